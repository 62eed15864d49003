"""BPTT fine-tuning, the pipeline's fourth stage (:func:`fine_tune`): the pretrained model, starting at the
validation split's best constant step, trained through whole relaxations for ``finetune.epochs`` epochs; the
epoch with the best validation loss is delivered (epoch 0: the starting model). One checkpoint per epoch
(``checkpoints/bptt``) lets an interrupted run resume from the last epoch that restores (a damaged one is set aside,
:func:`~bptt_jax.pipeline.checkpoints.restore_latest`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional, Union

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from bptt_jax import parallel
from bptt_jax.bptt import BPTT, OptimConfig, jit_fit_step
from bptt_jax.pipeline.checkpoints import bptt_dir, bptt_params, latest_step, resume_bptt, save_checkpoint
from bptt_jax.pipeline.config import FinetuneConfig, RunConfig
from bptt_jax.pipeline.curves import TrainingCurves
from bptt_jax.pipeline.data import Data, batch_plan, relax_batches
from bptt_jax.pipeline.evaluate import Evaluator

log = logging.getLogger("bptt_jax")


def noise_schedule(ft: FinetuneConfig, steps_per_epoch: int) -> Union[float, optax.Schedule]:
    """Training noise σ per step: ``noise · noise_anneal^epoch`` (a constant when it does not anneal)."""
    if ft.noise == 0 or ft.noise_anneal == 1:
        return ft.noise
    return optax.exponential_decay(ft.noise, transition_steps=max(steps_per_epoch, 1), decay_rate=ft.noise_anneal,
                                   staircase=True)


def lr_schedule(ft: FinetuneConfig, steps_per_epoch: int) -> Union[float, optax.Schedule]:
    """The BPTT learning rate: constant (optionally with linear warm-up) or warm-up + cosine decay."""
    if ft.schedule == "cosine":
        total = max(ft.epochs * steps_per_epoch, ft.warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if ft.warmup_steps else ft.learning_rate, peak_value=ft.learning_rate,
            warmup_steps=ft.warmup_steps, decay_steps=total, end_value=ft.learning_rate * ft.final_lr_fraction)
    if ft.warmup_steps:
        return optax.linear_schedule(0.0, ft.learning_rate, ft.warmup_steps)
    return ft.learning_rate


def make_bptt(cfg: RunConfig, model, step_size: float, steps_per_epoch: int) -> BPTT:
    """The BPTT trainer of ``cfg``: its relaxation (``relax``), its step size starting at ``step_size``, and
    the optimiser ``finetune`` describes (whose ``noise_frame_anneal`` is the training noise's factor per frame)."""
    ft = cfg.finetune
    relax = dataclasses.replace(cfg.relax, step_size=step_size, noise_anneal=ft.noise_frame_anneal)
    optim = OptimConfig(learning_rate=lr_schedule(ft, steps_per_epoch), clip_norm=ft.clip_norm, loss=cfg.data.loss,
                        prox_weight=ft.prox_weight, step_learning_rate=ft.step_learning_rate,
                        freeze_model=ft.freeze_model, noise=noise_schedule(ft, steps_per_epoch),
                        stop_tol_range=ft.stop_tol_range if ft.variable_stop else None,
                        stop_frames_range=ft.stop_frames_range if ft.variable_stop else None)
    return BPTT(model, relax, optim)


@dataclasses.dataclass
class Tuned:
    """What fine-tuning delivers: the parameters of the kept epoch (a host copy) and the epochs' metrics."""

    bptt: BPTT
    params: Any
    metrics: list[dict]  # one row per epoch (metrics.csv's bptt rows)
    kept_epoch: int  # 0: the starting model
    val_start: Optional[float]  # the starting model's validation loss
    test_start: Optional[float]  # and its test loss (reported, never selected on)
    step_size_initial: float
    steps_per_epoch: int
    seconds: float


def starting_params(bptt: BPTT, model_params, key: jax.Array, sample) -> dict:
    """The parameters BPTT starts from (epoch 0): the pretrained model's, with the step-size parameters (a learned
    η, a step head) drawn from the run's ``key`` (``PRNGKey(seed)``), so that a loaded run rebuilds them exactly."""
    return bptt.with_model_params(model_params, jax.random.fold_in(key, 1), sample)


def fine_tune(cfg: RunConfig, model, ev: Evaluator, model_params, start_step: float, key: jax.Array,
              run_dir: Path, curves: Optional[TrainingCurves] = None) -> Tuned:
    """BPTT from the pretrained ``model_params`` at step size ``relax.step_size`` (None: ``start_step``),
    resuming from ``checkpoints/bptt`` when ``cfg.resume``. Data parallel over all devices when there are
    several: state replicated, batches split (the one-device path is unchanged). ``curves`` gets the starting
    model as epoch 0, each epoch's row and each training step's loss (:mod:`~bptt_jax.pipeline.curves`)."""
    t = time.time()
    curves = curves or TrainingCurves()
    ft, data = cfg.finetune, ev.data
    eta0 = start_step if cfg.relax.step_size is None else cfg.relax.step_size
    steps_per_epoch = len(batch_plan([len(s) for s, _ in data.fit_items], ft.batch_size, data.buckets,
                                     np.random.default_rng(0)))
    bptt = make_bptt(cfg, model, eta0, steps_per_epoch)
    params0 = starting_params(bptt, model_params, key, data.sample)
    ref_params = params0 if ft.prox_weight else None
    state = bptt.init_state(params0, jax.random.fold_in(key, 2))
    ft_dir = bptt_dir(run_dir)
    start_epoch = 0
    metrics_rows: list[dict] = []

    def val_loss(params) -> Optional[float]:
        return ev.val(bptt, params).avg if data.val_items else None

    val0 = val_loss(params0) if ft.epochs else None
    test0 = ev.test(bptt, params0).avg if ft.epochs else None
    resumed = resume_bptt(ft_dir, state) if cfg.resume and latest_step(ft_dir) is not None else None
    if resumed is not None:
        state, metrics_rows, start_epoch = resumed
    if ft.epochs:
        start_row = {"epoch": 0, "val_loss": val0, "test_loss": test0}
        if bptt.step_size(params0) is not None:
            start_row["step_size"] = float(eta0)
        if start_epoch:
            curves.restored("bptt", [start_row] + metrics_rows)
        else:
            curves.epoch("bptt", start_row)
    # The delivered model: the epoch with the best validation loss (epoch 0: the starting model).
    best_epoch, best_val = _best_epoch(metrics_rows, val0)
    best_params = jax.device_get(bptt_params(ft_dir, state, best_epoch) if best_epoch else params0)
    mesh = parallel.data_mesh() if jax.device_count() > 1 else None
    # The step donates the state; params0 (validation, ref_params, best_params) is not part of it: init_state copies.
    train_step = jit_fit_step(bptt, mesh)
    if mesh is not None:
        state, ref_params = parallel.replicate((state, ref_params), mesh)
        log.info("BPTT data parallel over %d devices (%d processes)", mesh.size, jax.process_count())
    data_rng = np.random.default_rng(cfg.seed + 1)
    for _ in range(start_epoch):  # replay the shuffles of finished epochs, so a resumed run matches
        batch_plan([len(s) for s, _ in data.fit_items], ft.batch_size, data.buckets, data_rng)
    bar = tqdm(range(start_epoch, ft.epochs), desc="BPTT", unit="epoch", disable=not cfg.progress)
    for epoch in bar:
        te = time.time()
        state, stats = _train_epoch(train_step, state, ref_params, data, ft.batch_size, data_rng, mesh, epoch,
                                    cfg.progress, curves, first_step=epoch * steps_per_epoch)
        seconds = time.time() - te
        val = val_loss(state.params)
        test = ev.test(bptt, state.params)  # with the model's own (possibly learned) step
        row = {"epoch": epoch + 1, "train_loss": stats.train_loss(), "val_loss": val, "test_loss": test.avg,
               "train_frames": float(np.mean(stats.frames)), "structure_frames": stats.structure_frames,
               "train_diverged": stats.diverged, "test_diverged": test.diverged,
               "skipped_updates": stats.skipped_updates, "seconds": round(seconds, 2)}
        if stats.skipped_updates:
            log.warning("BPTT epoch %d: %d of %d updates skipped (non-finite loss, gradient or update)", epoch + 1,
                        stats.skipped_updates, len(stats.losses))
        if ft.noise:
            noise = bptt.optim.noise
            row["noise"] = float(noise(epoch * steps_per_epoch) if callable(noise) else noise)
        if bptt.step_size(state.params) is not None:
            row["step_size"] = float(bptt.step_size(parallel.unreplicate(state.params)))
        if stats.residuals:
            _adjoint_report(row, stats.residuals, bptt.relax.adjoint_tol)
        metrics_rows.append(row)
        curves.epoch("bptt", row)
        if val is None or (best_val is not None and val < best_val):
            best_epoch, best_val = epoch + 1, val
            best_params = jax.device_get(parallel.unreplicate(state.params))
        log.info("BPTT epoch %d: train %.4f, validation %s, test %.4f%s (%.0f s)", epoch + 1, row["train_loss"],
                 "-" if val is None else f"{val:.4f}", test.avg,
                 f", η {row['step_size']:.4g}" if "step_size" in row else "", seconds)
        bar.set_postfix(train=f"{row['train_loss']:.3f}", val="-" if val is None else f"{val:.3f}",
                        test=f"{test.avg:.3f}")
        save_checkpoint(ft_dir, epoch + 1, {"state": state}, {"epoch": epoch + 1, "metrics": metrics_rows})
    seconds = time.time() - t
    if ft.epochs:
        log.info("BPTT delivers epoch %d (validation %s)", best_epoch, "-" if best_val is None else f"{best_val:.4f}")
    return Tuned(bptt, best_params, metrics_rows, best_epoch, val0, test0, eta0, steps_per_epoch, seconds)


def _best_epoch(rows: list[dict], val_start: Optional[float]) -> tuple[int, Optional[float]]:
    """(epoch, validation loss) of the finished epochs' best, epoch 0 (``val_start``) included."""
    best_epoch, best_val = 0, val_start
    for row in rows:
        if row.get("val_loss") is not None and best_val is not None and row["val_loss"] < best_val:
            best_epoch, best_val = row["epoch"], row["val_loss"]
    return best_epoch, best_val


@dataclasses.dataclass
class _EpochStats:
    losses: list[float] = dataclasses.field(default_factory=list)  # per training step
    frames: list[float] = dataclasses.field(default_factory=list)  # mean frames per structure, per step
    structure_frames: float = 0.0  # structures × frames over the epoch (model evaluations)
    diverged: int = 0  # training structures left out of their step's loss (diverged)
    skipped: list[bool] = dataclasses.field(default_factory=list)  # per step: its update was not applied
    residuals: list[float] = dataclasses.field(default_factory=list)  # adjoint residual per step (implicit modes)

    @property
    def skipped_updates(self) -> int:
        return sum(self.skipped)

    def train_loss(self) -> float:
        """Mean loss of the steps whose update was applied (a skipped step's loss may be NaN)."""
        applied = [loss for loss, skip in zip(self.losses, self.skipped) if not skip]
        return float(np.mean(applied)) if applied else float("nan")


def _train_epoch(train_step, state, ref_params, data: Data, batch_size: int, data_rng: np.random.Generator, mesh,
                 epoch: int, progress: bool, curves: TrainingCurves, first_step: int):
    """One pass over BPTT's training relaxations, shuffled by ``data_rng``: (state, :class:`_EpochStats`). Each
    step's numbers go to ``curves`` at step ``first_step + i`` (i = 1, 2, ...)."""
    stats = _EpochStats()
    train_batches = relax_batches(data.fit_items, batch_size, data.buckets, data_rng)
    inner = tqdm(train_batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
    for idx, batch in inner:
        if mesh is not None:
            batch = parallel.shard_batch(batch, mesh, process_local=False)
        state, m = train_step(state, batch, ref_params)
        # The host converts these for the epoch's row anyway: logging them per step adds no device sync.
        step_row = {"loss": float(m["loss"]), "frames": float(m["frames"]), "diverged": int(m["diverged"])}
        stats.losses.append(step_row["loss"])
        stats.frames.append(step_row["frames"])
        stats.structure_frames += step_row["frames"] * len(idx)
        stats.diverged += step_row["diverged"]
        stats.skipped.append(bool(m["skipped_updates"]))
        if "adjoint_residual" in m:
            step_row["adjoint_residual"] = float(m["adjoint_residual"])
            stats.residuals.append(step_row["adjoint_residual"])
        curves.scalars("bptt_step", step_row, first_step + len(stats.losses))
        inner.set_postfix(loss=f"{stats.losses[-1]:.3f}")
    return state, stats


def _adjoint_report(row: dict, residuals: list[float], tol: float) -> None:
    """The epoch's worst adjoint residual and how many steps missed ``tol`` (a warning when any did)."""
    row["adjoint_residual_max"] = max(residuals)
    row["adjoint_unconverged"] = sum(r > tol for r in residuals)
    if row["adjoint_unconverged"]:
        log.warning("epoch %d: the adjoint solve missed adjoint_tol=%g in %d of %d steps (worst residual %.3g); "
                    "raise relax.adjoint_iters or try relax.adjoint_solver=gmres", row["epoch"], tol,
                    row["adjoint_unconverged"], len(residuals), max(residuals))
