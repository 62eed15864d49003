"""Backpropagation through whole relaxations: parameters, the rollout loss and one jitted optimiser step.

Everything here is a pure function of explicit pytrees::

    bptt = BPTT(model, RelaxConfig(...), OptimConfig(...))
    params = bptt.init_params(key, batch)              # {"model": ..., ["log_step_size"], ["step_head"]}
    state = bptt.init_state(params, key)               # TrainState(params, opt_state, step, rng)
    train_step = jit_train_step(bptt)                  # jax.jit(bptt.train_step), the state donated
    state, metrics = train_step(state, batch)          # value_and_grad through the rollout, clip+Adam

``batch`` is a :class:`~bptt_jax.structures.Batch` with ``target_positions``. The loss is the mean over
real structures of Dq (paper Eq. 4) or MSE of the final positions, plus an optional proximal L2 term to
reference parameters (App. C.2).

Bad numbers: a structure whose relaxation diverges (non-finite positions or forces, or a drift beyond
``relax.diverge_distance``) is frozen at its last finite state, counted, and left out of the loss; its
gradient contribution is exactly zero, even where the model is non-finite on it
(:meth:`BPTT.loss_and_grad`). A step whose loss or gradient is still non-finite, or whose update would make a
parameter non-finite, is skipped and counted (:func:`update_if_finite`; metric ``skipped_updates``).

Training-only variations of the rollout (:class:`OptimConfig`: exploration noise, a stop rule drawn per step,
App. C.1 and C.4) enter :meth:`BPTT.loss` as traced values, so they change from step to step without a new
compilation, and never reach :meth:`BPTT.evaluate` or :meth:`BPTT.relax_batch`.

What is jitted, and where:

- :meth:`BPTT.train_step` ``(state, batch, ref_params=None, n_frames=None)`` is a plain method, never jitted
  by the class. :func:`jit_train_step` is the one place it is jitted, for one device (``mesh=None``) or for a
  data mesh (state and ``ref_params`` replicated, the batch split along ``"data"``); in both cases
  ``n_frames`` is static and the state is donated: its buffers are reused for the new state, so a state passed
  to the step must not be used again (:meth:`BPTT.init_state` copies its inputs, so the caller's parameters
  and key survive). :func:`jit_fit_step` adds ``relax.length_quantum``'s early-exit probe
  (:meth:`BPTT.frames_needed`, :meth:`BPTT.scan_length`) around the same jitted step (:class:`FitStep`).
- :attr:`BPTT.relax_batch` and :attr:`BPTT.evaluate`, the inference entry points, are jitted once per
  :class:`BPTT` on first use (``functools.cached_property``): they have no state to donate and no shardings to
  choose (sharded inputs carry their own), and every caller (the pipeline evaluates each epoch, in-flight
  inference, the experiments) then shares one compilation per shape without holding a jitted function itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from bptt_jax import parallel
from bptt_jax import relax as relax_lib
from bptt_jax.losses import masked_mean, structure_loss
from bptt_jax.models.step_head import StepHead
from bptt_jax.relax import RelaxConfig, RolloutResult
from bptt_jax.structures import Batch

Array = jax.Array
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """MLIP-level optimiser (paper: gradient clipping + Adam, 5 epochs).

    Attributes:
      learning_rate: Adam learning rate (a float or an optax schedule).
      clip_norm: global-norm gradient clip.
      loss: ``"dq"`` (Si defects, catalysts) or ``"mse"`` (pure crystals).
      prox_weight: weight λ of ``λ/2 · ||θ - θ_ref||²`` on the model parameters (0 = off).
      step_learning_rate: Adam learning rate of the learned step size's logarithm ``log η`` (a float or an
        optax schedule; None = ``learning_rate``). Adam moves a parameter by about its learning rate per step,
        so this is the relative change of η per step (0.01: about 1%), whatever the scale of η.
      freeze_model: train only the step-size parameters; the MLIP keeps its parameters bit for bit (paper
        Fig. 5a). Its gradient is never computed.
      noise: σ (Å) of Gaussian exploration noise added to every frame of *training* rollouts only (App. C.1),
        on top of ``RelaxConfig.noise``; a float or an optax schedule of the step count (per-epoch annealing).
      stop_tol_range: ``(low, high)``: each training step draws its stop tolerance log-uniformly from this
        range (App. C.4, paper: 1e-4 to 1e-2 Å); None = ``RelaxConfig.tol``.
      stop_frames_range: ``(low, high)``: each training step draws its frame budget uniformly from these
        integers, both included (paper: 50 to 75; at most ``RelaxConfig.max_frames``); None = ``max_frames``.
    """

    learning_rate: Union[float, optax.Schedule] = 1e-4
    clip_norm: Optional[float] = 1.0
    loss: str = "dq"
    prox_weight: float = 0.0
    step_learning_rate: Union[float, optax.Schedule, None] = None
    freeze_model: bool = False
    noise: Union[float, optax.Schedule] = 0.0
    stop_tol_range: Optional[tuple[float, float]] = None
    stop_frames_range: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.loss not in ("dq", "mse"):
            raise ValueError(f"unknown loss {self.loss!r}; expected dq or mse")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None (no clipping), not {self.clip_norm}")
        if self.stop_tol_range is not None and not 0 < self.stop_tol_range[0] <= self.stop_tol_range[1]:
            raise ValueError(f"stop_tol_range must be (low, high) with 0 < low <= high, not {self.stop_tol_range}")
        if self.stop_frames_range is not None and not 1 <= self.stop_frames_range[0] <= self.stop_frames_range[1]:
            raise ValueError(f"stop_frames_range must be (low, high) with 1 <= low <= high, not "
                             f"{self.stop_frames_range}")


class RolloutOverrides(NamedTuple):
    """A training step's variations of the rollout (traced scalars; None = the configured value)."""

    noise: Optional[Array] = None
    tol: Optional[Array] = None
    frame_limit: Optional[Array] = None


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm, adam)``; with ``step_learning_rate`` the learned ``log η`` has an
    Adam of its own rate (``optax.multi_transform``), clipped together with the model's gradient.
    ``clip_norm=None``: no clipping. ``freeze_model``: the model's updates are zero (``optax.set_to_zero``)."""
    clip = [] if config.clip_norm is None else [optax.clip_by_global_norm(config.clip_norm)]
    if config.step_learning_rate is None and not config.freeze_model:
        return optax.chain(*clip, optax.adam(config.learning_rate))
    step_lr = config.learning_rate if config.step_learning_rate is None else config.step_learning_rate
    model_label = "frozen" if config.freeze_model else "model"

    def labels(params):
        return {k: jax.tree_util.tree_map(lambda _: "step" if k == "log_step_size" else
                                          (model_label if k == "model" else "model"), v)
                for k, v in params.items()}

    transforms = {"model": optax.adam(config.learning_rate), "step": optax.adam(step_lr)}
    if config.freeze_model:
        transforms["frozen"] = optax.set_to_zero()
    return optax.chain(*clip, optax.multi_transform(transforms, labels))


