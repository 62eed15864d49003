"""Smoke test of the benchmark driver (no timing assertions) and parity of the PyTorch reference model."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
REQUIRED = ("name", "impl", "mode", "batch", "atoms", "frames", "d_model", "layers", "seconds_per_step",
            "frames_per_s", "peak_rss_mb")


def test_quick_run_emits_json_lines(tmp_path):
    out = tmp_path / "bench.jsonl"
    # The JAX case is the data-parallel one: its process gets 2 forced CPU devices and a sharded batch.
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "rollout_jax_n8_dp2", "bptt_torch_full_n8",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == (["bptt_torch_full_n8"] if HAS_TORCH else []) + ["rollout_jax_n8_dp2"]
    for r in rows:
        assert not r.get("error")
        for key in REQUIRED:
            assert key in r and r[key] is not None, (r["name"], key)
        assert r["impl"] in ("jax", "torch") and r["frames"] == 5 and r["batch"] == 2 and r["atoms"] == 8
        assert r["seconds_per_step"] > 0 and r["peak_rss_mb"] >= r["steady_peak_rss_mb"] > 0
    jax_row = rows[-1]
    assert jax_row["mode"] == "rollout" and jax_row["flops"] > 0
    assert jax_row["devices"] == 2 and "--xla_force_host_platform_device_count=2" in jax_row["env"]["XLA_FLAGS"]
    if HAS_TORCH:
        assert rows[0]["mode"] == "full" and rows[0]["n_params"] == jax_row["n_params"]
    # The file holds the same rows; the markdown tables are printed and written next to it.
    assert [json.loads(line)["name"] for line in out.read_text().splitlines()] == [r["name"] for r in rows]
    assert "| rollout_jax_n8_dp2 | jax | rollout |" in proc.stdout
    assert out.with_suffix(".md").exists()


def test_case_selection():
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import build_cases, select

    names = [c["name"] for c in build_cases(quick=False)]
    for required in ("rollout_jax_n64", "rollout_torch_n216", "bptt_jax_full_n64", "bptt_jax_remat_n216",
                     "bptt_torch_full_n64", "relax100_ase_bench", "relax100_batched_bench", "matmul_jax",
                     "bptt_jax_remat_n64_dp2", "rollout_jax_n216_dp2"):
        assert required in names
    assert [c["name"] for c in select(build_cases(quick=True), ["bptt_jax_full"])] == ["bptt_jax_full_n8",
                                                                                    "bptt_jax_full_n8_dp2"]
    assert {c["name"] for c in select(build_cases(quick=True), ["rollout"])} == {"rollout_jax_n8",
                                                                                 "rollout_torch_n8",
                                                                                 "rollout_jax_n8_dp2"}
    assert {c["name"] for c in select(build_cases(quick=True), ["*_dp2"])} == {
        "rollout_jax_n8_dp2", "bptt_jax_full_n8_dp2", "bptt_jax_remat_n8_dp2", "bptt_jax_first_order_n8_dp2",
        "relax4_batched_tiny_dp2"}
    assert all(c["devices"] == 2 for c in select(build_cases(quick=True), ["*_dp2"]))
    # A mode's case carries its settings into the RelaxConfig it times (and only into its own mode's config).
    from benchmarks.cases import _relax_config

    fo = next(c for c in build_cases(quick=False) if c["name"] == "bptt_jax_first_order_n64")
    cfg = _relax_config(fo, "first_order", 75)
    assert (cfg.grad_mode, cfg.window_frames, cfg.sample_frames, cfg.tol) == ("first_order", 0, 32, 0.0)
    assert _relax_config(fo, "full", 1).window is None


def test_derived_ratios_median_and_fastest_repeat():
    """JAX-vs-PyTorch ratios are derived from the medians and, separately, from the fastest repeats."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import derive, tables

    def row(name, impl, mode, med, fastest, rss):
        return dict(name=name, impl=impl, mode=mode, batch=8, atoms=64, frames=75, preset="bench", n_params=10,
                    seconds_per_step=med, seconds_min=fastest, peak_rss_mb=rss, flops=2e11 if impl == "jax" else None)

    rows = [dict(name="matmul_jax", impl="jax", mode="matmul", peak_flops_per_s=2e11, seconds_per_step=0.1,
                 peak_rss_mb=1),
            row("bptt_jax_remat_n64", "jax", "remat", 2.8, 2.7, 1000.0),
            row("bptt_torch_full_n64", "torch", "full", 3.0, 2.0, 2000.0)]
    assert derive(rows) == []
    jax_row = rows[1]
    assert jax_row["torch_reference"] == "bptt_torch_full_n64"
    assert jax_row["jax_speedup_vs_torch"] == pytest.approx(3.0 / 2.8)
    assert jax_row["jax_speedup_vs_torch_min"] == pytest.approx(2.0 / 2.7)
    assert jax_row["jax_over_torch_peak_rss"] == pytest.approx(0.5)
    assert "jax_speedup_vs_torch_min" not in rows[2]  # remat vs full: not a like-for-like pair for the PyTorch row
    # A data-parallel JAX row is compared with the one-device PyTorch row, which keeps its own pair's ratio.
    rows += [row("bptt_jax_full_n64", "jax", "full", 2.5, 2.4, 4000.0),
             dict(row("bptt_jax_full_n64_dp2", "jax", "full", 2.0, 1.9, 4100.0), devices=2)]
    derive(rows)
    assert rows[3]["jax_speedup_vs_torch"] == pytest.approx(3.0 / 2.5)
    assert rows[4]["torch_reference"] == "bptt_torch_full_n64" and rows[4]["jax_speedup_vs_torch"] == pytest.approx(1.5)
    assert rows[2]["jax_speedup_vs_torch"] == pytest.approx(3.0 / 2.5)
    # Batched relaxations against the ASE loop of the same preset; the ASE row keeps the one-device ratio.
    relax = [dict(name=f"relax100_{kind}_small{suffix}", impl="jax", mode="rollout", preset="small",
                  structures_per_s=sps, seconds_per_step=100 / sps, peak_rss_mb=500.0, devices=dev)
             for kind, suffix, sps, dev in (("ase", "", 5.0, None), ("batched", "", 40.0, None),
                                            ("batched", "_dp2", 50.0, 2))]
    derive(rows[:1] + relax)
    assert [r["batched_speedup_vs_ase"] for r in relax] == pytest.approx([8.0, 8.0, 10.0])
    md = tables(rows)
    assert "| bptt_jax_remat_n64 | remat | 64 | 2.8 | bptt_torch_full_n64 | 3 | 0.933 | 1.07x | 2.7 | 2 | 0.74x |" in md


