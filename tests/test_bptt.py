import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bptt_jax.bptt import BPTT, FixedStep, LearnedStep, NetworkStep, OptimConfig, jit_train_step, proximal_term
from bptt_jax.models import ADAPT, build_model
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import Batch
from conftest import get_leaf, rattled_si, set_leaf, to64

KEY = jax.random.PRNGKey(0)


def _batch(pairs, **kw):
    return Batch.from_structures([s for s, _ in pairs], [t for _, t in pairs], **kw)


@pytest.mark.parametrize("tol", [0.0, "adaptive"])
def test_rollout_gradient_matches_float64_finite_differences(si_pairs, tol):
    with jax.enable_x64(True):
        batch = _batch(si_pairs, batch_size=4)
        model = ADAPT(d_model=8, n_layers=1, n_heads=2, ffn_dim=8, species_dim=4)
        if tol == "adaptive":
            # A tolerance that stops some structures early, so the masked stop is part of the check.
            probe = BPTT(model, RelaxConfig(step_size=0.02, step_mode="learned", max_frames=12, tol=0.0))
            params = to64(probe.init_params(KEY, batch))
            traj = probe.rollout(params, batch, record=True).trajectory
            moves = np.sqrt(np.mean(np.sum(np.diff(np.asarray(traj), axis=0) ** 2, -1), -1))  # (T-1, B)
            tol = float(moves[:, 1].min()) * 1.001  # structure 1 (no padding) stops where it moves least
        bptt = BPTT(model, RelaxConfig(step_size=0.02, step_mode="learned", max_frames=12, tol=tol))
        params = to64(bptt.init_params(KEY, batch))
        loss_aux = jax.jit(lambda p: bptt.loss(p, batch))
        grads = jax.jit(jax.grad(lambda p: bptt.loss(p, batch)[0]))(params)
        frames = np.asarray(loss_aux(params)[1]["frames"])
        if tol:
            assert frames[:3].min() < 12, frames
        checks = [
            (("log_step_size",), ()),
            (("model", "params", "embed", "dense_0", "kernel"), (0, 1)),
            (("model", "params", "encoder_0", "attn", "query", "kernel"), (2, 1, 0)),
            (("model", "params", "encoder_0", "ffn", "dense_1", "kernel"), (3, 5)),
            (("model", "params", "proj", "bias"), (2,)),
        ]
        eps = 1e-6
        for path, index in checks:
            x = float(get_leaf(params, path)[index])
            up, aux_up = loss_aux(set_leaf(params, path, index, x + eps))
            down, aux_down = loss_aux(set_leaf(params, path, index, x - eps))
            # The stop decisions did not change under the perturbation (so the difference is valid).
            np.testing.assert_array_equal(np.asarray(aux_up["frames"]), frames)
            np.testing.assert_array_equal(np.asarray(aux_down["frames"]), frames)
            fd = float(up - down) / (2 * eps)
            ad = float(get_leaf(grads, path)[index])
            assert ad == pytest.approx(fd, rel=1e-5, abs=1e-8), (path, ad, fd)


def test_train_step_does_not_recompile_within_a_bucket(si_pairs):
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, max_frames=5))
    batch_a = _batch(si_pairs, batch_size=4)
    others = [rattled_si(seed=10), rattled_si(cubic=True, seed=11, drop=3), rattled_si(seed=12)]
    batch_b = _batch(others, batch_size=4)
    assert batch_a.positions.shape == batch_b.positions.shape
    state = bptt.init_state(bptt.init_params(KEY, batch_a), KEY)
    step = jit_train_step(bptt)
    state, _ = step(state, batch_a)
    state, _ = step(state, batch_b)
    state, _ = step(state, batch_a)
    assert step._cache_size() == 1
    assert int(state.step) == 3


def test_the_step_donates_the_state_and_init_state_copies_its_inputs(si_pairs):
    """The jitted step reuses the state's buffers: a state passed to it is gone, but the parameters and key
    it was made from survive (init_state copies them), so they can serve as the proximal reference."""
    batch = _batch(si_pairs, batch_size=4)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=3),
                OptimConfig(prox_weight=1.0))
    params, key = bptt.init_params(KEY, batch), jax.random.PRNGKey(5)
    state = bptt.init_state(params, key)
    new, metrics = jit_train_step(bptt)(state, batch, params)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(state.params))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves((params, key)))
    assert float(metrics["total"]) == float(metrics["loss"])  # the reference is where the step started
    assert float(proximal_term(new.params, params)) > 0


def test_a_few_steps_reduce_the_loss(si_pairs):
    batch = _batch(si_pairs, batch_size=4)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=15),
                OptimConfig(learning_rate=3e-3, clip_norm=10.0))
    state = bptt.init_state(bptt.init_params(KEY, batch), KEY)
    step = jit_train_step(bptt)
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(metrics["step_size"]) != pytest.approx(0.05)  # the step size is trained too


