"""Gradient modes of the relaxation (full, remat, truncated, implicit, guided) and training through FIRE.

Most checks use a small analytic potential with learnable parameters (tethers + pair springs), whose
relaxation converges quickly and cleanly in float64, so the gradient modes can be compared tightly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax import relax as R
from bptt_jax.bptt import BPTT, jit_fit_step, jit_train_step
from bptt_jax.models import build_model
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import Batch
from conftest import rattled_si

B, N = 2, 6
PAIRS = [(i, j) for i in range(N) for j in range(i + 1, N)]
I_IDX = np.array([p[0] for p in PAIRS])
J_IDX = np.array([p[1] for p in PAIRS])


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])


def _cos(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _problem(seed=0, tether=True, box=None):
    """Start positions, free mask, target and parameters of a learnable potential; float64."""
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(B, N, 3)) if box is None else rng.uniform(0, box, size=(B, N, 3))
    free = jnp.ones((B, N), bool)
    if tether:
        free = free.at[1, 0].set(False)
    target = jnp.asarray(x0 + rng.normal(size=x0.shape) * 0.1)
    theta = {"k": jnp.asarray((1 + rng.random(N)) if tether else np.zeros(N)),
             "a": jnp.asarray(x0[0] + 0.3 * rng.normal(size=(N, 3))),
             "s": jnp.asarray((0.1 if tether else 1.0) * (0.5 + rng.random(len(PAIRS)))),
             "r0": jnp.asarray(1.0 + rng.random(len(PAIRS)))}
    return jnp.asarray(x0), free, target, theta


def _force_fn(theta, box=None):
    def energy(x):
        d = x[:, I_IDX] - x[:, J_IDX]
        if box is not None:
            d = d - box * jnp.round(d / box)
        r = jnp.sqrt(jnp.sum(d * d, -1))
        tether = 0.5 * jnp.sum(theta["k"] * jnp.sum((x - theta["a"]) ** 2, -1))
        return tether + jnp.sum(theta["s"] * (r - theta["r0"]) ** 2)

    return lambda x, key: -jax.grad(energy)(x)


def _loss(theta, x0, free, target, method, box=None, eta=0.1, max_frames=300, tol=1e-8, **kw):
    """The loss of a rollout differentiated by ``method`` (a gradient method, or a registry name)."""
    method = R.from_config(method) if isinstance(method, str) else method
    rule = R.descent(_force_fn(theta, box), eta, free)
    res = R.rollout(rule, x0, free, max_frames=max_frames, tol=tol, method=method, **kw)
    return jnp.sum(jnp.where(free[..., None], res.positions - target, 0.0) ** 2), res


@pytest.fixture
def converged_problem():
    with jax.enable_x64(True):
        x0, free, target, theta = _problem()
        (_, res), g_full = jax.value_and_grad(_loss, has_aux=True)(theta, x0, free, target, "full")
        assert bool(jnp.all(res.converged)), "the test problem must converge"
        yield x0, free, target, theta, g_full, res


@pytest.mark.parametrize("method", [R.Implicit(), R.Implicit(solver="neumann"), R.Guided(window=5)])
def test_implicit_and_guided_match_full_bptt_on_a_converged_problem(converged_problem, method):
    x0, free, target, theta, g_full, res_full = converged_problem
    with jax.enable_x64(True):
        (_, res), g = jax.value_and_grad(_loss, has_aux=True)(theta, x0, free, target, method)
        np.testing.assert_array_equal(np.asarray(res.frames), np.asarray(res_full.frames))
        np.testing.assert_allclose(np.asarray(res.positions), np.asarray(res_full.positions), atol=1e-12)
        assert _cos(g, g_full) > 0.999
        rel = float(jnp.linalg.norm(_flat(g) - _flat(g_full)) / jnp.linalg.norm(_flat(g_full)))
        assert rel < 1e-3, rel


def test_truncated_gradient_is_exact_when_the_window_covers_the_relaxation(converged_problem):
    x0, free, target, theta, g_full, res_full = converged_problem
    with jax.enable_x64(True):
        long = int(res_full.frames.max())
        g = jax.grad(lambda t: _loss(t, x0, free, target, R.Truncated(window=long))[0])(theta)
        np.testing.assert_allclose(_flat(g), _flat(g_full), rtol=1e-9, atol=1e-12)
        # A short window is a different (biased) gradient, still pointing the same way on this problem.
        g5 = jax.grad(lambda t: _loss(t, x0, free, target, R.Truncated(window=5))[0])(theta)
        assert 0.5 < _cos(g5, g_full) < 1 - 1e-6


def test_truncated_gradient_is_bptt_through_the_last_window_frames(converged_problem):
    """A short window is BPTT through each structure's last ``window`` frames from its (held) state
    ``window`` frames before its stop: checked against that computation written out by hand."""
    x0, free, target, theta, _, res_full = converged_problem
    k = 7
    with jax.enable_x64(True):
        rule0 = R.descent(_force_fn(theta), 0.1, free)
        rec = R.rollout(rule0, x0, free, max_frames=300, tol=1e-8, record=True)
        stops = np.asarray(rec.frames)
        assert stops.min() > k, "the window must start after the first frame for this check"
        # trajectory[t] holds the positions after t + 1 frames: the window starts after stop - k frames.
        start = jnp.stack([rec.trajectory[s - k - 1, b] for b, s in enumerate(stops)])

        def by_hand(t):
            rule = R.descent(_force_fn(t), 0.1, free)
            res = R.rollout(rule, start, free, max_frames=k, tol=0.0)
            return jnp.sum(jnp.where(free[..., None], res.positions - target, 0.0) ** 2), res

        (l_ref, res_ref), g_ref = jax.value_and_grad(by_hand, has_aux=True)(theta)
        (l, res), g = jax.value_and_grad(_loss, has_aux=True)(theta, x0, free, target, R.Truncated(window=k))
        np.testing.assert_allclose(np.asarray(res_ref.positions), np.asarray(res_full.positions), atol=1e-12)
        np.testing.assert_allclose(np.asarray(res.positions), np.asarray(res_full.positions), atol=1e-12)
        np.testing.assert_array_equal(np.asarray(res.frames), stops)
        np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-12)
        np.testing.assert_allclose(_flat(g), _flat(g_ref), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("segment", [1, 0, 7])
def test_remat_gradient_equals_full(converged_problem, segment):
    x0, free, target, theta, g_full, res_full = converged_problem
    with jax.enable_x64(True):
        (_, res), g = jax.value_and_grad(_loss, has_aux=True)(theta, x0, free, target, R.Remat(segment))
        np.testing.assert_array_equal(np.asarray(res.frames), np.asarray(res_full.frames))
        np.testing.assert_allclose(_flat(g), _flat(g_full), rtol=1e-10, atol=1e-13)


def test_remat_segments_record_the_same_trajectory(converged_problem):
    x0, free, target, theta, _, _ = converged_problem
    with jax.enable_x64(True):
        rule = R.descent(_force_fn(theta), 0.1, free)
        full = R.rollout(rule, x0, free, max_frames=40, tol=1e-8, record=True)
        seg = R.rollout(rule, x0, free, max_frames=40, tol=1e-8, record=True, method=R.Remat(segment=7))
        assert seg.trajectory.shape == full.trajectory.shape
        np.testing.assert_allclose(np.asarray(seg.trajectory), np.asarray(full.trajectory), atol=1e-14)


def test_adjoint_residual_is_reported(converged_problem):
    x0, free, target, theta, _, _ = converged_problem
    with jax.enable_x64(True):
        probe = jnp.zeros(B)

        def residual(method):
            return jax.grad(lambda q: _loss(theta, x0, free, target, method, adjoint_probe=q)[0])(probe)

        good = residual(R.Implicit(tol=1e-8, max_iters=1000))
        bad = residual(R.Implicit(max_iters=2))
        assert float(good.max()) < 1e-7
        assert float(bad.min()) > 1e-2


def test_translation_zero_modes_are_projected():
    """A translation-invariant potential (anharmonic springs on pair vectors, as in a periodic cell): any
    translation of the fixed point is another one. Without the projection the Neumann adjoint cannot
    converge; with it, the implicit gradient matches full BPTT."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x0 = jnp.asarray(rng.normal(size=(B, N, 3)))
        free = jnp.ones((B, N), bool)
        target = x0 + 0.1 * jnp.asarray(rng.normal(size=x0.shape))
        theta = {"c": jnp.asarray(rng.normal(size=(len(PAIRS), 3))), "s": jnp.asarray(0.5 + rng.random(len(PAIRS)))}

        def force_fn(t):
            def energy(x):
                u = x[:, I_IDX] - x[:, J_IDX] - t["c"]
                q = jnp.sum(u * u, -1)
                return jnp.sum(t["s"] * (q + 0.02 * q * q))
            return lambda x, key: -jax.grad(energy)(x)

        def loss(t, method, **kw):
            res = R.rollout(R.descent(force_fn(t), 0.03, free), x0, free, max_frames=400, tol=1e-9,
                            method=method, **kw)
            return jnp.sum((res.positions - target) ** 2), res

        (_, res), g_full = jax.value_and_grad(loss, has_aux=True)(theta, R.Full())
        assert bool(jnp.all(res.converged))
        probe = jnp.zeros(B)
        cfg = R.Implicit(max_iters=500, tol=1e-8)

        def implicit(modes):
            return jax.grad(lambda t, q: loss(t, cfg, adjoint_probe=q,
                                              translation_modes=modes)[0], argnums=(0, 1))(theta, probe)

        g_proj, r_proj = implicit(jnp.ones(B, bool))
        _, r_plain = implicit(None)
        assert float(r_proj.max()) < 1e-7
        assert float(r_plain.min()) > 1e-3
        assert _cos(g_proj, g_full) > 0.999


