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
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "rollout_jax_n8", "bptt_torch_full_n8",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["rollout_jax_n8"] + (["bptt_torch_full_n8"] if HAS_TORCH else [])
    for r in rows:
        assert not r.get("error")
        for key in REQUIRED:
            assert key in r and r[key] is not None, (r["name"], key)
        assert r["impl"] in ("jax", "torch") and r["frames"] == 5 and r["batch"] == 2 and r["atoms"] == 8
        assert r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0
    assert rows[0]["mode"] == "rollout" and rows[0]["flops"] > 0
    if HAS_TORCH:
        assert rows[1]["mode"] == "full" and rows[1]["n_params"] == rows[0]["n_params"]
    # The file holds the same rows; the markdown tables are printed and written next to it.
    assert [json.loads(line)["name"] for line in out.read_text().splitlines()] == [r["name"] for r in rows]
    assert "| rollout_jax_n8 | jax | rollout |" in proc.stdout
    assert out.with_suffix(".md").exists()


def test_case_selection():
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import build_cases, select

    names = [c["name"] for c in build_cases(quick=False)]
    for required in ("rollout_jax_n64", "rollout_torch_n216", "bptt_jax_full_n64", "bptt_jax_remat_n216",
                     "bptt_torch_full_n64", "relax100_ase_bench", "relax100_batched_bench", "matmul_jax"):
        assert required in names
    assert [c["name"] for c in select(build_cases(quick=True), ["bptt_jax_full"])] == ["bptt_jax_full_n8"]
    assert {c["name"] for c in select(build_cases(quick=True), ["rollout"])} == {"rollout_jax_n8",
                                                                                 "rollout_torch_n8"}


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
