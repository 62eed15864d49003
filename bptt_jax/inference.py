"""Inference relaxation of many structures with in-flight batching.

:func:`relax_many` relaxes a list of host :class:`~bptt_jax.structures.Structure` s with a trained
:class:`~bptt_jax.bptt.BPTT` and wastes no model calls on structures that have already stopped::

    outcomes, stats = relax_many(bptt, params, structures, batch_size=16)
    outcomes[i].positions, outcomes[i].frames, outcomes[i].converged, outcomes[i].diverged
    stats.structures_per_s, stats.slot_utilisation, stats.compiles

Structures are grouped by padded size (:func:`~bptt_jax.structures.bucket_size`). Per bucket, a fixed-shape
*slot batch* of ``batch_size`` structures lives on device. One jitted function (:class:`InFlightRelaxer`)

1. writes newly queued structures into the slots the host marked for refill (fresh rule state from the
   rule's ``init_fn``, frame counter 0), then
2. runs up to ``limit`` frames in a ``lax.while_loop`` that exits early once every slot is done (or enough
   slots finished to be worth refilling).

Between calls the host harvests finished slots and refills them from the queue; once the queue is empty the
last call runs to the end. Shapes depend only on (bucket, batch_size), so the function compiles once per
bucket (and dtype / presence of targets); the slot state is donated. Nothing leaves the device inside the
loop (no host callbacks), so it runs unchanged on GPU/TPU.

Every structure gets the result of relaxing it alone with ``BPTT.relax_batch`` (mode ``"while"``): the same
update rule, and the same stop rule per structure — its own frame budget ``relax.max_frames``, movement
tolerance ``relax.tol`` and ``relax.diverge_distance`` — because the rule state, the start positions and the
stop flags are all per slot, and a slot that is done keeps its state. Stochastic rules (exploration noise)
draw from the key ``relax_batch`` would give the structure relaxed alone (see ``key`` in :func:`relax_many`).
With ``relax.dropout`` the model's dropout key is one per batch, as in ``relax_batch``, so results then depend
on the batch's composition.

The rule comes from :meth:`BPTT.update_rule <bptt_jax.bptt.BPTT.update_rule>`, the one
:meth:`BPTT.rollout <bptt_jax.bptt.BPTT.rollout>` uses; the tests check both give the same relaxation.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import relax as relax_lib
from bptt_jax.bptt import BPTT, Params
from bptt_jax.losses import structure_loss
from bptt_jax.structures import DEFAULT_BUCKETS, Batch, Structure, bucket_size

Array = jax.Array


@dataclasses.dataclass
class RelaxOutcome:
    """One relaxed structure (host side).

    Attributes:
      positions: (n, 3) final positions, Å (the last finite state for a diverged structure).
      frames: frames the structure took.
      converged: stopped by the movement tolerance.
      diverged: stopped by non-finite positions or drift beyond ``diverge_distance``.
      loss: per-structure loss (``bptt.optim.loss``) against its target, when targets were given.
      n_atoms: padded size (bucket) it was relaxed in.
    """

    positions: np.ndarray
    frames: int
    converged: bool
    diverged: bool
    loss: Optional[float] = None
    n_atoms: int = 0


@dataclasses.dataclass
class InferenceStats:
    """How a :func:`relax_many` call went.

    Attributes:
      structures: structures relaxed.
      seconds: wall time of the call, including any compilation.
      structures_per_s: ``structures / seconds``.
      model_calls: batched force evaluations (loop iterations, summed over buckets).
      structure_frames: frames summed over structures: the model evaluations that did useful work.
      slot_utilisation: ``structure_frames / (model_calls * batch_size)``; 1 means no slot ever idled.
      chunks: calls of the jitted chunk function (host round trips).
      compiles: new compilations of the chunk function during this call.
      buckets: structures per padded size.
    """

    structures: int
    seconds: float
    structures_per_s: float
    model_calls: int
    structure_frames: int
    slot_utilisation: float
    chunks: int
    compiles: int
    buckets: dict[int, int]


@flax.struct.dataclass
class Slots:
    """The device-side slot batch of one bucket; every leaf has the slot axis first.

    Attributes:
      batch: the structures in the slots (``positions`` are their *start* positions).
      state: the update rule's state (current positions etc.).
      status: the :class:`~bptt_jax.relax.Status` of each slot's structure under the library's stop rule;
        ``done`` also when it used its frame budget ``relax.max_frames``, or the slot holds nothing to relax.
    """

    batch: Batch
    state: Any
    status: relax_lib.Status


class InFlightRelaxer:
    """The jitted refill-and-advance function of :func:`relax_many` for one :class:`BPTT`.

    ``advance(params, slots, fresh, keys, replace, limit, want)``:

    - ``fresh``: a :class:`Batch` of the slot shape whose rows ``replace`` (B,) are written into the slots,
      with per-slot PRNG keys ``keys`` (B, 2) for the rule's ``init_fn``;
    - then frames until ``limit`` frames ran, every slot is finished (stopped or out of frames), or ``want``
      of the newly reported slots in ``watch`` finished.

    Returns ``(slots, loop_iterations, active_slot_frames, loss)`` (``loss`` (B,) when the batch has targets,
    else None). ``slots`` is donated.
    """

    def __init__(self, bptt: BPTT):
        self.bptt = bptt
        self.advance = jax.jit(self._advance, donate_argnums=(1,))

    def empty_slots(self, params: Params, batch: Batch) -> Slots:
        """Slots holding nothing (all done), with the pytree structure and shapes of ``batch``."""
        shapes = jax.eval_shape(lambda b: self.bptt.update_rule(params, b).init_fn(b.positions), batch)
        state = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        b = batch.positions.shape[0]
        empty = jax.tree_util.tree_map(jnp.zeros_like, batch)
        return Slots(empty, state, relax_lib.Status(jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32),
                                                    jnp.zeros((b,), bool), jnp.zeros((b,), bool)))

    def _advance(self, params: Params, slots: Slots, fresh: Batch, keys: Array, replace: Array, limit: Array,
                 want: Array):
        cfg = self.bptt.relax
        batch = relax_lib.select(replace, fresh, slots.batch)
        rule = self.bptt.update_rule(params, batch)
        free_mask = batch.free_mask
        # Fresh state and status per replaced slot, exactly as a structure relaxed alone starts.
        init = jax.vmap(lambda p, k: rule.init_fn(p[None], k))(fresh.positions, keys)
        init = jax.tree_util.tree_map(lambda x: x[:, 0], init)
        state = relax_lib.select(replace, init, slots.state)
        status = relax_lib.select(replace, relax_lib.initial_status(free_mask), slots.status)
        start = batch.positions
        # Slots whose finishing the host waits for (the ones that hold a structure).
        watch = ~status.done

        def cond(c):
            i, _, status, _ = c
            return (i < limit) & ~jnp.all(status.done) & (jnp.sum(status.done & watch) < want)

        def body(c):
            i, state, status, work = c
            new = rule.step_fn(state)
            # The frame budget is per slot: slots start at different loop iterations.
            accept, next_status = relax_lib.stop_rule(status, state.positions, new.positions, start, free_mask,
                                                      cfg.tol, cfg.diverge_distance, cfg.max_frames)
            return (i + 1, relax_lib.select(accept, new, state), next_status,
                    work + jnp.sum(~status.done, dtype=jnp.int32))

        n_iter, state, status, work = jax.lax.while_loop(cond, body, (jnp.int32(0), state, status, jnp.int32(0)))
        loss = None
        if batch.target_positions is not None:
            loss = structure_loss(self.bptt.optim.loss, state.positions, batch)
        return Slots(batch, state, status), n_iter, work, loss


@functools.lru_cache(maxsize=16)
def _cached_relaxer(bptt: BPTT) -> InFlightRelaxer:
    return InFlightRelaxer(bptt)


def relaxer_for(bptt: BPTT) -> InFlightRelaxer:
    """The (cached) :class:`InFlightRelaxer` of ``bptt``, so repeated calls reuse its compilations."""
    try:
        return _cached_relaxer(bptt)
    except TypeError:  # an unhashable model: no cache
        return InFlightRelaxer(bptt)


def _structure_keys(key: Optional[Array], n: int, per_structure: bool) -> np.ndarray:
    """(n, 2) raw PRNG keys, one per structure: ``key`` (default PRNGKey(0)) for all, or ``fold_in(key, i)``."""
    key = jax.random.PRNGKey(0) if key is None else jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if per_structure:
        return np.asarray(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n)))
    return np.tile(np.asarray(key), (n, 1))


def relax_many(
    bptt: BPTT,
    params: Params,
    structures: Sequence[Structure],
    targets: Optional[Sequence[Structure | np.ndarray]] = None,
    *,
    batch_size: int = 16,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    chunk_frames: int = 8,
    refill_at: Optional[int] = None,
    key: Optional[Array] = None,
    per_structure_keys: bool = False,
    relaxer: Optional[InFlightRelaxer] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> tuple[list[RelaxOutcome], InferenceStats]:
    """Relax ``structures`` with ``bptt``'s model and update rule, with early exit and in-flight batching.

    Args:
      bptt: model, relaxation config (rule, step size, ``max_frames``, ``tol``, ``diverge_distance``), loss.
      params: its parameters.
      structures: the starting structures.
      targets: optional relaxed structures or (n, 3) positions; then each outcome has its ``loss``.
      batch_size: slots per bucket (the batch the model sees).
      buckets: size buckets (see :func:`~bptt_jax.structures.bucket_size`).
      chunk_frames: frames per device call while structures are queued; then finished slots are refilled.
      refill_at: a chunk also ends once this many of its slots finished while structures are still queued
        (default ``max(1, batch_size // 4)``; 0 = only after ``chunk_frames``).
      key: PRNG key of stochastic rules (exploration noise). Structure ``i`` gets the key
        ``relax_batch(params, batch_of_it_alone, k)`` would use, with ``k = key`` (None: PRNGKey(0)) or,
        with ``per_structure_keys``, ``k = jax.random.fold_in(key, i)``.
      relaxer: the compiled function to use (default: the cached one of ``bptt``).
      mesh: split the slots over this mesh of local devices (:func:`bptt_jax.parallel.local_mesh`;
        ``batch_size`` must be a multiple of its size), the parameters copied to each device. The outcomes
        are those of one device.

    Returns:
      One :class:`RelaxOutcome` per structure, in input order, and :class:`InferenceStats`.
    """
    t0 = time.perf_counter()
    if batch_size < 1 or chunk_frames < 1:
        raise ValueError("batch_size and chunk_frames must be at least 1")
    if targets is not None and len(targets) != len(structures):
        raise ValueError(f"{len(targets)} targets for {len(structures)} structures")
    relaxer = relaxer_for(bptt) if relaxer is None else relaxer
    split = None  # where slot arrays live: the default device, or split over the mesh
    if mesh is not None:
        from bptt_jax import parallel

        if batch_size % mesh.size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the mesh's {mesh.size} devices")
        params = parallel.replicate(parallel.unreplicate(params), mesh)
        split = parallel.batch_sharding(mesh)

    def put(tree):
        return jax.device_put(tree, split)
    refill_at = max(1, batch_size // 4) if refill_at is None else int(refill_at)
    max_frames = bptt.relax.max_frames
    n_total = len(structures)
    keys = _structure_keys(key, n_total, per_structure_keys)

    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(structures):
        groups[bucket_size(len(s), buckets)].append(i)

    outcomes: list[Optional[RelaxOutcome]] = [None] * n_total
    cache0 = relaxer.advance._cache_size()
    model_calls = work_total = chunks = 0
    never = np.int32(batch_size + 1)
    for n_pad in sorted(groups):
        members = groups[n_pad]
        # Pad the bucket once on the host; refills are row gathers from it.
        padded = jax.device_get(Batch.from_structures(
            [structures[i] for i in members], None if targets is None else [targets[i] for i in members],
            n_atoms=n_pad))
        queue = collections.deque(range(len(members)))
        occupant = [-1] * batch_size  # slot -> index into members
        slots = fresh = None
        while True:
            refill = [j for j in range(batch_size) if occupant[j] < 0][:len(queue)]
            for j in refill:
                occupant[j] = queue.popleft()
            if all(o < 0 for o in occupant):
                break
            replace = np.zeros(batch_size, bool)
            replace[refill] = True
            if refill or fresh is None:
                # Row j of `fresh` is slot j's new structure; other rows are filler, ignored by `replace`.
                rows = np.full(batch_size, occupant[refill[0]] if refill else 0)
                rows[refill] = [occupant[j] for j in refill]
                fresh = put(jax.tree_util.tree_map(lambda a: a[rows], padded))
                slot_keys = put(keys[[members[r] for r in rows]])
            if slots is None:
                slots = put(relaxer.empty_slots(params, fresh))
            limit, want = (chunk_frames, refill_at if refill_at > 0 else never) if queue else (max_frames, never)
            slots, n_iter, work, loss = relaxer.advance(params, slots, fresh, slot_keys, put(replace),
                                                        np.int32(limit), np.int32(want))
            chunks += 1
            (fin, frames, converged, diverged), n_iter, work, loss = jax.device_get((slots.status, n_iter, work, loss))
            model_calls += int(n_iter)
            work_total += int(work)
            harvest = [j for j in range(batch_size) if occupant[j] >= 0 and fin[j]]
            if harvest:
                positions = np.asarray(jax.device_get(slots.state.positions))
                for j in harvest:
                    i = members[occupant[j]]
                    n = len(structures[i])
                    # Copies: the slot buffers are donated to the next call.
                    outcomes[i] = RelaxOutcome(
                        np.array(positions[j, :n], dtype=np.float64), int(frames[j]), bool(converged[j]),
                        bool(diverged[j]), None if loss is None else float(loss[j]), n_pad)
                    occupant[j] = -1

    seconds = time.perf_counter() - t0
    stats = InferenceStats(
        structures=n_total, seconds=seconds, structures_per_s=n_total / max(seconds, 1e-12),
        model_calls=model_calls, structure_frames=work_total,
        slot_utilisation=work_total / max(model_calls * batch_size, 1), chunks=chunks,
        compiles=relaxer.advance._cache_size() - cache0, buckets={n: len(g) for n, g in sorted(groups.items())})
    return outcomes, stats  # type: ignore[return-value]