def test_fire_rollout_gradient_matches_finite_differences():
    """Training through FIRE: its branches are jnp.where, so away from a switch the rollout is smooth."""
    with jax.enable_x64(True):
        x0, free, target, theta = _problem(seed=1)

        def loss(t):
            rule = R.fire(_force_fn(t), free, dt_start=0.05, max_step=0.1)
            res = R.rollout(rule, x0, free, max_frames=25, tol=0.0)
            return jnp.sum(jnp.where(free[..., None], res.positions - target, 0.0) ** 2)

        g = jax.grad(loss)(theta)
        eps = 1e-6
        for name, idx in [("k", (2,)), ("a", (1, 0)), ("a", (4, 2)), ("s", (3,)), ("r0", (7,))]:
            plus = dict(theta, **{name: theta[name].at[idx].add(eps)})
            minus = dict(theta, **{name: theta[name].at[idx].add(-eps)})
            fd = (loss(plus) - loss(minus)) / (2 * eps)
            np.testing.assert_allclose(float(g[name][idx]), float(fd), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", R.GRAD_MODES)
def test_bptt_train_step_in_every_mode(si_pairs, mode):
    batch = Batch.from_structures([s for s, _ in si_pairs], [t for _, t in si_pairs], batch_size=4)
    model = build_model("adapt", "tiny")
    # A loose tolerance so that structures converge within the budget (the implicit gradient needs that).
    # Each method's own options only (a window of 3 frames, √n checkpoints): RelaxConfig rejects the others.
    options = {k: v for k, v in dict(window=3, remat_segment=0).items() if k in R.method_fields(mode)}
    bptt = BPTT(model, RelaxConfig(step_size=0.01, step_mode="learned", max_frames=8, tol=0.05, grad_mode=mode,
                                   **options))
    state = bptt.init_state(bptt.init_params(jax.random.PRNGKey(0), batch), jax.random.PRNGKey(1))
    step = jit_train_step(bptt)
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)
    assert int(metrics["converged"]) > 0
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["grad_norm"]) > 0
    assert ("adjoint_residual" in metrics) == (mode in ("implicit", "guided"))
    assert step._cache_size() == 1