# ----------------------------------------------------------------------------------------------------
# Step sizes: how η of the update rule is parameterised (RelaxConfig.step_mode)


@dataclasses.dataclass(frozen=True)
class FixedStep:
    """A constant step size η = ``value`` (Å²/eV); no parameters."""

    value: Optional[float]  # None: no step (FIRE, or not chosen yet)
    trainable: ClassVar[bool] = False

    def init_params(self, key: Array, batch: Batch, start: Optional[float] = None) -> Params:
        return {}

    def scalar(self, params: Params) -> Optional[Array]:
        return None if self.value is None else jnp.asarray(self.value)

    def for_rule(self, params: Params, batch: Batch, dropout: bool):
        return self.value


@dataclasses.dataclass(frozen=True)
class LearnedStep:
    """A trainable scalar η = exp(``params["log_step_size"]``), starting at ``init`` (Å²/eV): positive by
    construction, however far training pushes it."""

    init: Optional[float]  # None: ``init_params`` must be given a start
    trainable: ClassVar[bool] = True

    def init_params(self, key: Array, batch: Batch, start: Optional[float] = None) -> Params:
        eta = self.init if start is None else start
        if eta is None or not eta > 0:
            raise ValueError(f"a learned step size starts from a positive value, not {eta}")
        return {"log_step_size": jnp.log(jnp.asarray(eta, batch.positions.dtype))}

    def scalar(self, params: Params) -> Optional[Array]:
        return jnp.exp(params["log_step_size"])

    def for_rule(self, params: Params, batch: Batch, dropout: bool):
        return jnp.exp(params["log_step_size"])


