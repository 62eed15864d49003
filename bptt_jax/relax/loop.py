"""Rollouts: an update rule composed frame by frame under one stop rule, and the loops that run it.

A rollout composes frames until every structure's RMS atomic movement falls below ``tol`` (Å) or
``max_frames`` is reached (paper Eq. 3). :func:`rollout` uses ``lax.scan`` over ``max_frames`` with a
per-structure ``done`` mask (for training: reverse-mode differentiable) or an early-exit
``lax.while_loop`` (for inference); both run the same frame function and give the same result. The stop
decision is taken on ``stop_gradient`` values: gradients flow through the frames a structure took, never
through the decision when to stop. Converged structures are frozen with ``jnp.where``.

A structure *diverges* when its positions become non-finite (non-finite forces make them so) or its RMS
displacement from the start exceeds ``diverge_distance`` (Å); it is then frozen at its last good state, flagged,
and counted by the caller, so its positions stay finite. (Its gradient: :meth:`bptt_jax.bptt.BPTT.loss_and_grad`
leaves it out of the loss and guarantees a zero contribution.)

The stop rule (:func:`stop_rule`) and the per-structure :class:`Status` it updates are the only ones in the
library: the training rollout, the early-exit rollout and :func:`bptt_jax.inference.relax_many` all use them.
How a scan-mode rollout is differentiated is the choice of a gradient method
(:mod:`bptt_jax.relax.methods`), which runs the loops of an :class:`Unroll`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

from bptt_jax.relax.methods import Full, GradMethod
from bptt_jax.relax.rules import UpdateRule

if TYPE_CHECKING:
    from bptt_jax.relax.config import RelaxConfig

Array = jax.Array


# ----------------------------------------------------------------------------------------------------
# The stop rule


class Status(NamedTuple):
    """Where each structure of a batch stands in its relaxation; every field is (B,).

    Attributes:
      done: stopped (tolerance, divergence or frame limit), or has no free atom to move.
      frames: frames taken.
      converged: stopped by the movement tolerance.
      diverged: stopped by non-finite positions or a displacement beyond ``diverge_distance``.
    """

    done: Array
    frames: Array
    converged: Array
    diverged: Array


def initial_status(free_mask: Array) -> Status:
    """The status before the first frame: structures without a free atom are done from the start."""
    done = jnp.sum(free_mask, axis=-1) == 0
    return Status(done, jnp.zeros(done.shape, jnp.int32), jnp.zeros_like(done), jnp.zeros_like(done))


def rms_movement(dR: Array, free_mask: Array) -> Array:
    """(B,) root-mean-square over free atoms of |dR| (Å): the paper's stopping statistic."""
    sq = jnp.sum(dR * dR, axis=-1) * free_mask
    n = jnp.maximum(jnp.sum(free_mask, axis=-1), 1)
    return jnp.sqrt(jnp.sum(sq, axis=-1) / n)


def select(mask: Array, new, old):
    """Per structure, ``new`` where mask else ``old``; every leaf has the batch axis first."""
    def sel(n, o):
        m = mask.reshape(mask.shape + (1,) * (n.ndim - 1))
        return jnp.where(m, n, o)
    return jax.tree_util.tree_map(sel, new, old)


def stop_rule(status: Status, old: Array, new: Array, start: Array, free_mask: Array, tol: Union[float, Array],
              diverge_distance: float, frame_limit: Union[int, Array, None] = None) -> tuple[Array, Status]:
    """One frame of the stop rule: which structures take the frame ``old → new``, and the status after it.

    Args:
      status: before the frame.
      old, new: (B, N, 3) positions before and after the frame (Å); pass ``stop_gradient`` values when
        differentiating, the stop decision is never differentiated.
      start: (B, N, 3) positions at the start of the relaxation (Å), for the divergence bound.
      free_mask: (B, N) atoms that move and count in the statistics.
      tol: a structure converges once its RMS movement in one frame is below ``tol`` Å (a number or traced).
      diverge_distance: RMS displacement from ``start`` (Å) beyond which a structure diverges.
      frame_limit: optional frame budget (an int or traced): a structure that has taken this many frames is done.

    Returns:
      ``(accept, status)``: (B,) the structures whose new state counts (active and finite, within the bound;
      the others keep their old state), and the status after the frame.
    """
    free = free_mask[..., None]
    move = rms_movement(jnp.where(free, new - old, 0.0), free_mask)
    drift = rms_movement(jnp.where(free, new - start, 0.0), free_mask)
    finite = jnp.all(jnp.isfinite(new) | ~free, axis=(-2, -1))
    bad = ~finite | ~(drift <= diverge_distance)
    active = ~status.done
    accept = active & ~bad
    hit_tol = accept & (move < tol)
    frames = status.frames + active
    stop = status.done | bad | hit_tol
    if frame_limit is not None:
        stop = stop | (frames >= frame_limit)
    return accept, Status(stop, frames, status.converged | hit_tol, status.diverged | (active & bad))


