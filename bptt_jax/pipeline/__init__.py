"""The paper's staged pipeline as library functions: data → pretrain → baselines → BPTT → evaluation → report.

:func:`run_pipeline` takes typed configs (no Hydra here; :mod:`bptt_jax.train` is the thin CLI) and writes
into a run directory: ``results.json``, ``metrics.csv``, plots, the resolved config and orbax checkpoints
(``checkpoints/pretrained``, ``checkpoints/pretraining`` while it trains, ``checkpoints/bptt``, one step per epoch).
``resume=True`` continues an interrupted run from its last checkpoint that restores.

One module per stage, in the order :func:`run_pipeline` (:mod:`~bptt_jax.pipeline.run`) calls them:

- :mod:`~bptt_jax.pipeline.config`: :class:`RunConfig` and its parts (data, model, pretrain, finetune, eval,
  logging).
- :mod:`~bptt_jax.pipeline.data`: the test / training split (:func:`load_split`), items and size-bucketed
  batches; the stage :func:`load_data` → :class:`Data`.
- :mod:`~bptt_jax.pipeline.pretraining`: force matching (:func:`pretrain`); the stage :func:`pretrained_model`
  → :class:`Pretrained`.
- :mod:`~bptt_jax.pipeline.evaluate`: relaxing and scoring a split (:func:`evaluate_relaxation`, ADwT), the
  baselines (constant-step grid, FIRE, :func:`run_oracle`) and the equal-compute control
  (:func:`force_control`); the stages :func:`baselines` → :class:`Baselines`, :func:`evaluate_tuned` →
  :class:`Evaluation`, :func:`equal_compute_control` → :class:`Control`.
- :mod:`~bptt_jax.pipeline.finetuning`: BPTT fine-tuning; the stage :func:`fine_tune` → :class:`Tuned`.
- :mod:`~bptt_jax.pipeline.checkpoints`: orbax save / restore, ``model.init_from``, resume.
- :mod:`~bptt_jax.pipeline.report`: ``results.json``, ``metrics.csv``, plots and :func:`markdown_table`.
- :mod:`~bptt_jax.pipeline.curves`: the training curves as TensorBoard event files (:class:`TrainingCurves`,
  ``logging.tensorboard``).
"""

from bptt_jax.pipeline.checkpoints import (DamagedCheckpointError, bptt_dir, bptt_params, init_from_dir, latest_step,
                                           pretrained_dir, pretraining_dir, restore_checkpoint, restore_latest,
                                           resume_bptt, save_checkpoint)
from bptt_jax.pipeline.config import (DataConfig, EvalConfig, FinetuneConfig, LoggingConfig, ModelConfig,
                                      PretrainConfig, RunConfig)
from bptt_jax.pipeline.curves import TrainingCurves
from bptt_jax.pipeline.data import (Data, Split, batch_plan, force_batches, force_items, generated_dir, load_data,
                                    load_split, load_trajectories, model_buckets, relax_batches, relaxation_items)
from bptt_jax.pipeline.evaluate import (Baselines, Control, EvalResult, Evaluation, Evaluator, adwt, baselines,
                                        equal_compute_control, evaluate_relaxation, evaluate_tuned, force_control,
                                        initial_loss, run_oracle, summarize)
from bptt_jax.pipeline.finetuning import Tuned, fine_tune, lr_schedule, make_bptt, noise_schedule
from bptt_jax.pipeline.pretraining import (Pretrained, PretrainProgress, force_errors, make_force_step, pretrain,
                                           pretrained_model)
from bptt_jax.pipeline.report import build_results, markdown_table, write_run
from bptt_jax.pipeline.run import run_pipeline

__all__ = [
    "Baselines", "Control", "DamagedCheckpointError", "Data", "DataConfig", "EvalConfig", "EvalResult",
    "Evaluation", "Evaluator", "FinetuneConfig", "LoggingConfig", "ModelConfig", "PretrainConfig", "Pretrained",
    "PretrainProgress", "RunConfig", "Split", "TrainingCurves", "Tuned", "adwt", "baselines", "batch_plan",
    "bptt_dir", "bptt_params", "build_results", "equal_compute_control", "evaluate_relaxation", "evaluate_tuned",
    "fine_tune", "force_batches", "force_control", "force_errors", "force_items", "generated_dir", "init_from_dir",
    "initial_loss", "latest_step", "load_data", "load_split", "load_trajectories", "lr_schedule", "make_bptt",
    "make_force_step", "markdown_table", "model_buckets", "noise_schedule", "pretrain", "pretrained_dir",
    "pretrained_model", "pretraining_dir", "relax_batches", "relaxation_items", "restore_checkpoint",
    "restore_latest", "resume_bptt", "run_oracle", "run_pipeline", "save_checkpoint", "summarize", "write_run",
]
