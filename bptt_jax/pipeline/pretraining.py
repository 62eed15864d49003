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
from bptt_jax.pipeline.checkpoints import (clear, init_from_dir, pretrained_dir, pretraining_dir, restore_checkpoint,
                                           restore_latest, save_checkpoint)
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


@dataclasses.dataclass
class PretrainProgress:
    """Where pretraining stands: the host-side half of its checkpoints (JSON; the arrays are the other half).

    Attributes:
      epoch: finished epochs.
      position: training steps done in the next epoch (0: at its start).
      rng: the shuffling generator's state (numpy ``bit_generator.state``) at the start of that epoch, so that a
        resume shuffles it the same way.
      losses: that epoch's training losses so far (its row's ``train_force_mse`` is their mean).
      skipped: that epoch's updates skipped so far (non-finite; its row's ``skipped_updates``).
      history: the finished epochs' rows.
      best: the best validation force MSE so far (None: no epoch yet).
      bad_epochs: epochs since it last improved by ``min_delta``.
      seconds: training time so far (``time_budget_s`` counts it across resumes).
    """

    epoch: int = 0
    position: int = 0
    rng: dict = dataclasses.field(default_factory=dict)
    losses: list = dataclasses.field(default_factory=list)
    skipped: int = 0
    history: list = dataclasses.field(default_factory=list)
    best: Optional[float] = None
    bad_epochs: int = 0
    seconds: float = 0.0

    @property
    def done(self) -> bool:
        """Whether a stop rule has ended pretraining (the last row says which)."""
        return bool(self.history) and "stop" in self.history[-1]


def pretrain(model, params, frames: list[Structure], cfg: PretrainConfig, buckets, seed: int,
             progress: bool = True, on_epoch: Optional[Callable[[dict], None]] = None,
             checkpoints: Optional[Path] = None, resume: bool = False,
             on_resume: Optional[Callable[[list[dict]], None]] = None):
    """Adam with clipping and reduce-on-plateau on the force MSE; early stopping on a validation split.
    Returns the best parameters (by validation force MSE) and the per-epoch history; ``on_epoch`` gets each
    epoch's row of it when the epoch is done.

    ``checkpoints``: a folder for pretraining's state (parameters, optimiser state, best parameters and
    :class:`PretrainProgress`), saved at the end of every epoch and every ``cfg.checkpoint_every`` training steps
    within one; the newest two are kept. ``resume``: continue from the newest state there that restores (a
    damaged one is set aside for the one before, :func:`~bptt_jax.pipeline.checkpoints.restore_latest`), with the
    same shuffles, so that the result is bit for bit the uninterrupted one's; ``on_resume`` gets the restored
    rows. Without ``resume`` (or a state to resume), the folder is cleared and pretraining starts afresh."""
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

    best_params = params
    prog = PretrainProgress(rng=rng.bit_generator.state)
    if checkpoints is not None:
        like = {"params": params, "opt_state": opt_state, "best_params": params}
        restored = restore_latest(checkpoints, like) if resume else None
        if restored is None:
            clear(checkpoints)
        else:
            tree, meta, _ = restored
            params, opt_state, best_params = tree["params"], tree["opt_state"], tree["best_params"]
            prog = PretrainProgress(**meta)
            log.info("resumed pretraining after %d epochs and %d steps", prog.epoch, prog.position)
            if on_resume:
                on_resume(list(prog.history))

    def save():
        prog.seconds = time.time() - t0
        save_checkpoint(checkpoints, prog.epoch * n_batches + prog.position,
                        {"params": params, "opt_state": opt_state, "best_params": best_params},
                        dataclasses.asdict(prog), max_to_keep=2)

    t0 = time.time() - prog.seconds
    bar = tqdm(total=cfg.max_epochs, initial=prog.epoch, desc="pretrain", unit="epoch", disable=not progress)
    while not prog.done and prog.epoch < cfg.max_epochs:
        rng.bit_generator.state = prog.rng
        batches = force_batches(train, cfg.batch_size, buckets, rng)
        for batch in batches[prog.position:]:
            params, opt_state, loss, skip = step(params, opt_state, batch)
            if skip:  # not applied (a non-finite loss, gradient or update): counted, kept out of the mean
                prog.skipped += 1
            else:
                prog.losses.append(float(loss))
            prog.position += 1
            if (checkpoints is not None and cfg.checkpoint_every and prog.position % cfg.checkpoint_every == 0
                    and prog.position < len(batches)):
                save()
        epoch = prog.epoch + 1
        val_mse, val_l2 = force_errors(errors, params, val_batches)
        lr = (float(lr_of_step(epoch * n_batches)) if lr_of_step is not None
              else cfg.learning_rate * float(opt_state[2].scale))
        rec = {"epoch": epoch, "train_force_mse": float(np.mean(prog.losses)) if prog.losses else float("nan"),
               "val_force_mse": val_mse, "val_force_l2": val_l2, "lr": lr, "skipped_updates": prog.skipped}
        bar.set_postfix(val_mse=f"{val_mse:.4f}", lr=f"{rec['lr']:.1e}")
        log.debug("pretrain epoch %d: train %.5f, val %.5f, lr %.2e", epoch, rec["train_force_mse"], val_mse,
                  rec["lr"])
        if val_mse < (math.inf if prog.best is None else prog.best) * (1 - cfg.min_delta):
            prog.best, best_params, prog.bad_epochs = val_mse, params, 0
        else:
            prog.bad_epochs += 1
        rec["best_epoch"] = epoch - prog.bad_epochs
        if on_epoch:
            on_epoch(rec)
        if cfg.patience is not None and prog.bad_epochs >= cfg.patience:
            rec["stop"] = "plateau"
        elif cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s:
            rec["stop"] = "time_budget"
        elif epoch == cfg.max_epochs:
            rec["stop"] = "max_epochs"
        prog.history.append(rec)
        prog.epoch, prog.position, prog.rng, prog.losses, prog.skipped = epoch, 0, rng.bit_generator.state, [], 0
        bar.update()
        if checkpoints is not None:
            save()
    bar.close()
    return best_params, prog.history


