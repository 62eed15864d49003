"""experiments.paper: every item of the paper's tables and figures makes its runs (reusing shared ones) and
writes a report with the paper's figures beside ours."""

import hashlib
import json
from pathlib import Path

import pytest

from experiments import paper


def _fake_results(overrides: list[str]) -> dict:
    """Deterministic stand-in results of a pipeline run, different for different settings."""
    h = int(hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8], 16)
    x = 1.0 + (h % 1000) / 1000
    eta = next((float(o.split("=")[1]) for o in overrides if o.startswith("relax.step_size=")), 0.007)
    mse = "+dataset=pure_crystals" in overrides
    epochs = 0 if "finetune.epochs=0" in overrides else 2
    return {"loss": "mse" if mse else "dq",
            "avg_dq": {"initial": 9.0 * x, "constant_step": 6.0 * x, "fire": 8.0 * x, "bptt": 4.0 * x, "oracle": 3.0},
            "avg_dq_without_diverged": {"fire": 7.5 * x}, "diverged": {"fire": 2, "bptt": 0},
            "constant_step_grid": {"0.005": 6.5 * x, "0.007": 6.0 * x, "0.01": 7.0 * x},
            "step_size_initial": eta, "step_size_final": eta * 1.5, "force_l2": {"pretrained": 2.0, "bptt": 3.0 * x},
            "finetune": {"epochs": epochs},
            "bptt_selection": {"kept_epoch": epochs, "val_loss": [5.0 * x] + [4.5 * x] * epochs,
                               "test_loss": [4.0 * x] * epochs, "test_loss_start": 6.0 * x,
                               "train_loss": [4.2 * x] * epochs}}


