"""Gradient methods: how reverse-mode gradients flow through a relaxation.

A scan-mode :func:`~bptt_jax.relax.loop.rollout` runs its frames with the loops of an
:class:`~bptt_jax.relax.loop.Unroll` (written once); the gradient method decides which loops run and how
they are differentiated, as optimistix's adjoints (``RecursiveCheckpointAdjoint``, ``ImplicitAdjoint``) and
diffrax's do. Each method is a small frozen dataclass that carries only its own options::

    rollout(rule, R, free_mask, method=Truncated(window=10))
    from_config("truncated", window=10)        # the same, by registry name (the CLI's relax.grad_mode)

=================================================  ==========================================================
``Full()``                                         plain BPTT through a ``lax.scan`` over ``max_frames``
                                                   (memory ∝ frames)
``Remat(segment)``                                 the same gradient, ``jax.checkpoint`` per block of frames
``Truncated(window)``                              early-exit forward pass, then BPTT through each structure's
                                                   last ``window`` frames only
``Implicit(solver, tol, max_iters, damping,        early-exit forward pass and the implicit-function-theorem
unconverged, project_translations)``               gradient at the fixed point (memory independent of frames)
``Guided(window, implicit)``                       ``Truncated`` plus the implicit gradient for the frames
                                                   before the window
``FirstOrder(window, samples, chunk)``             BPTT through the last ``window`` frames, the earlier frames'
                                                   parameter derivative at a held adjoint (first-order MAML)
=================================================  ==========================================================

:data:`REGISTRY` maps the names (``"full"``, ``"remat"``, ...) to the classes; :func:`from_config` builds one
from a name and options and names, in a one-line error, any option the method does not take.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from bptt_jax.relax.loop import Status, Unroll

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GradMethod:
    """A way to differentiate a relaxation (the base of the methods in :data:`REGISTRY`).

    A method's dataclass fields are its options (:meth:`options`); ``unroll`` runs the relaxation.

    Class attributes:
      name: its registry name (``RelaxConfig.grad_mode``).
      early_exit: runs an early-exit forward pass without gradients first; it cannot record a trajectory, and
        ``RelaxConfig.length_quantum`` (a shorter scan for a batch that converges early) does not apply.
      uses_adjoint: its gradient includes an implicit (adjoint) solve, whose residual a train step reports.
    """

    name: ClassVar[str] = ""
    early_exit: ClassVar[bool] = True
    uses_adjoint: ClassVar[bool] = False

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The option names :func:`from_config` accepts for this method."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, **options) -> GradMethod:
        return cls(**options)

    def unroll(self, u: Unroll, record: bool = False) -> tuple[object, Status, Optional[Array]]:
        """Run the relaxation ``u`` so that reverse-mode gradients flow the method's way.

        Returns the final rule state (its ``positions`` carry the gradient), the final status and the
        positions after every frame (T, B, N, 3) when ``record`` (methods with ``early_exit`` never record)."""
        raise NotImplementedError


def _window_scan(u: Unroll, start_state, frames: Array, k: int):
    """BPTT through the last ``k`` frames of each structure, from ``start_state`` (the state ``k`` frames
    before its stop, or its start if it stopped sooner) given the frames ``frames`` (B,) it took in all."""
    status = u.status0._replace(frames=jnp.maximum(frames - k, 0))
    (state, status), _ = u.scan(start_state, status, k)
    return state, status, None


@dataclasses.dataclass(frozen=True)
class Full(GradMethod):
    """Plain BPTT through a ``lax.scan`` over ``max_frames`` frames (memory ∝ frames)."""

    name: ClassVar[str] = "full"
    early_exit: ClassVar[bool] = False

    def unroll(self, u, record=False):
        (state, status), traj = u.scan(u.state0, u.status0, u.max_frames, record=record)
        return state, status, traj


@dataclasses.dataclass(frozen=True)
class Remat(GradMethod):
    """:class:`Full`'s gradient, with ``jax.checkpoint`` around blocks of ``segment`` frames: only the carries
    at block boundaries are stored, a block's frames are recomputed in the backward pass.

    Attributes:
      segment: frames per checkpointed block (1: per frame; 0: ⌈√max_frames⌉, √n checkpointing).
    """

    name: ClassVar[str] = "remat"
    early_exit: ClassVar[bool] = False
    segment: int = 1

    def __post_init__(self):
        if self.segment < 0:
            raise ValueError(f"remat segment must be at least 0 (0 = ⌈√max_frames⌉), not {self.segment}")

    def unroll(self, u, record=False):
        seg = self.segment if self.segment > 0 else math.ceil(math.sqrt(u.max_frames))
        (state, status), traj = u.scan(u.state0, u.status0, u.max_frames, segment=seg, record=record)
        return state, status, traj


@dataclasses.dataclass(frozen=True)
class Truncated(GradMethod):
    """An early-exit forward pass without gradients, then BPTT through each structure's last ``window`` frames
    only (re-run from the stored state ``window`` frames before its stop).

    Attributes:
      window: frames unrolled with gradients (at least 1; at most ``max_frames`` are used).
    """

    name: ClassVar[str] = "truncated"
    window: int = 10

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be at least 1 frame for {self.name}, not {self.window}")

    def unroll(self, u, record=False):
        k = max(1, min(self.window, u.max_frames))
        (_, status), start = u.forward_to_stop(k)
        return _window_scan(u, start, status.frames, k)


@dataclasses.dataclass(frozen=True)
class Implicit(GradMethod):
    """The early-exit forward pass, and the gradient of each converged structure as a fixed point
    X* = Φ(X*) (Φ: one frame of the update rule) by the implicit function theorem.

    With J = ∂Φ/∂X at X*, the cotangent g = ∂L/∂X* becomes the adjoint λ solving ``λ = g + (1 − damping) Jᵀλ``,
    and the parameter gradient is ``λᵀ ∂Φ/∂θ``. Only vector–Jacobian products of one frame are used, so memory
    does not grow with the number of frames. Structures that did not converge (frame budget or divergence)
    contribute no gradient (see ``unconverged``).

    Attributes:
      solver: ``"neumann"`` (the fixed-point iteration λ ← g + Jᵀλ: BPTT run backwards at the fixed point)
        or ``"gmres"`` (``jax.scipy.sparse.linalg.gmres`` on ``(I − Jᵀ)λ = g``; faster on stiff systems).
      tol: relative residual ``‖g + Jᵀλ − λ‖ / ‖g‖`` to stop at (per structure, the worst one counts).
      max_iters: iteration cap (Neumann steps, or GMRES restarts × Krylov size).
      damping: δ ≥ 0; a small δ makes the system well-posed along soft or zero modes.
      unconverged: ``"skip"`` (default): structures that stopped at ``max_frames`` without meeting the stop
        tolerance get no implicit gradient (the fixed-point assumption does not hold for them); ``"solve"``:
        treat every structure that did not diverge as converged (for relaxations that are stopped slightly
        short of the tolerance, and for measuring the cost of the solve).
      project_translations: solve on the complement of rigid translations for structures with no fixed
        atom (their fixed point is defined only up to a translation when the model is translation-invariant).
    """

    name: ClassVar[str] = "implicit"
    uses_adjoint: ClassVar[bool] = True
    solver: str = "gmres"
    tol: float = 1e-4
    max_iters: int = 200
    damping: float = 0.0
    unconverged: str = "skip"
    project_translations: bool = True

    def __post_init__(self):
        if self.solver not in ("neumann", "gmres"):
            raise ValueError(f"unknown adjoint solver {self.solver!r}; expected neumann or gmres")
        if self.unconverged not in ("skip", "solve"):
            raise ValueError(f"unknown adjoint unconverged policy {self.unconverged!r}; expected skip or solve")

    def solvable(self, converged: Array, diverged: Array) -> Array:
        """(B,) the structures whose final state is treated as a fixed point."""
        return converged if self.unconverged == "skip" else ~diverged

    def unroll(self, u, record=False):
        (state, status), _ = u.forward_to_stop(0)
        positions = _attach_implicit(u.step_fn, state, state.positions, u.free_mask, u.translation_modes,
                                     self.solvable(status.converged, status.diverged), self, u.adjoint_probe)
        return state.replace(positions=positions), status, None


@dataclasses.dataclass(frozen=True)
class Guided(GradMethod):
    """:class:`Truncated` plus the implicit gradient for the frames before the window: the window's start state
    gets the sensitivity of the fixed point, linearised at the converged state; structures that did not
    converge keep the plain truncated gradient.

    Attributes:
      window: frames unrolled with gradients (at least 1).
      implicit: the adjoint solve (:class:`Implicit`'s options; :func:`from_config` takes them flat).
    """

    name: ClassVar[str] = "guided"
    uses_adjoint: ClassVar[bool] = True
    window: int = 10
    implicit: Implicit = Implicit()

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be at least 1 frame for {self.name}, not {self.window}")

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return ("window",) + Implicit.options()

    @classmethod
    def from_options(cls, window: int = 10, **adjoint) -> Guided:
        return cls(window, Implicit(**adjoint))

    def unroll(self, u, record=False):
        k = max(1, min(self.window, u.max_frames))
        (state, status), start = u.forward_to_stop(k)
        tail = _attach_implicit(u.step_fn, state, start.positions, u.free_mask, u.translation_modes,
                                self.implicit.solvable(status.converged, status.diverged), self.implicit,
                                u.adjoint_probe)
        started = (status.frames >= k).reshape((-1, 1, 1))  # structures that stopped sooner re-run from the start
        start = start.replace(positions=jnp.where(started, tail, start.positions))
        return _window_scan(u, start, status.frames, k)


@dataclasses.dataclass(frozen=True)
class FirstOrder(GradMethod):
    """The early-exit forward pass records every frame's state; BPTT runs through each structure's last
    ``window`` frames (none with ``window=0``), and the frames before them contribute their parameter
    derivative with the Jacobians of the frames with respect to positions dropped (as first-order MAML drops
    second derivatives): ``∂L/∂θ ≈ Σ_t λᵀ ∂Φ(s_t)/∂θ``, with λ the cotangent at the window's start and s_t the
    recorded states, estimated from ``samples`` frames per structure (stratified, unbiased). Exact where
    ``I + η ∂F/∂X ≈ I`` over the early frames: for modes that relax slowly, which is where most of the
    remaining displacement (and of Dq) lies.

    Attributes:
      window: frames unrolled exactly (0: none; the gradient-mode study found 10 no better, and it costs a
        sequential unroll).
      samples: frames per structure whose parameter derivative is evaluated (0 = every frame).
      chunk: the sampled frames are differentiated this many at a time, in a loop that accumulates the
        parameter gradient (0 = all at once). Memory is that many frames' tape; on XLA:CPU chunks of 2–4 were
        also the fastest (all 32 at once: 1.4× slower, 9× the memory).
    """

    name: ClassVar[str] = "first_order"
    window: int = 0
    samples: int = 32
    chunk: int = 4

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"window must be at least 0 frames for {self.name}, not {self.window}")
        if self.samples < 0 or self.chunk < 0:
            raise ValueError("first_order samples and chunk must be at least 0 (0 = every frame / all at once)")

    def unroll(self, u, record=False):
        k = max(0, min(self.window, u.max_frames))
        (state, status), states = u.forward_recording()
        n_early = jnp.maximum(status.frames - k, 0)
        index, weights = first_order_samples(n_early, self.samples, u.key, u.max_frames)
        if k == 0:  # no window: the first-order part ends at the final state
            tail = _attach_first_order(u.step_fn, _gather_frames(states, index), weights, state.positions,
                                       self.chunk)
            return state.replace(positions=tail), status, None
        # The window starts from the recorded state k frames before each structure's stop.
        tail_state = jax.tree_util.tree_map(lambda x: x[0], _gather_frames(states, n_early[None, :]))
        tail = _attach_first_order(u.step_fn, _gather_frames(states, index), weights, tail_state.positions,
                                   self.chunk)
        return _window_scan(u, tail_state.replace(positions=tail), status.frames, k)


REGISTRY: dict[str, type[GradMethod]] = {m.name: m for m in (Full, Remat, Truncated, Implicit, Guided, FirstOrder)}
"""Gradient methods by name, in the order the experiments and benchmarks list them."""


def from_config(name: str, **options) -> GradMethod:
    """The gradient method ``name`` (a key of :data:`REGISTRY`) with ``options``; raises a one-line ValueError
    for an unknown name or an option the method does not take."""
    if name not in REGISTRY:
        raise ValueError(f"unknown grad_mode {name!r}; expected one of {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    unknown = [k for k in options if k not in cls.options()]
    if unknown:
        raise ValueError(f"grad_mode {name!r} takes no option {', '.join(map(repr, unknown))}; it takes "
                         f"{', '.join(cls.options()) or 'no options'}")
    return cls.from_options(**options)


# ----------------------------------------------------------------------------------------------------
# First-order and implicit gradients: custom VJPs that attach a gradient to positions computed without one


def _per_structure_norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim))))



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
                   valid: Array, config: Implicit):
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
                     valid: Array, config: Implicit, probe: Optional[Array]) -> Array:
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
