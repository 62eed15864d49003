import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.optimize import FIRE

from bptt_jax.models import build_model
from bptt_jax.relax import (Full, Implicit, RelaxConfig, Remat, Status, Truncated, descent, fire, initial_status,
                            rollout, stop_rule)
from bptt_jax.structures import Batch

KEY = jax.random.PRNGKey(0)


def harmonic(center, k):
    """F = -k (R - center), with per-structure stiffness k (B,)."""
    k = jnp.asarray(k)

    def force_fn(R, key=None):
        return -k[:, None, None] * (R - center)

    return force_fn


def _setup(b=3, n=5, seed=0):
    rng = np.random.default_rng(seed)
    center = jnp.asarray(rng.normal(size=(b, n, 3)))
    start = center + jnp.asarray(rng.normal(scale=0.5, size=(b, n, 3)))
    free = jnp.ones((b, n), bool)
    return center, start, free


def test_constant_step_matches_closed_form():
    center, start, free = _setup()
    eta, k = 0.3, jnp.array([0.5, 1.0, 2.0])
    res = rollout(descent(harmonic(center, k), eta, free), start, free, max_frames=7, tol=0.0)
    factor = (1 - eta * np.asarray(k)) ** 7
    expected = np.asarray(center) + factor[:, None, None] * np.asarray(start - center)
    np.testing.assert_allclose(np.asarray(res.positions), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(res.frames), [7, 7, 7])


def test_stop_rule_frame_counts():
    center, start, free = _setup()
    eta, k, tol = 0.3, np.array([0.5, 1.0, 2.0]), 1e-3
    res = rollout(descent(harmonic(center, k), eta, free), start, free, max_frames=200, tol=tol)
    # Frame t moves eta*k*(1-eta*k)^(t-1) * |R0 - c|_rms; the first t with movement < tol stops.
    r0 = np.sqrt(np.mean(np.sum(np.asarray(start - center) ** 2, -1), -1))
    expected = []
    for kk, r in zip(k, r0):
        t = 1
        while eta * kk * abs(1 - eta * kk) ** (t - 1) * r >= tol:
            t += 1
        expected.append(t)
    np.testing.assert_array_equal(np.asarray(res.frames), expected)
    assert np.all(np.asarray(res.converged)) and not np.any(np.asarray(res.diverged))


def test_momentum_and_anneal_by_hand():
    R = jnp.ones((1, 1, 3))
    free = jnp.ones((1, 1), bool)
    rule = descent(harmonic(jnp.zeros((1, 1, 3)), [1.0]), 0.1, free, momentum=0.5, anneal=0.9)
    res = rollout(rule, R, free, max_frames=2, tol=0.0)
    # v1 = 0.1*(-1) -> x1 = 0.9; v2 = 0.5*(-0.1) + 0.09*(-0.9) = -0.131 -> x2 = 0.769.
    np.testing.assert_allclose(np.asarray(res.positions)[0, 0], 0.769, rtol=1e-6)


def test_fixed_and_padding_atoms_never_move():
    center, start, free = _setup()
    free = free.at[0, :2].set(False).at[2, :].set(False)
    rule = descent(harmonic(center, [1.0, 1.0, 1.0]), 0.2, free, noise=0.05)
    res = rollout(rule, start, free, key=KEY, max_frames=10, tol=0.0)
    moved = np.any(np.asarray(res.positions) != np.asarray(start), axis=-1)
    np.testing.assert_array_equal(moved, np.asarray(free))
    assert int(res.frames[2]) == 0  # no free atom: done before the first frame


