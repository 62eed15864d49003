"""The Hydra entry point: config composition for every dataset and model, and a tiny real run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from bptt_jax.train import config_from_hydra

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.preset=tiny", "dataset.n=10", "dataset.n_test=4", "dataset.max_frames=8", "model.preset=tiny",
        "pretrain.max_epochs=2", "finetune.epochs=1", "eval.step_grid=[0.01,0.05]", "eval.force_control=true", "progress=false"]


@pytest.mark.parametrize("dataset", [None, "si_defects", "catalysts", "pure_crystals"])
@pytest.mark.parametrize("model", ["adapt", "resmlp"])
def test_config_composes(dataset, model):
    overrides = ([f"+dataset={dataset}"] if dataset else []) + [f"model={model}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run = config_from_hydra(cfg, "/tmp/x")
    assert run.data.name == (dataset or "si_defects")
    assert run.model.name == model
    assert run.relax.max_frames == (200 if dataset == "catalysts" else 75)
    assert run.data.loss == ("mse" if dataset == "pure_crystals" else "dq")
    assert run.finetune.epochs == 5 and run.data.n_test == 100


def _train(tmp_path, cache, *overrides, multirun=False):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    cmd = [sys.executable, "-m", "bptt_jax.train"] + (["-m"] if multirun else []) + [
        f"dataset.cache_dir={cache / 'data'}", f"compile_cache_dir={cache / 'xla'}"] + TINY + list(overrides)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_end_to_end_run_and_resume(tmp_path, cli_cache):
    run_dir = tmp_path / "run"
    r = _train(tmp_path, cli_cache, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| BPTT-tuned (epoch " in r.stdout and "| oracle forces, constant step" in r.stdout
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("dataset", "model", "n_test", "avg_dq", "constant_step_grid", "reduction_pct", "force_l2", "adwt",
                "diverged", "skipped", "step_size_final", "wall_s", "basins", "avg_dq_without_diverged", "split",
                "bptt_selection", "oracle", "force_control", "validation_step_grid"):
        assert key in res, key
    assert set(res["avg_dq"]) == {"initial", "constant_step", "fire", "bptt", "oracle", "force_control"}
    assert all(v is not None for v in res["avg_dq"].values())
    # The oracle row (Tersoff's own forces) and the equal-compute control (force epochs for BPTT's evaluations).
    assert set(res["oracle"]["grid"]) == {"0.01", "0.05"}
    assert res["force_control"]["epochs"] >= 1 and res["force_control"]["bptt_structure_frames"] > 0
    assert res["split"]["test_records"] == 4 and res["split"]["bptt_validation"] == 1
    assert set(res["basins"]) >= {"threshold_dq", "initial", "constant_step", "bptt", "oracle", "force_control"}
    assert res["n_test"] == 4 and set(res["constant_step_grid"]) == {"0.01", "0.05"}
    assert res["avg_dq"]["constant_step"] == min(res["constant_step_grid"].values())
    assert set(res["wall_s"]) >= {"data", "pretrain", "baselines", "bptt", "evaluate", "force_control"}
    for name in ("loss_per_epoch.png", "per_structure.png", "displacement_errors.png", "config_resolved.yaml",
                 "metrics.csv"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints" / "pretrained" / "0").is_dir()
    assert (run_dir / "checkpoints" / "bptt" / "1").is_dir()
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows if r["stage"] == "bptt"] == ["1"]
    # The default cpu_devices=2: the CPU is split into 2 XLA devices and BPTT runs data parallel over them.
    log_text = (run_dir / "train.log").read_text()
    assert "BPTT data parallel over 2 devices" in log_text and "test relaxations split over 2 local devices" in log_text
    # compile_cache_dir: the compiled programs were written to the persistent cache (the resume below reads them).
    assert f"persistent compilation cache: {cli_cache / 'xla'}" in log_text
    assert len(list((cli_cache / "xla").iterdir())) > 10

    # python -m bptt_jax.evaluate on the saved run: every figure of its results.json again, bit for bit (the same
    # data, models, relaxations and XLA settings), except the equal-compute control, which trains.
    out = tmp_path / "evaluation"
    r = subprocess.run([sys.executable, "-m", "bptt_jax.evaluate", str(run_dir), "progress=false",
                        f"compile_cache_dir={cli_cache / 'xla'}", "-o", str(out)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| BPTT-tuned (epoch " in r.stdout and (out / "results.md").read_text().strip() in r.stdout
    evaluated = json.loads((out / "results.json").read_text())
    no_control = lambda d: {k: v for k, v in d.items() if k != "force_control"}  # noqa: E731
    for key in ("avg_dq", "avg_dq_without_diverged", "basins", "diverged", "adwt", "frames", "force_l2", "force_mse",
                "per_structure", "constant_step_grid", "validation_step_grid", "constant_step_best", "reduction_pct",
                "reduction_vs_fire_pct", "oracle", "split", "n_test", "step_size_final", "bptt_selection"):
        assert (no_control(evaluated[key]) if isinstance(evaluated[key], dict) else evaluated[key]) == (
            no_control(res[key]) if isinstance(res[key], dict) else res[key]), key
    assert evaluated["evaluated"] == {"run": str(run_dir), "checkpoint": "final",
                                      "epoch": res["bptt_selection"]["kept_epoch"], "overrides": [
                                          "progress=false", f"compile_cache_dir={cli_cache / 'xla'}"]}
    for name in ("per_structure.png", "displacement_errors.png", "run_config.json"):
        assert (out / name).exists(), name

    # Resume with a longer budget: epoch 1 is kept, epoch 2 is added, pretraining is not repeated.
    r = _train(tmp_path, cli_cache, f"hydra.run.dir={run_dir}", "train.resume=true", "finetune.epochs=2",
               "eval.oracle=false", "eval.force_control=false")
    assert r.returncode == 0, r.stderr[-3000:]
    rows2 = _rows(run_dir)
    bptt_rows = [r for r in rows2 if r["stage"] == "bptt"]
    assert [r["epoch"] for r in bptt_rows] == ["1", "2"]
    assert bptt_rows[0] == [r for r in rows if r["stage"] == "bptt"][0]
    assert [r for r in rows2 if r["stage"] == "pretrain"] == [r for r in rows if r["stage"] == "pretrain"]
    assert (run_dir / "checkpoints" / "bptt" / "2").is_dir()


@pytest.mark.slow
def test_multirun_sweep_writes_a_summary(tmp_path, cli_cache):
    sweep = tmp_path / "sweep"
    r = _train(tmp_path, cli_cache, "relax.step_size=0.02,0.05", f"hydra.sweep.dir={sweep}", "eval.fire=false",
               "eval.oracle=false", "eval.force_control=false",
               "cpu_devices=1", "pretrain.max_epochs=1", "eval.step_grid=[0.05]", multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(runs) == 2
    assert not any("data parallel" in (p / "train.log").read_text() for p in runs)  # cpu_devices=1: one device
    inits = sorted(json.loads((p / "results.json").read_text())["step_size_initial"] for p in runs)
    assert inits == [0.02, 0.05]
    summary = (sweep / "summary.md").read_text()
    assert summary.count("\n") == 4 and "relax.step_size=0.02" in summary


# The tiny run (after TINY: the later value wins) with room to be killed in: four pretraining and four BPTT epochs,
# no FIRE, oracle or control.
KILLABLE = ["pretrain.max_epochs=4", "finetune.epochs=4", "eval.fire=false", "eval.oracle=false",
            "eval.force_control=false", "plots=false"]
WALL_TIMES = ("wall_s", "seconds_per_bptt_step", "seconds")  # results.json's and metrics.csv's


def _steps(path):
    """The finished checkpoint steps in ``path`` (orbax's tmp folders of unfinished saves are not)."""
    return sorted(int(p.name) for p in path.glob("*") if p.name.isdigit()) if path.exists() else []


def _kill_when(tmp_path, cache, ready, *overrides, timeout=600):
    """Run the CLI in a session of its own and SIGKILL it, data generation workers included, once ``ready()``."""
    import signal
    import time

    cmd = [sys.executable, "-m", "bptt_jax.train", f"compile_cache_dir={cache / 'xla'}", *TINY, *KILLABLE, *overrides]
    with open(tmp_path / "killed.out", "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                env=dict(os.environ, HYDRA_FULL_ERROR="0"))
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"ended before the kill:\n{(tmp_path / 'killed.out').read_text()[-3000:]}"
            assert time.time() < deadline, "no point to kill the run at"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _same_run(run_dir, ref_dir):
    """Two runs of the same seed: the same results.json and metrics.csv but for wall times, and bit for bit the
    same pretrained and fine-tuned parameters of every epoch."""
    import jax
    import numpy as np

    from bptt_jax import load_run

    res, ref = (json.loads((d / "results.json").read_text()) for d in (run_dir, ref_dir))
    untimed = lambda d: {k: v for k, v in d.items() if k not in WALL_TIMES}  # noqa: E731
    assert untimed(res) == untimed(ref)
    assert [untimed(r) for r in _rows(run_dir)] == [untimed(r) for r in _rows(ref_dir)]
    epochs = _steps(run_dir / "checkpoints" / "bptt")
    assert epochs == _steps(ref_dir / "checkpoints" / "bptt") and epochs
    for checkpoint in ("pretrained", "final", *epochs):
        jax.tree_util.tree_map(np.testing.assert_array_equal, load_run(run_dir, checkpoint).params,
                               load_run(ref_dir, checkpoint).params)


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_same_results(tmp_path, cli_cache):
    """The tiny run (two CPU devices) killed with SIGKILL in data generation, pretraining, the baselines and BPTT,
    resumed with train.resume=true each time, the newest BPTT checkpoint damaged before the last resume (and an
    interrupted save's tmp folder left beside it): it ends with the uninterrupted run's results.json, metrics and
    parameters, bit for bit. The uninterrupted run is the killed one's repeat of the same seed, too."""
    ref_dir, run_dir, data = tmp_path / "ref", tmp_path / "run", tmp_path / "data"
    r = _train(tmp_path, cli_cache, *KILLABLE, f"hydra.run.dir={ref_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    dataset, ckpt = data / "si_defects-tiny-n10-s0", run_dir / "checkpoints"
    run = [f"dataset.cache_dir={data}", f"hydra.run.dir={run_dir}"]

    _kill_when(tmp_path, cli_cache, lambda: any(dataset.glob("*.extxyz")), *run)
    assert not json.loads((dataset / "manifest.json").read_text())["complete"]  # killed while generating
    _kill_when(tmp_path, cli_cache, lambda: _steps(ckpt / "pretraining"), *run, "train.resume=true")
    assert not (ckpt / "pretrained").exists()  # killed while pretraining
    _kill_when(tmp_path, cli_cache, lambda: _steps(ckpt / "pretrained"), *run, "train.resume=true")
    assert not _steps(ckpt / "bptt")  # killed between pretraining and BPTT: the baselines
    _kill_when(tmp_path, cli_cache, lambda: len(_steps(ckpt / "bptt")) >= 2, *run, "train.resume=true")
    last = _steps(ckpt / "bptt")[-1]
    assert last < 4  # killed while fine-tuning
    damaged = max((p for p in (ckpt / "bptt" / str(last)).rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    unfinished = ckpt / "bptt" / f"{last + 1}.orbax-checkpoint-tmp-1796316200123456"
    unfinished.mkdir()
    (unfinished / "_CHECKPOINT_METADATA").write_text("{")
    r = _train(tmp_path, cli_cache, *KILLABLE, *run, "train.resume=true")
    assert r.returncode == 0, r.stderr[-3000:]

    log_text = (run_dir / "train.log").read_text()
    assert "resumed pretraining after" in log_text and "resumed BPTT from epoch" in log_text
    assert f"damaged checkpoint {ckpt / 'bptt' / str(last)} (" in log_text and f"using step {last - 1}" in log_text
    assert (ckpt / "damaged" / f"bptt-{last}").is_dir() and not unfinished.exists()
    _same_run(run_dir, ref_dir)
    # The data set the killed generation finished is the one generated in one go; the killed writers' temporary
    # files are gone.
    ref_data = cli_cache / "data" / dataset.name
    names = sorted(p.name for p in ref_data.glob("*.extxyz"))
    assert len(names) == 10 and sorted(p.name for p in dataset.glob("*.extxyz")) == names
    # Not byte for byte: ASE's BFGS in the generator can differ in the last bits between processes (numpy's SIMD
    # sums depend on memory alignment; seen under a loaded full suite: energies in the 16th digit).
    from ase.io import read

    for name in names:
        got, want = read(dataset / name, index=":"), read(ref_data / name, index=":")
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.positions, w.positions, rtol=0, atol=1e-6)
            np.testing.assert_allclose(g.get_forces(), w.get_forces(), rtol=0, atol=1e-5)
    assert not list(dataset.glob("*.tmp*"))


def test_bad_dataset_path_is_one_line(tmp_path, cli_cache):
    r = _train(tmp_path, cli_cache, f"dataset.path={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "missing" in (r.stderr + r.stdout)


def test_seed_sweep_summary_has_mean_and_std(tmp_path):
    from bptt_jax.train import summarize_sweep

    for i, (const, bptt) in enumerate([(6.0, 4.0), (6.2, 4.4), (5.8, 4.2)]):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- seed={i}\n")
        res = {"step_size_initial": 0.01, "step_size_final": 0.012, "bptt_selection": {"kept_epoch": 5},
               "avg_dq": {"initial": 10.0, "constant_step": const, "fire": None, "oracle": 3.0,
                          "force_control": const - 0.1, "bptt": bptt},
               "reduction_pct": 100 * (const - bptt) / const, "basins": {"constant_step": 10, "bptt": 20 + i}}
        (d / "results.json").write_text(json.dumps(res))
    table = summarize_sweep(tmp_path)
    lines = table.splitlines()
    assert len(lines) == 6 and lines[2].startswith("| seed=0 |") and "| 10/20 |" in lines[2]
    mean = lines[-1]
    assert mean.startswith("| mean ± std (3 seeds) |")
    assert "| 6 ± 0.2 |" in mean and "| 4.2 ± 0.2 |" in mean and "| - |" in mean  # FIRE missing: no statistic


@pytest.mark.slow
def test_resmlp_input_norm_from_the_cli(tmp_path, cli_cache):
    """`+model.overrides.input_norm=true` reaches the ResMLP, whose input statistics are fitted on the
    training frames before pretraining and saved with the pretrained checkpoint."""
    import jax
    import numpy as np

    from bptt_jax.models import build_model
    from bptt_jax.pipeline import restore_checkpoint

    run_dir = tmp_path / "run"
    r = _train(tmp_path, cli_cache, f"hydra.run.dir={run_dir}", "model=resmlp",
               "model.preset=small", "+model.overrides.input_norm=true", "+model.overrides.coords=periodic",
               "finetune.epochs=0", "eval.fire=false",
               "eval.oracle=false", "eval.force_control=false")
    assert r.returncode == 0, r.stderr[-3000:]
    model = build_model("resmlp", "small", input_norm=True, coords="periodic")  # 64-atom tiny Si cells
    cfg = json.loads((run_dir / "run_config.json").read_text())
    assert cfg["model"]["overrides"] == {"input_norm": True, "coords": "periodic"}
    like = jax.tree_util.tree_map(np.asarray, _resmlp_like(model))
    params, _, _ = restore_checkpoint(run_dir / "checkpoints" / "pretrained", like)
    std = np.asarray(params["input_stats"]["std"])
    mean = np.asarray(params["input_stats"]["mean"])
    assert (std > 0.01).sum() > 10 and np.abs(mean).max() > 0  # fitted, not the initial zeros and ones


def _resmlp_like(model):
    import jax

    from conftest import rattled_si
    from bptt_jax.structures import Batch

    start, target = rattled_si(seed=0)
    return model.init(jax.random.PRNGKey(0), Batch.from_structures([start], [target], batch_size=1))
