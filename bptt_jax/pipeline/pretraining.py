"""Pretraining: force matching on the training trajectories' frames (:func:`pretrain`), the pipeline's second
stage (:func:`pretrained_model`: trained here, or restored from a checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

from bptt_jax.bptt import update_if_finite
from bptt_jax.losses import force_l2, force_mse, masked_mean
from bptt_jax.models import fit_input_stats
from bptt_jax.pipeline.checkpoints import (init_from_dir, latest_step, pretrained_dir, restore_checkpoint,
                                           save_checkpoint)
from bptt_jax.pipeline.config import PretrainConfig, RunConfig
from bptt_jax.pipeline.curves import TrainingCurves
from bptt_jax.pipeline.data import Data, batch_plan, force_batches
from bptt_jax.structures import Batch, Structure

log = logging.getLogger("bptt_jax")


def make_force_step(model, optimizer):
    """Jitted force matching: ``step(params, opt_state, batch) -> (params, opt_state, loss, skipped)`` (one
    ``optimizer`` step on the batch's mean force MSE; a step whose loss, gradient or update is non-finite is not
    applied, ``skipped`` says so: :func:`~bptt_jax.bptt.update_if_finite`) and ``errors(params, batch) ->
    (force MSE, force L2)`` per structure."""
    def loss_fn(params, batch):
        pred = model.apply(params, batch)
        per = force_mse(pred, batch.forces, batch.atom_mask)
        return masked_mean(per, batch.structure_mask)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        # ``value`` feeds optax.contrib.reduce_on_plateau when it is in the chain (ignored otherwise).
        params, opt_state, skipped = update_if_finite(optimizer, grads, opt_state, params, loss, value=loss)
        return params, opt_state, loss, skipped

    @jax.jit
    def errors(params, batch):
        pred = model.apply(params, batch)
        return force_mse(pred, batch.forces, batch.atom_mask), force_l2(pred, batch.forces, batch.atom_mask)

    return step, errors


def force_errors(errors_fn, params, batches: list[Batch]) -> tuple[float, float]:
    """(force MSE per component, mean per-structure L2 force error) over real structures."""
    mse, l2, n = 0.0, 0.0, 0
    for b in batches:
        sq_err, l2_err = errors_fn(params, b)
        mask = np.asarray(b.structure_mask)
        mse += float(np.asarray(sq_err)[mask].sum())
        l2 += float(np.asarray(l2_err)[mask].sum())
        n += int(mask.sum())
    return mse / max(n, 1), l2 / max(n, 1)


def pretrain(model, params, frames: list[Structure], cfg: PretrainConfig, buckets, seed: int,
             progress: bool = True, on_epoch: Optional[Callable[[dict], None]] = None):
    """Adam with clipping and reduce-on-plateau on the force MSE; early stopping on a validation split.
    Returns the best parameters (by validation force MSE) and the per-epoch history; ``on_epoch`` gets each
    epoch's row of it when the epoch is done."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frames))
    n_val = max(1, int(round(cfg.val_fraction * len(frames))))
    val = [frames[i] for i in order[:n_val]]
    train = [frames[i] for i in order[n_val:]]
    val_batches = force_batches(val, cfg.batch_size, buckets)
    n_batches = len(batch_plan([len(s) for s in train], cfg.batch_size, buckets))
    if cfg.schedule == "cosine":
        # Cosine decay from learning_rate to min_learning_rate over max_epochs: a fixed amount of training.
        lr_of_step = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.max_epochs * n_batches, 1),
                                                 alpha=min(1.0, cfg.min_learning_rate / cfg.learning_rate))
        optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(lr_of_step))
    else:
        # Halve the learning rate when the epoch-mean training loss plateaus (accumulated over one epoch).
        lr_of_step = None
        optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate),
                                optax.contrib.reduce_on_plateau(factor=0.5, patience=2, accumulation_size=n_batches,
                                                                min_scale=min(1.0, cfg.min_learning_rate /
                                                                              cfg.learning_rate)))
    opt_state = optimizer.init(params)
    step, errors = make_force_step(model, optimizer)

    best, best_params, bad_epochs, history = math.inf, params, 0, []
    t0 = time.time()
    bar = tqdm(range(cfg.max_epochs), desc="pretrain", unit="epoch", disable=not progress)
    for epoch in bar:
        losses, skipped = [], 0
        for batch in force_batches(train, cfg.batch_size, buckets, rng):
            params, opt_state, loss, skip = step(params, opt_state, batch)
            if skip:  # not applied (a non-finite loss, gradient or update): counted, kept out of the mean
                skipped += 1
            else:
                losses.append(float(loss))
        val_mse, val_l2 = force_errors(errors, params, val_batches)
        lr = (float(lr_of_step((epoch + 1) * n_batches)) if lr_of_step is not None
              else cfg.learning_rate * float(opt_state[2].scale))
        rec = {"epoch": epoch + 1, "train_force_mse": float(np.mean(losses)) if losses else float("nan"),
               "val_force_mse": val_mse, "val_force_l2": val_l2, "lr": lr, "skipped_updates": skipped}
        history.append(rec)
        bar.set_postfix(val_mse=f"{val_mse:.4f}", lr=f"{rec['lr']:.1e}")
        log.debug("pretrain epoch %d: train %.5f, val %.5f, lr %.2e", epoch + 1, rec["train_force_mse"], val_mse,
                  rec["lr"])
        if val_mse < best * (1 - cfg.min_delta):
            best, best_params, bad_epochs = val_mse, params, 0
        else:
            bad_epochs += 1
        rec["best_epoch"] = epoch + 1 - bad_epochs
        if on_epoch:
            on_epoch(rec)
        if cfg.patience is not None and bad_epochs >= cfg.patience:
            rec["stop"] = "plateau"
            break
        if cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s:
            rec["stop"] = "time_budget"
            break
    else:
        if history:
            history[-1]["stop"] = "max_epochs"
    bar.close()
    return best_params, history


