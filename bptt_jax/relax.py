"""Relaxation as an iterated map, and differentiable rollouts of it.

Update rules follow jax-md's minimisers: a factory returns a pair of pure functions ::

    init_fn, step_fn = descent(force_fn, step_size, free_mask)
    state = init_fn(positions, key)        # a pytree; every leaf has the batch axis first
    state = step_fn(state)                 # one frame: X_{t+1} = X_t + η F(X_t)   (paper Eq. 2)

``force_fn(positions, key) -> forces`` maps (B, N, 3) positions in Å to (B, N, 3) forces in eV/Å (``key``
is a PRNG key for models that use dropout inside rollouts; most ignore it). Fixed and padding atoms
(``~free_mask``) never move.

A rollout composes frames until every structure's RMS atomic movement falls below ``tol`` (Å) or
``max_frames`` is reached (paper Eq. 3). :func:`rollout` uses ``lax.scan`` over ``max_frames`` with a
per-structure ``done`` mask (for training: reverse-mode differentiable) or an early-exit
``lax.while_loop`` (for inference); both run the same frame function and give the same result. The stop
decision is taken on ``stop_gradient`` values: gradients flow through the frames a structure took, never
through the decision when to stop. Converged structures are frozen with ``jnp.where``.

A structure *diverges* when its positions become non-finite or its RMS displacement from the start
exceeds ``diverge_distance`` (Å); it is then frozen at its last good state, flagged, and counted by the
caller, so one bad structure never turns a batch's loss into NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

from bptt_jax.structures import safe_norm

Array = jax.Array
ForceFn = Callable[[Array, Array], Array]
StepSizeFn = Callable[[Array, Array, Array], Array]  # (positions, forces, key) -> (B,) step sizes


class UpdateRule(NamedTuple):
    init_fn: Callable[..., object]
    step_fn: Callable[[object], object]


def _split_keys(key: Optional[Array], batch_size: int) -> Array:
    key = jax.random.PRNGKey(0) if key is None else key
    return jax.random.split(key, batch_size)


def _is_zero(x) -> bool:
    """Whether ``x`` is a Python number equal to 0 (a traced value is never known to be zero)."""
    return isinstance(x, (int, float)) and x == 0


def _per_structure(x: Array, batch_size: int, dtype) -> Array:
    """A scalar or (B,) step parameter as (B,)."""
    return jnp.broadcast_to(jnp.asarray(x, dtype), (batch_size,))


# ----------------------------------------------------------------------------------------------------
# Update rules


@flax.struct.dataclass
class DescentState:
    """State of :func:`descent`.

    Attributes:
      positions: (B, N, 3) Å.
      velocity: (B, N, 3) Å, the momentum buffer (last displacement).
      step_size: (B,) step size used in the last frame (Å²/eV).
      frame: (B,) frames taken so far.
      key: (B, 2) PRNG keys for exploration noise and dropout.
    """

    positions: Array
    velocity: Array
    step_size: Array
    frame: Array
    key: Array


def descent(
    force_fn: ForceFn,
    step_size: Union[float, Array, StepSizeFn],
    free_mask: Array,
    *,
    momentum: float = 0.0,
    anneal: float = 1.0,
    noise: Union[float, Array] = 0.0,
    noise_anneal: float = 1.0,
) -> UpdateRule:
    """Force-driven descent, the paper's ``frame`` (Eq. 2) and its ablations (App. C).

    Per frame k, with F = force_fn(X)::

        η_k = η · anneal^k                          (multiplicative annealing, paper: 0.99)
        v   = momentum · v + η_k F                  (heavy-ball momentum, paper: 0.05)
        X  ← X + v + noise · noise_anneal^k · ε     (exploration noise, ε ~ N(0, 1) Å)

    Args:
      force_fn: forces (eV/Å) at positions.
      step_size: η in Å²/eV: a constant, a traced scalar (a learned parameter), a (B,) array, or a
        callable ``(positions, forces, key) -> (B,)`` (the neural step head of App. B).
      free_mask: (B, N) atoms that move.
      noise: σ of the exploration noise in Å, a number or a traced scalar (a training-time schedule).
    """
    free = free_mask[..., None]

    def eta_at(positions, forces, key):
        if callable(step_size):
            return step_size(positions, forces, key)
        return _per_structure(step_size, positions.shape[0], positions.dtype)

    def init_fn(positions: Array, key: Optional[Array] = None) -> DescentState:
        b = positions.shape[0]
        return DescentState(positions, jnp.zeros_like(positions), jnp.zeros((b,), positions.dtype),
                            jnp.zeros((b,), jnp.int32), _split_keys(key, b))

    def step_fn(state: DescentState) -> DescentState:
        keys = jax.vmap(jax.random.split)(state.key)  # (B, 2, 2)
        next_key, use_key = keys[:, 0], keys[:, 1]
        forces = jnp.where(free, force_fn(state.positions, use_key[0]), 0.0)
        eta = eta_at(state.positions, forces, use_key[0])
        eta = eta * jnp.asarray(anneal, eta.dtype) ** state.frame
        velocity = momentum * state.velocity + eta[:, None, None] * forces
        positions = state.positions + velocity
        if not _is_zero(noise):
            eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), state.positions.shape[1:],
                                                       state.positions.dtype))(use_key)
            scale = noise * jnp.asarray(noise_anneal, eta.dtype) ** state.frame
            positions = positions + jnp.where(free, scale[..., None, None] * eps, 0.0)
        return DescentState(positions, velocity, eta, state.frame + 1, next_key)

    return UpdateRule(init_fn, step_fn)


@flax.struct.dataclass
class FireState:
    """State of :func:`fire`: positions and velocity (B, N, 3); per structure dt, alpha, the number of
    downhill frames since the last reset, the frame counter and PRNG keys."""

    positions: Array
    velocity: Array
    dt: Array
    alpha: Array
    n_downhill: Array
    frame: Array
    key: Array


def fire(
    force_fn: ForceFn,
    free_mask: Array,
    *,
    dt_start: float = 0.1,
    dt_max: float = 1.0,
    max_step: float = 0.2,
    n_min: int = 5,
    f_inc: float = 1.1,
    f_dec: float = 0.5,
    alpha_start: float = 0.1,
    f_alpha: float = 0.99,
) -> UpdateRule:
    """FIRE (Bitzek et al. 2006) with ASE's conventions (unit masses; the whole structure's step is
    limited to ``max_step`` Å), batched per structure. Branches are ``jnp.where``, so the rule is
    differentiable almost everywhere (away from the switches between branches)."""
    free = free_mask[..., None]

    def init_fn(positions: Array, key: Optional[Array] = None) -> FireState:
        b = positions.shape[0]
        dtype = positions.dtype
        return FireState(positions, jnp.zeros_like(positions), jnp.full((b,), dt_start, dtype),
                         jnp.full((b,), alpha_start, dtype), jnp.zeros((b,), jnp.int32),
                         jnp.zeros((b,), jnp.int32), _split_keys(key, b))

    def step_fn(s: FireState) -> FireState:
        keys = jax.vmap(jax.random.split)(s.key)
        forces = jnp.where(free, force_fn(s.positions, keys[0, 1]), 0.0)
        power = jnp.sum(forces * s.velocity, axis=(-2, -1))
        downhill = (power > 0) & (s.frame > 0)
        f_norm = safe_norm(forces.reshape(forces.shape[0], -1))
        v_norm = safe_norm(s.velocity.reshape(forces.shape[0], -1))
        mix = s.alpha[:, None, None]
        # NOTE: f_norm ~ 0 only at convergence, where the mixing term vanishes anyway.
        mixed = (1 - mix) * s.velocity + mix * forces / jnp.maximum(f_norm, 1e-12)[:, None, None] * v_norm[:, None, None]
        speed_up = downhill & (s.n_downhill > n_min)
        velocity = jnp.where(downhill[:, None, None], mixed, 0.0)
        dt = jnp.where(downhill, jnp.where(speed_up, jnp.minimum(s.dt * f_inc, dt_max), s.dt), s.dt * f_dec)
        alpha = jnp.where(downhill, jnp.where(speed_up, s.alpha * f_alpha, s.alpha), alpha_start)
        # The first frame keeps dt_start, as ASE does.
        dt = jnp.where(s.frame > 0, dt, s.dt)
        n_downhill = jnp.where(downhill, s.n_downhill + 1, 0)
        velocity = velocity + dt[:, None, None] * forces
        dR = dt[:, None, None] * velocity
        dR_norm = safe_norm(dR.reshape(dR.shape[0], -1))
        scale = jnp.where(dR_norm > max_step, max_step / jnp.maximum(dR_norm, 1e-12), 1.0)
        positions = s.positions + scale[:, None, None] * dR
        return FireState(positions, velocity, dt, alpha, n_downhill, s.frame + 1, keys[:, 0])

    return UpdateRule(init_fn, step_fn)


# ----------------------------------------------------------------------------------------------------
# Rollouts

GRAD_MODES = ("full", "remat", "truncated", "implicit", "guided", "first_order")


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


@dataclasses.dataclass(frozen=True)
class AdjointConfig:
    """How the implicit (adjoint) gradient at a converged structure is solved.

    With the frame map Φ (one update-rule step) and its Jacobian J = ∂Φ/∂X at the converged positions X*,
    the cotangent g = ∂L/∂X* becomes the adjoint λ solving ``λ = g + (1 − damping) Jᵀλ``, and the parameter
    gradient is ``λᵀ ∂Φ/∂θ``. Only vector–Jacobian products of one frame are used, so memory does not grow
    with the number of frames.

    Attributes:
      solver: ``"neumann"`` (the fixed-point iteration λ ← g + Jᵀλ: BPTT run backwards at the fixed point)
        or ``"gmres"`` (``jax.scipy.sparse.linalg.gmres`` on ``(I − Jᵀ)λ = g``; faster on stiff systems).
      max_iters: iteration cap (Neumann steps, or GMRES restarts × Krylov size).
      tol: relative residual ``‖g + Jᵀλ − λ‖ / ‖g‖`` to stop at (per structure, the worst one counts).
      damping: δ ≥ 0; a small δ makes the system well-posed along soft or zero modes.
      project_translations: solve on the complement of rigid translations for structures with no fixed
        atom (their fixed point is defined only up to a translation when the model is translation-invariant).
      unconverged: ``"skip"`` (default): structures that stopped at ``max_frames`` without meeting the stop
        tolerance get no implicit gradient (the fixed-point assumption does not hold for them); ``"solve"``:
        treat every structure that did not diverge as converged (for relaxations that are stopped slightly
        short of the tolerance, and for measuring the cost of the solve).
    """

    solver: str = "gmres"
    max_iters: int = 200
    tol: float = 1e-4
    damping: float = 0.0
    project_translations: bool = True
    unconverged: str = "skip"

    def __post_init__(self):
        if self.solver not in ("neumann", "gmres"):
            raise ValueError(f"unknown adjoint solver {self.solver!r}; expected neumann or gmres")
        if self.unconverged not in ("skip", "solve"):
            raise ValueError(f"unknown adjoint unconverged policy {self.unconverged!r}; expected skip or solve")

    def solvable(self, converged: Array, diverged: Array) -> Array:
        """(B,) the structures whose final state is treated as a fixed point."""
        return converged if self.unconverged == "skip" else ~diverged


def rms_movement(dR: Array, free_mask: Array) -> Array:
    """(B,) root-mean-square over free atoms of |dR| (Å): the paper's stopping statistic."""
    sq = jnp.sum(dR * dR, axis=-1) * free_mask
    n = jnp.maximum(jnp.sum(free_mask, axis=-1), 1)
    return jnp.sqrt(jnp.sum(sq, axis=-1) / n)