def test_proximal_term_anchors_parameters(si_pairs):
    batch = _batch(si_pairs)
    distances = {}
    for weight in (0.0, 100.0):
        bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, max_frames=5),
                    OptimConfig(learning_rate=1e-2, prox_weight=weight))
        ref = bptt.init_params(KEY, batch)
        state = bptt.init_state(ref, KEY)
        step = jit_train_step(bptt)
        for _ in range(10):
            state, metrics = step(state, batch, ref)
        distances[weight] = float(proximal_term(state.params, ref))
        if weight:
            assert float(metrics["total"]) > float(metrics["loss"])
    assert distances[100.0] < 0.5 * distances[0.0]


@pytest.mark.slow
def test_network_step_head_trains(si_pairs):
    batch = _batch(si_pairs)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="network", max_frames=5),
                OptimConfig(learning_rate=1e-3))
    params = bptt.init_params(KEY, batch)
    grads = jax.grad(lambda p: bptt.loss(p, batch)[0])(params)
    assert float(jnp.abs(grads["step_head"]["params"]["out"]["kernel"]).sum()) > 0
    # With the constant-output init the head reproduces the fixed-step rollout exactly.
    fixed = BPTT(bptt.model, RelaxConfig(step_size=0.05, max_frames=5))
    a = bptt.rollout(params, batch).positions
    b = fixed.rollout({"model": params["model"]}, batch).positions
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_evaluate_and_relax_batch(si_pairs):
    batch = _batch(si_pairs, batch_size=4)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, max_frames=10, tol=1e-2))
    params = bptt.init_params(KEY, batch)
    out = bptt.evaluate(params, batch)
    res = bptt.relax_batch(params, batch)
    np.testing.assert_array_equal(np.asarray(out["frames"]), np.asarray(res.frames))
    # Jitted once per BPTT, on first use: a second call reuses the compilation.
    bptt.evaluate(params, batch)
    assert bptt.evaluate is bptt.evaluate and bptt.evaluate._cache_size() == 1
    assert out["per_structure"].shape == (4,) and float(out["per_structure"][3]) == 0.0


def test_learned_step_size_stays_positive_when_driven_to_zero(si_pairs):
    # Targets = the starting positions: every move costs, so training drives η toward 0. Adam with a large
    # rate on log η moves it by up to ~0.5 per step; a raw η would have crossed zero in its first step.
    starts = [s for s, _ in si_pairs]
    batch = Batch.from_structures(starts, [s.positions for s in starts], batch_size=4)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=5),
                OptimConfig(learning_rate=1e-3, step_learning_rate=0.5, clip_norm=None))
    state = bptt.init_state(bptt.init_params(KEY, batch), KEY)
    step = jit_train_step(bptt)
    etas = []
    for _ in range(30):
        state, metrics = step(state, batch)
        etas.append(float(metrics["step_size"]))
    assert all(np.isfinite(etas)) and min(etas) > 0.0, etas
    assert etas[-1] < 0.01 * 0.05 and np.all(np.diff(etas) < 0), etas  # driven 100x down, still positive
    assert float(bptt.step_size(state.params)) == pytest.approx(etas[-1])


def test_step_learning_rate_is_the_relative_change_of_eta(si_pairs):
    batch = _batch(si_pairs, batch_size=4)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=5),
                OptimConfig(learning_rate=0.0, step_learning_rate=0.01))
    state = bptt.init_state(bptt.init_params(KEY, batch), KEY)
    before = jax.tree_util.tree_map(np.array, state.params)  # host copies: the step donates the state
    new, _ = jit_train_step(bptt)(state, batch)
    # Adam's first step moves log η by (almost exactly) its rate; the model (rate 0) does not move.
    assert abs(float(new.params["log_step_size"] - before["log_step_size"])) == pytest.approx(0.01, rel=1e-3)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                           new.params["model"], before["model"])


def test_frozen_model_keeps_its_parameters_bit_for_bit(si_pairs):
    batch = _batch(si_pairs, batch_size=4)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=5),
                OptimConfig(learning_rate=1e-2, step_learning_rate=0.05, freeze_model=True))
    state = bptt.init_state(bptt.init_params(KEY, batch), KEY)
    start = jax.tree_util.tree_map(np.array, state.params)  # host copies: the step donates the state
    step = jit_train_step(bptt)
    for _ in range(3):
        state, _ = step(state, batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                           state.params["model"], start["model"])
    assert float(state.params["log_step_size"]) != float(start["log_step_size"])  # η still trains
    with pytest.raises(ValueError, match="nothing to train"):
        BPTT(bptt.model, RelaxConfig(step_size=0.05, step_mode="fixed"), OptimConfig(freeze_model=True))


def test_variable_stop_draws_a_new_rule_per_step_without_recompiling(si_pairs):
    batch = _batch(si_pairs, batch_size=4)
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=8,
                                                          tol=1e-9),
                OptimConfig(learning_rate=1e-4, stop_tol_range=(1e-4, 1e-2), stop_frames_range=(2, 6)))
    state = bptt.init_state(bptt.init_params(KEY, batch), KEY)
    step = jit_train_step(bptt)
    tols, limits = [], []
    for _ in range(6):
        state, m = step(state, batch)
        tols.append(float(m["tol"]))
        limits.append(int(m["frame_limit"]))
        assert float(m["frames"]) <= limits[-1]
    assert step._cache_size() == 1
    assert len(set(limits)) > 1 and len(set(tols)) == len(tols), (limits, tols)
    assert all(2 <= n <= 6 for n in limits) and all(1e-4 <= t <= 1e-2 for t in tols)
    # Evaluation keeps the configured rule: tol 1e-9 never met, so every structure takes all 8 frames.
    frames = np.asarray(bptt.evaluate(state.params, batch)["frames"])[:3]
    assert np.all(frames == 8), frames


