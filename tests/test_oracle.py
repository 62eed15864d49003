import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes

from bptt_jax.data.generate import generate
from bptt_jax.oracle import (best_row, best_step_size, descent_relax, load_test_pairs, main, oracle_calculator_for,
                             oracle_rows, structure_losses)
from bptt_jax.relax import descent, rollout
from bptt_jax.structures import Batch, Structure
from conftest import rattled_si


class Harmonic(Calculator):
    """F = -k (R - center): an analytic pull toward ``center`` (k = inf gives non-finite forces)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, center, k):
        super().__init__()
        self.center, self.k = np.asarray(center, np.float64), float(k)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = self.atoms.positions - self.center
        with np.errstate(invalid="ignore"):
            self.results = {"energy": 0.5 * self.k * float(np.sum(d * d)), "forces": -self.k * d}


def _harmonic_cases():
    """Structures, targets and stiffnesses (eV/Å²) that, at η = 0.05 and 0.5 with 20 frames, cover every stop:
    A (a fixed atom): frame budget at 0.05, converged at 0.5; B: converged at 0.05, diverges (oscillation
    growing by 1.5 per frame) at 0.5; C: no free atom (no frame); D: non-finite forces (diverged in frame 1)."""
    a, ta = rattled_si(cubic=True, seed=1)
    a.fixed[0] = True
    b, tb = rattled_si(seed=0)
    c, tc = rattled_si(seed=2)
    c.fixed[:] = True
    d, td = rattled_si(seed=3)
    return [a, b, c, d], [ta, tb, tc, td], np.array([1.0, 5.0, 1.0, np.inf])


class _Factory:
    """One harmonic calculator per structure, in input order (what a real factory builds from a dataset)."""

    def __init__(self, targets, ks):
        self.items = iter(zip(targets, ks))

    def __call__(self):
        center, k = next(self.items)
        return Harmonic(center, k)


def test_oracle_matches_the_jax_descent_rule():
    structures, targets, ks = _harmonic_cases()
    grid, kw = (0.05, 0.5), dict(tol=1e-3, max_frames=20, diverge_distance=5.0)
    by_loss = {loss: oracle_rows(structures, targets, _Factory(targets, ks), grid, loss=loss, **kw)
               for loss in ("dq", "mse")}
    with jax.enable_x64(True):
        batch = Batch.from_structures(structures, targets)
        k = jnp.asarray(ks)

        def force_fn(R, key=None):
            return -k[:, None, None] * (R - batch.target_positions)

        free = batch.free_mask
        for mode in ("while", "scan"):
            run = jax.jit(lambda eta: rollout(descent(force_fn, eta, free), batch.positions, free, mode=mode, **kw))
            for j, eta in enumerate(grid):
                res = run(jnp.float64(eta))
                pos = np.asarray(res.positions)
                for loss, rows in by_loss.items():
                    row = rows[j]
                    np.testing.assert_array_equal(row.frames, np.asarray(res.frames))
                    np.testing.assert_array_equal(row.converged, np.asarray(res.converged))
                    np.testing.assert_array_equal(row.diverged_mask, np.asarray(res.diverged))
                    for i, s in enumerate(structures):
                        np.testing.assert_allclose(row.positions[i], pos[i, : len(s)], rtol=1e-13, atol=1e-13)
                    finals = [pos[i, : len(s)] for i, s in enumerate(structures)]
                    np.testing.assert_allclose(row.per_structure, structure_losses(loss, structures, targets, finals),
                                               rtol=1e-12, atol=1e-14)
    rows = by_loss["dq"]
    # Every branch of the stop rule was taken.
    slow, fast = rows
    np.testing.assert_array_equal(slow.frames, [20, slow.frames[1], 0, 1])
    assert 0 < slow.frames[1] < 20 and slow.converged.tolist() == [False, True, False, False]
    assert slow.diverged_mask.tolist() == [False, False, False, True] and slow.diverged == 1
    assert fast.converged[0] and fast.diverged_mask.tolist() == [False, True, False, True]
    assert fast.frames[1] > 1  # it diverged after some good frames, and stays at the last of them
    assert np.all(np.isfinite(fast.per_structure))
    assert best_row(rows).avg == min(slow.avg, fast.avg) and best_step_size(rows) == best_row(rows).step_size


def test_descent_relax_by_hand():
    # One free atom pulled toward the origin: X_t = (1 - ηk)^t X_0; fixed atoms never move.
    s = Structure([[0.5, 0.0, 0.0], [3.0, 0.0, 0.0]], [14, 14], fixed=[False, True])
    atoms = s.to_atoms()
    atoms.calc = Harmonic(np.zeros((2, 3)), 2.0)
    out = descent_relax(atoms, 0.25, ~s.fixed, tol=1e-3, max_frames=100)
    # Frame t moves 0.5 · 0.5^t Å (RMS over the one free atom); the first below 1e-3 is t = 9.
    assert out.frames == 9 and out.converged and not out.diverged
    np.testing.assert_allclose(out.positions[0], [0.5 * 0.5**9, 0, 0], rtol=1e-12)
    np.testing.assert_array_equal(out.positions[1], [3.0, 0, 0])
    np.testing.assert_array_equal(atoms.positions, out.positions)


@pytest.fixture(scope="module")
def tiny_catalysts(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalysts")
    generate("catalysts", out, preset="tiny", n=2, seed=3, progress=False)
    return out


def test_oracle_relaxes_a_generated_emt_slab(tiny_catalysts):
    structures, targets = load_test_pairs(tiny_catalysts, n_test=5)
    assert len(structures) == 2 and all(s.fixed.any() for s in structures)
    calc = oracle_calculator_for(tiny_catalysts)
    assert type(calc()).__name__ == "EMT"
    unrelaxed = structure_losses("dq", structures, targets)
    rows = oracle_rows(structures, targets, calc, (0.01, 0.02), loss="dq", max_frames=200)
    row = best_row(rows)
    assert row.diverged == 0 and np.all(row.frames > 0)
    assert np.all(row.per_structure < unrelaxed) and row.avg < 0.6 * unrelaxed.mean(), (row.per_structure, unrelaxed)
    for s, final in zip(structures, row.positions):
        np.testing.assert_array_equal(final[s.fixed], s.positions[s.fixed])


def test_oracle_row_counts_basins_by_dq_under_the_mse_loss(tmp_path):
    # An MSE run's oracle row counts basins by Dq, as every other row does (it used to report None).
    from bptt_jax.pipeline import DataConfig, EvalConfig, RunConfig, generated_dir, run_oracle
    from bptt_jax.relax import RelaxConfig

    data = DataConfig(name="catalysts", preset="tiny", n=2, seed=3, cache_dir=str(tmp_path), loss="mse", workers=1)
    generate("catalysts", generated_dir(data), preset="tiny", n=2, seed=3, progress=False)
    structures, targets = load_test_pairs(generated_dir(data), n_test=2)
    cfg = RunConfig(data=data, relax=RelaxConfig(max_frames=40), eval=EvalConfig(step_grid=[0.02], basin_dq=1e6),
                    progress=False)
    out = run_oracle(cfg, list(zip(structures, targets)), ["a", "b"])
    assert out["basins"] == 2
    mse = structure_losses("mse", structures, targets, None)
    assert out["avg"] < mse.mean()  # the row itself is the MSE
    strict = run_oracle(dataclasses.replace(cfg, eval=EvalConfig(step_grid=[0.02], basin_dq=1e-9)),
                        list(zip(structures, targets)), ["a", "b"])
    assert strict["basins"] == 0


@pytest.mark.slow
def test_workers_give_the_same_rows(tiny_catalysts):
    structures, targets = load_test_pairs(tiny_catalysts)
    calc = oracle_calculator_for(tiny_catalysts / "manifest.json")
    kw = dict(loss="dq", max_frames=30)
    one = oracle_rows(structures, targets, calc, (0.02,), **kw)[0]
    two = oracle_rows(structures, targets, calc, (0.02,), workers=2, **kw)[0]
    np.testing.assert_array_equal(one.frames, two.frames)
    np.testing.assert_array_equal(one.per_structure, two.per_structure)


def test_no_oracle_for_user_files(tmp_path, capsys):
    (tmp_path / "mine.extxyz").write_text("1\nLattice=\"3 0 0 0 3 0 0 0 3\" Properties=species:S:1:pos:R:3\nSi 0 0 0\n")
    with pytest.raises(ValueError, match="no oracle is known for user files"):
        oracle_calculator_for(tmp_path)
    with pytest.raises(ValueError, match="no oracle is known for user files"):
        load_test_pairs(tmp_path / "mine.extxyz")
    assert main([str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no oracle" in err and "Traceback" not in err
    (tmp_path / "manifest.json").write_text(json.dumps({"generator": "qm9", "params": {}}))
    with pytest.raises(ValueError, match="generator 'qm9'"):
        oracle_calculator_for(tmp_path / "manifest.json")