@dataclasses.dataclass(frozen=True)
class NetworkStep:
    """The App. B step-size head: η per structure and frame from the positions and forces,
    ``head.apply(params["step_head"], batch, forces)``; no single scalar."""

    head: StepHead
    trainable: ClassVar[bool] = True

    def init_params(self, key: Array, batch: Batch, start: Optional[float] = None) -> Params:
        return {"step_head": self.head.init(key, batch, jnp.zeros_like(batch.positions))}

    def scalar(self, params: Params) -> Optional[Array]:
        return None

    def for_rule(self, params: Params, batch: Batch, dropout: bool) -> Callable[[Array, Array, Array], Array]:
        def step_size(R, F, k):
            b = batch.replace(positions=R)
            if dropout:
                return self.head.apply(params["step_head"], b, F, deterministic=False, rngs={"dropout": k})
            return self.head.apply(params["step_head"], b, F)
        return step_size


StepSize = Union[FixedStep, LearnedStep, NetworkStep]
"""How η is parameterised: ``init_params`` (the parameters it adds), ``scalar`` (the current η, None for a
head), ``for_rule`` (the ``step_size`` argument of :func:`~bptt_jax.relax.make_rule`) and ``trainable``."""


def make_step(config: RelaxConfig, head: Optional[StepHead] = None) -> StepSize:
    """The step size ``config.step_mode`` names, starting at ``config.step_size``; ``"network"``: ``head``, or
    a :class:`StepHead` with ``config.step_head``'s options. FIRE adapts its own time step: always
    :class:`FixedStep` (it has no η to learn)."""
    if config.rule == "fire":
        return FixedStep(config.step_size)
    if config.step_mode == "learned":
        return LearnedStep(config.step_size)
    if config.step_mode == "network":
        if head is None:
            if config.step_size is None:
                raise ValueError("the step head starts at relax.step_size, which is None")
            head = StepHead(init_step=config.step_size, output="exp", **dict(config.step_head))
        return NetworkStep(head)
    return FixedStep(config.step_size)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: parameters, optimiser state, step count, PRNG key.

    The jitted step (:func:`jit_train_step`) donates it: once passed to the step, a state is gone."""

    params: Params
    opt_state: optax.OptState
    step: Array
    rng: Array


def all_finite(tree: Any) -> Array:
    """Whether every value of every leaf of ``tree`` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def update_if_finite(optimizer: optax.GradientTransformation, grads: Any, opt_state: optax.OptState,
                     params: Any, loss: Array, **extra_args) -> tuple[Any, optax.OptState, Array]:
    """One optimiser update, applied only if the loss, the gradient and the new parameters are all finite;
    otherwise the parameters and the optimiser state stay as they were (Adam's moments and count, and with them
    a schedule's position, do not move). The optimiser state is not checked: some hold infinities by design
    (``optax.contrib.reduce_on_plateau`` starts from a best value of +inf).

    The update is computed as usual and the old values are selected afterwards, so a normal step's arithmetic
    is bit for bit that of ``optimizer`` alone. (``optax.apply_if_finite`` skips the same steps, but its
    ``lax.cond`` around the inner update changes how XLA fuses the update with ``params + updates``: normal
    steps then differ in the last bits.) ``extra_args`` go to ``optimizer.update`` (e.g. ``value``).

    Returns:
      ``(params, opt_state, skipped)``: ``skipped`` a scalar bool, True when the update was not applied.
    """
    updates, new_opt_state = optimizer.update(grads, opt_state, params, **extra_args)
    new_params = optax.apply_updates(params, updates)
    ok = all_finite((loss, grads, new_params))

    def keep(new, old):
        return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)

    return keep(new_params, params), keep(new_opt_state, opt_state), ~ok


def proximal_term(params: Params, ref_params: Params) -> Array:
    """``1/2 · ||θ - θ_ref||²`` over the model parameters."""
    diffs = jax.tree_util.tree_map(lambda p, r: jnp.sum((p - r) ** 2), params["model"], ref_params["model"])
    return 0.5 * sum(jax.tree_util.tree_leaves(diffs))