def make_frame(step_fn, start: Array, free_mask: Array, tol: Union[float, Array], diverge_distance: float,
               frame_limit: Optional[Array] = None):
    """One frame of ``step_fn`` under the stop rule, on the carry ``(state, status)``.

    ``tol`` may be traced; ``frame_limit`` (a traced int, at most the scan's length) stops a structure once
    it has taken that many frames, so a training step can draw its stop rule without a new compilation."""

    def frame(carry):
        state, status = carry
        new = step_fn(state)
        accept, status = stop_rule(status, jax.lax.stop_gradient(state.positions),
                                   jax.lax.stop_gradient(new.positions), start, free_mask, tol, diverge_distance,
                                   frame_limit)
        return select(accept, new, state), status

    return frame


# ----------------------------------------------------------------------------------------------------
# Loops


def scan_frames(frame, carry0, n_frames: int, *, segment: int, skip_converged: bool, record: bool):
    """``n_frames`` frames with ``lax.scan``; with ``segment > 0`` every block of ``segment`` frames is one
    ``jax.checkpoint`` (only block-boundary carries are stored; a block's frames are recomputed in the
    backward pass). Returns the final carry and the recorded positions (T, B, N, 3) or None."""

    def guarded(carry, live=None):
        """``frame``, skipped (by ``lax.cond``) when every structure is done or the frame is padding."""
        skip = None
        if skip_converged:
            skip = jnp.all(carry[1].done)
        if live is not None:
            skip = ~live if skip is None else skip | ~live
        if skip is None:
            return frame(carry)
        return jax.lax.cond(skip, lambda c: c, frame, carry)

    if segment <= 0:
        def body(carry, _):
            carry = guarded(carry)
            return carry, (carry[0].positions if record else None)
        return jax.lax.scan(body, carry0, None, length=n_frames)

    if segment == 1:
        step = jax.checkpoint(guarded)

        def body1(carry, _):
            carry = step(carry)
            return carry, (carry[0].positions if record else None)
        return jax.lax.scan(body1, carry0, None, length=n_frames)

    n_seg = -(-n_frames // segment)

    @jax.checkpoint
    def block(carry, seg_index):
        def inner(c, j):
            live = seg_index * segment + j < n_frames
            c = guarded(c, live)
            return c, (c[0].positions if record else None)
        return jax.lax.scan(inner, carry, jnp.arange(segment))

    carry, traj = jax.lax.scan(block, carry0, jnp.arange(n_seg))
    if record:
        traj = traj.reshape((n_seg * segment,) + traj.shape[2:])[:n_frames]
    return carry, traj


def forward_to_stop(frame, carry0, max_frames: int, window: int):
    """Early-exit forward pass (no gradients) that also keeps, per structure, the rule state ``window``
    frames before its stop (or the start state if it stopped sooner). Returns (final carry, window start)."""
    state0 = carry0[0]
    if window > 0:
        ring0 = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (window,) + x.shape), state0)
    else:
        ring0 = None

    def body(c):
        t, carry, ring = c
        if window > 0:
            state, status = carry
            slot = (jnp.arange(window)[:, None] == (status.frames % window)[None, :]) & ~status.done[None, :]

            def write(r, s):
                m = slot.reshape(slot.shape + (1,) * (s.ndim - 1))
                return jnp.where(m, s[None], r)
            ring = jax.tree_util.tree_map(write, ring, state)
        return t + 1, frame(carry), ring

    def cond(c):
        return (c[0] < max_frames) & ~jnp.all(c[1][1].done)

    _, carry, ring = jax.lax.while_loop(cond, body, (jnp.int32(0), carry0, ring0))
    carry = jax.lax.stop_gradient(carry)
    if window <= 0:
        return carry, None
    frames = carry[1].frames
    take = frames % window

    def pick(r, s0):
        chosen = jnp.take_along_axis(r, take.reshape((1, -1) + (1,) * (r.ndim - 2)), axis=0)[0]
        m = (frames >= window).reshape((-1,) + (1,) * (s0.ndim - 1))
        return jnp.where(m, chosen, s0)
    start_state = jax.lax.stop_gradient(jax.tree_util.tree_map(pick, ring, state0))
    return carry, start_state