def _select(mask: Array, new, old):
    """Per structure, ``new`` where mask else ``old``; every leaf has the batch axis first."""
    def sel(n, o):
        m = mask.reshape(mask.shape + (1,) * (n.ndim - 1))
        return jnp.where(m, n, o)
    return jax.tree_util.tree_map(sel, new, old)


def _per_structure_norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim))))


def _make_frame(step_fn, start: Array, free_mask: Array, tol: Union[float, Array], diverge_distance: float,
                frame_limit: Optional[Array] = None):
    """One frame of the stop rule on the carry ``(state, done, frames, converged, diverged)``.

    ``tol`` may be traced; ``frame_limit`` (a traced int, at most the scan's length) stops a structure once
    it has taken that many frames, so a training step can draw its stop rule without a new compilation."""

    def frame(carry):
        state, done, frames, converged, diverged = carry
        new = step_fn(state)
        R_old = jax.lax.stop_gradient(state.positions)
        R_new = jax.lax.stop_gradient(new.positions)
        move = rms_movement(jnp.where(free_mask[..., None], R_new - R_old, 0.0), free_mask)
        drift = rms_movement(jnp.where(free_mask[..., None], R_new - start, 0.0), free_mask)
        finite = jnp.all(jnp.isfinite(R_new) | ~free_mask[..., None], axis=(-2, -1))
        bad = ~finite | ~(drift <= diverge_distance)
        active = ~done
        state = _select(active & ~bad, new, state)
        hit_tol = active & ~bad & (move < tol)
        frames = frames + active
        stop = done | bad | hit_tol
        if frame_limit is not None:
            stop = stop | (frames >= frame_limit)
        return (state, stop, frames, converged | hit_tol, diverged | (active & bad))

    return frame


