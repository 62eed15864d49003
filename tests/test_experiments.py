"""The experiments: the gradient-mode study (one real cost measurement, and the report), the seed-study
headline, the FIRE divergence diagnosis and the ResMLP pretraining study."""

import json

import numpy as np
import pytest

from experiments import grad_modes


@pytest.mark.slow
def test_cost_child_runs_the_stated_frames():
    # A real (small) measurement: 64-atom cells, 3 frames, one structure. The row must say what ran.
    row = grad_modes.cost_child("truncated", frames=3, atoms=64, batch=1, repeats=1)
    assert "error" not in row
    assert row["mean_frames"] == 3 and row["diverged"] == 0
    assert row["seconds_per_step"] > 0 and row["peak_rss_mb"] > row["base_rss_mb"] > 0
    assert row["window"] == grad_modes.WINDOW and row["frames_per_s"] == pytest.approx(3 / row["seconds_per_step"])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_tables(tmp_path, monkeypatch):
    out = tmp_path / "results" / "grad_modes"
    out.mkdir(parents=True)
    monkeypatch.setattr(grad_modes, "OUT", out)
    monkeypatch.setattr(grad_modes, "ROOT", tmp_path)

    def cost(mode, sec, rss, **kw):
        return {"part": "cost", "mode": mode, "frames": 75, "atoms": 64, "batch": 4, "seconds_per_step": sec,
                "frames_per_s": 300 / sec, "first_step_s": 9.0, "xla_temp_mb": 10.0, "loadavg_1m": 1.0,
                "peak_rss_mb": rss, "base_rss_mb": 600.0, "mean_frames": 75.0, "diverged": 0, **kw}

    _write(out / "cost.jsonl", [
        cost("full", 9.9, 9999.0),  # superseded by the later row of the same cell
        cost("full", 2.0, 4000.0), cost("remat", 3.0, 1000.0), cost("truncated", 0.5, 2000.0),
        cost("implicit", 1.0, 800.0, adjoint_residual=0.25),
        {"part": "cost", "mode": "guided", "frames": 75, "atoms": 64, "batch": 4, "error": "not run: too big"}])
    _write(out / "cosine.jsonl", [{"part": "cosine", "mode": m, "cosine_mean": c, "cosine_min": c - 0.1,
                                   "rel_error_mean": 1 - c, "batches": 3, "structures": 20}
                                  for m, c in (("full", 1.0), ("truncated", 0.8))]
           + [{"part": "cosine", "mode": m, "cosine_mean": c, "cosine_min": c, "rel_error_mean": 1 - c, "batches": 2,
               "structures": 9, "pretrained": "runs/base"}
              for m, c in (("first_order-w0-k32", 0.95), ("full", 1.0), ("truncated-w25", 0.9))])
    _write(out / "quality.jsonl", [
        {"part": "quality", "mode": "full", "avg_dq": 5.0, "constant_step": 7.0, "initial": 10.0,
         "reduction_pct": 28.6, "basin_threshold": 3.0, "in_basin": 9, "in_basin_constant_step": 2, "n_test": 100,
         "bptt_s": 100.0, "seconds_per_bptt_step": 2.5, "epochs": 5},
        {"part": "quality", "mode": "implicit", "error": "boom"}])

    grad_modes.run_report(None)
    text = (tmp_path / "results" / "grad_modes.md").read_text()
    lines = text.splitlines()
    full = next(line for line in lines if line.startswith("| 64 | 75 | full |"))
    assert "| 2.00 |" in full and "| 4000 |" in full and full.endswith("| 75 |")
    assert any(line.startswith("| 64 | 75 | implicit | 1.00 |") and "| 0.25 |" in line for line in lines)
    assert any(line.startswith("| 64 | 75 | guided | not run: too big") for line in lines)
    # ratios to full: remat 3.0/2.0 s and 1000/4000 MB; truncated 0.5/2.0 s and 2000/4000 MB
    ratio = next(line for line in lines if line.startswith("| 64 | 75 | 1.50 / 0.25 |"))
    assert "| 0.25 / 0.50 |" in ratio and "| 0.50 / 0.20 |" in ratio and ratio.endswith("| – |")
    assert "| truncated | 0.8000 | 0.7000 | 0.200 |" in text
    # One table per pretrained model (rows without the field: runs/large), modes in GRAD_MODES order.
    assert "(9 converged test structures, 2 batches, pretrained model `runs/base`)" in text
    base = text[text.index("pretrained model `runs/base`"):].splitlines()
    table = [line.split(" | ")[0] for line in base if line.startswith("| ") and "cosine" not in line
             and "---" not in line][:3]
    assert table == ["| full", "| truncated-w25", "| first_order-w0-k32"], table
    assert "| first_order-w0-k32 | 0.9500 | 0.9500 | 0.050 |" in text
    assert "| full | 5.000 | 28.6% | 9 | 2.50 | 100 |" in text and "| implicit | failed: boom" in text