def forward_recording(frame, carry0, max_frames: int):
    """Early-exit forward pass (no gradients) that records the rule state before every frame.

    Returns (final carry, states) with ``states`` leaves of shape (max_frames, B, ...): entry t is the state
    after t frames (for each structure, valid for t <= its frame count; later entries are never read)."""
    state0 = carry0[0]
    buf0 = jax.tree_util.tree_map(lambda x: jnp.zeros((max_frames,) + x.shape, x.dtype), state0)

    def body(c):
        t, carry, buf = c
        buf = jax.tree_util.tree_map(lambda b, s: jax.lax.dynamic_update_index_in_dim(b, s, t, 0), buf, carry[0])
        return t + 1, frame(carry), buf

    def cond(c):
        return (c[0] < max_frames) & ~jnp.all(c[1][1].done)

    _, carry, buf = jax.lax.while_loop(cond, body, (jnp.int32(0), carry0, buf0))
    return jax.lax.stop_gradient(carry), jax.lax.stop_gradient(buf)


@dataclasses.dataclass(frozen=True)
class Unroll:
    """One relaxation ready to run, handed to a gradient method's ``unroll``: the frame function under the stop
    rule, the start, and the loops that run it (written once here; the method picks and combines them).

    Attributes:
      step_fn: the update rule's ``step_fn`` (methods that differentiate one frame on its own use it).
      frame: ``frame((state, status)) -> (state, status)``, one frame under the stop rule (:func:`make_frame`).
      state0, status0: the rule state and :class:`Status` before the first frame.
      max_frames: the frame budget (static).
      skip_converged: scans skip a frame's model call once every structure is done.
      free_mask: (B, N) atoms that move.
      key: the rollout's PRNG key (sampling methods draw from it), or None.
      translation_modes: optional (B,) bool, structures whose rigid translation is a zero mode.
      adjoint_probe: optional (B,) zeros whose cotangent is an adjoint solve's residual per structure.
    """

    step_fn: Callable
    frame: Callable
    state0: object
    status0: Status
    max_frames: int
    skip_converged: bool
    free_mask: Array
    key: Optional[Array] = None
    translation_modes: Optional[Array] = None
    adjoint_probe: Optional[Array] = None

    def scan(self, state, status: Status, n_frames: int, *, segment: int = 0, record: bool = False):
        """``n_frames`` frames by ``lax.scan`` from ``(state, status)`` (:func:`scan_frames`), differentiable.
        Returns ``((state, status), trajectory or None)``."""
        return scan_frames(self.frame, (state, status), n_frames, segment=segment,
                           skip_converged=self.skip_converged, record=record)

    def forward_to_stop(self, window: int = 0):
        """The early-exit forward pass from the start, without gradients (:func:`forward_to_stop`).
        Returns ``((state, status), state window frames before each structure's stop or None)``."""
        return forward_to_stop(self.frame, (self.state0, self.status0), self.max_frames, window)

    def forward_recording(self):
        """The early-exit forward pass recording every frame's state (:func:`forward_recording`).
        Returns ``((state, status), states)`` with leaves (max_frames, B, ...)."""
        return forward_recording(self.frame, (self.state0, self.status0), self.max_frames)


# ----------------------------------------------------------------------------------------------------
# Rollouts


@flax.struct.dataclass
class RolloutResult:
    """What a rollout returns.

    Attributes:
      positions: (B, N, 3) final positions, Å.
      frames: (B,) frames each structure took (0 for structures with no free atom).
      converged: (B,) stopped by the movement tolerance.
      diverged: (B,) stopped by non-finite positions or displacement beyond ``diverge_distance``.
      state: the final update-rule state.
      trajectory: (T, B, N, 3) positions after every frame, when recorded (scan mode only).
    """

    positions: Array
    frames: Array
    converged: Array
    diverged: Array
    state: object
    trajectory: Optional[Array] = None