def test_training_noise_never_reaches_evaluation(si_pairs):
    from bptt_jax.bptt import RolloutOverrides

    batch = _batch(si_pairs, batch_size=4)
    model = build_model("adapt", "tiny")
    relax = RelaxConfig(step_size=0.05, step_mode="learned", max_frames=5, tol=0.0)
    noisy = BPTT(model, relax, OptimConfig(noise=0.05))
    clean = BPTT(model, relax, OptimConfig())
    params = clean.init_params(KEY, batch)
    np.testing.assert_array_equal(np.asarray(noisy.evaluate(params, batch)["positions"]),
                                  np.asarray(clean.evaluate(params, batch)["positions"]))
    np.testing.assert_array_equal(np.asarray(noisy.relax_batch(params, batch, KEY).positions),
                                  np.asarray(clean.relax_batch(params, batch, KEY).positions))
    overrides = noisy.training_overrides(jnp.int32(0), KEY)
    assert float(overrides.noise) == pytest.approx(0.05)
    with_noise = noisy.rollout(params, batch, KEY, overrides=overrides).positions
    without = noisy.rollout(params, batch, KEY, overrides=RolloutOverrides()).positions
    moved = np.abs(np.asarray(with_noise - without))[:3]
    assert moved.max() > 0.01  # five frames of σ = 0.05 Å noise
    # Padding atoms never move.
    np.testing.assert_array_equal(np.asarray(with_noise)[~np.asarray(batch.atom_mask)],
                                  np.asarray(batch.positions)[~np.asarray(batch.atom_mask)])


def test_noise_anneals_per_epoch():
    from bptt_jax.pipeline import FinetuneConfig, noise_schedule

    sched = noise_schedule(FinetuneConfig(noise=0.1, noise_anneal=0.5), steps_per_epoch=3)
    assert [float(sched(s)) for s in (0, 2, 3, 5, 6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert noise_schedule(FinetuneConfig(noise=0.1), steps_per_epoch=3) == 0.1


def test_clip_norm_none_means_no_clipping():
    from bptt_jax.bptt import make_optimizer

    params = {"model": {"w": jnp.zeros(3)}}
    grads = [{"model": {"w": jnp.array([100.0, 0.0, 0.0])}}, {"model": {"w": jnp.array([-1.0, 0.0, 0.0])}}]

    def updates(opt):
        state, out = opt.init(params), []
        for g in grads:
            u, state = opt.update(g, state, params)
            out.append(np.asarray(u["model"]["w"]))
        return out

    plain = updates(optax.adam(1e-2))
    unclipped = updates(make_optimizer(OptimConfig(learning_rate=1e-2, clip_norm=None)))
    clipped = updates(make_optimizer(OptimConfig(learning_rate=1e-2, clip_norm=1.0)))
    for a, b in zip(plain, unclipped):
        np.testing.assert_array_equal(a, b)
    # Clipped, the two gradients weigh the same and Adam's second step reverses; unclipped it does not.
    assert unclipped[1][0] < 0 < clipped[1][0]


def test_step_size_objects_per_step_mode(si_pairs):
    """relax.step_mode names a step-size object: its parameters, its scalar and what the update rule gets."""
    batch = _batch(si_pairs)
    model = build_model("adapt", "tiny")
    key = jax.random.PRNGKey(0)
    fixed = BPTT(model, RelaxConfig(step_size=0.05, step_mode="fixed"))
    learned = BPTT(model, RelaxConfig(step_size=0.05, step_mode="learned"))
    network = BPTT(model, RelaxConfig(step_size=0.05, step_mode="network"))
    assert fixed.step == FixedStep(0.05) and learned.step == LearnedStep(0.05)
    assert isinstance(network.step, NetworkStep) and network.step.head is network.step_head
    assert (fixed.step.trainable, learned.step.trainable, network.step.trainable) == (False, True, True)
    p_fixed, p_learned, p_network = (b.init_params(key, batch) for b in (fixed, learned, network))
    assert set(p_fixed) == {"model"} and set(p_learned) == {"model", "log_step_size"}
    assert set(p_network) == {"model", "step_head"}
    np.testing.assert_allclose(float(learned.step_size(p_learned)), 0.05, rtol=1e-6)
    assert float(fixed.step_size(p_fixed)) == pytest.approx(0.05) and network.step_size(p_network) is None
    assert callable(network.step.for_rule(p_network, batch, False))
    with pytest.raises(ValueError, match="positive"):
        learned.with_model_params(p_learned["model"], key, batch, step_size=0.0)
    with pytest.raises(ValueError, match="nothing to train"):
        BPTT(model, RelaxConfig(step_mode="fixed"), OptimConfig(freeze_model=True))