@dataclasses.dataclass(frozen=True)
class BPTT:
    """A force model, how it relaxes structures, and how it is trained through the relaxation.

    Attributes:
      model: a Flax module ``model(batch, deterministic) -> (B, N, 3)`` forces in eV/Å.
      relax: the relaxation (update rule, step-size mode, stop rule).
      optim: the MLIP-level optimiser and loss.
      step_head: a step-size head module to use when ``relax.step_mode == "network"``, instead of the
        :class:`StepHead` that ``relax.step_head``'s options describe (which then must be empty).

    ``bptt.step`` is the step size ``relax.step_mode`` names (:func:`make_step`): :class:`FixedStep`,
    :class:`LearnedStep` or :class:`NetworkStep`.
    """

    model: nn.Module
    relax: RelaxConfig = RelaxConfig()
    optim: OptimConfig = OptimConfig()
    step_head: Optional[StepHead] = None

    def __post_init__(self):
        if self.step_head is not None and self.relax.step_head:
            raise ValueError("give the step head as a module (step_head) or as options (relax.step_head), not both")
        step = self.step  # cached: made once, from step_head (or relax.step_head's options)
        if self.optim.freeze_model and not step.trainable:
            raise ValueError("freeze_model with a fixed step size leaves nothing to train; use a learned step "
                             "size (step_mode learned or network)")
        if self.optim.stop_frames_range is not None and self.optim.stop_frames_range[1] > self.relax.max_frames:
            raise ValueError(f"stop_frames_range {self.optim.stop_frames_range} exceeds max_frames "
                             f"{self.relax.max_frames}")
        if isinstance(step, NetworkStep) and self.step_head is None:
            object.__setattr__(self, "step_head", step.head)

    @functools.cached_property
    def step(self) -> StepSize:
        """How η is parameterised: :class:`FixedStep`, :class:`LearnedStep` or :class:`NetworkStep`."""
        return make_step(self.relax, self.step_head)

    # -- parameters ---------------------------------------------------------------------------------

    def init_params(self, key: Array, batch: Batch) -> Params:
        """Fresh parameters for ``batch``'s shapes."""
        k_model, k_head = jax.random.split(key)
        params: Params = {"model": self.model.init(k_model, batch)}
        self._add_step_params(params, k_head, batch)
        return params

    def with_model_params(self, model_variables: Any, key: Array, batch: Batch,
                          step_size: Optional[float] = None) -> Params:
        """Parameters around pretrained model variables (step-size parameters freshly initialised, a learned
        scalar at ``step_size`` when given, else at ``relax.step_size``)."""
        params: Params = {"model": model_variables}
        self._add_step_params(params, key, batch, step_size)
        return params

    def _add_step_params(self, params: Params, key: Array, batch: Batch, step_size: Optional[float] = None) -> None:
        params.update(self.step.init_params(key, batch, step_size))

    def init_state(self, params: Params, key: Array) -> TrainState:
        """A fresh train state on copies of ``params`` and ``key``: the step donates the state, and the caller's
        parameters (a proximal reference, a validation baseline) and key must outlive it."""
        params, key = jax.tree_util.tree_map(jnp.copy, (params, key))
        return TrainState(params, make_optimizer(self.optim).init(params), jnp.zeros((), jnp.int32), key)

    def step_size(self, params: Params) -> Optional[Array]:
        """The current scalar step size (fixed or learned); None for the network head."""
        return self.step.scalar(params)

    # -- relaxation ---------------------------------------------------------------------------------

    def forces(self, params: Params, batch: Batch, key: Optional[Array] = None) -> Array:
        """Model forces (B, N, 3) at ``batch.positions`` (dropout only when ``key`` is given)."""
        if key is None:
            return self.model.apply(params["model"], batch)
        return self.model.apply(params["model"], batch, deterministic=False, rngs={"dropout": key})

    def update_rule(self, params: Params, batch: Batch, extra_noise: Union[float, Array, None] = None
                    ) -> relax_lib.UpdateRule:
        """The ``(init_fn, step_fn)`` rule that relaxes ``batch``: model forces and the configured step size
        (``extra_noise``: training-time exploration noise on top of ``relax.noise``)."""
        use_dropout = self.relax.dropout

        def force_fn(R, k):
            return self.forces(params, batch.replace(positions=R), k if use_dropout else None)

        step_size = self.step.for_rule(params, batch, use_dropout)
        return relax_lib.make_rule(self.relax, force_fn, batch.free_mask, step_size,
                                   0.0 if extra_noise is None else extra_noise)

    def rollout(self, params: Params, batch: Batch, key: Optional[Array] = None, *, mode: str = "scan",
                record: bool = False, adjoint_probe: Optional[Array] = None,
                max_frames: Optional[int] = None, overrides: Optional[RolloutOverrides] = None) -> RolloutResult:
        """Relax ``batch`` with the model (traceable; differentiable in scan mode by ``relax.method``).

        ``max_frames`` (static) overrides ``relax.max_frames`` for this call; ``overrides`` (traced) adds a
        training step's noise and stop rule (:meth:`training_overrides`)."""
        o = overrides or RolloutOverrides()
        rule = self.update_rule(params, batch, o.noise)
        config = self.relax if max_frames is None else dataclasses.replace(self.relax, max_frames=max_frames)
        return relax_lib.run(config, rule, batch.positions, batch.free_mask, key=key, mode=mode,
                             record=record, adjoint_probe=adjoint_probe,
                             translation_modes=~jnp.any(batch.fixed_mask & batch.atom_mask, axis=-1),
                             tol=o.tol, frame_limit=o.frame_limit)

    def training_overrides(self, step: Array, key: Array) -> Optional[RolloutOverrides]:
        """The rollout variations of training step ``step``: exploration noise from ``optim.noise`` (its schedule
        at ``step``) and a stop rule drawn from ``key`` (``optim.stop_tol_range``, ``optim.stop_frames_range``).
        None when training rollouts equal evaluation rollouts."""
        o = self.optim
        if not callable(o.noise) and o.noise == 0 and o.stop_tol_range is None and o.stop_frames_range is None:
            return None
        noise = o.noise(step) if callable(o.noise) else (None if o.noise == 0 else jnp.asarray(o.noise))
        k_tol, k_frames = jax.random.split(jax.random.fold_in(key, 0x5709))
        tol = frame_limit = None
        if o.stop_tol_range is not None:
            lo, hi = (math.log(v) for v in o.stop_tol_range)
            tol = jnp.exp(jax.random.uniform(k_tol, (), minval=lo, maxval=hi))
        if o.stop_frames_range is not None:
            frame_limit = jax.random.randint(k_frames, (), o.stop_frames_range[0], o.stop_frames_range[1] + 1)
        return RolloutOverrides(noise, tol, frame_limit)

    @functools.cached_property
    def relax_batch(self) -> Callable[..., RolloutResult]:
        """Jitted ``relax_batch(params, batch, key=None, *, mode="while", record=False) -> RolloutResult``:
        :meth:`rollout` for inference (early exit by default; ``mode`` and ``record`` static), compiled once
        per shape for this :class:`BPTT`."""
        def relax_batch(params: Params, batch: Batch, key: Optional[Array] = None, *, mode: str = "while",
                        record: bool = False) -> RolloutResult:
            return self.rollout(params, batch, key, mode=mode, record=record)

        return jax.jit(relax_batch, static_argnames=("mode", "record"))

    # -- loss and training --------------------------------------------------------------------------

    @property
    def uses_adjoint(self) -> bool:
        """Whether gradients include an implicit (adjoint) solve, whose residual a train step reports."""
        return self.relax.method.uses_adjoint

    def loss(self, params: Params, batch: Batch, key: Optional[Array] = None,
             ref_params: Optional[Params] = None, adjoint_probe: Optional[Array] = None,
             max_frames: Optional[int] = None, overrides: Optional[RolloutOverrides] = None
             ) -> tuple[Array, dict[str, Array]]:
        """Mean structural loss of the relaxed batch (+ proximal term) and per-structure diagnostics.

        The mean runs over the real structures that did not diverge (a diverged one is frozen at its last finite
        state and counted in ``aux["diverged"]``). Its gradient contribution is then zero, or NaN where the model
        is non-finite on it (0 · inf): :meth:`loss_and_grad` guarantees the gradient without it.

        ``adjoint_probe``: (B,) zeros whose gradient is the per-structure adjoint residual (implicit/guided).
        ``overrides``: a training step's noise and stop rule (:meth:`training_overrides`).
        """
        if self.optim.freeze_model:  # no gradient flows into (or is computed for) the MLIP
            params = {**params, "model": jax.lax.stop_gradient(params["model"])}
        result = self.rollout(params, batch, key, mode="scan", adjoint_probe=adjoint_probe, max_frames=max_frames,
                              overrides=overrides)
        per_structure = structure_loss(self.optim.loss, result.positions, batch)
        # A diverged structure (frozen at its last good state) is left out of the mean: its cotangent is zero.
        counted = batch.structure_mask & ~result.diverged
        loss = masked_mean(jnp.where(counted, per_structure, 0.0), counted)
        total = loss
        if self.optim.prox_weight and ref_params is not None:
            total = total + self.optim.prox_weight * proximal_term(params, ref_params)
        aux = {"loss": loss, "per_structure": per_structure, "frames": result.frames,
               "converged": result.converged, "diverged": result.diverged}
        return total, aux

    def loss_and_grad(self, params: Params, batch: Batch, key: Optional[Array] = None,
                      ref_params: Optional[Params] = None, n_frames: Optional[int] = None,
                      overrides: Optional[RolloutOverrides] = None):
        """``value_and_grad`` of :meth:`loss`, with the gradient of a batch whose structures diverged equal to that
        of the batch without them.

        :meth:`loss` leaves a diverged structure out, so no cotangent reaches it, and its contribution is exactly
        zero as long as the model's values on it are finite. Where they are not (forces that overflowed, positions
        that became NaN), the backward pass meets 0 · inf = NaN inside the model, which no masking after the
        model call can undo. Then, and only then (loss or gradient non-finite and a structure diverged), the
        gradient is taken again on the batch with the diverged structures made empty slots (:meth:`Batch.without
        <bptt_jax.structures.Batch.without>`): the batch without them, same shapes. Both attempts are one
        ``lax.while_loop`` (one compilation); a normal batch runs it once.

        Args:
          params, batch, key, ref_params: as :meth:`loss`.
          n_frames: differentiate a scan of this many frames instead of ``relax.max_frames`` (static).
          overrides: a training step's noise and stop rule (:meth:`training_overrides`).

        Returns:
          ``(total, aux, grads, residual)``: :meth:`loss`'s value and diagnostics (per-structure ``frames``,
          ``converged`` and ``diverged`` of the first attempt: a structure left out keeps its flags), its gradient
          with respect to ``params``, and the (B,) adjoint residual (None unless :attr:`uses_adjoint`).
        """
        smask = batch.structure_mask

        def attempt(drop):
            b = batch.without(drop)
            if not self.uses_adjoint:
                (total, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(params, b, key, ref_params, None,
                                                                                  n_frames, overrides)
                return total, aux, grads, None
            probe = jnp.zeros(smask.shape, batch.positions.dtype)
            (total, aux), (grads, residual) = jax.value_and_grad(
                lambda p, q: self.loss(p, b, key, ref_params, q, n_frames, overrides), argnums=(0, 1),
                has_aux=True)(params, probe)
            return total, aux, grads, residual

        flag_names = ("frames", "converged", "diverged")

        def body(carry):
            i, drop, first, _ = carry
            out = attempt(drop)
            flags = {k: out[1][k] for k in flag_names}
            first = jax.tree_util.tree_map(lambda new, old: jnp.where(i == 0, new, old), flags, first)
            return i + 1, first["diverged"] & smask, first, out

        def again(carry):
            i, drop, _, (total, _, grads, _) = carry
            return (i == 0) | ((i == 1) & jnp.any(drop) & ~all_finite((total, grads)))

        no_drop = jnp.zeros(smask.shape, bool)
        out0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(attempt, no_drop))
        first0 = {k: out0[1][k] for k in flag_names}
        carry = jax.lax.while_loop(again, body, (jnp.int32(0), no_drop, first0, out0))
        _, _, first, (total, aux, grads, residual) = carry
        return total, {**aux, **first}, grads, residual

    def train_step(self, state: TrainState, batch: Batch, ref_params: Optional[Params] = None,
                   n_frames: Optional[int] = None) -> tuple[TrainState, dict[str, Array]]:
        """One optimiser step: ``value_and_grad`` of :meth:`loss` through the rollout (:meth:`loss_and_grad`),
        clip + Adam.

        Diverged structures are left out of the loss and the gradient (:meth:`loss_and_grad`). A step whose loss,
        gradient or update is still non-finite is skipped (:func:`update_if_finite`): parameters and optimiser
        state stay as they were, while the step count and the key advance as usual, so a run stays reproducible.

        A pure function, not jitted here: :func:`jit_train_step` jits it (state donated, ``n_frames`` static).

        Args:
          state: the train state (its key is split: one half for this step's rollout, one for the next state).
          batch: structures with ``target_positions``.
          ref_params: the proximal term's reference parameters (``optim.prox_weight``); None = no term.
          n_frames: differentiate a scan of this many frames instead of ``relax.max_frames``
            (:class:`FitStep` passes :meth:`scan_length`).

        Returns:
          ``(new_state, metrics)``: scalars ``total``, ``loss``, ``grad_norm``, ``frames`` (mean over real
          structures), ``diverged``, ``converged`` (counts), ``skipped_updates`` (1 if this step's update was not
          applied, else 0), and where they apply ``step_size``, the drawn ``noise`` / ``tol`` / ``frame_limit``
          and ``adjoint_residual``.
        """
        rng, key = jax.random.split(state.rng)
        overrides = self.training_overrides(state.step, key)
        total, aux, grads, residual = self.loss_and_grad(state.params, batch, key, ref_params, n_frames, overrides)
        params, opt_state, skipped = update_if_finite(make_optimizer(self.optim), grads, state.opt_state,
                                                      state.params, total)
        smask = batch.structure_mask
        metrics = {
            "total": total,
            "loss": aux["loss"],
            "grad_norm": optax.tree.norm(grads),
            "frames": masked_mean(aux["frames"].astype(total.dtype), smask),
            "diverged": jnp.sum(aux["diverged"] & smask),
            "converged": jnp.sum(aux["converged"] & smask),
            "skipped_updates": skipped.astype(jnp.int32),
        }
        if isinstance(self.step, LearnedStep):
            metrics["step_size"] = self.step.scalar(params)
        if overrides is not None:
            for name, value in overrides._asdict().items():
                if value is not None:
                    metrics[name] = value
        if residual is not None:
            # Worst relative residual of the adjoint solve over real structures (0 when not solved).
            metrics["adjoint_residual"] = jnp.max(jnp.where(smask, residual, 0.0))
        return TrainState(params, opt_state, state.step + 1, rng), metrics

    # -- early-exit probe of FitStep ----------------------------------------------------------------

    @property
    def adapts_length(self) -> bool:
        """Whether :class:`FitStep` probes each batch for its scan length (``relax.length_quantum > 0`` with a
        gradient method that does not stop early by construction)."""
        return self.relax.length_quantum > 0 and not self.relax.method.early_exit

    def frames_needed(self, params: Params, batch: Batch, key: Array, step: Optional[Array] = None) -> Array:
        """Frames the slowest structure of ``batch`` takes in an early-exit forward pass (no gradients), with the
        key, noise and stop rule of the training step that follows (``key``: that step's rollout key, ``step``:
        the state's count)."""
        overrides = self.training_overrides(jnp.zeros((), jnp.int32) if step is None else step, key)
        noisy = self.relax.noise or (overrides is not None and overrides.noise is not None)
        use_key = key if (self.relax.dropout or noisy) else None
        return jnp.max(self.rollout(params, batch, use_key, mode="while", overrides=overrides).frames)

    def scan_length(self, needed: int) -> int:
        """The scan a batch needing ``needed`` frames differentiates: rounded up to a multiple of
        ``relax.length_quantum`` (at least one quantum, at most ``max_frames``), so that lengths, and with them
        compilations, come in few sizes."""
        q = self.relax.length_quantum
        return min(self.relax.max_frames, max(q, -(-needed // q) * q))

    # -- inference ------------------------------------------------------------------------------------

    @functools.cached_property
    def evaluate(self) -> Callable[[Params, Batch], dict[str, Array]]:
        """Jitted ``evaluate(params, batch) -> dict``: the inference relaxation (early exit) and the
        per-structure loss, no gradients; ``per_structure``, ``frames``, ``converged``, ``diverged`` (B,) and
        ``positions`` (B, N, 3) Å. Compiled once per shape for this :class:`BPTT`."""
        def evaluate(params: Params, batch: Batch) -> dict[str, Array]:
            result = self.rollout(params, batch, None, mode="while")
            return {"per_structure": structure_loss(self.optim.loss, result.positions, batch),
                    "frames": result.frames, "converged": result.converged, "diverged": result.diverged,
                    "positions": result.positions}

        return jax.jit(evaluate)


TrainStep = Callable[..., tuple[TrainState, dict[str, Array]]]


def jit_train_step(bptt: BPTT, mesh: Optional[jax.sharding.Mesh] = None) -> TrainStep:
    """:meth:`BPTT.train_step` jitted: ``step(state, batch, ref_params=None, n_frames=None) -> (state, metrics)``.

    The only place the train step is jitted. ``state`` is donated (XLA writes the new state into its buffers;
    do not use it after the call) and ``n_frames`` is static (one compilation per scan length and batch shape).

    Args:
      bptt: the trainer.
      mesh: None for one device. A data mesh (:func:`bptt_jax.parallel.data_mesh`): ``state`` and
        ``ref_params`` replicated, ``batch`` split along ``"data"`` (its size a multiple of ``mesh.size``, see
        :func:`~bptt_jax.parallel.shard_batch`); the new state and the metrics come back replicated. XLA adds
        the cross-device reductions of the batch mean: the step is that of one device on the whole batch (up
        to summation order). A jit with shardings takes positional arguments only:
        ``step(state, batch, ref_params)`` (None allowed) or ``step(state, batch, ref_params, n_frames)``.
    """
    shardings = {}
    if mesh is not None:
        rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        shardings = dict(in_shardings=(rep, data, rep), out_shardings=(rep, rep))
    return jax.jit(bptt.train_step, static_argnames="n_frames", donate_argnames="state", **shardings)


@dataclasses.dataclass(frozen=True)
class FitStep:
    """The train step that does not pay for frames after the batch has converged (made by :func:`jit_fit_step`):
    ``fit_step(state, batch, ref_params=None) -> (state, metrics)``, a host-level call.

    With :attr:`BPTT.adapts_length` (``relax.length_quantum = q > 0``, gradient method ``full`` or ``remat``), a
    cheap early-exit forward pass (``probe``: :meth:`BPTT.frames_needed` jitted, same parameters and PRNG key as
    the step) finds the frames the batch needs; the differentiated scan then runs that many frames rounded up
    to a multiple of q (:meth:`BPTT.scan_length`), so memory and backward time follow the batch rather than the
    budget: one compilation of ``step`` per (size bucket, length). Otherwise ``step`` scans ``max_frames``.

    Attributes:
      bptt: the trainer.
      step: its jitted train step (:func:`jit_train_step`; the state is donated).
      probe: ``jax.jit(bptt.frames_needed)``, or None when the length does not adapt.
    """

    bptt: BPTT
    step: TrainStep
    probe: Optional[Callable[..., Array]]

    def length(self, state: TrainState, batch: Batch) -> Optional[int]:
        """The scan length the step for ``batch`` differentiates (None: ``max_frames``; the state is kept)."""
        if self.probe is None:
            return None
        _, key = jax.random.split(state.rng)  # the rollout key the step will draw
        return self.bptt.scan_length(int(self.probe(state.params, batch, key, state.step)))

    def __call__(self, state: TrainState, batch: Batch,
                 ref_params: Optional[Params] = None) -> tuple[TrainState, dict[str, Array]]:
        n_frames = self.length(state, batch)
        if n_frames is None:
            return self.step(state, batch, ref_params)
        return self.step(state, batch, ref_params, n_frames)


def jit_fit_step(bptt: BPTT, mesh: Optional[jax.sharding.Mesh] = None) -> FitStep:
    """:class:`FitStep` around :func:`jit_train_step` ``(bptt, mesh)``: the step with ``relax.length_quantum``'s
    early-exit probe, for one device or a data mesh (sharded inputs carry their shardings into the probe)."""
    return FitStep(bptt, jit_train_step(bptt, mesh), jax.jit(bptt.frames_needed) if bptt.adapts_length else None)


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))

