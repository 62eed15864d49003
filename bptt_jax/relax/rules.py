"""Update rules: one frame of a relaxation as a pair of pure functions, as jax-md's minimisers are.

A rule is an :class:`UpdateRule`, made by a factory such as :func:`descent` or :func:`fire` ::

    init_fn, step_fn = descent(force_fn, step_size, free_mask)
    state = init_fn(positions, key)        # a pytree; every leaf has the batch axis first
    state = step_fn(state)                 # one frame: X_{t+1} = X_t + η F(X_t)   (paper Eq. 2)

``force_fn(positions, key) -> forces`` maps (B, N, 3) positions in Å to (B, N, 3) forces in eV/Å (``key``
is a PRNG key for models that use dropout inside rollouts; most ignore it). Fixed and padding atoms
(``~free_mask``) never move. The rollout (:mod:`bptt_jax.relax.loop`) only reads ``state.positions``;
everything else in the state is the rule's own.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

from bptt_jax.structures import safe_norm

Array = jax.Array
ForceFn = Callable[[Array, Array], Array]
StepSizeFn = Callable[[Array, Array, Array], Array]  # (positions, forces, key) -> (B,) step sizes


class UpdateRule(NamedTuple):
    """A relaxation's update rule: a pair of pure functions over a pytree state.

    Attributes:
      init_fn: ``init_fn(positions, key=None) -> state``: the state before the first frame, from (B, N, 3)
        positions in Å and an optional PRNG key (None: ``PRNGKey(0)``), split into one key per structure.
      step_fn: ``step_fn(state) -> state``: one frame. The state is a pytree whose leaves all have the batch
        axis first and which has a ``positions`` (B, N, 3) field in Å: the rollout freezes structures that
        stopped by selecting between the old and new state leaf by leaf, and reads ``positions`` for the stop
        rule. ``step_fn`` must be differentiable in the parameters it closes over for training.
    """

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