@pytest.fixture
def fake_runs(monkeypatch):
    calls = []

    def run_training(overrides, run_dir: Path):
        calls.append((run_dir, list(overrides)))
        run_dir.mkdir(parents=True, exist_ok=True)
        res = _fake_results(overrides)
        (run_dir / "results.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(paper, "run_training", run_training)
    monkeypatch.setattr(paper, "_xla_flags", lambda sets: None)
    return calls


def test_list_names_every_item(capsys):
    assert paper.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("table1", "table2", "table3", "table4", "table5", "table6", "table7", "fig2a", "fig2b", "fig3",
                 "fig4", "fig5a", "fig5b", "fig6", "c1_noise", "c2_prox"):
        assert name in out and name in paper.ITEMS


def test_every_item_reports_the_papers_figures_beside_ours(tmp_path, fake_runs):
    out = tmp_path / "reports"
    args = ["all", "--preset", "tiny", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert paper.main(args) == 0
    # Every run made once, however many items share it; one pretrained base per dataset and model.
    dirs = [d for d, _ in fake_runs]
    assert len(dirs) == len(set(dirs))
    bases = sorted(d.parent.name for d in dirs if d.name == "base")
    assert bases == sorted(f"{d}-{m}" for d in paper.DATASETS for m in ("adapt", "resmlp"))
    by_name = {d.name: ov for d, ov in fake_runs if d.parent.name == "si_defects-adapt"}
    base_dir = tmp_path / "runs" / "tiny" / "si_defects-adapt" / "base"
    for name, ov in by_name.items():
        if name not in ("base", "random_init"):
            assert f"model.init_from={base_dir}" in ov, name  # every variant starts from the base's model
    assert "model.init_from" not in " ".join(by_name["random_init"]) and "pretrain.max_epochs=0" in by_name["random_init"]
    assert "finetune.variable_stop=true" in by_name["variable_stop"]
    assert "finetune.freeze_model=true" in by_name["frozen_mlip"]
    assert {"finetune.clip_norm=null", "finetune.prox_weight=0.01"} <= set(by_name["prox_only"])
    assert "+relax.step_head.output_init=random" in by_name["head_random"]
    assert {"finetune.noise=0.01", "finetune.noise_anneal=0.5"} <= set(by_name["noise_annealed"])
    t5 = by_name["learned_x6.5_momentum_anneal"]
    assert {"relax.momentum=0.05", "relax.anneal=0.99"} <= set(t5)
    assert f"relax.step_size={paper.T5_FACTOR * 0.007:.6g}" in t5  # 6.5 × the base's starting step
    assert "finetune.epochs=0" in by_name["t5_plain"] and "finetune.epochs=2" in by_name["learned_x6.5"]
    # The reports: the paper's figures and ours side by side, the runs and their commands, a PNG per figure.
    paper_numbers = {"table1": ["5.32", "2.73", "3.37"], "table2": ["4.32", "13.36"],
                     "table3": ["6.73", "5.25", "48.00", "21.17", "45.09"], "table4": ["8.24", "58.00", "13.21", "4.18"],
                     "table5": ["8.47", "1928.30", "1969.71"], "table6": ["2.92", "3.19"], "table7": ["12.38", "9.18"]}
    for name in paper.ITEMS:
        text = (out / f"{name}.md").read_text()
        assert text.startswith("# ") and f"`python -m experiments.paper {name}`" in text
        assert "## Runs" in text and "python -m bptt_jax.train" in text and "Machine:" in text
        for number in paper_numbers.get(name, ["Paper:"]):
            assert number in text, (name, number)
        if name.startswith("fig"):
            assert (out / f"{name}.png").stat().st_size > 1000
    base = _fake_results(by_name["base"])
    t1 = (out / "table1.md").read_text()
    assert f"| No BPTT (best constant step on the test grid) | 5.32 | {base['avg_dq']['constant_step']:.3f} |" in t1
    assert f"| Scalar step size (learned) | 2.73 | {base['avg_dq']['bptt']:.3f} | 2 |" in t1
    timing = (out / "TIMING.md").read_text()  # every run once, with the wall time recorded when it ran
    assert f"- 16 items use {len(dirs)} pipeline runs" in timing and timing.count("| `") == len(dirs)
    # A second call reuses every run; a run made with other settings is not silently reused.
    n = len(fake_runs)
    assert paper.main(["table1", "--preset", "tiny", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert len(fake_runs) == n
    assert paper.main(["table1", "--preset", "tiny", "--runs", str(tmp_path / "runs"), "--out", str(out),
                       "--set", "seed=3"]) == 1  # one line logged: delete the run to re-run


def test_overrides_merge_last_wins():
    assert paper.merge_overrides(["a=1", "+b.c=2", "a=3", "b.c=4"]) == ["a=3", "b.c=4"]


@pytest.mark.slow
def test_an_item_runs_for_real_at_tiny_size(tmp_path, cli_cache):
    """fig5a through the real pipeline: the variant loads the base's pretrained MLIP, the frozen one keeps it
    exactly, and the report carries the runs' figures. (Variable stopping and the other options run through the
    pipeline in test_pipeline's ablation test; every item's report against fake runs above.)"""
    runs, out = tmp_path / "runs", tmp_path / "reports"
    sets = ["--set", f"dataset.cache_dir={cli_cache / 'data'}", "--set", f"compile_cache_dir={cli_cache / 'xla'}"]
    assert paper.main(["fig5a", "--preset", "tiny", "--runs", str(runs), "--out", str(out)] + sets) == 0
    root = runs / "tiny" / "si_defects-adapt"
    base = json.loads((root / "base" / "results.json").read_text())
    frozen = json.loads((root / "frozen_mlip" / "results.json").read_text())
    assert frozen["force_l2"]["bptt"] == frozen["force_l2"]["pretrained"] == base["force_l2"]["pretrained"]
    assert frozen["step_size_initial"] == base["step_size_initial"] and frozen["finetune"]["freeze_model"]
    f5 = (out / "fig5a.md").read_text()
    assert f"{frozen['avg_dq']['bptt']:.3f}" in f5 and "`si_defects-adapt/frozen_mlip`" in f5
    assert (out / "fig5a.png").exists() and (root / "frozen_mlip" / "train.log").read_text().count("BPTT epoch") == 2
