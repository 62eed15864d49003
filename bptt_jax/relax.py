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
    noise: float = 0.0,
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
        if noise:
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
) -> RolloutResult:
    """Run ``rule`` from ``positions`` until every structure converged or ``max_frames``.

    Args:
      rule: an ``(init_fn, step_fn)`` pair.
      positions: (B, N, 3) starting positions, Å.
      free_mask: (B, N) atoms that move and count in the stop statistic.
      key: PRNG key for stochastic rules / dropout.
      max_frames: frame budget (paper: 75 for Si defects and crystals, 200 for catalysts).
      tol: a structure stops once its RMS movement in one frame is below ``tol`` Å (paper: 1e-3).
      diverge_distance: RMS displacement from the start (Å) beyond which a structure counts as diverged.
      mode: ``"scan"`` (fixed length, reverse-mode differentiable) or ``"while"`` (early exit, inference).
      remat: wrap each frame in ``jax.checkpoint`` (memory ~ one frame's activations + the carries).
      skip_converged: in scan mode, skip the model call in frames where every structure is done.
      record: return the positions after every frame (scan mode).
    """
    init_fn, step_fn = rule
    start = positions
    state0 = init_fn(positions, key)
    n_free = jnp.sum(free_mask, axis=-1)
    done0 = n_free == 0
    zeros_b = jnp.zeros(done0.shape, jnp.int32)

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
        return (state, done | bad | hit_tol, frames + active, converged | hit_tol, diverged | (active & bad))

    if remat:
        frame = jax.checkpoint(frame)

    carry0 = (state0, done0, zeros_b, jnp.zeros_like(done0), jnp.zeros_like(done0))

    if mode == "scan":
        def body(carry, _):
            if skip_converged:
                carry = jax.lax.cond(jnp.all(carry[1]), lambda c: c, frame, carry)
            else:
                carry = frame(carry)
            return carry, (carry[0].positions if record else None)

        carry, traj = jax.lax.scan(body, carry0, None, length=max_frames)
    elif mode == "while":
        if record:
            raise ValueError("record=True needs mode='scan'")

        def cond(c):
            t, inner = c
            return (t < max_frames) & ~jnp.all(inner[1])

        _, carry = jax.lax.while_loop(cond, lambda c: (c[0] + 1, frame(c[1])), (jnp.int32(0), carry0))
        traj = None
    else:
        raise ValueError(f"unknown rollout mode {mode!r}; expected 'scan' or 'while'")

    state, _, frames, converged, diverged = carry
    return RolloutResult(state.positions, frames, converged, diverged, state, traj)


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class RelaxConfig:
    """How structures are relaxed during training and evaluation.

    Attributes:
      rule: ``"descent"`` (paper Eq. 2 and its ablations) or ``"fire"``.
      step_size: η (Å²/eV), or its initial value when learned (paper: 0.077 best fixed; 0.5 learned init).
      step_mode: ``"fixed"``, ``"learned"`` (a trainable scalar) or ``"network"`` (the App. B head).
      momentum, anneal, noise, noise_anneal: descent ablations (App. C).
      max_frames, tol, diverge_distance: stop rule (App. D) and divergence bound (Å).
      remat: ``jax.checkpoint`` per frame.
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


def make_rule(config: RelaxConfig, force_fn: ForceFn, free_mask: Array,
              step_size: Union[float, Array, StepSizeFn, None] = None) -> UpdateRule:
    """The update rule ``config`` describes; ``step_size`` (a learned scalar or a step-head closure)
    replaces ``config.step_size`` when given."""
    if config.rule == "fire":
        return fire(force_fn, free_mask, **dict(config.fire))
    eta = config.step_size if step_size is None else step_size
    return descent(force_fn, eta, free_mask, momentum=config.momentum, anneal=config.anneal,
                   noise=config.noise, noise_anneal=config.noise_anneal)


def run(config: RelaxConfig, rule: UpdateRule, positions: Array, free_mask: Array, *,
        key: Optional[Array] = None, mode: str = "scan", record: bool = False) -> RolloutResult:
    """:func:`rollout` with the stop rule and options of ``config``."""
    return rollout(rule, positions, free_mask, key=key, max_frames=config.max_frames, tol=config.tol,
                   diverge_distance=config.diverge_distance, mode=mode, remat=config.remat,
                   skip_converged=config.skip_converged, record=record)