def test_bptt_fire_training_reduces_the_loss():
    """Fine-tuning through FIRE (rule="fire") with the model's forces."""
    pairs = [rattled_si(cubic=True, seed=s, sigma=0.08) for s in range(4)]
    batch = Batch.from_structures([s for s, _ in pairs], [t for _, t in pairs], batch_size=4)
    model = build_model("adapt", "tiny")
    bptt = BPTT(model, RelaxConfig(rule="fire", step_mode="fixed", max_frames=10, tol=1e-4))
    from bptt_jax.bptt import OptimConfig
    bptt = BPTT(model, bptt.relax, OptimConfig(learning_rate=3e-3))
    state = bptt.init_state(bptt.init_params(jax.random.PRNGKey(0), batch), jax.random.PRNGKey(1))
    step = jit_train_step(bptt)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_relax_config_rejects_unknown_grad_mode():
    with pytest.raises(ValueError, match="grad_mode"):
        RelaxConfig(grad_mode="adjointish")
    with pytest.raises(ValueError, match="solver"):
        RelaxConfig(adjoint_solver="cg")


@pytest.mark.slow
def test_fit_step_scans_only_the_frames_needed(si_pairs):
    """An adaptive-length step (early-exit probe, then a scan of the rounded-up length) takes the same step
    as the full-length scan when the batch converges early."""
    batch = Batch.from_structures([s for s, _ in si_pairs], [t for _, t in si_pairs], batch_size=4)
    model = build_model("adapt", "tiny")
    cfg = RelaxConfig(step_size=0.01, step_mode="learned", max_frames=40, tol=0.0, length_quantum=4)
    probe = BPTT(model, cfg)
    state = probe.init_state(probe.init_params(jax.random.PRNGKey(0), batch), jax.random.PRNGKey(1))
    traj = np.asarray(probe.rollout(state.params, batch, record=True).trajectory)
    free = np.asarray(batch.free_mask)
    sq = np.sum(np.diff(traj, axis=0) ** 2, -1) * free  # (T-1, B, N)
    moves = np.sqrt(sq.sum(-1) / np.maximum(free.sum(-1), 1))  # RMS over free atoms, as the stop rule
    tol = float(moves[5:12, :3].max()) * 1.01  # every real structure stops somewhere before frame ~13
    bptt = BPTT(model, dataclasses.replace(cfg, tol=tol))
    fit = jit_fit_step(bptt)
    length = fit.length(state, batch)
    assert length < 36 and length % 4 == 0, "the test batch must converge well before max_frames"
    # Each step donates its state: the full-length one gets a copy.
    s_full, m_full = jit_train_step(bptt)(jax.tree_util.tree_map(jnp.copy, state), batch)
    s_fit, m_fit = fit(state, batch)
    np.testing.assert_allclose(float(m_fit["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_array_equal(float(m_fit["frames"]), float(m_full["frames"]))
    for a, b in zip(jax.tree_util.tree_leaves(s_fit.params), jax.tree_util.tree_leaves(s_full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert fit.step._cache_size() == 1
    length2 = fit.length(s_fit, batch)
    fit(s_fit, batch)
    assert fit.step._cache_size() == len({length, length2})  # one compilation per scan length


def test_implicit_gradient_skips_structures_that_did_not_converge(converged_problem):
    """The fixed-point gradient is only defined at a fixed point: a structure stopped by the frame budget
    contributes nothing in implicit mode (and guided falls back to its unrolled window)."""
    x0, free, target, theta, _, _ = converged_problem
    with jax.enable_x64(True):
        (_, res), g = jax.value_and_grad(_loss, has_aux=True)(theta, x0, free, target, "implicit", max_frames=5)
        assert not bool(jnp.any(res.converged))
        assert float(jnp.abs(_flat(g)).max()) == 0.0
        g_guided = jax.grad(lambda t: _loss(t, x0, free, target, R.Guided(window=3), max_frames=5)[0])(theta)
        g_trunc = jax.grad(lambda t: _loss(t, x0, free, target, R.Truncated(window=3), max_frames=5)[0])(theta)
        np.testing.assert_allclose(_flat(g_guided), _flat(g_trunc), rtol=1e-12, atol=1e-14)


def test_implicit_solves_unconverged_structures_when_asked(converged_problem):
    """``Implicit(unconverged="solve")``: a relaxation stopped by the frame budget at (numerically) its
    fixed point gets the implicit gradient anyway, which then matches full BPTT; the default skips it."""
    x0, free, target, theta, g_full, _ = converged_problem
    with jax.enable_x64(True):
        def grad(policy):
            return jax.value_and_grad(_loss, has_aux=True)(
                theta, x0, free, target, R.Implicit(unconverged=policy), tol=0.0)
        (_, res), g_skip = grad("skip")
        assert not bool(jnp.any(res.converged))
        assert float(jnp.abs(_flat(g_skip)).max()) == 0.0
        _, g_solve = grad("solve")
        assert _cos(g_solve, g_full) > 0.999
    with pytest.raises(ValueError, match="unconverged"):
        R.Implicit(unconverged="maybe")


# ----------------------------------------------------------------------------------------------------
# first_order: BPTT through the last window frames, the earlier frames' parameter derivative at a held adjoint


def _first_order_by_hand(theta, x0, free, target, k, eta=0.1):
    """The first-order gradient written out: full BPTT from the recorded state k frames before each stop, plus
    Σ_{t < stop - k} λᵀ ∂(X_t + η F(X_t; θ))/∂θ at the recorded X_t, with λ the cotangent at the window start."""
    rule0 = R.descent(_force_fn(theta), eta, free)
    rec = R.rollout(rule0, x0, free, max_frames=300, tol=1e-8, record=True)
    stops = np.asarray(rec.frames)
    traj = jnp.concatenate([x0[None], rec.trajectory])  # traj[t] = positions after t frames
    start = jnp.stack([traj[s - k, b] for b, s in enumerate(stops)])

    def window_loss(t, x):
        res = R.rollout(R.descent(_force_fn(t), eta, free), x, free, max_frames=k, tol=0.0)
        return jnp.sum(jnp.where(free[..., None], res.positions - target, 0.0) ** 2)

    g_window, lam = jax.grad(window_loss, argnums=(0, 1))(theta, start) if k else (None, None)
    if not k:
        lam = 2 * jnp.where(free[..., None], start - target, 0.0)

    def early(t):
        total = 0.0
        for b, s in enumerate(stops):
            for i in range(s - k):
                step = R.descent(_force_fn(t), eta, free)[1]
                moved = step(R.descent(_force_fn(t), eta, free)[0](traj[i]))
                total = total + jnp.sum(lam[b] * moved.positions[b])
        return total

    g_early = jax.grad(early)(theta)
    if g_window is None:
        return g_early
    return jax.tree_util.tree_map(jnp.add, g_window, g_early)


@pytest.mark.parametrize("k", [0, 6])
def test_first_order_gradient_is_the_first_order_formula_written_out(converged_problem, k):
    x0, free, target, theta, _, res_full = converged_problem
    with jax.enable_x64(True):
        g_ref = _first_order_by_hand(theta, x0, free, target, k)
        (_, res), g = jax.value_and_grad(_loss, has_aux=True)(theta, x0, free, target,
                                                             R.FirstOrder(window=k, samples=0))
        np.testing.assert_allclose(np.asarray(res.positions), np.asarray(res_full.positions), atol=1e-12)
        np.testing.assert_array_equal(np.asarray(res.frames), np.asarray(res_full.frames))
        np.testing.assert_allclose(_flat(g), _flat(g_ref), rtol=1e-9, atol=1e-12)


def test_first_order_is_exact_when_the_window_covers_the_relaxation(converged_problem):
    x0, free, target, theta, g_full, res_full = converged_problem
    with jax.enable_x64(True):
        long = int(res_full.frames.max())
        g = jax.grad(lambda t: _loss(t, x0, free, target, R.FirstOrder(window=long, samples=4))[0])(theta)
        np.testing.assert_allclose(_flat(g), _flat(g_full), rtol=1e-9, atol=1e-12)


def test_first_order_is_exact_for_position_independent_forces():
    """With F(X; θ) = θ the frames' position Jacobians vanish, so the first-order gradient is the gradient."""
    with jax.enable_x64(True):
        x0, free, target, _ = _problem()
        force = jnp.asarray(np.random.default_rng(5).normal(size=(N, 3)))

        def loss(f, method):
            rule = R.descent(lambda x, key: jnp.broadcast_to(f, x.shape), 0.05, free)
            res = R.rollout(rule, x0, free, max_frames=20, tol=0.0, method=method)
            return jnp.sum(jnp.where(free[..., None], res.positions - target, 0.0) ** 2)

        g_full = jax.grad(loss)(force, R.Full())
        for method in (R.FirstOrder(window=0, samples=0), R.FirstOrder(window=3, samples=0)):
            np.testing.assert_allclose(np.asarray(jax.grad(loss)(force, method)), np.asarray(g_full),
                                       rtol=1e-10)


def test_first_order_frame_sampling_is_unbiased(converged_problem):
    """The stratified estimate over K sampled frames averages to the all-frames first-order gradient."""
    x0, free, target, theta, _, _ = converged_problem
    with jax.enable_x64(True):
        def grad(key, samples):
            return _flat(jax.grad(lambda t: _loss(t, x0, free, target, R.FirstOrder(window=3, samples=samples),
                                                  key=key)[0])(theta))

        exact = grad(jax.random.PRNGKey(0), 0)
        draws = jax.jit(jax.vmap(lambda k: grad(k, 4)))(jax.random.split(jax.random.PRNGKey(1), 2000))
        one = draws[0]
        assert float(jnp.linalg.norm(one - exact) / jnp.linalg.norm(exact)) > 1e-3  # a single draw is noisy
        err = float(jnp.linalg.norm(draws.mean(0) - exact) / jnp.linalg.norm(exact))
        assert err < 0.02, err


def test_first_order_samples_cover_each_structures_frames():
    n = jnp.asarray([0, 1, 5, 40])
    t, w = R.first_order_samples(n, 8, jax.random.PRNGKey(0), 50)
    t, w = np.asarray(t), np.asarray(w)
    assert t.shape == w.shape == (8, 4)
    for b, nb in enumerate(np.asarray(n)):
        assert (t[:, b] >= 0).all() and (t[:, b] < max(nb, 1)).all()
        np.testing.assert_allclose(w[:, b].sum(), nb)
        if nb == 40:  # one draw in each stratum of 5 frames
            np.testing.assert_array_equal(t[:, b] // 5, np.arange(8))
    t_all, w_all = R.first_order_samples(n, 0, None, 50)
    np.testing.assert_array_equal(np.asarray(w_all).sum(0), np.asarray(n))


@pytest.mark.parametrize("chunk", [3, 4])
def test_first_order_in_chunks_equals_all_at_once(converged_problem, chunk):
    """``sample_chunk``: the sampled frames differentiated a few at a time (a loop; the last chunk padded with
    weight-0 frames) accumulate the same gradient."""
    x0, free, target, theta, _, _ = converged_problem
    with jax.enable_x64(True):
        def grad(c):
            return jax.grad(lambda t: _loss(t, x0, free, target, R.FirstOrder(window=2, samples=8, chunk=c),
                                            key=jax.random.PRNGKey(3))[0])(theta)
        np.testing.assert_allclose(_flat(grad(chunk)), _flat(grad(0)), rtol=1e-12, atol=1e-14)


def test_window_defaults_per_mode():
    assert RelaxConfig(grad_mode="truncated").window_frames == RelaxConfig(grad_mode="guided").window_frames == 10
    assert RelaxConfig(grad_mode="first_order").window_frames == 0
    assert RelaxConfig(grad_mode="first_order", window=4).window_frames == 4
    with pytest.raises(ValueError, match="window"):
        RelaxConfig(grad_mode="truncated", window=0)
    with pytest.raises(ValueError, match="sample"):
        RelaxConfig(grad_mode="first_order", sample_frames=-1)
    assert RelaxConfig().window_frames is None and RelaxConfig(grad_mode="implicit").window_frames is None


# ----------------------------------------------------------------------------------------------------
# The registry of gradient methods and their options


@pytest.mark.parametrize("name", R.GRAD_MODES)
def test_registry_round_trip(name):
    """Every registered method builds from its name, and from its name and its own options back to itself;
    RelaxConfig builds the same object from the flat Hydra fields."""
    cls = R.REGISTRY[name]
    assert cls.name == name and R.from_config(name) == cls()
    method = cls()
    options = {k: v for k, v in dataclasses.asdict(method).items() if k != "implicit"}
    if isinstance(method, R.Guided):
        options.update(dataclasses.asdict(method.implicit))
    assert set(options) == set(cls.options())
    assert R.from_config(name, **options) == method
    assert RelaxConfig(grad_mode=name).method == method
    assert (method.uses_adjoint, method.early_exit) == (name in ("implicit", "guided"), name not in ("full", "remat"))


def test_relax_config_builds_each_method_with_its_options():
    assert RelaxConfig(grad_mode="remat", remat_segment=0).method == R.Remat(segment=0)
    assert RelaxConfig(grad_mode="truncated", window=7).method == R.Truncated(window=7)
    cfg = RelaxConfig(grad_mode="guided", window=4, adjoint_solver="neumann", adjoint_tol=1e-6, adjoint_iters=50,
                      adjoint_damping=0.1, adjoint_unconverged="solve", adjoint_project_translations=False)
    assert cfg.method == R.Guided(4, R.Implicit(solver="neumann", tol=1e-6, max_iters=50, damping=0.1,
                                                unconverged="solve", project_translations=False))
    assert RelaxConfig(grad_mode="first_order", window=2, sample_frames=0, sample_chunk=1).method == \
        R.FirstOrder(window=2, samples=0, chunk=1)
    assert R.method_fields("full") == () and R.method_fields("truncated") == ("window",)


@pytest.mark.parametrize("kw,key", [
    (dict(window=5), "relax.window=5"),
    (dict(grad_mode="truncated", adjoint_solver="neumann"), "relax.adjoint_solver='neumann'"),
    (dict(grad_mode="implicit", sample_frames=8), "relax.sample_frames=8"),
    (dict(grad_mode="first_order", remat_segment=0), "relax.remat_segment=0"),
    (dict(step_mode="learned", step_head={"d_model": 8}), "relax.step_head"),
    (dict(grad_mode="implicit", length_quantum=8), "relax.length_quantum=8"),
])
def test_an_option_the_method_does_not_take_is_a_one_line_error(kw, key):
    with pytest.raises(ValueError) as err:
        RelaxConfig(**kw)
    message = str(err.value)
    assert key in message and "\n" not in message, message
    with pytest.raises(ValueError, match="takes no option 'window'; it takes no options"):
        R.from_config("full", window=3)
    with pytest.raises(ValueError, match="takes no option 'samples'"):
        R.from_config("guided", samples=3)
    with pytest.raises(ValueError, match="unknown grad_mode"):
        R.from_config("adjointish")
