"""The relaxation's configuration (the ``relax`` node of the Hydra config) and what it builds: an update rule
(:func:`make_rule`) and a gradient method (:attr:`RelaxConfig.method`)."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional, Union

import jax

from bptt_jax.relax.methods import REGISTRY, GradMethod, from_config
from bptt_jax.relax.rules import ForceFn, StepSizeFn, UpdateRule, _is_zero, descent, fire

Array = jax.Array

# The flat RelaxConfig fields that are options of one gradient method, and the option each one sets.
METHOD_FIELDS = {
    "remat_segment": "segment", "window": "window", "sample_frames": "samples", "sample_chunk": "chunk",
    "adjoint_solver": "solver", "adjoint_tol": "tol", "adjoint_iters": "max_iters", "adjoint_damping": "damping",
    "adjoint_unconverged": "unconverged", "adjoint_project_translations": "project_translations",
}


def require(ok: bool, key: str, value: Any, what: str) -> None:
    """The typed configs' one-line refusal of a setting: ``ValueError("key=value: must be what")``."""
    if not ok:
        raise ValueError(f"{key}={value!r}: must be {what}")


def is_number(x: Any, low: float = -math.inf, *, above: bool = False, high: float = math.inf) -> bool:
    """``x`` is a finite real number (a float, int or numpy scalar; not a bool or a string) with ``low <= x``
    (``low < x`` if ``above``) and ``x <= high``."""
    if isinstance(x, (bool, str, bytes)):
        return False
    try:
        v = float(x)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and (v > low if above else v >= low) and v <= high


def is_count(x: Any, low: int = 0) -> bool:
    """``x`` is an integer (an int or numpy integer; not a bool) of at least ``low``."""
    if isinstance(x, bool):
        return False
    try:
        return operator.index(x) >= low
    except TypeError:
        return False


def method_fields(grad_mode: str) -> tuple[str, ...]:
    """The :class:`RelaxConfig` fields that gradient method ``grad_mode`` takes (e.g. ``("window",)``)."""
    options = REGISTRY[grad_mode].options()
    return tuple(f for f, opt in METHOD_FIELDS.items() if opt in options)