def _scan_frames(frame, carry0, n_frames: int, *, segment: int, skip_converged: bool, record: bool):
    """``n_frames`` frames with ``lax.scan``; with ``segment > 0`` every block of ``segment`` frames is one
    ``jax.checkpoint`` (only block-boundary carries are stored; a block's frames are recomputed in the
    backward pass). Returns the final carry and the recorded positions (T, B, N, 3) or None."""

    def guarded(carry, live=None):
        """``frame``, skipped (by ``lax.cond``) when every structure is done or the frame is padding."""
        skip = None
        if skip_converged:
            skip = jnp.all(carry[1])
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


def _forward_to_stop(frame, carry0, max_frames: int, window: int):
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
            state, done, frames = carry[0], carry[1], carry[2]
            slot = (jnp.arange(window)[:, None] == (frames % window)[None, :]) & ~done[None, :]

            def write(r, s):
                m = slot.reshape(slot.shape + (1,) * (s.ndim - 1))
                return jnp.where(m, s[None], r)
            ring = jax.tree_util.tree_map(write, ring, state)
        return t + 1, frame(carry), ring

    def cond(c):
        return (c[0] < max_frames) & ~jnp.all(c[1][1])

    _, carry, ring = jax.lax.while_loop(cond, body, (jnp.int32(0), carry0, ring0))
    carry = jax.lax.stop_gradient(carry)
    if window <= 0:
        return carry, None
    frames = carry[2]
    take = frames % window

    def pick(r, s0):
        chosen = jnp.take_along_axis(r, take.reshape((1, -1) + (1,) * (r.ndim - 2)), axis=0)[0]
        m = (frames >= window).reshape((-1,) + (1,) * (s0.ndim - 1))
        return jnp.where(m, chosen, s0)
    start_state = jax.lax.stop_gradient(jax.tree_util.tree_map(pick, ring, state0))
    return carry, start_state