@dataclasses.dataclass
class Pretrained:
    """The pretrained model's variables and its per-epoch history (empty when a checkpoint had none)."""

    params: Any
    history: list[dict]
    seconds: float


def pretrained_model(cfg: RunConfig, model, data: Data, key: jax.Array, run_dir: Path,
                     curves: Optional[TrainingCurves] = None) -> Pretrained:
    """The pretrained model: restored from ``model.init_from``, or from this run's own checkpoint when resuming,
    else trained on ``data.frames`` (:func:`pretrain`, continuing from ``checkpoints/pretraining`` when resuming)
    and saved to ``checkpoints/pretrained``. A damaged ``checkpoints/pretrained`` is set aside and the model
    taken again from pretraining's last state. ``curves`` gets each epoch's row as it is trained (a restored
    history: :meth:`TrainingCurves.restored`)."""
    t = time.time()
    curves = curves or TrainingCurves()
    pre_dir = pretrained_dir(run_dir)
    params = model.init(key, data.sample)
    history: list[dict] = []
    restored = restore_latest(pre_dir, params) if cfg.resume and not cfg.model.init_from else None
    if cfg.model.init_from:
        src = init_from_dir(cfg.model.init_from)
        params, meta, _ = restore_checkpoint(src, params)
        history = meta.get("history", [])
        log.info("pretrained parameters from %s", src)
        curves.restored("pretrain", history)
    elif restored is not None:
        params, meta, _ = restored
        history = meta.get("history", [])
        curves.restored("pretrain", history)
    else:
        if not data.frames:
            raise ValueError("no frames with forces to pretrain on; set model.init_from")
        if getattr(model, "input_norm", False):  # ResMLP: standardize its inputs by the training frames' statistics
            params = fit_input_stats(model, params, force_batches(data.frames, cfg.pretrain.batch_size, data.buckets))
        params, history = pretrain(model, params, data.frames, cfg.pretrain, data.buckets, cfg.seed, cfg.progress,
                                   on_epoch=lambda row: curves.epoch("pretrain", row),
                                   checkpoints=pretraining_dir(run_dir), resume=cfg.resume,
                                   on_resume=lambda rows: curves.restored("pretrain", rows))
        save_checkpoint(pre_dir, 0, params, {"history": history})
    out = Pretrained(params, history, time.time() - t)
    if history:
        last = history[-1]
        log.info("pretrain: %d epochs (stop: %s), best epoch %s, val force MSE %.5f", len(history),
                 last.get("stop", "-"), last.get("best_epoch", "-"), min(r["val_force_mse"] for r in history))
    return out