def test_seed_spread_section(tmp_path):
    def row(variant, seed, dq, sps):
        return {"part": "seeds", "study": "base", "variant": variant, "seed": seed, "eta": 0.005, "avg_dq": dq,
                "diverged": seed,
                "pretrained": "runs/base", "epochs": 5, "n_test": 100, "constant_step": 7.4,
                "seconds_per_bptt_step": sps}

    path = tmp_path / "seeds.jsonl"
    _write(path, [row("full", 0, 9.9, 2.0), row("full", 0, 6.0, 2.0), row("full", 1, 5.0, 2.2),
                  row("truncated-w10", 0, 6.6, 0.5), row("truncated-w10", 1, 5.0, 0.7),
                  {"part": "seeds", "study": "base", "variant": "truncated-w25", "seed": 0, "mode": "truncated-w25",
                   "error": "boom"}])
    lines = grad_modes.seeds_section(path)
    assert lines[0].startswith("## Seed spread") and "fixed step 0.005" in lines[0]
    full = next(line for line in lines if line.startswith("| full |"))
    assert "| 0, 1 | 6.000 / 5.000 | 5.500 ± 0.707 | – | – | 0 / 1 | 2.10 |" in full  # the later seed-0 row counts
    trunc = next(line for line in lines if line.startswith("| truncated-w10 |"))
    assert "| +10.0% / +0.0% | +5.0% | 0 / 1 | 0.60 |" in trunc
    assert not any("truncated-w25" in line for line in lines)  # failed runs have no Avg Dq to show
    # A study without its own full runs compares with the full runs of the same pretrained model and step.
    _write(path, [row("full", 0, 6.0, 2.0), dict(row("first_order-w0-k32", 0, 6.3, 1.0), study="chunked")])
    lines = grad_modes.seeds_section(path)
    start = next(i for i, line in enumerate(lines) if "study `chunked`" in line)
    assert "another study" in lines[start + 2]
    assert any(line.startswith("| first_order-w0-k32 |") and "| +5.0% |" in line for line in lines[start:])


def test_headline_report_gives_mean_and_std_over_seeds(tmp_path):
    from experiments.headline import load_runs, report

    def fake(seed, const, bptt, pre_epochs=16):
        d = tmp_path / ("doubled" if pre_epochs == 32 else "seeds") / str(seed)
        d.mkdir(parents=True)
        methods = {"constant_step": const, "fire": 9.0, "oracle": 3.0, "force_control": const - 0.1, "bptt": bptt}
        res = {"dataset": "si_defects", "model": "adapt", "loss": "dq", "seed": seed, "n_train": 119, "n_val": 21,
               "split": {"test_used": 100, "test_records": 100},
               "avg_dq": {"initial": 10.0, **methods}, "avg_dq_without_diverged": methods,
               "diverged": {k: 0 for k in methods}, "basins": {"threshold_dq": 3.0, "initial": 0,
                                                               **{k: 10 for k in methods}},
               "reduction_pct": 100 * (const - bptt) / const, "reduction_vs_force_control_pct": 20.0,
               "reduction_vs_fire_pct": 50.0, "bptt_selection": {"kept_epoch": 5, "val_loss": [7.0, 6.0]},
               "step_size_initial": 0.005, "step_size_final": 0.01,
               "force_l2": {"pretrained": 5.0, "bptt": 9.0, "force_control": 4.9},
               "pretrain_epochs": pre_epochs, "pretrain_stop": "max_epochs", "wall_s": {"pretrain": 60.0},
               # one structure no method relaxes, as the crystals' phase-changing reference
               "per_structure": {"constant_step": [1.0, 2.0, 3.0, 100.0], "bptt": [0.5, 1.0, 3.5, 100.0]}}
        (d / "results.json").write_text(json.dumps(res))

    for seed, const, bptt in [(0, 6.0, 4.0), (1, 7.0, 5.0), (2, 6.5, 4.5)]:
        fake(seed, const, bptt)
        fake(seed, const * 0.98, bptt, pre_epochs=32)
    text = report(load_runs(tmp_path / "seeds"), load_runs(tmp_path / "doubled"), "cmd")
    assert "| best constant step (test grid) | 6.500 ± 0.500 | 6.000 / 7.000 / 6.500 |" in text
    assert "| BPTT-tuned | 4.500 ± 0.500 |" in text
    assert "| 0 | 16 | 6.000 | 32 | 5.880 | -2.0% |" in text
    assert "(median loss; structures improved): 2.5 → 2.25, 2 of 4; 2.5 → 2.25, 2 of 4;" in text


