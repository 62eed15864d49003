"""Relaxation as an iterated map, and differentiable rollouts of it.

- :mod:`~bptt_jax.relax.rules`: update rules as ``(init_fn, step_fn)`` pairs (:class:`UpdateRule`):
  :func:`descent` (paper Eq. 2 and its ablations) and :func:`fire`.
- :mod:`~bptt_jax.relax.loop`: the one stop rule (:func:`stop_rule`, :class:`Status`), the scan and
  while loops, and :func:`rollout`, which runs a rule to convergence.
- :mod:`~bptt_jax.relax.methods`: how a rollout is differentiated, as small objects that carry their own
  options: :class:`Full`, :class:`Remat`, :class:`Truncated`, :class:`Implicit`, :class:`Guided`,
  :class:`FirstOrder`; :data:`REGISTRY` and :func:`from_config` by name.
- :mod:`~bptt_jax.relax.config`: :class:`RelaxConfig` (the ``relax`` node of the Hydra config), the rule
  (:func:`make_rule`) and the method (``RelaxConfig.method``) it describes; :func:`run` rolls out by it.

::

    rule = descent(force_fn, 0.077, free_mask)
    result = rollout(rule, positions, free_mask, method=Truncated(window=10), max_frames=75, tol=1e-3)
"""

from bptt_jax.relax.config import METHOD_FIELDS, RelaxConfig, make_rule, method_fields
from bptt_jax.relax.loop import (RolloutResult, Status, Unroll, initial_status, make_frame, rms_movement, rollout,
                                 run, select, stop_rule)
from bptt_jax.relax.methods import (REGISTRY, FirstOrder, Full, GradMethod, Guided, Implicit, Remat, Truncated,
                                    first_order_samples, from_config)
from bptt_jax.relax.rules import (DescentState, FireState, ForceFn, StepSizeFn, UpdateRule, descent, fire)

GRAD_MODES = tuple(REGISTRY)
"""The gradient methods' names (``RelaxConfig.grad_mode``), in registry order."""

__all__ = [
    "DescentState", "FireState", "FirstOrder", "ForceFn", "Full", "GRAD_MODES", "GradMethod", "Guided", "Implicit",
    "METHOD_FIELDS", "REGISTRY", "RelaxConfig", "Remat", "RolloutResult", "Status", "StepSizeFn", "Truncated",
    "Unroll", "UpdateRule", "descent", "fire", "first_order_samples", "from_config", "initial_status", "make_frame",
    "make_rule", "method_fields", "rms_movement", "rollout", "run", "select", "stop_rule",
]