def test_noise_is_seeded():
    center, start, free = _setup()
    rule = descent(harmonic(center, [1.0, 1.0, 1.0]), 0.2, free, noise=0.05)
    a = rollout(rule, start, free, key=KEY, max_frames=5, tol=0.0).positions
    b = rollout(rule, start, free, key=KEY, max_frames=5, tol=0.0).positions
    c = rollout(rule, start, free, key=jax.random.PRNGKey(1), max_frames=5, tol=0.0).positions
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_divergence_is_flagged_and_frozen():
    center, start, free = _setup()
    # Structure 0 is pushed away (repulsive), structure 1 produces NaN forces, structure 2 is fine.
    k = jnp.array([-1.0, 1.0, 1.0])

    def force_fn(R, key=None):
        F = harmonic(center, k)(R)
        return F.at[1].set(jnp.where(R[1] > 1e9, 0.0, jnp.nan))

    res = rollout(descent(force_fn, 0.5, free), start, free, max_frames=50, tol=1e-4, diverge_distance=3.0)
    np.testing.assert_array_equal(np.asarray(res.diverged), [True, True, False])
    assert np.all(np.isfinite(np.asarray(res.positions)))
    drift = np.sqrt(np.mean(np.sum(np.asarray(res.positions - start) ** 2, -1), -1))
    assert drift[0] <= 3.0
    assert int(res.frames[1]) == 1 and bool(res.converged[2])


def _model_force(si_pairs):
    batch = Batch.from_structures([s for s, _ in si_pairs], [t for _, t in si_pairs], batch_size=4)
    model = build_model("adapt", "tiny")
    params = model.init(KEY, batch)
    stiff = jnp.array([0.4, 1.0, 2.0, 1.0])

    def force_fn(R, key=None):
        # A real model on top of a stiff well, so structures converge at different frames.
        return -stiff[:, None, None] * (R - batch.target_positions) + 0.01 * model.apply(
            params, batch.replace(positions=R))

    return batch, force_fn


def test_scan_and_while_agree(si_pairs):
    batch, force_fn = _model_force(si_pairs)
    rule = descent(force_fn, 0.3, batch.free_mask)
    kw = dict(max_frames=60, tol=1e-3)
    scan = jax.jit(lambda R: rollout(rule, R, batch.free_mask, mode="scan", **kw))(batch.positions)
    loop = jax.jit(lambda R: rollout(rule, R, batch.free_mask, mode="while", **kw))(batch.positions)
    frames = np.asarray(scan.frames)
    assert len(set(frames[:3].tolist())) == 3 and frames[3] == 0  # really different lengths
    np.testing.assert_array_equal(frames, np.asarray(loop.frames))
    np.testing.assert_array_equal(np.asarray(scan.converged), np.asarray(loop.converged))
    np.testing.assert_allclose(np.asarray(scan.positions), np.asarray(loop.positions), atol=1e-6)
    plain = rollout(rule, batch.positions, batch.free_mask, skip_converged=False, method=Remat(1), **kw)
    np.testing.assert_allclose(np.asarray(plain.positions), np.asarray(scan.positions), atol=1e-6)


def test_remat_gives_the_same_gradient(si_pairs):
    batch, _ = _model_force(si_pairs)
    model = build_model("adapt", "tiny")
    params = model.init(KEY, batch)

    def loss(p, method):
        rule = descent(lambda R, k: model.apply(p, batch.replace(positions=R)), 0.05, batch.free_mask)
        res = rollout(rule, batch.positions, batch.free_mask, max_frames=8, tol=0.0, method=method)
        return jnp.sum((res.positions - batch.target_positions) ** 2)

    g_full = jax.grad(loss)(params, Full())
    g_remat = jax.grad(loss)(params, Remat(1))
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


class _Anharmonic(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, center, k=1.0, a=0.5):
        super().__init__()
        self.center, self.k, self.a = center, k, a

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = atoms.positions - self.center
        r2 = np.sum(d * d, axis=1)
        self.results["energy"] = float(np.sum(0.5 * self.k * r2 + 0.25 * self.a * r2**2))
        self.results["forces"] = -(self.k + self.a * r2)[:, None] * d


def test_fire_matches_ase():
    rng = np.random.default_rng(4)
    center = rng.normal(size=(6, 3))
    start = center + rng.normal(scale=0.8, size=(6, 3))
    atoms = Atoms("Cu6", positions=start)
    atoms.calc = _Anharmonic(center)
    opt = FIRE(atoms, logfile=None)
    ase_path = []
    for _ in range(25):
        opt.step()
        ase_path.append(atoms.positions.copy())

    def force_fn(R, key=None):
        d = R - jnp.asarray(center)[None]
        r2 = jnp.sum(d * d, -1, keepdims=True)
        return -(1.0 + 0.5 * r2) * d

    free = jnp.ones((1, 6), bool)
    with jax.enable_x64(True):
        res = rollout(fire(force_fn, free), jnp.asarray(start)[None], free, max_frames=25, tol=0.0, record=True)
        ours = np.asarray(res.trajectory)[:, 0]
    np.testing.assert_allclose(ours, np.stack(ase_path), atol=1e-8)