def test_fire_divergence_classifies_what_moved():
    from experiments.fire_divergence import classify, net_force

    rng = np.random.default_rng(0)
    start = rng.normal(size=(6, 3)) * 3
    free = np.array([False, True, True, True, True, True])
    ads = np.array([False, False, False, False, True, True])
    slid = start.copy()
    slid[1:4] += [4.0, 1.0, 0.0]  # the free metal atoms slide together
    assert classify(start, slid, free, ads)["kind"] == "slab translation"
    left = start.copy()
    left[4:] += [0.0, 0.0, 12.0]  # the adsorbate flies off
    out = classify(start, left, free, ads)
    assert out["kind"] == "adsorbate" and out["adsorbate_share"] == pytest.approx(1.0)
    shaken = start.copy()
    shaken[1:4] += rng.normal(size=(3, 3))
    shaken[1:4] -= shaken[1:4].mean(0) - start[1:4].mean(0)  # no net shift of the slab
    assert classify(start, shaken, free, ads)["kind"] == "slab distortion"
    F = np.zeros((6, 3))
    F[1:] = [1.0, 0.0, 0.0]
    assert net_force(F, free) == pytest.approx(1.0)
    F[0] = [-50.0, 0.0, 0.0]  # a fixed atom's force does not count
    assert net_force(F, free) == pytest.approx(1.0)


def test_exact_fire_follows_the_stop_rule_and_flags_divergence():
    from ase.calculators.calculator import Calculator, all_changes
    from ase.calculators.emt import EMT
    from ase.build import fcc111

    from bptt_jax.structures import Structure
    from experiments.fire_divergence import exact_fire

    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    fixed = slab.positions[:, 2] < slab.positions[:, 2].min() + 0.5
    slab.positions[~fixed] += np.random.default_rng(1).normal(0, 0.1, (int((~fixed).sum()), 3))
    s = Structure.from_atoms(slab)
    s = Structure(s.positions, s.numbers, s.cell, s.pbc, fixed=fixed)
    r = exact_fire(s, EMT(), max_frames=200, tol=1e-3, diverge_distance=5.0)
    assert r["converged"] and not r["diverged"] and 1 < r["frames"] < 200
    assert np.allclose(r["positions"][fixed], s.positions[fixed])

    class Push(Calculator):  # a constant force: FIRE accelerates without bound
        implemented_properties = ["forces", "energy"]

        def calculate(self, atoms=None, properties=("forces",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            self.results = {"forces": np.tile([1.0, 0.0, 0.0], (len(atoms), 1)), "energy": 0.0}

    r = exact_fire(s, Push(), max_frames=200, tol=1e-3, diverge_distance=5.0)
    assert r["diverged"] and not r["converged"] and r["frames"] < 200


def test_resmlp_pretrain_study_runs_and_reports(tmp_path):
    from experiments.resmlp_pretrain import report, study

    variants = [("plain", {}, {"max_epochs": 2}), ("input_norm", {"input_norm": True, "coords": "periodic"},
                                                   {"max_epochs": 2})]
    rows = study("si_defects", variants, memorise_epochs=2,
                 data_overrides={"preset": "tiny", "n_test": 2, "cache_dir": str(tmp_path), "workers": 1})
    assert [r["variant"] for r in rows] == ["plain", "input_norm"]
    for r in rows:
        assert r["epochs"] == 2 and r["zero_mse"] > 0 and r["n_frames"] > 0
        assert all(np.isfinite(r[k]) for k in ("train_mse", "best_val_mse", "test_mse", "memorise_mse"))
    assert rows[0]["test_mse"] != rows[1]["test_mse"]  # the option reaches the model
    text = report(rows, "si_defects", "cmd", 1.0)
    assert "| plain |" in text and "| input_norm |" in text and "2 epochs" in text