@pytest.mark.skipif(not HAS_TORCH, reason="torch (extra 'bench') not installed")
def test_torch_reference_matches_flax():
    """The PyTorch ADAPT with the flax parameters gives the same forces, loss and gradient norm."""
    import jax
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks import torch_adapt as ta
    from benchmarks.data import si_structures
    from bptt_jax.bptt import BPTT, OptimConfig, count_params
    from bptt_jax.models import PRESETS, build_model
    from bptt_jax.relax import RelaxConfig
    from bptt_jax.structures import Batch, Structure

    torch.set_num_threads(1)
    data = si_structures(2, 8, seed=3)
    structs = [Structure(data["positions"][i], data["numbers"][i], data["cell"][i], data["pbc"][i])
               for i in range(2)]
    batch = Batch.from_structures(structs, list(data["target"]), n_atoms=8)
    cfg = PRESETS["adapt"]["tiny"]
    model = build_model("adapt", "tiny")
    variables = model.init(jax.random.PRNGKey(0), batch)
    tmodel = ta.TorchADAPT(cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["ffn_dim"], cfg["species_dim"])
    assert ta.count_params(tmodel) == count_params(variables)
    ta.load_flax_params(tmodel, jax.tree_util.tree_map(np.asarray, variables))
    tb = ta.TorchBatch(data)
    np.testing.assert_allclose(tmodel(tb.positions, tb.numbers, tb.fixed, tb.atom_mask).detach().numpy(),
                               np.asarray(model.apply(variables, batch)), atol=2e-5)

    bptt = BPTT(model, RelaxConfig(max_frames=4, tol=0.0, step_size=0.01, skip_converged=False), OptimConfig())
    loss_j, grads = jax.value_and_grad(lambda p: bptt.loss(p, batch)[0])({"model": variables})
    loss_t = ta.dq(ta.rollout(tmodel, tb, 0.01, 4), tb).mean()
    loss_t.backward()
    gn_j = float(np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree_util.tree_leaves(grads))))
    gn_t = float(torch.sqrt(sum((p.grad ** 2).sum() for p in tmodel.parameters())))
    assert float(loss_t.detach()) == pytest.approx(float(loss_j), rel=1e-5)
    assert gn_t == pytest.approx(gn_j, rel=1e-4)


def test_first_order_settings_probe(capsys, monkeypatch):
    """benchmarks.first_order times first_order steps under several chunk sizes (tiny sizes here): one JSON line
    per setting, and the same relaxation (the loss of the last step) whatever the chunk."""
    import os

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the probe appends its flags; restored after
    sys.path.insert(0, str(ROOT))
    from benchmarks import first_order

    first_order.main(["--atoms", "8", "--frames", "6", "--batch", "2", "--preset", "tiny", "--samples", "3",
                      "--chunks", "0", "2", "--repeats", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["mode"], r.get("sample_chunk")) for r in rows] == [("first_order", 0), ("first_order", 2),
                                                                  ("truncated", None)]
    assert all(r["seconds_min"] > 0 and r["xla_temp_mb"] >= 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