@dataclasses.dataclass(frozen=True)
class RelaxConfig:
    """How structures are relaxed during training and evaluation.

    Attributes:
      rule: ``"descent"`` (paper Eq. 2 and its ablations) or ``"fire"`` (which adapts its own time step: it has
        no η, so ``step_mode`` and ``step_size`` do not apply to it).
      step_size: η (Å²/eV), or its initial value when learned (paper: 0.077 best fixed; 0.5 learned init).
        None: not chosen yet (the pipeline starts from the validation split's best constant step); a descent
        rollout needs a value.
      step_mode: ``"fixed"``, ``"learned"`` (a trainable scalar) or ``"network"`` (the App. B head).
      step_head: ``"network"``: keyword options of :class:`~bptt_jax.models.StepHead` as ``(name, value)`` pairs,
        e.g. ``(("output_init", "random"),)``; it starts at ``step_size``.
      momentum, anneal, noise, noise_anneal: descent ablations (App. C).
      max_frames, tol, diverge_distance: stop rule (App. D) and divergence bound (Å).
      grad_mode: gradient through the relaxation, a name in :data:`~bptt_jax.relax.methods.REGISTRY`
        (see :attr:`method`).
      remat_segment: ``"remat"``: frames per checkpointed block (0 = ⌈√max_frames⌉).
      window: ``"truncated"``, ``"guided"``, ``"first_order"``: frames unrolled with gradients (None: the
        method's default, 10 frames, none for ``"first_order"``).
      sample_frames: ``"first_order"``: frames per structure whose parameter derivative is evaluated (0 = all).
      sample_chunk: ``"first_order"``: that many sampled frames are differentiated at a time (0 = all at once).
      adjoint_solver, adjoint_iters, adjoint_tol, adjoint_damping, adjoint_project_translations,
        adjoint_unconverged: ``"implicit"`` and ``"guided"``: the adjoint solve (see
        :class:`~bptt_jax.relax.methods.Implicit`).
      length_quantum: with ``bptt.jit_fit_step`` in full/remat mode, differentiate a scan only as long as the batch
        needs (found by an early-exit forward pass), rounded up to a multiple of this (0 = always max_frames).
      skip_converged: skip frames once every structure in the batch is done.
      dropout: keep model dropout on inside rollouts.
      fire: keyword overrides for :func:`~bptt_jax.relax.rules.fire`.

    A gradient-method option (:data:`METHOD_FIELDS`) set away from its default for a ``grad_mode`` that does
    not take it is an error, as is ``length_quantum`` with a method that stops early by construction.
    """

    rule: str = "descent"
    step_size: Optional[float] = 0.077
    step_mode: str = "fixed"
    step_head: tuple[tuple[str, Any], ...] = ()
    momentum: float = 0.0
    anneal: float = 1.0
    noise: float = 0.0
    noise_anneal: float = 1.0
    max_frames: int = 75
    tol: float = 1e-3
    diverge_distance: float = 5.0
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
        if isinstance(self.step_head, dict):  # Hydra and JSON give the head's options as a mapping
            object.__setattr__(self, "step_head", tuple(sorted(self.step_head.items())))
        if self.step_head and self.step_mode != "network":
            raise ValueError(f"relax.step_head applies to step_mode network, not {self.step_mode!r}")
        self._check_values()
        if self.grad_mode not in REGISTRY:
            raise ValueError(f"unknown grad_mode {self.grad_mode!r}; expected one of {', '.join(REGISTRY)}")
        takes = method_fields(self.grad_mode)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in METHOD_FIELDS:
            value = getattr(self, name)
            if name not in takes and value != defaults[name]:
                raise ValueError(f"relax.{name}={value!r} does not apply to grad_mode {self.grad_mode!r}, which "
                                 f"takes {', '.join('relax.' + t for t in takes) or 'no options'}")
        try:
            method = self.method  # validates the options' values
        except ValueError as err:
            raise ValueError(f"relax.grad_mode={self.grad_mode!r}: {err}") from None
        if self.length_quantum > 0 and method.early_exit:
            raise ValueError(f"relax.length_quantum={self.length_quantum} applies to grad_mode full and remat; "
                             f"{self.grad_mode!r} stops early by construction")

    def _check_values(self) -> None:
        """Refuse values no relaxation can run with, naming the key (``dataset.max_frames`` fills
        ``relax.max_frames`` in the CLI's config)."""
        require(self.step_size is None or is_number(self.step_size, 0.0, above=True), "relax.step_size",
                self.step_size, "a positive number (Å²/eV), or null for the validation split's best constant step")
        require(is_number(self.momentum, 0.0, high=1.0) and self.momentum < 1, "relax.momentum", self.momentum,
                "in [0, 1)")
        require(is_number(self.anneal, 0.0, above=True), "relax.anneal", self.anneal, "a positive factor")
        require(is_number(self.noise, 0.0), "relax.noise", self.noise, "at least 0 (Å)")
        require(is_number(self.noise_anneal, 0.0, above=True), "relax.noise_anneal", self.noise_anneal,
                "a positive factor")
        require(is_count(self.max_frames, 1), "relax.max_frames", self.max_frames,
                "an integer of at least 1 (the CLI sets it from dataset.max_frames)")
        # tol 0: never converged, every relaxation runs max_frames (benchmarks, tests); inf: no divergence bound.
        require(is_number(self.tol, 0.0), "relax.tol", self.tol, "a distance of at least 0 (Å)")
        require(self.diverge_distance == math.inf or is_number(self.diverge_distance, 0.0, above=True),
                "relax.diverge_distance", self.diverge_distance, "a positive distance (Å)")
        for name in ("remat_segment", "sample_frames", "sample_chunk", "length_quantum"):
            require(is_count(getattr(self, name)), f"relax.{name}", getattr(self, name), "an integer of at least 0")
        require(self.window is None or is_count(self.window), "relax.window", self.window,
                "an integer of at least 0, or null")
        require(is_count(self.adjoint_iters, 1), "relax.adjoint_iters", self.adjoint_iters,
                "an integer of at least 1")
        require(is_number(self.adjoint_tol, 0.0, above=True), "relax.adjoint_tol", self.adjoint_tol,
                "a positive number")
        require(is_number(self.adjoint_damping, 0.0), "relax.adjoint_damping", self.adjoint_damping,
                "at least 0")

    @property
    def method(self) -> GradMethod:
        """The gradient method ``grad_mode`` names, with the options of this config."""
        options = {METHOD_FIELDS[f]: getattr(self, f) for f in method_fields(self.grad_mode)}
        if options.get("window", 0) is None:  # the method's default window
            del options["window"]
        return from_config(self.grad_mode, **options)

    @property
    def window_frames(self) -> Optional[int]:
        """The window of a windowed gradient method (``window``, or the method's default when it is None);
        None for a method without a window."""
        return getattr(self.method, "window", None)


def make_rule(config: RelaxConfig, force_fn: ForceFn, free_mask: Array,
              step_size: Union[float, Array, StepSizeFn, None] = None,
              extra_noise: Union[float, Array] = 0.0) -> UpdateRule:
    """The update rule ``config`` describes; ``step_size`` (a learned scalar or a step-head closure)
    replaces ``config.step_size`` when given; ``extra_noise`` (Å, maybe traced) adds to ``config.noise``."""
    if config.rule == "fire":
        return fire(force_fn, free_mask, **dict(config.fire))
    eta = config.step_size if step_size is None else step_size
    if eta is None:
        raise ValueError("descent needs a step size: relax.step_size is None")
    noise = config.noise if _is_zero(extra_noise) else config.noise + extra_noise
    return descent(force_fn, eta, free_mask, momentum=config.momentum, anneal=config.anneal,
                   noise=noise, noise_anneal=config.noise_anneal)
