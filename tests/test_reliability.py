"""Diverging relaxations and bad numbers (issue 18).

A structure whose relaxation diverges (non-finite positions or forces, or a drift beyond ``relax.diverge_distance``)
is frozen, counted and left out of the loss, and the gradient is that of the batch without it, bit for bit, for
every way of differentiating the relaxation. An update that would bring a non-finite value into the parameters or
the optimiser state is skipped and counted, in BPTT and in pretraining.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bptt_jax.bptt import BPTT, TrainState, jit_train_step
from bptt_jax.inference import relax_many
from bptt_jax.models import build_model
from bptt_jax.pipeline.curves import TrainingCurves
from bptt_jax.pipeline.finetuning import _train_epoch
from bptt_jax.pipeline.pretraining import make_force_step
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import Batch, Structure
from conftest import rattled_si

KEY = jax.random.PRNGKey(0)
GE, SN = 32, 50  # the elements that mark a structure the model fails on


class Unstable(nn.Module):
    """A force model that fails on marked structures: inside it, the forces on a structure containing germanium
    overflow (× e^1000 = inf, so the backward pass meets 0 · inf), and those on a structure containing tin are
    e^4 ≈ 55 times too strong (its relaxation runs away). Other structures get the inner model's forces exactly."""

    inner: nn.Module

    @nn.compact
    def __call__(self, batch, deterministic=True):
        forces = self.inner(batch, deterministic)
        has = lambda z: jnp.any(batch.numbers == z, axis=-1)  # noqa: E731
        log_gain = jnp.where(has(GE), 1000.0, jnp.where(has(SN), 4.0, 0.0))
        return forces * jnp.exp(log_gain)[:, None, None]


def _normal():
    return [rattled_si(seed=0), rattled_si(cubic=True, seed=1), rattled_si(cubic=True, seed=2, drop=1)]


def _bad_structures():
    """(start, target) of a structure whose relaxation goes wrong, by kind."""
    s, t = rattled_si(cubic=True, seed=3)
    nan_start = s.positions.copy()
    nan_start[2, 0] = np.nan  # a bad input: non-finite from the start
    return {"overflow": (Structure(s.positions, np.full(len(s), GE), s.cell, s.pbc), t),
            "drift": (Structure(s.positions, np.full(len(s), SN), s.cell, s.pbc), t),
            "nan_start": (Structure(nan_start, s.numbers, s.cell, s.pbc), t)}


def _batch(pairs):
    return Batch.from_structures([s for s, _ in pairs], [t for _, t in pairs], batch_size=4)