def rollout(
    rule: UpdateRule,
    positions: Array,
    free_mask: Array,
    *,
    method: GradMethod = Full(),
    key: Optional[Array] = None,
    max_frames: int = 75,
    tol: float = 1e-3,
    diverge_distance: float = 5.0,
    mode: str = "scan",
    skip_converged: bool = True,
    record: bool = False,
    adjoint_probe: Optional[Array] = None,
    translation_modes: Optional[Array] = None,
    frame_limit: Optional[Array] = None,
) -> RolloutResult:
    """Run ``rule`` from ``positions`` until every structure converged or ``max_frames``.

    Args:
      rule: an ``(init_fn, step_fn)`` pair.
      positions: (B, N, 3) starting positions, Å.
      free_mask: (B, N) atoms that move and count in the stop statistic.
      method: how reverse-mode gradients flow through the relaxation in scan mode, a gradient method of
        :mod:`bptt_jax.relax.methods`: ``Full()`` (plain BPTT), ``Remat(segment)``, ``Truncated(window)``,
        ``Implicit(...)``, ``Guided(window, implicit)`` or ``FirstOrder(window, samples, chunk)``.
      key: PRNG key for stochastic rules / dropout (and the frames ``FirstOrder`` samples).
      max_frames: frame budget (paper: 75 for Si defects and crystals, 200 for catalysts).
      tol: a structure stops once its RMS movement in one frame is below ``tol`` Å (paper: 1e-3); a number or
        a traced scalar.
      diverge_distance: RMS displacement from the start (Å) beyond which a structure counts as diverged.
      mode: ``"scan"`` (differentiable, per ``method``) or ``"while"`` (early exit, inference only).
      skip_converged: in scan mode, skip the model call in frames where every structure is done.
      record: return the positions after every frame (``Full`` or ``Remat`` only).
      adjoint_probe: optional (B,) zeros; differentiating with respect to it returns the adjoint residual
        per structure (``Implicit``/``Guided``), so a training step can report an unconverged solve.
      translation_modes: optional (B,) bool, structures whose rigid translation is a zero mode (no fixed
        atom, translation-invariant forces); the adjoint is solved on the complement of their translations
        (see ``Implicit.project_translations``). Default: none. :class:`~bptt_jax.bptt.BPTT` flags every
        structure without fixed atoms.
      frame_limit: optional traced int ≤ ``max_frames``: structures stop after this many frames. The scan keeps
        its static length ``max_frames``, so a different limit per call (paper App. C.4: variable stopping)
        reuses the compiled program.
    """
    if not isinstance(method, GradMethod):
        raise TypeError(f"method must be a gradient method (bptt_jax.relax.methods), not {method!r}")
    if mode not in ("scan", "while"):
        raise ValueError(f"unknown rollout mode {mode!r}; expected 'scan' or 'while'")
    init_fn, step_fn = rule
    unroll = Unroll(step_fn, make_frame(step_fn, positions, free_mask, tol, diverge_distance, frame_limit),
                    init_fn(positions, key), initial_status(free_mask), max_frames, skip_converged, free_mask,
                    key, translation_modes, adjoint_probe)

    if mode == "while":
        if record:
            raise ValueError("record=True needs mode='scan'")
        (state, status), _ = unroll.forward_to_stop()
        return RolloutResult(state.positions, status.frames, status.converged, status.diverged, state, None)

    if record and method.early_exit:
        raise ValueError(f"record=True needs grad_mode full or remat, not {method.name!r}")
    state, status, traj = method.unroll(unroll, record=record)
    return RolloutResult(state.positions, status.frames, status.converged, status.diverged, state, traj)


def run(config: RelaxConfig, rule: UpdateRule, positions: Array, free_mask: Array, *,
        key: Optional[Array] = None, mode: str = "scan", record: bool = False,
        adjoint_probe: Optional[Array] = None, translation_modes: Optional[Array] = None,
        tol: Union[float, Array, None] = None, frame_limit: Optional[Array] = None) -> RolloutResult:
    """:func:`rollout` with the stop rule, gradient method and options of ``config``; ``tol`` and
    ``frame_limit`` (traced values) replace its stop rule for this call."""
    return rollout(rule, positions, free_mask, method=config.method, key=key, max_frames=config.max_frames,
                   tol=config.tol if tol is None else tol, diverge_distance=config.diverge_distance, mode=mode,
                   skip_converged=config.skip_converged, record=record, adjoint_probe=adjoint_probe,
                   translation_modes=translation_modes, frame_limit=frame_limit)