def test_relax_config_validation():
    with pytest.raises(ValueError, match="update rule"):
        RelaxConfig(rule="lbfgs")
    with pytest.raises(ValueError, match="step_mode"):
        RelaxConfig(step_mode="adaptive")
    with pytest.raises(ValueError, match="rollout mode"):
        center, start, free = _setup()
        rollout(descent(harmonic(center, [1, 1, 1]), 0.1, free), start, free, mode="bogus")


@pytest.mark.parametrize("method", [Full(), Truncated(window=2), Implicit()])
def test_traced_stop_rule_equals_the_static_one(method):
    """A traced frame limit and tolerance stop exactly where the same static rule does, in scan and while
    modes and the windowed gradient modes, with one compiled program for every limit."""
    center, start, free = _setup()
    k = jnp.array([0.5, 1.0, 2.0])
    rule = descent(harmonic(center, k), 0.3, free)
    traced = jax.jit(lambda tol, limit, mode: rollout(rule, start, free, max_frames=30, tol=tol, mode=mode,
                                                      method=method, frame_limit=limit),
                     static_argnames="mode")
    for limit, tol in [(4, 0.0), (9, 1e-2), (30, 1e-3)]:
        ref = rollout(rule, start, free, max_frames=limit, tol=tol)
        for mode in ("scan", "while"):
            res = traced(jnp.float32(tol), jnp.int32(limit), mode)
            np.testing.assert_array_equal(np.asarray(res.frames), np.asarray(ref.frames))
            np.testing.assert_allclose(np.asarray(res.positions), np.asarray(ref.positions), rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(res.converged), np.asarray(ref.converged))
    assert traced._cache_size() == 2  # one program per mode, whatever the limit and tolerance


def test_status_fields_and_the_stop_rule_by_hand():
    """One frame of the stop rule on four structures: one that moves little (converges), one that moves far
    (diverges), one with NaN positions (diverges, keeps its state), one already done (untouched)."""
    free = jnp.ones((4, 2), bool)
    status = initial_status(free)
    assert isinstance(status, Status) and Status._fields == ("done", "frames", "converged", "diverged")
    status = status._replace(done=jnp.array([False, False, False, True]), frames=jnp.array([3, 3, 3, 7]))
    start = jnp.zeros((4, 2, 3))
    old = start + 0.1
    new = old + jnp.array([1e-4, 10.0, jnp.nan, 0.5])[:, None, None]
    accept, after = stop_rule(status, old, new, start, free, tol=1e-3, diverge_distance=5.0)
    np.testing.assert_array_equal(np.asarray(accept), [True, False, False, False])
    np.testing.assert_array_equal(np.asarray(after.done), [True, True, True, True])
    np.testing.assert_array_equal(np.asarray(after.frames), [4, 4, 4, 7])
    np.testing.assert_array_equal(np.asarray(after.converged), [True, False, False, False])
    np.testing.assert_array_equal(np.asarray(after.diverged), [False, True, True, False])
    # A frame budget: a structure that has taken frame_limit frames is done, neither converged nor diverged.
    moving = status._replace(done=jnp.zeros(4, bool), frames=jnp.array([3, 3, 3, 1]))
    _, limited = stop_rule(moving, old, old + 0.01, start, free, tol=1e-3, diverge_distance=5.0, frame_limit=4)
    np.testing.assert_array_equal(np.asarray(limited.done), [True, True, True, False])
    assert not np.any(np.asarray(limited.converged)) and not np.any(np.asarray(limited.diverged))
    assert int(initial_status(free.at[2].set(False)).done.sum()) == 1  # no free atom: done from the start