def _assert_trees_equal(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


def test_without_makes_the_slots_what_padding_makes_them():
    """Batch.without gives the batch of the other structures, as from_structures pads it (NaN positions gone)."""
    for pair in _bad_structures().values():
        dropped = _batch(_normal() + [pair]).without(jnp.array([False, False, False, True]))
        _assert_trees_equal(dropped, _batch(_normal()))


METHODS = {
    "full": dict(),
    "remat-fire": dict(rule="fire", grad_mode="remat"),
    "first_order": dict(grad_mode="first_order", sample_frames=4),
    "implicit": dict(grad_mode="implicit", adjoint_unconverged="solve"),
}


@pytest.mark.parametrize("method", METHODS)
def test_a_diverged_structure_adds_nothing_to_the_gradient(method):
    """Three normal structures and a fourth that diverges, against the same three with an empty fourth slot: the
    same loss and the same gradient, bit for bit, and the fourth counted as diverged."""
    good = _batch(_normal())
    bptt = BPTT(Unstable(build_model("adapt", "tiny")), RelaxConfig(step_size=0.05, max_frames=6, **METHODS[method]))
    params = bptt.init_params(KEY, good)
    loss_and_grad = jax.jit(bptt.loss_and_grad)
    total0, aux0, grads0, _ = loss_and_grad(params, good)
    assert _finite(grads0) and float(optax.tree.norm(grads0)) > 0
    assert not np.any(np.asarray(aux0["diverged"]))
    kinds = _bad_structures()
    if bptt.relax.rule == "fire":
        del kinds["drift"]  # FIRE caps every frame's step (0.2 Å): strong forces alone do not run away
    for kind, pair in kinds.items():
        batch = _batch(_normal() + [pair])
        total, aux, grads, _ = loss_and_grad(params, batch)
        np.testing.assert_array_equal(np.asarray(aux["diverged"]), [False, False, False, True], err_msg=kind)
        if kind == "drift":  # it took frames before it ran away, and they add nothing either
            assert int(aux["frames"][3]) >= 2, aux["frames"]
        assert float(total) == float(total0), kind
        assert _finite(grads), kind
        _assert_trees_equal(grads, grads0)

    if method == "full":
        # The overflow really reaches the backward pass: leaving the structure out of the loss is not enough.
        batch = _batch(_normal() + [kinds["overflow"]])
        plain = jax.jit(jax.grad(lambda p: bptt.loss(p, batch)[0]))(params)
        assert not _finite(plain)


def test_evaluation_counts_diverged_structures_and_stays_finite():
    """BPTT.evaluate and relax_many flag the structures whose relaxation went wrong, keep their last finite state,
    and relax the others as without them."""
    normal = _normal()
    bad = _bad_structures()
    bptt = BPTT(Unstable(build_model("adapt", "tiny")), RelaxConfig(step_size=0.05, max_frames=6))
    params = bptt.init_params(KEY, _batch(normal))
    alone = bptt.evaluate(params, _batch(normal))
    for kind in ("overflow", "drift"):
        out = bptt.evaluate(params, _batch(normal + [bad[kind]]))
        np.testing.assert_array_equal(np.asarray(out["diverged"]), [False, False, False, True])
        assert _finite((out["per_structure"], out["positions"])), kind
        np.testing.assert_array_equal(np.asarray(out["per_structure"])[:3], np.asarray(alone["per_structure"])[:3])

    pairs = normal + [bad["overflow"], bad["drift"]]
    outcomes, _ = relax_many(bptt, params, [s for s, _ in pairs], [t for _, t in pairs], batch_size=2)
    assert [o.diverged for o in outcomes] == [False, False, False, True, True]
    assert all(np.isfinite(o.loss) and np.all(np.isfinite(o.positions)) for o in outcomes)
    np.testing.assert_allclose([o.loss for o in outcomes[:3]], np.asarray(alone["per_structure"])[:3], rtol=1e-5)


def test_a_non_finite_update_is_skipped_and_counted():
    """A step whose gradient is NaN (a NaN target) leaves parameters and optimiser state as they were and counts
    itself; its step count and key advance, so the next normal step is the one the run would take next."""
    good = _batch(_normal())
    bad = good.replace(target_positions=good.target_positions.at[0, 0, 0].set(jnp.nan))
    bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=4))
    state = bptt.init_state(bptt.init_params(KEY, good), KEY)
    before = jax.device_get(state)  # host copies: the step donates the state
    step = jit_train_step(bptt)
    state, metrics = step(state, bad)
    assert int(metrics["skipped_updates"]) == 1 and not np.isfinite(float(metrics["grad_norm"]))
    _assert_trees_equal(state.params, before.params)
    _assert_trees_equal(state.opt_state, before.opt_state)
    assert int(state.step) == 1
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(jax.random.split(before.rng)[0]))

    # The next step proceeds, exactly as from a state that never saw the bad batch (with the same count and key).
    expected = TrainState(*jax.tree_util.tree_map(jnp.asarray, (before.params, before.opt_state)), jnp.int32(1),
                          jax.random.split(before.rng)[0])
    state, metrics = step(state, good)
    expected, metrics_expected = step(expected, good)
    assert int(metrics["skipped_updates"]) == 0 and np.isfinite(float(metrics["loss"]))
    _assert_trees_equal(state.params, expected.params)
    assert float(metrics["loss"]) == float(metrics_expected["loss"])
    assert not np.array_equal(np.asarray(state.params["log_step_size"]), before.params["log_step_size"])


def test_force_matching_skips_a_non_finite_step():
    structures = [Structure(s.positions, s.numbers, s.cell, s.pbc, forces=0.1 * (t - s.positions))
                  for s, t in _normal()]
    good = Batch.from_structures(structures, with_forces=True)
    bad = good.replace(forces=good.forces.at[1, 0, 2].set(jnp.inf))
    model = build_model("adapt", "tiny")
    # The pretraining chain: reduce_on_plateau's state holds +inf by design, which must not count as non-finite.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2),
                            optax.contrib.reduce_on_plateau(factor=0.5, patience=2, accumulation_size=2))
    step, _ = make_force_step(model, optimizer)
    params = model.init(KEY, good)
    opt_state = optimizer.init(params)
    new_params, new_state, loss, skipped = step(params, opt_state, bad)
    assert bool(skipped) and not np.isfinite(float(loss))
    _assert_trees_equal(new_params, params)
    _assert_trees_equal(new_state, opt_state)
    new_params, _, loss, skipped = step(new_params, new_state, good)
    assert not bool(skipped) and np.isfinite(float(loss)) and not _finite(jax.tree_util.tree_map(
        lambda a, b: np.where(np.asarray(a) == np.asarray(b), np.nan, 0.0), new_params, params))


def test_an_epoch_counts_its_skipped_updates_and_averages_the_applied_steps():
    """BPTT's epoch loop sums the steps' ``skipped_updates`` (metrics.csv's column) and leaves a skipped step's
    loss (NaN) out of the epoch's training loss."""
    items = [(s, t) for s, t in _normal()] * 2
    data = types.SimpleNamespace(fit_items=items, buckets=(8,))
    losses = iter([1.0, float("nan"), 3.0])

    def train_step(state, batch, ref_params):
        loss = next(losses)
        return state + 1, {"loss": loss, "frames": 4.0, "diverged": 1, "skipped_updates": int(not np.isfinite(loss))}

    state, stats = _train_epoch(train_step, 0, None, data, 2, np.random.default_rng(0), None, 0, False,
                                TrainingCurves(), first_step=0)
    assert state == 3 and stats.skipped_updates == 1 and stats.diverged == 3
    assert stats.train_loss() == 2.0
