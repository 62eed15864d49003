import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.bptt import BPTT, jit_train_step
from bptt_jax.inference import relax_many
from bptt_jax.losses import structure_loss
from bptt_jax.models import ADAPT, PRESETS
from bptt_jax.pipeline import relax_batches
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import Batch, Structure, bucket_size

KEY = jax.random.PRNGKey(0)
BUCKETS = (8, 16, 24)

# Spring constants (eV/Å²) by atomic number: O stops fast, Si in ~15 frames, C slowly (often out of frames),
# He is pushed outwards and diverges.
STIFFNESS = {8: 2.5, 14: 1.0, 6: 0.15, 2: -0.4}


class Well(nn.Module):
    """Each atom is pulled to its structure's centroid with a per-species (learnable) spring constant, plus
    ``scale`` times a tiny ADAPT's forces (so attention masks over padded atoms are exercised)."""

    scale: float = 0.0
    preset: str = "tiny"

    @nn.compact
    def __call__(self, batch, deterministic=True):
        init = np.zeros(119)
        for z, k in STIFFNESS.items():
            init[z] = k
        table = self.param("stiffness", lambda _: jnp.asarray(init, batch.positions.dtype))
        mask = batch.atom_mask[..., None]
        R = batch.positions
        centroid = jnp.sum(R * mask, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
        forces = -table[batch.numbers][..., None] * (R - centroid) * mask
        if self.scale:
            extra = ADAPT(**PRESETS["adapt"][self.preset])(batch, deterministic) * mask
            extra = extra - jnp.sum(extra, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
            forces = forces + self.scale * extra * mask  # no net force: the centroid stays put
        return forces


def cluster(n, z, seed, fixed=0, spread=0.7):
    rng = np.random.default_rng(seed)
    numbers = np.full(n, z) if np.isscalar(z) else np.asarray(z)
    fix = np.zeros(n, bool)
    fix[:fixed] = True
    return Structure(rng.normal(scale=spread, size=(n, 3)), numbers, fixed=fix)


def mixed_set():
    """Two buckets (8 and 16), frame counts from 0 to the budget, one divergence, fixed atoms."""
    return [
        cluster(3, 14, 0), cluster(5, 8, 1), cluster(4, 6, 2), cluster(7, [14, 8] * 3 + [6], 3),
        cluster(4, 2, 4),                      # diverges
        cluster(6, 14, 5, fixed=6),            # nothing free: 0 frames
        cluster(12, 8, 6), cluster(10, 14, 7, fixed=3), cluster(14, [6, 14] * 7, 8), cluster(2, 8, 9),
        cluster(11, 14, 10), cluster(5, [8, 14, 8, 14, 6], 11),
    ]


def _alone(bptt, params, structures, key=None):
    """Reference: every structure relaxed on its own with BPTT.relax_batch (early-exit while loop)."""
    out = []
    for s in structures:
        batch = Batch.from_structures([s], buckets=BUCKETS)
        res = bptt.relax_batch(params, batch, key)
        out.append((np.asarray(res.positions)[0, :len(s)], int(res.frames[0]), bool(res.converged[0]),
                    bool(res.diverged[0])))
    return out


def _to64(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


@pytest.mark.parametrize("x64", [True, False], ids=["descent-noise-f64", "fire-f32"])
def test_in_flight_equals_relaxing_each_alone(x64):
    structures = mixed_set()
    if x64:
        relax = RelaxConfig(step_size=0.3, momentum=0.1, noise=0.02, noise_anneal=0.7, max_frames=40, tol=1e-3,
                            diverge_distance=2.0)
    else:
        relax = RelaxConfig(rule="fire", max_frames=36, tol=1e-3, diverge_distance=2.0,
                            fire=(("dt_start", 0.2), ("max_step", 0.3)))
    with jax.enable_x64(x64):
        bptt = BPTT(Well(scale=0.01), relax)
        params = bptt.init_params(KEY, Batch.from_structures(structures[:2], buckets=BUCKETS))
        if x64:
            params = _to64(params)
        ref = _alone(bptt, params, structures)
        outcomes, stats = relax_many(bptt, params, structures, batch_size=3, buckets=BUCKETS, chunk_frames=4)
    frames = [r[1] for r in ref]
    # The set is a real test: very different lengths, the budget, a divergence, a structure with nothing free.
    assert 0 in frames and relax.max_frames in frames and len(set(frames)) >= 6, frames
    assert sum(r[3] for r in ref) == 1 and ref[4][3]
    for o, (pos, fr, conv, div), s in zip(outcomes, ref, structures):
        assert (o.frames, o.converged, o.diverged) == (fr, conv, div)
        assert o.positions.shape == (len(s), 3) and o.n_atoms == bucket_size(len(s), BUCKETS)
        if x64:
            np.testing.assert_array_equal(o.positions, pos)
        else:
            np.testing.assert_allclose(o.positions, pos, rtol=1e-5, atol=1e-5)
    # 12 structures in 3 slots per bucket: slots were refilled, in at most one compile per bucket.
    assert stats.buckets == {8: 8, 16: 4}
    assert stats.chunks > 2 * len(stats.buckets)
    assert stats.compiles <= len(stats.buckets)
    assert stats.structure_frames == sum(frames)
    assert 0 < stats.slot_utilisation <= 1 and stats.structures_per_s > 0


def test_per_structure_keys_and_targets():
    structures = mixed_set()[:5]
    targets = [np.zeros((len(s), 3)) for s in structures]
    bptt = BPTT(Well(), RelaxConfig(step_size=0.3, noise=0.02, noise_anneal=0.7, max_frames=30))
    params = bptt.init_params(KEY, Batch.from_structures(structures, buckets=BUCKETS))
    key = jax.random.PRNGKey(7)
    outcomes, _ = relax_many(bptt, params, structures, targets, batch_size=2, buckets=BUCKETS, key=key,
                             per_structure_keys=True)
    for i, (o, s, t) in enumerate(zip(outcomes, structures, targets)):
        batch = Batch.from_structures([s], [t], buckets=BUCKETS)
        res = bptt.relax_batch(params, batch, jax.random.fold_in(key, i))
        assert o.frames == int(res.frames[0])
        np.testing.assert_allclose(o.positions, np.asarray(res.positions)[0, :len(s)], rtol=1e-5, atol=1e-5)
        loss = float(structure_loss(bptt.optim.loss, res.positions, batch)[0])
        assert o.loss == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_one_compile_per_bucket_and_mode():
    """Training, evaluation and in-flight inference over batches of three size buckets compile once per
    bucket each, however many batches a bucket has."""
    sizes = [3, 5, 7, 2, 12, 9, 15, 10, 20, 17, 23, 18]
    structures = [cluster(n, [14, 8, 6][i % 3], seed=i) for i, n in enumerate(sizes)]
    items = [(s, s.positions * 0.9) for s in structures]
    batches = relax_batches(items, batch_size=2, buckets=BUCKETS)
    shapes = {b.positions.shape for _, b in batches}
    assert {n for _, n, _ in shapes} == set(BUCKETS) and len(batches) == 2 * len(BUCKETS)
    bptt = BPTT(Well(), RelaxConfig(step_size=0.2, step_mode="learned", max_frames=6))
    state = bptt.init_state(bptt.init_params(KEY, batches[0][1]), KEY)
    step = jit_train_step(bptt)
    for _ in range(2):
        for _, batch in batches:
            state, metrics = step(state, batch)
    evaluated = [(idx, bptt.evaluate(state.params, batch)) for idx, batch in batches]
    assert np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == len(BUCKETS)
    assert bptt.evaluate._cache_size() == len(BUCKETS)

    outcomes, stats = relax_many(bptt, state.params, structures, batch_size=2, buckets=BUCKETS, chunk_frames=2)
    assert stats.compiles == len(BUCKETS) and stats.buckets == {8: 4, 16: 4, 24: 4}
    for idx, out in evaluated:  # the same relaxation as the pipeline's evaluation (learned step size)
        for row, i in enumerate(idx):
            assert outcomes[i].frames == int(out["frames"][row])
            np.testing.assert_allclose(outcomes[i].positions, np.asarray(out["positions"])[row, :len(structures[i])],
                                       rtol=1e-5, atol=1e-5)
            assert outcomes[i].loss is None
    again, stats2 = relax_many(bptt, state.params, structures[::-1], batch_size=2, buckets=BUCKETS)
    assert stats2.compiles == 0  # cached per BPTT: a second call compiles nothing
    assert [o.frames for o in again[::-1]] == [o.frames for o in outcomes]


def test_in_flight_saves_model_calls_and_reports_throughput():
    # Structures that need very different numbers of frames, in an order that mixes them within batches.
    structures = [cluster(4, [8, 14, 6][i % 3], seed=i) for i in range(18)]
    bptt = BPTT(Well(), RelaxConfig(step_size=0.3, max_frames=60, tol=1e-3))
    params = bptt.init_params(KEY, Batch.from_structures(structures[:1], buckets=BUCKETS))
    outcomes, stats = relax_many(bptt, params, structures, batch_size=4, buckets=BUCKETS, chunk_frames=4)
    frames = np.array([o.frames for o in outcomes])
    # Fixed batches of 4 in order take, each, as many frames as their slowest structure.
    fixed_calls = sum(frames[i:i + 4].max() for i in range(0, len(frames), 4))
    assert stats.model_calls < fixed_calls
    assert stats.slot_utilisation > frames.sum() / (4 * fixed_calls)
    assert stats.structures == 18 and stats.structures_per_s > 0 and stats.seconds > 0
    assert stats.model_calls >= -(-frames.sum() // 4)


def test_empty_input_and_validation():
    bptt = BPTT(Well(), RelaxConfig(max_frames=5))
    outcomes, stats = relax_many(bptt, {}, [])
    assert outcomes == [] and stats.structures == 0 and stats.chunks == 0
    with pytest.raises(ValueError, match="targets"):
        relax_many(bptt, {}, [cluster(3, 14, 0)], [np.zeros((3, 3))] * 2)
    with pytest.raises(ValueError, match="batch_size"):
        relax_many(bptt, {}, [cluster(3, 14, 0)], batch_size=0)
