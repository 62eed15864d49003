"""bptt-jax: fine-tune machine-learning interatomic potentials by backpropagation through relaxations.

The public API, one concept per module:

- :mod:`bptt_jax.structures`: ``Structure`` (host), ``Batch`` (device pytree), padding, minimum image.
- :mod:`bptt_jax.models`: ADAPT, ResMLP and the step-size head (Flax; pure ``apply``).
- :mod:`bptt_jax.relax`: update rules as ``(init_fn, step_fn)`` pairs, scan / while rollouts under one stop rule,
  and gradient methods (how a rollout is differentiated) as small objects.
- :mod:`bptt_jax.losses`: Dq, MSE and force errors.
- :mod:`bptt_jax.bptt`: parameters, the rollout loss, the BPTT train step and the one place it is jitted
  (``jit_train_step``, ``jit_fit_step``; one device or a data mesh).
- :mod:`bptt_jax.inference`: ``relax_many``, bucketed in-flight relaxation of many structures.
- :mod:`bptt_jax.load`: ``load_run``, a finished run's model, parameters and learned relaxation.

Used elsewhere (import the submodule): :mod:`bptt_jax.ase` (an ASE calculator and optimizer) and
:mod:`bptt_jax.jax_md` (``force_fn``, ``energy_fn`` and ``learned_descent`` in jax-md's conventions).
"""

from bptt_jax.bptt import (BPTT, FitStep, OptimConfig, TrainState, count_params, jit_fit_step, jit_train_step,
                           make_optimizer, update_if_finite)
from bptt_jax.inference import InferenceStats, RelaxOutcome, relax_many
from bptt_jax.load import LoadedRun, load_run
from bptt_jax.losses import dq, force_l2, force_mse, masked_mean, position_mse, structure_loss
from bptt_jax.models import ADAPT, PRESETS, ResMLP, StepHead, build_model
from bptt_jax.relax import (DescentState, FireState, RelaxConfig, RolloutResult, UpdateRule, descent, fire,
                            rms_movement, rollout)
from bptt_jax.structures import DEFAULT_BUCKETS, Batch, Structure, bucket_size, displacement, minimum_image

__version__ = "0.1.0"

__all__ = [
    "ADAPT", "BPTT", "Batch", "DEFAULT_BUCKETS", "DescentState", "FireState", "FitStep", "InferenceStats",
    "LoadedRun", "OptimConfig", "PRESETS", "RelaxConfig", "RelaxOutcome", "ResMLP", "RolloutResult", "StepHead", "Structure",
    "TrainState", "UpdateRule", "build_model", "bucket_size", "count_params", "descent", "displacement", "dq", "fire",
    "force_l2", "force_mse", "jit_fit_step", "jit_train_step", "load_run", "make_optimizer", "masked_mean", "minimum_image",
    "position_mse", "relax_many", "rms_movement", "rollout", "structure_loss", "update_if_finite",
]