@dataclasses.dataclass
class Pretrained:
    """The pretrained model's variables and its per-epoch history (empty when a checkpoint had none)."""

    params: Any
    history: list[dict]
    seconds: float


def pretrained_model(cfg: RunConfig, model, data: Data, key: jax.Array, run_dir: Path,
                     curves: Optional[TrainingCurves] = None) -> Pretrained:
    """The pretrained model: restored from ``model.init_from``, or from this run's own checkpoint when resuming,
    else trained on ``data.frames`` (:func:`pretrain`) and saved to ``checkpoints/pretrained``. ``curves`` gets
    each epoch's row as it is trained (a restored history: :meth:`TrainingCurves.restored`)."""
    t = time.time()
    curves = curves or TrainingCurves()
    pre_dir = pretrained_dir(run_dir)
    params = model.init(key, data.sample)
    history: list[dict] = []
    if cfg.model.init_from:
        src = init_from_dir(cfg.model.init_from)
        params, meta, _ = restore_checkpoint(src, params)
        history = meta.get("history", [])
        log.info("pretrained parameters from %s", src)
        curves.restored("pretrain", history)
    elif cfg.resume and latest_step(pre_dir) is not None:
        params, meta, _ = restore_checkpoint(pre_dir, params)
        history = meta.get("history", [])
        curves.restored("pretrain", history)
    else:
        if not data.frames:
            raise ValueError("no frames with forces to pretrain on; set model.init_from")
        if getattr(model, "input_norm", False):  # ResMLP: standardize its inputs by the training frames' statistics
            params = fit_input_stats(model, params, force_batches(data.frames, cfg.pretrain.batch_size, data.buckets))
        params, history = pretrain(model, params, data.frames, cfg.pretrain, data.buckets, cfg.seed, cfg.progress,
                                   on_epoch=lambda row: curves.epoch("pretrain", row))
        save_checkpoint(pre_dir, 0, params, {"history": history})
    out = Pretrained(params, history, time.time() - t)
    if history:
        last = history[-1]
        log.info("pretrain: %d epochs (stop: %s), best epoch %s, val force MSE %.5f", len(history),
                 last.get("stop", "-"), last.get("best_epoch", "-"), min(r["val_force_mse"] for r in history))
    return out