def _forward_recording(frame, carry0, max_frames: int):
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
        return (c[0] < max_frames) & ~jnp.all(c[1][1])

    _, carry, buf = jax.lax.while_loop(cond, body, (jnp.int32(0), carry0, buf0))
    return jax.lax.stop_gradient(carry), jax.lax.stop_gradient(buf)


def _gather_frames(states, index: Array):
    """States at per-structure frame indices: ``index`` (K, B) into leaves (T, B, ...) gives (K, B, ...)."""
    def take(x):
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=0)
    return jax.tree_util.tree_map(take, states)


def first_order_samples(n_frames: Array, samples: int, key: Optional[Array], max_frames: int):
    """Frame indices (K, B) and weights (K, B) of the first-order estimator over each structure's first
    ``n_frames`` (B,) frames.

    ``samples = 0``: every frame, weight 1 (K = max_frames; entries at or past ``n_frames`` get weight 0).
    ``samples = K > 0``: stratified sampling, one frame from each of K equal strata of [0, n), weight n / K.
    Each frame i < n is then drawn with probability K/n (spread over the strata it overlaps), so the weighted
    sum over the K draws is an unbiased estimate of the sum over all n frames.
    """
    b = n_frames.shape[0]
    if samples <= 0:
        t = jnp.broadcast_to(jnp.arange(max_frames)[:, None], (max_frames, b))
        w = (t < n_frames[None, :]).astype(jnp.float32)
        # Frames a structure did not take point at one it did (weight 0): never-written states would give
        # 0 · NaN cotangents in models that are singular at zero positions.
        return jnp.minimum(t, jnp.maximum(n_frames - 1, 0)[None, :]), w
    key = jax.random.PRNGKey(0) if key is None else key
    u = jax.random.uniform(jax.random.fold_in(key, 0x5EED), (samples, b))
    n = n_frames.astype(jnp.float32)[None, :]
    t = jnp.floor((jnp.arange(samples, dtype=jnp.float32)[:, None] + u) * n / samples).astype(jnp.int32)
    t = jnp.clip(t, 0, jnp.maximum(n_frames - 1, 0)[None, :])
    return t, jnp.broadcast_to(n / samples, (samples, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _first_order_tail(phi_k, chunk, value, states, weights, *consts):
    """Returns ``value`` (positions, no gradient of their own); their cotangent λ goes to the parameters in
    ``consts`` as ``Σ_k w_k λᵀ ∂Φ(s_k)/∂θ`` over the recorded states ``s_k`` (held constant), ``chunk`` sampled
    frames at a time (0: all at once)."""
    del phi_k, chunk, states, weights, consts
    return value


def _first_order_tail_fwd(phi_k, chunk, value, states, weights, *consts):
    return value, (states, weights, consts)


def _first_order_tail_bwd(phi_k, chunk, res, g):
    states, weights, consts = res

    def part(s, w):
        _, vjp_c = jax.vjp(lambda *c: phi_k(s, *c), *consts)
        # Cotangent of Φ(s_k) for structure b: w_kb λ_b (weight 0 for frames a structure did not take).
        return vjp_c(w.astype(g.dtype)[:, :, None, None] * g[None])

    k = weights.shape[0]
    if chunk <= 0 or chunk >= k:
        d_consts = part(states, weights)
    else:  # a loop over chunks of sampled frames: memory of one chunk's tape, gradients accumulated
        n = -(-k // chunk)
        pad = n * chunk - k

        def blocks(x, fill):
            x = jnp.concatenate([x, jnp.broadcast_to(fill, (pad,) + x.shape[1:])]) if pad else x
            return x.reshape((n, chunk) + x.shape[1:])

        xs = (jax.tree_util.tree_map(lambda x: blocks(x, x[:1]), states),
              blocks(weights, jnp.zeros((), weights.dtype)))
        zero = tuple(jnp.zeros_like(c) for c in consts)
        d_consts, _ = jax.lax.scan(lambda acc, x: (jax.tree_util.tree_map(jnp.add, acc, part(*x)), None), zero, xs)
    return (None, None, None, *d_consts)


_first_order_tail.defvjp(_first_order_tail_fwd, _first_order_tail_bwd)


def _attach_first_order(step_fn, states, weights: Array, value: Array, chunk: int = 0) -> Array:
    """``value`` carrying the first-order gradient of the frames in ``states`` (leaves (K, B, ...))."""
    states = jax.lax.stop_gradient(states)
    one = jax.tree_util.tree_map(lambda x: x[0], states)

    def phi(s):
        return step_fn(s).positions

    phi_conv, consts = jax.closure_convert(phi, one)

    def phi_k(ss, *c):
        return jax.vmap(lambda s: phi_conv(s, *c))(ss)

    return _first_order_tail(phi_k, chunk, jax.lax.stop_gradient(value), states, jax.lax.stop_gradient(weights),
                             *consts)


def _adjoint_solve(vjp_x: Callable[[Array], Array], g: Array, free_mask: Array, translation: Array,
                   valid: Array, config: AdjointConfig):
    """λ with ``λ = P g + (1 − δ) P Jᵀλ`` and the per-structure relative residual.

    Only structures flagged ``valid`` (B,) (those that converged: the fixed-point assumption holds) are
    solved; the others get λ = 0 and residual 0. A structure whose solve ends worse than λ = 0 (relative
    residual ≥ 1, or non-finite: J is not contracting there) also gets λ = 0, and its residual is reported.

    P keeps free atoms and, for structures flagged in ``translation`` (B,), removes the mean over free atoms:
    when no atom is held fixed, a rigid translation of a translation-invariant model's fixed point is again a
    fixed point, so the fixed point is defined only up to translation and the adjoint is solved on the
    complement (rigid rotations of isolated molecules are not projected).
    """
    decay = 1.0 - config.damping
    free = free_mask[..., None]
    n_free = jnp.maximum(jnp.sum(free_mask, axis=-1), 1)[:, None, None]
    shift = translation[:, None, None]

    def proj(u):
        u = jnp.where(free, u, 0.0)
        mean = jnp.sum(u, axis=1, keepdims=True) / n_free
        return jnp.where(free, u - jnp.where(shift, mean, 0.0), 0.0)

    g = proj(jnp.where(valid[:, None, None], g, 0.0))

    def apply_jt(lam):
        return proj(decay * vjp_x(lam))

    g_norm = jnp.maximum(_per_structure_norm(g), jnp.finfo(g.dtype).tiny)
    def neumann():
        def cond(c):
            i, _, err = c
            # Structures whose iteration blew up (non-finite) stop counting; the check below zeroes them.
            worst = jnp.max(jnp.where(jnp.isfinite(err), err, 0.0))
            return (i == 0) | ((i < config.max_iters) & (worst > config.tol))

        def body(c):
            i, lam, _ = c
            new = g + apply_jt(lam)
            return i + 1, new, _per_structure_norm(new - lam) / g_norm

        return jax.lax.while_loop(cond, body, (jnp.int32(0), g, jnp.full(g.shape[:1], jnp.inf, g.dtype)))[1]

    if config.solver == "neumann":
        lam = neumann()
    else:
        restart = min(20, config.max_iters)
        lam, _ = jax.scipy.sparse.linalg.gmres(lambda u: u - apply_jt(u), g, x0=g, tol=config.tol, atol=0.0,
                                               restart=restart, maxiter=max(1, config.max_iters // restart))
        # GMRES works on the whole batch at once; a breakdown (e.g. a Krylov space exhausted early) can leave
        # non-finite values everywhere. Then fall back to the per-structure-stable Neumann iteration.
        lam = jax.lax.cond(jnp.all(jnp.isfinite(lam)), lambda: lam, neumann)
    residual = _per_structure_norm(g + apply_jt(lam) - lam) / g_norm
    residual = jnp.where(jnp.isfinite(residual), residual, jnp.inf)
    ok = valid & (residual < 1.0)
    lam = jnp.where(ok[:, None, None], lam, 0.0)
    return lam, jnp.where(valid, residual, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _implicit_tail(phi, config, value, x_star, free, translation, valid, probe, *consts):
    """Returns ``value``; its cotangent goes to the parameters in ``consts`` through the implicit function
    theorem at the fixed point ``x_star = phi(x_star, *consts)``. ``probe``'s cotangent is the adjoint
    residual per structure (so callers can report a solve that did not converge)."""
    del phi, config, x_star, free, translation, valid, probe, consts
    return value


def _implicit_tail_fwd(phi, config, value, x_star, free, translation, valid, probe, *consts):
    return value, (x_star, free, translation, valid, probe, consts)


def _implicit_tail_bwd(phi, config, res, g):
    x_star, free, translation, valid, probe, consts = res
    _, vjp_x = jax.vjp(lambda x: phi(x, *consts), x_star)
    lam, residual = _adjoint_solve(lambda u: vjp_x(u)[0], g, free, translation, valid, config)
    _, vjp_c = jax.vjp(lambda *c: phi(x_star, *c), *consts)
    d_consts = vjp_c(lam)
    return (jnp.zeros_like(x_star), jnp.zeros_like(x_star), None, None, None, residual.astype(probe.dtype),
            *d_consts)


_implicit_tail.defvjp(_implicit_tail_fwd, _implicit_tail_bwd)


def _attach_implicit(step_fn, final_state, value: Array, free_mask: Array, translation: Optional[Array],
                     valid: Array, config: AdjointConfig, probe: Optional[Array]) -> Array:
    """``value`` carrying the implicit gradient of the fixed point of ``step_fn`` at ``final_state``."""
    x_star = jax.lax.stop_gradient(final_state.positions)
    frozen = jax.lax.stop_gradient(final_state)

    def phi(x):
        return step_fn(frozen.replace(positions=x)).positions

    phi_conv, consts = jax.closure_convert(phi, x_star)

    def phi_args(x, *c):
        return phi_conv(x, *c)

    if probe is None:
        probe = jnp.zeros(x_star.shape[:1], x_star.dtype)
    if translation is None or not config.project_translations:
        translation = jnp.zeros(x_star.shape[:1], bool)
    return _implicit_tail(phi_args, config, value, x_star, free_mask, translation, valid, probe, *consts)


def rollout(
    rule: UpdateRule,
    positions: Array,
    free_mask: Array,
    *,
    key: Optional[Array] = None,
    max_frames: int = 75,
    tol: float = 1e-3,
    diverge_distance: float = 5.0,
    mode: str = "scan",
    remat: bool = False,
    skip_converged: bool = True,
    record: bool = False,
    grad_mode: str = "full",
    segment: int = 1,
    window: Optional[int] = None,
    adjoint: AdjointConfig = AdjointConfig(),
    adjoint_probe: Optional[Array] = None,
    translation_modes: Optional[Array] = None,
    samples: int = 32,
    sample_chunk: int = 4,
    frame_limit: Optional[Array] = None,
) -> RolloutResult:
    """Run ``rule`` from ``positions`` until every structure converged or ``max_frames``.

    Args:
      rule: an ``(init_fn, step_fn)`` pair.
      positions: (B, N, 3) starting positions, Å.
      free_mask: (B, N) atoms that move and count in the stop statistic.
      key: PRNG key for stochastic rules / dropout.
      max_frames: frame budget (paper: 75 for Si defects and crystals, 200 for catalysts).
      tol: a structure stops once its RMS movement in one frame is below ``tol`` Å (paper: 1e-3); a number or
        a traced scalar.
      diverge_distance: RMS displacement from the start (Å) beyond which a structure counts as diverged.
      mode: ``"scan"`` (differentiable, per ``grad_mode``) or ``"while"`` (early exit, inference only).
      remat: shorthand for ``grad_mode="remat", segment=1``.
      skip_converged: in scan mode, skip the model call in frames where every structure is done.
      record: return the positions after every frame (``grad_mode`` full or remat).
      grad_mode: how reverse-mode gradients flow through the relaxation (scan mode):

        - ``"full"``: plain BPTT through a ``lax.scan`` over ``max_frames`` (memory ∝ frames).
        - ``"remat"``: the same gradient, with ``jax.checkpoint`` around blocks of ``segment`` frames
          (``segment=1``: per frame; ``segment=0``: ⌈√max_frames⌉ frames, √n checkpointing).
        - ``"truncated"``: an early-exit forward pass without gradients, then BPTT through each structure's
          last ``window`` frames only (re-run from the stored state ``window`` frames before its stop).
        - ``"implicit"``: the early-exit forward pass, and the gradient of the converged structure as a fixed
          point X* = frame(X*) by the implicit function theorem (see :class:`AdjointConfig`); memory is
          independent of the number of frames. Structures that did not converge (frame budget or
          divergence) contribute no gradient.
        - ``"guided"``: ``"truncated"`` plus the implicit gradient for the frames before the window (the
          window's start state gets the sensitivity of the fixed point, linearised at the converged state;
          structures that did not converge keep the plain truncated gradient).
        - ``"first_order"``: the early-exit forward pass records every frame's state; BPTT runs through each
          structure's last ``window`` frames (none with ``window=0``), and the frames before them contribute
          their parameter derivative with the Jacobians of the frames with respect to positions dropped (as
          first-order MAML drops second derivatives): ``∂L/∂θ ≈ Σ_t λᵀ ∂Φ(s_t)/∂θ``, with λ the cotangent at
          the window's start and s_t the recorded states, estimated from ``samples`` frames per structure
          (stratified, unbiased; 0 = every frame). Exact where ``I + η ∂F/∂X ≈ I`` over the early frames:
          for modes that relax slowly, which is where most of the remaining displacement (and of Dq) lies.
      segment: frames per checkpointed block in ``"remat"`` mode.
      window: frames unrolled with gradients in ``"truncated"``, ``"guided"`` and ``"first_order"`` modes
        (None: :data:`DEFAULT_WINDOW`, 10 frames, none for ``"first_order"``).
      adjoint: the adjoint solver of ``"implicit"`` and ``"guided"``.
      adjoint_probe: optional (B,) zeros; differentiating with respect to it returns the adjoint residual
        per structure (``"implicit"``/``"guided"``), so a training step can report an unconverged solve.
      translation_modes: optional (B,) bool, structures whose rigid translation is a zero mode (no fixed
        atom, translation-invariant forces); the adjoint is solved on the complement of their translations
        (see ``AdjointConfig.project_translations``). Default: none. :class:`~bptt_jax.bptt.BPTT` flags every
        structure without fixed atoms.
      samples: frames per structure whose parameter derivative ``"first_order"`` evaluates (0 = all).
      sample_chunk: ``"first_order"`` differentiates the sampled frames this many at a time, in a loop that
        accumulates the parameter gradient (0 = all at once). Memory is that many frames' tape; on XLA:CPU
        chunks of 2–4 were also the fastest (all 32 at once: 1.4× slower, 9× the memory).
      frame_limit: optional traced int ≤ ``max_frames``: structures stop after this many frames. The scan keeps
        its static length ``max_frames``, so a different limit per call (paper App. C.4: variable stopping)
        reuses the compiled program.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; expected one of {', '.join(GRAD_MODES)}")
    if mode not in ("scan", "while"):
        raise ValueError(f"unknown rollout mode {mode!r}; expected 'scan' or 'while'")
    if remat and grad_mode == "full":
        grad_mode, segment = "remat", 1
    init_fn, step_fn = rule
    window = window_frames(grad_mode, window)
    start = positions
    state0 = init_fn(positions, key)
    n_free = jnp.sum(free_mask, axis=-1)
    done0 = n_free == 0
    zeros_b = jnp.zeros(done0.shape, jnp.int32)
    frame = _make_frame(step_fn, start, free_mask, tol, diverge_distance, frame_limit)
    carry0 = (state0, done0, zeros_b, jnp.zeros_like(done0), jnp.zeros_like(done0))

    if mode == "while":
        if record:
            raise ValueError("record=True needs mode='scan'")
        carry, _ = _forward_to_stop(frame, carry0, max_frames, 0)
        state, _, frames, converged, diverged = carry
        return RolloutResult(state.positions, frames, converged, diverged, state, None)

    if grad_mode in ("full", "remat"):
        seg = 0 if grad_mode == "full" else (segment if segment > 0 else math.ceil(math.sqrt(max_frames)))
        carry, traj = _scan_frames(frame, carry0, max_frames, segment=seg, skip_converged=skip_converged,
                                   record=record)
        state, _, frames, converged, diverged = carry
        return RolloutResult(state.positions, frames, converged, diverged, state, traj)

    if record:
        raise ValueError(f"record=True needs grad_mode full or remat, not {grad_mode!r}")
    if grad_mode == "first_order":
        k = max(0, min(window, max_frames))
        fwd, states = _forward_recording(frame, carry0, max_frames)
        n_early = jnp.maximum(fwd[2] - k, 0)
        index, weights = first_order_samples(n_early, samples, key, max_frames)
        if k == 0:  # no window: the first-order part ends at the final state
            state, _, frames, converged, diverged = fwd
            tail = _attach_first_order(step_fn, _gather_frames(states, index), weights, state.positions, sample_chunk)
            return RolloutResult(tail, frames, converged, diverged, state.replace(positions=tail))
        # The window starts from the recorded state k frames before each structure's stop.
        tail_state = jax.tree_util.tree_map(lambda x: x[0], _gather_frames(states, n_early[None, :]))
        tail = _attach_first_order(step_fn, _gather_frames(states, index), weights, tail_state.positions,
                                   sample_chunk)
        carry_w = (tail_state.replace(positions=tail), done0, n_early, jnp.zeros_like(done0), jnp.zeros_like(done0))
        carry, _ = _scan_frames(frame, carry_w, k, segment=0, skip_converged=skip_converged, record=False)
        state, _, frames, converged, diverged = carry
        return RolloutResult(state.positions, frames, converged, diverged, state, None)
    k = 0 if grad_mode == "implicit" else max(1, min(window, max_frames))
    fwd, window_start = _forward_to_stop(frame, carry0, max_frames, k)
    if grad_mode == "implicit":
        state, _, frames, converged, diverged = fwd
        positions = _attach_implicit(step_fn, state, state.positions, free_mask, translation_modes,
                                     adjoint.solvable(converged, diverged), adjoint, adjoint_probe)
        return RolloutResult(positions, frames, converged, diverged, state.replace(positions=positions))

    if grad_mode == "guided":
        tail = _attach_implicit(step_fn, fwd[0], window_start.positions, free_mask, translation_modes,
                                adjoint.solvable(fwd[3], fwd[4]), adjoint, adjoint_probe)
        started = (fwd[2] >= k).reshape((-1, 1, 1))  # structures that stopped sooner re-run from the start
        window_start = window_start.replace(positions=jnp.where(started, tail, window_start.positions))
    frames0 = jnp.maximum(fwd[2] - k, 0)
    carry_w = (window_start, done0, frames0, jnp.zeros_like(done0), jnp.zeros_like(done0))
    carry, _ = _scan_frames(frame, carry_w, k, segment=0, skip_converged=skip_converged, record=False)
    state, _, frames, converged, diverged = carry
    return RolloutResult(state.positions, frames, converged, diverged, state, None)


# ----------------------------------------------------------------------------------------------------
# Configuration


# Frames unrolled before each structure's stop when ``RelaxConfig.window`` is None. first_order: none (the
# gradient-mode study found a 10-frame window no better, and it costs a sequential unroll).
DEFAULT_WINDOW = {"truncated": 10, "guided": 10, "first_order": 0}


def window_frames(grad_mode: str, window: Optional[int] = None) -> int:
    """``window``, or ``grad_mode``'s default (:data:`DEFAULT_WINDOW`) when it is None."""
    return DEFAULT_WINDOW.get(grad_mode, 10) if window is None else window


@dataclasses.dataclass(frozen=True)
class RelaxConfig:
    """How structures are relaxed during training and evaluation.

    Attributes:
      rule: ``"descent"`` (paper Eq. 2 and its ablations) or ``"fire"``.
      step_size: η (Å²/eV), or its initial value when learned (paper: 0.077 best fixed; 0.5 learned init).
      step_mode: ``"fixed"``, ``"learned"`` (a trainable scalar) or ``"network"`` (the App. B head).
      momentum, anneal, noise, noise_anneal: descent ablations (App. C).
      max_frames, tol, diverge_distance: stop rule (App. D) and divergence bound (Å).
      remat: ``jax.checkpoint`` per frame (shorthand for ``grad_mode="remat"``, ``remat_segment=1``).
      grad_mode: gradient through the relaxation, one of :data:`GRAD_MODES` (see :func:`rollout`).
      remat_segment: frames per checkpointed block in ``"remat"`` mode (0 = ⌈√max_frames⌉).
      window: frames unrolled with gradients in ``"truncated"``, ``"guided"`` and ``"first_order"`` modes
        (``"first_order"`` also takes 0); None: the mode's default, :data:`DEFAULT_WINDOW` (see
        :attr:`window_frames`).
      sample_frames: frames per structure whose parameter derivative ``"first_order"`` evaluates (0 = all).
      sample_chunk: ``"first_order"`` differentiates that many sampled frames at a time (0 = all at once).
      adjoint_solver, adjoint_iters, adjoint_tol, adjoint_damping, adjoint_project_translations,
        adjoint_unconverged: the adjoint solve of ``"implicit"`` and ``"guided"`` (see :class:`AdjointConfig`).
      length_quantum: with ``BPTT.fit_step`` in full/remat mode, differentiate a scan only as long as the batch
        needs (found by an early-exit forward pass), rounded up to a multiple of this (0 = always max_frames).
      skip_converged: skip frames once every structure in the batch is done.
      dropout: keep model dropout on inside rollouts.
      fire: keyword overrides for :func:`fire`.
    """

    rule: str = "descent"
    step_size: float = 0.077
    step_mode: str = "fixed"
    momentum: float = 0.0
    anneal: float = 1.0
    noise: float = 0.0
    noise_anneal: float = 1.0
    max_frames: int = 75
    tol: float = 1e-3
    diverge_distance: float = 5.0
    remat: bool = False
    grad_mode: str = "full"
    remat_segment: int = 1
    window: Optional[int] = None
    sample_frames: int = 32
    sample_chunk: int = 4
    adjoint_solver: str = "gmres"
    adjoint_iters: int = 200
    adjoint_tol: float = 1e-4
    adjoint_damping: float = 0.0
    adjoint_project_translations: bool = True
    adjoint_unconverged: str = "skip"
    length_quantum: int = 0
    skip_converged: bool = True
    dropout: bool = False
    fire: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.rule not in ("descent", "fire"):
            raise ValueError(f"unknown update rule {self.rule!r}; expected descent or fire")
        if self.step_mode not in ("fixed", "learned", "network"):
            raise ValueError(f"unknown step_mode {self.step_mode!r}; expected fixed, learned or network")
        if self.max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"unknown grad_mode {self.grad_mode!r}; expected one of {', '.join(GRAD_MODES)}")
        if self.window_frames < (0 if self.grad_mode == "first_order" else 1) or self.remat_segment < 0:
            raise ValueError("window must be at least 1 (0 allowed for first_order) and remat_segment at least 0")
        if self.sample_frames < 0 or self.sample_chunk < 0:
            raise ValueError("sample_frames and sample_chunk must be at least 0 (0 = every frame / all at once)")
        self.adjoint  # validates the solver name

    @property
    def window_frames(self) -> int:
        """``window``, or the gradient mode's default when it is None."""
        return window_frames(self.grad_mode, self.window)

    @property
    def adjoint(self) -> AdjointConfig:
        return AdjointConfig(self.adjoint_solver, self.adjoint_iters, self.adjoint_tol, self.adjoint_damping,
                             self.adjoint_project_translations, self.adjoint_unconverged)


def make_rule(config: RelaxConfig, force_fn: ForceFn, free_mask: Array,
              step_size: Union[float, Array, StepSizeFn, None] = None,
              extra_noise: Union[float, Array] = 0.0) -> UpdateRule:
    """The update rule ``config`` describes; ``step_size`` (a learned scalar or a step-head closure)
    replaces ``config.step_size`` when given; ``extra_noise`` (Å, maybe traced) adds to ``config.noise``."""
    if config.rule == "fire":
        return fire(force_fn, free_mask, **dict(config.fire))
    eta = config.step_size if step_size is None else step_size
    noise = config.noise if _is_zero(extra_noise) else config.noise + extra_noise
    return descent(force_fn, eta, free_mask, momentum=config.momentum, anneal=config.anneal,
                   noise=noise, noise_anneal=config.noise_anneal)


def run(config: RelaxConfig, rule: UpdateRule, positions: Array, free_mask: Array, *,
        key: Optional[Array] = None, mode: str = "scan", record: bool = False,
        adjoint_probe: Optional[Array] = None, translation_modes: Optional[Array] = None,
        tol: Union[float, Array, None] = None, frame_limit: Optional[Array] = None) -> RolloutResult:
    """:func:`rollout` with the stop rule, gradient mode and options of ``config``; ``tol`` and
    ``frame_limit`` (traced values) replace its stop rule for this call."""
    return rollout(rule, positions, free_mask, key=key, max_frames=config.max_frames,
                   tol=config.tol if tol is None else tol,
                   diverge_distance=config.diverge_distance, mode=mode, remat=config.remat,
                   skip_converged=config.skip_converged, record=record, grad_mode=config.grad_mode,
                   segment=config.remat_segment, window=config.window_frames, adjoint=config.adjoint,
                   adjoint_probe=adjoint_probe, translation_modes=translation_modes, samples=config.sample_frames,
                   sample_chunk=config.sample_chunk, frame_limit=frame_limit)
