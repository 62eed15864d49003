"""The whole run: :func:`run_pipeline` calls the stages in order, each a function of the config and the stages
before it that returns a small dataclass (:class:`Data`, :class:`Pretrained`, :class:`Baselines`,
:class:`Tuned`, :class:`Evaluation`, :class:`Control`)."""

from __future__ import annotations

from typing import Any

import jax

from bptt_jax import parallel
from bptt_jax.pipeline import report
from bptt_jax.pipeline.config import RunConfig
from bptt_jax.pipeline.curves import TrainingCurves
from bptt_jax.pipeline.data import load_data
from bptt_jax.pipeline.evaluate import Evaluator, baselines, equal_compute_control, evaluate_tuned
from bptt_jax.pipeline.finetuning import fine_tune
from bptt_jax.pipeline.pretraining import pretrained_model


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage and write the run directory; returns the results dictionary.

    Multi-host: every process runs every stage (only the BPTT steps are shared); process 0 alone writes. When one
    process fails, the others stop within seconds (:func:`~bptt_jax.parallel.fail_together`).
    ``logging.tensorboard``: the training curves and results also go to TensorBoard event files, closed when the
    run ends or fails (:mod:`~bptt_jax.pipeline.curves`)."""
    parallel.initialize(cfg.distributed)  # multi-host: before any JAX computation (no-op unless enabled)
    with parallel.fail_together():  # multi-host: a failure here stops the other processes too
        cfg.validate()
        run_dir = report.start_run(cfg)
        with TrainingCurves.open(cfg, run_dir) as curves:
            model = cfg.model.build()
            data = load_data(cfg, getattr(model, "max_atoms", None))  # ResMLP: a fixed input size
            key = jax.random.PRNGKey(cfg.seed)
            pre = pretrained_model(cfg, model, data, key, run_dir, curves)
            ev = Evaluator.create(cfg, model, data, key)  # relaxes the test and validation splits for the stages below
            base = baselines(cfg, model, ev, pre.params)
            tuned = fine_tune(cfg, model, ev, pre.params, base.val_step, key, run_dir, curves)
            final = evaluate_tuned(ev, tuned.bptt, tuned.params, pre.params)
            control = equal_compute_control(cfg, model, ev, pre.params, tuned.metrics)
            results = report.build_results(cfg, data, pre, base, tuned, final, control)
            report.write_run(cfg, run_dir, results, pre.history, tuned.metrics)
            report.write_error_picture(cfg, run_dir, data.test_items, base.constant_step, final.tuned, base.best_step)
            curves.results(results, report.markdown_table(results), step=cfg.finetune.epochs)
    return results
