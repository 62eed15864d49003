"""The paper's staged pipeline as library functions: data → pretrain → baselines → BPTT → evaluation.

:func:`run_pipeline` takes typed configs (no Hydra here; :mod:`bptt_jax.train` is the thin CLI) and writes
into a run directory: ``results.json``, ``metrics.csv``, plots, the resolved config and orbax checkpoints
(``checkpoints/pretrained`` and ``checkpoints/bptt``, one step per epoch). ``resume=True`` continues an
interrupted run from its last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bptt_jax import parallel
from bptt_jax.bptt import BPTT, OptimConfig
from bptt_jax.data.trajectory import DataError, SkipLog, Trajectory, filter_usable
from bptt_jax.losses import force_l2, force_mse, masked_mean, structure_loss
from bptt_jax.models import StepHead, build_model, fit_input_stats
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import DEFAULT_BUCKETS, Batch, Structure, bucket_size, displacement

log = logging.getLogger("bptt_jax")

# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class DataConfig:
    """Where trajectories come from and how they are split and batched.

    ``path`` set: read any supported format (file or directory), at most ``n`` records. Otherwise the
    offline generator ``name`` with ``preset``/``n``/``seed`` writes (or reuses)
    ``cache_dir/<name>-<preset>-n<n>-s<seed>`` (``n`` None: the preset's size). The first ``n_test`` records
    are the test split, counted before anything is filtered (:func:`load_split`).
    """

    name: str = "si_defects"
    path: Optional[str] = None
    format: Optional[str] = None
    preset: str = "default"
    n: Optional[int] = None
    seed: int = 0
    workers: int = 2
    cache_dir: str = "data"
    generator: dict = dataclasses.field(default_factory=dict)  # extra generator parameters
    strict: bool = False
    n_test: int = 100
    max_train: Optional[int] = None  # cap on training trajectories (None = all)
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    loss: str = "dq"  # dq (defects, catalysts) or mse (pure crystals)
    max_frames: int = 75


@dataclasses.dataclass
class ModelConfig:
    name: str = "adapt"
    preset: Optional[str] = "small_geo"
    overrides: dict = dataclasses.field(default_factory=dict)
    init_from: Optional[str] = None  # a run directory or checkpoint directory with pretrained params
    matmul_dtype: str = "float32"  # float32 | bfloat16 (matrix products in bf16, float32 parameters; accelerators)


@dataclasses.dataclass
class PretrainConfig:
    """Force matching on the flattened frames until the validation force error stops improving.

    The run stops after ``max_epochs``, or after ``patience`` epochs without a relative improvement of
    ``min_delta`` in the validation force MSE: the same command and seed give the same model on any machine.
    ``time_budget_s`` adds a wall-clock cap (off by default: a cap makes the model depend on the machine).
    ``patience=None`` turns the plateau stop off (every run trains ``max_epochs``)."""

    def __post_init__(self):
        if self.schedule not in ("plateau", "cosine"):
            raise ValueError(f"pretrain.schedule must be plateau or cosine, not {self.schedule!r}")

    max_epochs: int = 60
    patience: Optional[int] = 6
    batch_size: int = 32
    learning_rate: float = 2e-3
    min_learning_rate: float = 1e-5
    clip_norm: float = 10.0
    val_fraction: float = 0.1
    frame_stride: int = 3  # every k-th frame of each trajectory (neighbouring frames are nearly identical)
    min_delta: float = 1e-3  # an epoch improves when the validation MSE drops by more than this fraction
    schedule: str = "plateau"  # plateau: halve the rate when training stalls | cosine: decay over max_epochs
    time_budget_s: Optional[float] = None  # optional wall-clock cap (s); None: stop by epochs and plateau only


@dataclasses.dataclass
class FinetuneConfig:
    """BPTT fine-tuning (paper Sec. 3, App. B-D). The training-only options (``freeze_model``, ``noise``,
    ``variable_stop``) change the training rollouts, never the evaluation's."""

    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 5e-4
    clip_norm: Optional[float] = 1.0  # None: no clipping (proximal-only runs, App. C.2)
    prox_weight: float = 0.0
    step_mode: str = "learned"  # fixed | learned | network
    step_head: dict = dataclasses.field(default_factory=dict)  # StepHead options (init, d_model, n_layers, ...)
    freeze_model: bool = False  # train the step size only; the MLIP stays as pretrained (Fig. 5a)
    noise: float = 0.0  # σ (Å) of exploration noise in every training frame (App. C.1)
    noise_anneal: float = 1.0  # the noise's factor per epoch (epoch e: noise · noise_anneal^e)
    noise_frame_anneal: float = 1.0  # and per frame within a relaxation
    variable_stop: bool = False  # each training step draws its stop rule (App. C.4)
    stop_tol_range: tuple[float, float] = (1e-4, 1e-2)  # log-uniform
    stop_frames_range: tuple[int, int] = (50, 75)  # uniform, both included
    rule: str = "descent"  # descent | fire: the relaxation trained through
    step_size: Optional[float] = None  # None: start from the best constant step of the grid
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (decays to final_lr_fraction · learning_rate at the last step)
    final_lr_fraction: float = 0.05
    step_learning_rate: Optional[float] = 0.03  # Adam rate of log η: up to ~3% change of a learned η per step
    val_fraction: float = 0.15  # the last trajectories of the training split: BPTT's validation split

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"finetune.schedule must be constant or cosine, not {self.schedule!r}")
        if self.rule not in ("descent", "fire"):
            raise ValueError(f"finetune.rule must be descent or fire, not {self.rule!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"finetune.val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.noise < 0 or not 0 < self.noise_anneal <= 1 or not 0 < self.noise_frame_anneal <= 1:
            raise ValueError("finetune.noise must be >= 0 and its anneal factors in (0, 1]")
        self.stop_tol_range = tuple(float(x) for x in self.stop_tol_range)
        self.stop_frames_range = tuple(int(x) for x in self.stop_frames_range)


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


@dataclasses.dataclass
class EvalConfig:
    """Test-set evaluation and its controls.

    Attributes:
      step_grid: constant step sizes of the baseline (the best on the test set is reported, paper Table 7).
      fire: also relax the test set with FIRE and the pretrained model.
      batch_size: structures relaxed together.
      basin_dq: a relaxation ends in the reference's basin when its final Dq is below this (√amu·Å).
      force_control: continue force training for as many model evaluations as BPTT made, and report its
        best constant step beside BPTT (the equal-compute control).
      oracle: relax the test set with the generating potential's own forces under the same rule, step grid
        and frame budget (generated data sets only).
    """

    step_grid: tuple[float, ...] = (0.002, 0.003, 0.005, 0.007, 0.01, 0.02, 0.03, 0.05, 0.077, 0.1)
    fire: bool = True
    batch_size: int = 16
    basin_dq: float = 3.0
    force_control: bool = False
    oracle: bool = True


@dataclasses.dataclass
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    relax: RelaxConfig = dataclasses.field(default_factory=RelaxConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = False
    progress: bool = True
    plots: bool = True
    distributed: parallel.DistributedConfig = dataclasses.field(default_factory=parallel.DistributedConfig)


# ---------------------------------------------------------------------------------------------------
# Data


def _records(cfg: DataConfig, skipped: SkipLog, progress: bool = True) -> Iterator[Union[Trajectory, DataError]]:
    """Every record of the configured source in order, a skipped one as its :class:`DataError` (counted in
    ``skipped``); at most ``cfg.n`` of them (a generated set: the preset's size when ``n`` is None)."""
    from bptt_jax.data.readers import read_trajectories

    if cfg.path:
        yield from read_trajectories(Path(cfg.path), strict=cfg.strict, skipped=skipped, fmt=cfg.format,
                                     limit=cfg.n, placeholders=True)
        return
    from bptt_jax.data.generate import generate, make_params

    n = cfg.n if cfg.n is not None else make_params(cfg.name, cfg.preset, **cfg.generator).n
    out = generated_dir(cfg)
    manifest = generate(cfg.name, out, preset=cfg.preset, seed=cfg.seed, workers=cfg.workers,
                        progress=progress, n=n, **cfg.generator)
    for rec in manifest["trajectories"][:n]:
        yield from read_trajectories(out / rec["file"], strict=cfg.strict, skipped=skipped, placeholders=True)


def generated_dir(cfg: DataConfig) -> Path:
    """Where the generator ``cfg.name`` caches its trajectories for this preset, size and seed."""
    from bptt_jax.data.generate import make_params

    n = cfg.n if cfg.n is not None else make_params(cfg.name, cfg.preset, **cfg.generator).n
    return Path(cfg.cache_dir) / f"{cfg.name}-{cfg.preset}-n{n}-s{cfg.seed}"


@dataclasses.dataclass
class Split:
    """The usable trajectories of each split, and how many records each split was cut from."""

    train: list[Trajectory]
    test: list[Trajectory]
    train_records: int
    test_records: int

    def describe(self) -> str:
        return (f"test: {len(self.test)} usable of the first {self.test_records} records; train: "
                f"{len(self.train)} of the {self.train_records} after them")


def load_split(cfg: DataConfig, skipped: SkipLog, progress: bool = True,
               max_atoms: Optional[int] = None) -> Split:
    """Read (or generate, then read) the configured records and split them as the paper does: the test split
    is the first ``n_test`` records *before* anything is filtered (so it is the same records whatever is
    skipped), the training split the rest; then each keeps its usable trajectories (bad records, ≤ 2 frames,
    changing atom counts, and with ``max_atoms`` structures larger than the model takes, are skipped and
    counted in ``skipped``)."""
    records = list(_records(cfg, skipped, progress))
    test_raw, train_raw = records[:cfg.n_test], records[cfg.n_test:]

    def usable(part):
        trajs = list(filter_usable((r for r in part if isinstance(r, Trajectory)), skipped))
        if max_atoms is None:
            return trajs
        keep = []
        for t in trajs:
            if t.n_atoms <= max_atoms:
                keep.append(t)
                continue
            err = DataError(t.source or t.id, None, f"{t.n_atoms} atoms, more than the model takes "
                            f"(max_atoms={max_atoms})", kind="too_large")
            if cfg.strict:
                raise err
            skipped.add(err.kind, str(err))
        return keep

    return Split(usable(train_raw), usable(test_raw), len(train_raw), len(test_raw))


def load_trajectories(cfg: DataConfig, skipped: SkipLog, progress: bool = True) -> list[Trajectory]:
    """The usable trajectories of the configured source, in order (test split first)."""
    parts = load_split(cfg, skipped, progress)
    return parts.test + parts.train


def relaxation_items(trajs: Sequence[Trajectory]) -> list[tuple[Structure, np.ndarray]]:
    return [t.relaxation_pair() for t in trajs]


def force_items(trajs: Sequence[Trajectory], stride: int = 1) -> list[Structure]:
    """Every ``stride``-th frame (and always the last) of each trajectory that has forces."""
    out = []
    for t in trajs:
        if t.forces is None or t.endpoints_only:
            continue
        idx = list(range(0, t.n_frames, max(stride, 1)))
        if idx[-1] != t.n_frames - 1:
            idx.append(t.n_frames - 1)
        out.extend(t.frame(i) for i in idx)
    return out


def batch_plan(sizes: Sequence[int], batch_size: int, buckets: Sequence[int],
               rng: Optional[np.random.Generator] = None) -> list[tuple[int, list[int]]]:
    """Group item indices by size bucket into batches of at most ``batch_size``: [(n_atoms, indices)].

    With ``rng``, items are shuffled within buckets and the batch order is shuffled (training); without,
    the order is deterministic (evaluation). Each bucket compiles once.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(sizes):
        groups[bucket_size(n, buckets)].append(i)
    plan = []
    for n_pad in sorted(groups):
        idx = np.asarray(groups[n_pad])
        if rng is not None:
            idx = rng.permutation(idx)
        plan.extend((n_pad, idx[i:i + batch_size].tolist()) for i in range(0, len(idx), batch_size))
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def model_buckets(buckets: Sequence[int], max_atoms: Optional[int]) -> tuple[int, ...]:
    """Size buckets a model with a fixed input size (ResMLP's ``max_atoms``) can take: those below the limit
    and the limit itself, so that e.g. 216-site cells pad to 220 rather than 224."""
    if max_atoms is None:
        return tuple(buckets)
    return tuple(sorted({int(b) for b in buckets if b < max_atoms} | {int(max_atoms)}))


def relax_batches(items, batch_size, buckets, rng=None) -> list[tuple[list[int], Batch]]:
    plan = batch_plan([len(s) for s, _ in items], batch_size, buckets, rng)
    return [(idx, Batch.from_structures([items[i][0] for i in idx], [items[i][1] for i in idx],
                                        n_atoms=n_pad, batch_size=batch_size)) for n_pad, idx in plan]


def force_batches(frames, batch_size, buckets, rng=None) -> list[Batch]:
    plan = batch_plan([len(s) for s in frames], batch_size, buckets, rng)
    return [Batch.from_structures([frames[i] for i in idx], n_atoms=n_pad, batch_size=batch_size,
                                  with_forces=True) for n_pad, idx in plan]


# ---------------------------------------------------------------------------------------------------
# Metrics


def adwt(pred: np.ndarray, target: np.ndarray, cell: np.ndarray, pbc: np.ndarray, free: np.ndarray) -> float:
    """fairchem's Average Distance within Threshold: per structure the mean minimum-image distance of
    its free atoms, then the fraction of structures below each threshold in 0.01..0.5 Å (step 0.001),
    averaged over thresholds. Arrays are stacked per structure: (S, N, 3), (S, 3, 3), (S, 3), (S, N)."""
    d = np.linalg.norm(np.asarray(displacement(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(cell),
                                               jnp.asarray(pbc))), axis=-1)
    mean_d = (d * free).sum(-1) / np.maximum(free.sum(-1), 1)
    thresholds = np.arange(0.01, 0.5, 0.001)
    return float(np.mean(mean_d[None, :] < thresholds[:, None]))


@dataclasses.dataclass
class EvalResult:
    avg: float
    per_structure: np.ndarray  # (S,) loss per test structure, in test order
    frames: np.ndarray
    diverged: int
    adwt: float
    dq: Optional[np.ndarray] = None  # (S,) Dq per structure whatever the loss (for the basin count)
    diverged_mask: Optional[np.ndarray] = None  # (S,) bool

    def summary(self, basin_dq: float) -> dict[str, Any]:
        """Avg loss with and without the diverged (degenerate) relaxations, their count, and how many
        structures ended in the reference's basin: final Dq below ``basin_dq``."""
        return summarize(self.per_structure, self.dq, self.diverged_mask, basin_dq)


def summarize(per_structure: np.ndarray, dq: Optional[np.ndarray], diverged: Optional[np.ndarray],
              basin_dq: float) -> dict[str, Any]:
    per = np.asarray(per_structure, float)
    bad = np.zeros(len(per), bool) if diverged is None else np.asarray(diverged, bool)
    return {"avg": float(per.mean()),
            "avg_without_diverged": float(per[~bad].mean()) if (~bad).any() else None,
            "diverged": int(bad.sum()),
            "basins": None if dq is None else int((np.asarray(dq) < basin_dq).sum())}


def evaluate_relaxation(bptt: BPTT, params, batches: list[tuple[list[int], Batch]], n_items: int,
                        mesh=None) -> EvalResult:
    """Relax the test batches (early-exit rollout) and collect per-structure losses and ADwT.

    ``params`` may be replicated over a multi-host mesh (the local copy is used). With ``mesh`` (a mesh of this
    process's devices, :func:`bptt_jax.parallel.local_mesh`) every batch is split over its devices and the
    parameters are copied to each; the results are those of one device."""
    per = np.zeros(n_items)
    dq_per = np.zeros(n_items)
    frames = np.zeros(n_items, int)
    bad = np.zeros(n_items, bool)
    preds, tgts, cells, pbcs, frees = [], [], [], [], []
    width = max(b.positions.shape[1] for _, b in batches)
    params = parallel.unreplicate(params)  # one local copy (of a replicated multi-host state, too)
    if mesh is not None:
        params = parallel.replicate(params, mesh)
    for idx, batch in batches:
        out = bptt.evaluate(params, batch if mesh is None else parallel.shard_batch(batch, mesh))
        k = len(idx)
        per[idx] = np.asarray(out["per_structure"])[:k]
        dq_per[idx] = (per[idx] if bptt.optim.loss == "dq" else
                       np.asarray(structure_loss("dq", jnp.asarray(np.asarray(out["positions"])), batch))[:k])
        frames[idx] = np.asarray(out["frames"])[:k]
        bad[idx] = np.asarray(out["diverged"])[:k]
        pad = ((0, 0), (0, width - batch.positions.shape[1]), (0, 0))
        preds.append(np.pad(np.asarray(out["positions"])[:k], pad))
        tgts.append(np.pad(np.asarray(batch.target_positions)[:k], pad))
        cells.append(np.asarray(batch.cell)[:k])
        pbcs.append(np.asarray(batch.pbc)[:k])
        frees.append(np.pad(np.asarray(batch.free_mask)[:k], pad[:2]))
    score = adwt(np.concatenate(preds), np.concatenate(tgts), np.concatenate(cells), np.concatenate(pbcs),
                 np.concatenate(frees))
    return EvalResult(float(per.mean()), per, frames, int(bad.sum()), score, dq_per, bad)


def initial_loss(batches, n_items: int, loss: str) -> np.ndarray:
    per = np.zeros(n_items)
    for idx, batch in batches:
        per[idx] = np.asarray(structure_loss(loss, batch.positions, batch))[:len(idx)]
    return per


# ---------------------------------------------------------------------------------------------------
# Pretraining (force matching)


def make_force_step(model, optimizer):
    def loss_fn(params, batch):
        pred = model.apply(params, batch)
        per = force_mse(pred, batch.forces, batch.atom_mask)
        return masked_mean(per, batch.structure_mask)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        # ``value`` feeds optax.contrib.reduce_on_plateau when it is in the chain (ignored otherwise).
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss

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
    Returns the best parameters (by validation force MSE) and the per-epoch history."""
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
        losses = []
        for batch in force_batches(train, cfg.batch_size, buckets, rng):
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
        val_mse, val_l2 = force_errors(errors, params, val_batches)
        lr = (float(lr_of_step((epoch + 1) * n_batches)) if lr_of_step is not None
              else cfg.learning_rate * float(opt_state[2].scale))
        rec = {"epoch": epoch + 1, "train_force_mse": float(np.mean(losses)), "val_force_mse": val_mse,
               "val_force_l2": val_l2, "lr": lr}
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
        bar.set_postfix(val_mse=f"{val_mse:.4f}", lr=f"{rec['lr']:.1e}")
        log.debug("pretrain epoch %d: train %.5f, val %.5f, lr %.2e", epoch + 1, rec["train_force_mse"], val_mse,
                  rec["lr"])
        if val_mse < best * (1 - cfg.min_delta):
            best, best_params, bad_epochs = val_mse, params, 0
        else:
            bad_epochs += 1
        rec["best_epoch"] = epoch + 1 - bad_epochs
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


def force_control(model, params, frames: list[Structure], cfg: PretrainConfig, buckets, seed: int,
                  structure_frames: float, learning_rate: float, progress: bool = True) -> dict[str, Any]:
    """The equal-compute control: continue force training from the pretrained ``params`` for as many model
    evaluations (forward and backward) as BPTT made, ``structure_frames`` (structures × frames over every
    training step). Each epoch evaluates the training part of ``frames`` once, so that is
    ⌈structure_frames / frames per epoch⌉ epochs, at BPTT's ``learning_rate`` decayed by a cosine over them
    (a fine-tune of the same size as BPTT's, on forces); the best epoch by validation force MSE is kept, as
    in pretraining. A count of evaluations, not seconds, so it is the same on any machine.
    """
    n_val = max(1, int(round(cfg.val_fraction * len(frames))))
    per_epoch = max(len(frames) - n_val, 1)
    epochs = max(1, math.ceil(structure_frames / per_epoch))
    ctrl_cfg = dataclasses.replace(cfg, max_epochs=epochs, patience=None, time_budget_s=None, schedule="cosine",
                                   learning_rate=learning_rate,
                                   min_learning_rate=min(cfg.min_learning_rate, learning_rate))
    new_params, ctrl_history = pretrain(model, params, frames, ctrl_cfg, buckets, seed, progress)
    return {"params": new_params, "history": ctrl_history, "epochs": epochs, "frames_per_epoch": per_epoch,
            "learning_rate": learning_rate}


def run_oracle(cfg: "RunConfig", test_items: list[tuple[Structure, np.ndarray]],
               test_ids: Sequence[str] = ()) -> Optional[dict[str, Any]]:
    """The oracle row: the test set relaxed with the generating potential's exact forces under the same rule,
    step grid, tolerance and frame budget as the constant-step baseline (best of the grid). None for user
    files, whose generating potential is unknown.

    It does not depend on the model, so it is cached beside the generated data (``oracle/<key>.json``, keyed
    by the test structures and every setting that affects it) and computed once per data set and settings."""
    import hashlib

    from bptt_jax import oracle

    if cfg.data.path:
        log.info("oracle row skipped: %s is not a generated data set", cfg.data.path)
        return None
    settings = {"step_grid": [float(e) for e in cfg.eval.step_grid], "tol": cfg.relax.tol,
                "max_frames": cfg.data.max_frames, "diverge_distance": cfg.relax.diverge_distance,
                "loss": cfg.data.loss, "basin_dq": cfg.eval.basin_dq, "basins_by": "dq", "test": list(test_ids),
                "positions": hashlib.sha256(b"".join(np.ascontiguousarray(s.positions, np.float64).tobytes()
                                                     for s, _ in test_items)).hexdigest()}
    cache = generated_dir(cfg.data) / "oracle" / (
        hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if cache.exists():
        log.info("oracle row from %s", cache)
        return json.loads(cache.read_text())
    t = time.time()
    factory = oracle.oracle_calculator_for(generated_dir(cfg.data))
    structures, targets = [s for s, _ in test_items], [x for _, x in test_items]
    rows = oracle.oracle_rows(structures, targets, factory, cfg.eval.step_grid,
                              loss=cfg.data.loss, tol=cfg.relax.tol, max_frames=cfg.data.max_frames,
                              diverge_distance=cfg.relax.diverge_distance, workers=cfg.data.workers,
                              progress=cfg.progress)
    best = oracle.best_row(rows)
    # The basin count is by Dq whatever the loss (as the other rows'), so an MSE run gets one too.
    dq = best.per_structure if cfg.data.loss == "dq" else oracle.structure_losses("dq", structures, targets,
                                                                                  best.positions)
    out = {"step_size": best.step_size, **summarize(best.per_structure, dq, best.diverged_mask, cfg.eval.basin_dq),
           "frames": float(np.mean(best.frames)), "converged": int(np.sum(best.converged)),
           "grid": {str(r.step_size): r.avg for r in rows}, "per_structure": best.per_structure.tolist(),
           "seconds": round(time.time() - t, 2)}
    if parallel.is_primary():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(cache)
    return out


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def _ckpt_manager(path: Path, max_to_keep: Optional[int] = None):
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames at INFO
    extra = {}
    if jax.process_count() > 1:
        # Multi-host: each manager acts for its own process alone (no cross-process barriers). Only process 0
        # saves (host-local copies of the replicated state, see save_checkpoint); every process may restore.
        me = jax.process_index()
        extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        extra["create"] = False  # orbax refuses create=True with active_processes; save_checkpoint makes the folder
    return ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, **extra))


def save_checkpoint(path: Path, step: int, tree: Any, meta: dict) -> None:
    """Save ``tree`` (and JSON ``meta``) as step ``step``. In a multi-process run only process 0 writes, a
    host-local copy of replicated arrays (the other processes return at once)."""
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:
        if not parallel.is_primary():
            return
        tree = jax.device_get(parallel.unreplicate(tree))
        path.mkdir(parents=True, exist_ok=True)
    with _ckpt_manager(path) as mngr:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                  force=True)


def restore_checkpoint(path: Path, like: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """Restore the pytree shaped like ``like`` (and its JSON metadata) from the latest (or ``step``)."""
    import orbax.checkpoint as ocp

    with _ckpt_manager(path) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {path}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), jax.tree_util.tree_leaves(out.state))
    return tree, out.meta, step


def latest_step(path: Path) -> Optional[int]:
    if not path.exists():
        return None
    with _ckpt_manager(path) as mngr:
        return mngr.latest_step()


# ---------------------------------------------------------------------------------------------------
# The whole run


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _pct(before: float, after: float) -> float:
    return 100.0 * (before - after) / before if before > 0 else float("nan")


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage and write the run directory; returns the results dictionary."""
    from tqdm.auto import tqdm

    if cfg.finetune.variable_stop and cfg.finetune.stop_frames_range[1] > cfg.data.max_frames:
        raise ValueError(f"finetune.stop_frames_range {list(cfg.finetune.stop_frames_range)} exceeds "
                         f"dataset.max_frames {cfg.data.max_frames}")
    if cfg.relax.noise:
        raise ValueError("relax.noise would also perturb the baselines and the test relaxations; training-only "
                         "exploration noise is finetune.noise")
    parallel.initialize(cfg.distributed)  # multi-host: before any JAX computation (no-op unless enabled)
    # Multi-host: every process runs every stage (only the BPTT steps are shared), process 0 alone writes the
    # run directory (config, checkpoints, results, metrics, plots), so processes sharing one run_dir do not
    # clobber each other's files.
    primary, several = parallel.is_primary(), jax.process_count() > 1
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        (run_dir / "run_config.json").write_text(json.dumps(_jsonable(cfg), indent=1))
    wall: dict[str, float] = {}
    t = time.time()

    # 1. Data -----------------------------------------------------------------------------------------
    skipped = SkipLog()
    if several and not primary:  # let process 0 generate a missing data set; the others then read its cache
        parallel.sync("data generated")
    model_kw = dict(cfg.model.overrides)
    if cfg.model.matmul_dtype != "float32":
        model_kw.setdefault("matmul_dtype", cfg.model.matmul_dtype)
    model = build_model(cfg.model.name, cfg.model.preset, **model_kw)
    max_atoms = getattr(model, "max_atoms", None)  # ResMLP: a fixed input size
    parts = load_split(cfg.data, skipped, cfg.progress, max_atoms)
    if several and primary:
        parallel.sync("data generated")
    train_trajs, test_trajs = parts.train, parts.test
    if cfg.data.max_train is not None:
        train_trajs = train_trajs[:cfg.data.max_train]
    n_val = int(round(cfg.finetune.val_fraction * len(train_trajs))) if cfg.finetune.epochs else 0
    if not train_trajs or not test_trajs or (cfg.finetune.val_fraction and cfg.finetune.epochs and not n_val):
        raise ValueError(f"need training, validation and test trajectories; have {len(train_trajs)} train and "
                         f"{len(test_trajs)} test after skipping {skipped.total}")
    # The last val_fraction of the training trajectories: BPTT's validation split (its starting step size and
    # the epoch it delivers are chosen on it; the test split only gives the reported figures).
    val_trajs = train_trajs[len(train_trajs) - n_val:] if n_val else []
    fit_trajs = train_trajs[:len(train_trajs) - n_val]
    train_items, test_items = relaxation_items(fit_trajs), relaxation_items(test_trajs)
    val_items = relaxation_items(val_trajs)
    buckets = model_buckets(cfg.data.buckets, max_atoms)
    test_batches = relax_batches(test_items, cfg.eval.batch_size, buckets)
    val_batches = relax_batches(val_items, cfg.eval.batch_size, buckets) if val_items else []
    frames = force_items(train_trajs, cfg.pretrain.frame_stride)
    test_frames = force_items(test_trajs, max(1, cfg.pretrain.frame_stride))
    wall["data"] = time.time() - t
    log.info("data: %d train (%d of them BPTT validation) / %d test trajectories, %d training frames, %d skipped; %s",
             len(train_trajs), len(val_trajs), len(test_trajs), len(frames), skipped.total, parts.describe())

    relax_cfg = dataclasses.replace(cfg.relax, max_frames=cfg.data.max_frames)
    key = jax.random.PRNGKey(cfg.seed)
    sample = test_batches[0][1]

    # 2. Pretrain -------------------------------------------------------------------------------------
    t = time.time()
    pre_dir = run_dir / "checkpoints" / "pretrained"
    model_params = model.init(key, sample)
    pretrain_history: list[dict] = []
    if cfg.model.init_from:
        src = Path(cfg.model.init_from)
        src = src / "checkpoints" / "pretrained" if (src / "checkpoints").exists() else src
        model_params, meta, _ = restore_checkpoint(src, model_params)
        pretrain_history = meta.get("history", [])
        log.info("pretrained parameters from %s", src)
    elif cfg.resume and latest_step(pre_dir) is not None:
        model_params, meta, _ = restore_checkpoint(pre_dir, model_params)
        pretrain_history = meta.get("history", [])
    else:
        if not frames:
            raise ValueError("no frames with forces to pretrain on; set model.init_from")
        if getattr(model, "input_norm", False):  # ResMLP: standardize its inputs by the training frames' statistics
            model_params = fit_input_stats(model, model_params,
                                           force_batches(frames, cfg.pretrain.batch_size, buckets))
        model_params, pretrain_history = pretrain(model, model_params, frames, cfg.pretrain, buckets, cfg.seed,
                                                  cfg.progress)
        save_checkpoint(pre_dir, 0, model_params, {"history": pretrain_history})
    wall["pretrain"] = time.time() - t
    if pretrain_history:
        last = pretrain_history[-1]
        log.info("pretrain: %d epochs (stop: %s), best epoch %s, val force MSE %.5f", len(pretrain_history),
                 last.get("stop", "-"), last.get("best_epoch", "-"),
                 min(r["val_force_mse"] for r in pretrain_history))

    # 3. Baselines ------------------------------------------------------------------------------------
    t = time.time()
    loss_kind = cfg.data.loss
    # Relaxations of the test set (baselines, each epoch, the end) split over this process's devices.
    eval_mesh = parallel.local_mesh()
    if eval_mesh is not None:
        log.info("test relaxations split over %d local devices", eval_mesh.size)
    # One compiled evaluator for every constant step: the step size is a traced parameter.
    grid_eval = BPTT(model, dataclasses.replace(relax_cfg, step_mode="learned", rule="descent"),
                     OptimConfig(loss=loss_kind))

    def step_grid(params, batches, n_items, desc):
        out: dict[float, EvalResult] = {}
        for eta in tqdm(cfg.eval.step_grid, desc=desc, disable=not cfg.progress):
            p = grid_eval.with_model_params(params, key, sample, step_size=float(eta))
            out[float(eta)] = evaluate_relaxation(grid_eval, p, batches, n_items, eval_mesh)
        return out

    # The constant-step baseline: the best of the grid on the test set (the paper's Table 7, the one figure
    # chosen on the test split).
    grid = step_grid(model_params, test_batches, len(test_items), "constant-step grid")
    best_eta = min(grid, key=lambda e: grid[e].avg)
    fire_res = None
    if cfg.eval.fire:
        fire_eval = BPTT(model, dataclasses.replace(relax_cfg, rule="fire", step_mode="fixed"),
                         OptimConfig(loss=loss_kind))
        fire_res = evaluate_relaxation(fire_eval, {"model": model_params}, test_batches, len(test_items), eval_mesh)
    initial = initial_loss(test_batches, len(test_items), loss_kind)
    initial_dq = initial if loss_kind == "dq" else initial_loss(test_batches, len(test_items), "dq")
    # BPTT starts from the best constant step on the validation split (not the test split's).
    val_grid = step_grid(model_params, val_batches, len(val_items), "validation grid") if val_items else {}
    val_eta = min(val_grid, key=lambda e: val_grid[e].avg) if val_grid else best_eta
    oracle_res = run_oracle(cfg, test_items, [t.id for t in test_trajs]) if cfg.eval.oracle else None
    wall["baselines"] = time.time() - t
    log.info("baselines: best constant step %.4g (Avg %s %.4f), FIRE %s, oracle %s; validation's best step %.4g",
             best_eta, loss_kind, grid[best_eta].avg, f"{fire_res.avg:.4f}" if fire_res else "-",
             f"{oracle_res['avg']:.4f} (η={oracle_res['step_size']:g})" if oracle_res else "-", val_eta)

    # 4. BPTT fine-tuning ----------------------------------------------------------------------------
    t = time.time()
    ft = cfg.finetune
    eta0 = val_eta if ft.step_size is None else ft.step_size
    steps_per_epoch = len(batch_plan([len(s) for s, _ in train_items], ft.batch_size, buckets,
                                     np.random.default_rng(0)))
    schedule = lr_schedule(ft, steps_per_epoch)
    # FIRE has no step size to learn: its own time step adapts.
    step_mode = "fixed" if ft.rule == "fire" else ft.step_mode
    head = StepHead(init_step=eta0, output="exp", **ft.step_head) if step_mode == "network" else None
    bptt = BPTT(model, dataclasses.replace(relax_cfg, step_mode=step_mode, step_size=eta0, rule=ft.rule,
                                           noise_anneal=ft.noise_frame_anneal),
                OptimConfig(learning_rate=schedule, clip_norm=ft.clip_norm, loss=loss_kind,
                            prox_weight=ft.prox_weight, step_learning_rate=ft.step_learning_rate,
                            freeze_model=ft.freeze_model, noise=noise_schedule(ft, steps_per_epoch),
                            stop_tol_range=ft.stop_tol_range if ft.variable_stop else None,
                            stop_frames_range=ft.stop_frames_range if ft.variable_stop else None),
                step_head=head)
    params0 = bptt.with_model_params(model_params, jax.random.fold_in(key, 1), sample)
    ref_params = params0 if ft.prox_weight else None
    state = bptt.init_state(params0, jax.random.fold_in(key, 2))
    ft_dir = run_dir / "checkpoints" / "bptt"
    start_epoch = 0
    metrics_rows: list[dict] = []

    def val_loss(params) -> Optional[float]:
        return evaluate_relaxation(bptt, params, val_batches, len(val_items), eval_mesh).avg if val_items else None

    val0 = val_loss(params0) if ft.epochs else None
    # The starting model on the test split (epoch 0 of the per-epoch test curve; reported, never selected on).
    test0 = evaluate_relaxation(bptt, params0, test_batches, len(test_items), eval_mesh).avg if ft.epochs else None
    if cfg.resume and latest_step(ft_dir) is not None:
        like = {"state": state}
        restored, meta, start_epoch = restore_checkpoint(ft_dir, like)
        state = restored["state"]
        metrics_rows = meta.get("metrics", [])
        log.info("resumed BPTT from epoch %d", start_epoch)
    # The delivered model: the epoch with the best validation loss (epoch 0: the starting model).
    best_epoch, best_val, best_params = 0, val0, jax.device_get(params0)
    for row in metrics_rows:
        if row.get("val_loss") is not None and best_val is not None and row["val_loss"] < best_val:
            best_epoch, best_val = row["epoch"], row["val_loss"]
    if best_epoch:
        best_params = jax.device_get(restore_checkpoint(ft_dir, {"state": state}, step=best_epoch)[0]["state"].params)
    # Data parallel over all devices when there are several: state replicated, batches split (the
    # one-device path is unchanged). Evaluation and everything after the loop use a local copy.
    train_step, mesh = bptt.fit_step, None
    if jax.device_count() > 1:
        mesh = parallel.data_mesh()
        train_step = parallel.shard_fit_step(bptt, mesh)
        state, ref_params = parallel.replicate((state, ref_params), mesh)
        log.info("BPTT data parallel over %d devices (%d processes)", mesh.size, jax.process_count())
    epoch_eval = bptt  # test Dq each epoch with the model's own (possibly learned) step
    data_rng = np.random.default_rng(cfg.seed + 1)
    for _ in range(start_epoch):  # replay the shuffles of finished epochs, so a resumed run matches
        batch_plan([len(s) for s, _ in train_items], ft.batch_size, buckets, data_rng)
    bar = tqdm(range(start_epoch, ft.epochs), desc="BPTT", unit="epoch", disable=not cfg.progress)
    for epoch in bar:
        te = time.time()
        losses, frames_used, diverged, residuals, structure_frames = [], [], 0, [], 0.0
        train_batches = relax_batches(train_items, ft.batch_size, buckets, data_rng)
        inner = tqdm(train_batches, desc=f"epoch {epoch + 1}", leave=False, disable=not cfg.progress)
        for idx, batch in inner:
            if mesh is not None:
                batch = parallel.shard_batch(batch, mesh, process_local=False)
            state, m = train_step(state, batch, ref_params)
            losses.append(float(m["loss"]))
            frames_used.append(float(m["frames"]))
            structure_frames += float(m["frames"]) * len(idx)
            diverged += int(m["diverged"])
            if "adjoint_residual" in m:
                residuals.append(float(m["adjoint_residual"]))
            inner.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.time() - te
        val = val_loss(state.params)
        test = evaluate_relaxation(epoch_eval, state.params, test_batches, len(test_items), eval_mesh)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val, "test_loss": test.avg,
               "train_frames": float(np.mean(frames_used)), "structure_frames": structure_frames,
               "train_diverged": diverged, "test_diverged": test.diverged, "seconds": round(seconds, 2)}
        if ft.noise:
            noise = bptt.optim.noise
            row["noise"] = float(noise(epoch * steps_per_epoch) if callable(noise) else noise)
        if bptt.step_size(state.params) is not None:
            row["step_size"] = float(bptt.step_size(parallel.unreplicate(state.params)))
        if residuals:
            row["adjoint_residual_max"] = max(residuals)
            row["adjoint_unconverged"] = sum(r > relax_cfg.adjoint_tol for r in residuals)
            if row["adjoint_unconverged"]:
                log.warning("epoch %d: the adjoint solve missed adjoint_tol=%g in %d of %d steps (worst residual "
                            "%.3g); raise relax.adjoint_iters or try relax.adjoint_solver=gmres", epoch + 1,
                            relax_cfg.adjoint_tol, row["adjoint_unconverged"], len(residuals), max(residuals))
        metrics_rows.append(row)
        if val is None or (best_val is not None and val < best_val):
            best_epoch, best_val = epoch + 1, val
            best_params = jax.device_get(parallel.unreplicate(state.params))
        log.info("BPTT epoch %d: train %.4f, validation %s, test %.4f%s (%.0f s)", epoch + 1, row["train_loss"],
                 "-" if val is None else f"{val:.4f}", test.avg,
                 f", η {row['step_size']:.4g}" if "step_size" in row else "", seconds)
        bar.set_postfix(train=f"{row['train_loss']:.3f}", val="-" if val is None else f"{val:.3f}",
                        test=f"{test.avg:.3f}")
        save_checkpoint(ft_dir, epoch + 1, {"state": state},
                        {"epoch": epoch + 1, "metrics": metrics_rows})
    if mesh is not None:
        state = parallel.unreplicate(state)
    wall["bptt"] = time.time() - t
    if ft.epochs:
        log.info("BPTT delivers epoch %d (validation %s)", best_epoch, "-" if best_val is None else f"{best_val:.4f}")
    tuned_params = best_params

    # 5. Evaluation -----------------------------------------------------------------------------------
    t = time.time()
    tuned = evaluate_relaxation(bptt, tuned_params, test_batches, len(test_items), eval_mesh)
    _, errors = make_force_step(model, optax.identity())
    test_force_batches = force_batches(test_frames, cfg.pretrain.batch_size, buckets) if test_frames else []
    force_pre = force_errors(errors, model_params, test_force_batches) if test_force_batches else (None, None)
    force_bptt = force_errors(errors, tuned_params["model"], test_force_batches) if test_force_batches else (None, None)
    wall["evaluate"] = time.time() - t

    # Equal-compute control: force training continued for as many model evaluations as BPTT made.
    control = None
    bptt_structure_frames = sum(r.get("structure_frames", 0.0) for r in metrics_rows)
    if cfg.eval.force_control and frames and metrics_rows and not cfg.model.init_from:
        t = time.time()
        control = force_control(model, model_params, frames, cfg.pretrain, buckets, cfg.seed, bptt_structure_frames,
                                ft.learning_rate, cfg.progress)
        ctrl_grid = step_grid(control["params"], test_batches, len(test_items), "control grid")
        ctrl_eta = min(ctrl_grid, key=lambda e: ctrl_grid[e].avg)
        control["constant_step_best"] = ctrl_eta
        control["result"] = ctrl_grid[ctrl_eta]
        control["force_l2"] = (force_errors(errors, control["params"], test_force_batches)[1]
                               if test_force_batches else None)
        wall["force_control"] = time.time() - t
        log.info("equal-compute control: %d more force epochs, best constant step %.4g (Avg %s %.4f)",
                 control["epochs"], ctrl_eta, loss_kind, ctrl_grid[ctrl_eta].avg)

    step_final = bptt.step_size(tuned_params)
    thr = cfg.eval.basin_dq
    methods = {"constant_step": grid[best_eta], "fire": fire_res, "bptt": tuned,
               "force_control": control["result"] if control else None}
    summary = {k: v.summary(thr) for k, v in methods.items() if v is not None}
    if oracle_res is not None:
        summary["oracle"] = {k: oracle_res[k] for k in ("avg", "avg_without_diverged", "diverged", "basins")}
    results = {
        "dataset": cfg.data.path or cfg.data.name,
        "model": cfg.model.name,
        "loss": loss_kind,
        "seed": cfg.seed,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "n_test": len(test_items),
        "split": {"test_records": parts.test_records, "test_used": len(test_trajs),
                  "train_records": parts.train_records, "train_used": len(train_trajs),
                  "bptt_train": len(train_items), "bptt_validation": len(val_items)},
        "avg_dq": {"initial": float(initial.mean()), "constant_step": grid[best_eta].avg,
                   "fire": fire_res.avg if fire_res else None, "bptt": tuned.avg,
                   "oracle": oracle_res["avg"] if oracle_res else None,
                   "force_control": control["result"].avg if control else None},
        "avg_dq_without_diverged": {k: v["avg_without_diverged"] for k, v in summary.items()},
        "basins": {"threshold_dq": thr, "initial": int((initial_dq < thr).sum()),
                   **{k: v["basins"] for k, v in summary.items()}},
        "constant_step_best": best_eta,
        "constant_step_grid": {str(k): v.avg for k, v in grid.items()},
        "validation_step_grid": {str(k): v.avg for k, v in val_grid.items()},
        "reduction_pct": _pct(grid[best_eta].avg, tuned.avg),
        "reduction_vs_fire_pct": _pct(fire_res.avg, tuned.avg) if fire_res else None,
        "reduction_vs_force_control_pct": _pct(control["result"].avg, tuned.avg) if control else None,
        "force_l2": {"pretrained": force_pre[1], "bptt": force_bptt[1],
                     "force_control": control["force_l2"] if control else None},
        "force_mse": {"pretrained": force_pre[0], "bptt": force_bptt[0]},
        "adwt": {"constant_step": grid[best_eta].adwt, "fire": fire_res.adwt if fire_res else None,
                 "bptt": tuned.adwt},
        "frames": {"constant_step": float(grid[best_eta].frames.mean()),
                   "fire": float(fire_res.frames.mean()) if fire_res else None, "bptt": float(tuned.frames.mean()),
                   "oracle": oracle_res["frames"] if oracle_res else None},
        "diverged": {k: v["diverged"] for k, v in summary.items()},
        "skipped": {"total": skipped.total, "by_reason": dict(skipped.counts), "examples": skipped.messages[:5]},
        "step_size_initial": eta0,
        "step_size_final": float(step_final) if step_final is not None else None,
        "bptt_selection": {"kept_epoch": best_epoch if ft.epochs else None, "criterion": "validation loss",
                           "val_loss": [val0] + [r.get("val_loss") for r in metrics_rows],
                           "test_loss": [r["test_loss"] for r in metrics_rows],
                           "test_loss_start": test0,
                           "train_loss": [r["train_loss"] for r in metrics_rows]},
        "oracle": ({k: v for k, v in oracle_res.items() if k != "per_structure"} if oracle_res else None),
        "force_control": ({"epochs": control["epochs"], "constant_step_best": control["constant_step_best"],
                           "bptt_structure_frames": bptt_structure_frames,
                           "force_frames_per_epoch": control["frames_per_epoch"],
                           "seconds": round(wall["force_control"], 2)} if control else None),
        "grad_mode": relax_cfg.grad_mode,
        "finetune_rule": ft.rule,
        "finetune": _jsonable(ft),
        "seconds_per_bptt_step": (float(np.mean([r["seconds"] for r in metrics_rows])) / max(steps_per_epoch, 1)
                                  if metrics_rows else None),
        "pretrain_epochs": len(pretrain_history),
        "pretrain_stop": pretrain_history[-1].get("stop") if pretrain_history else None,
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "per_structure": {"initial": initial.tolist(), "constant_step": grid[best_eta].per_structure.tolist(),
                          "fire": fire_res.per_structure.tolist() if fire_res else None,
                          "bptt": tuned.per_structure.tolist(),
                          "oracle": oracle_res["per_structure"] if oracle_res else None},
    }
    if primary:
        (run_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
        _write_metrics(run_dir / "metrics.csv", pretrain_history, metrics_rows)
        if cfg.plots:
            _plots(run_dir, metrics_rows, results, grid[best_eta].avg)
    if several:  # nobody leaves (and tears down the distributed runtime) before process 0 has written
        parallel.sync("run written")
    return results


def _write_metrics(path: Path, pretrain_rows: list[dict], bptt_rows: list[dict]) -> None:
    rows = [{"stage": "pretrain", **r} for r in pretrain_rows] + [{"stage": "bptt", **r} for r in bptt_rows]
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _plots(run_dir: Path, rows: list[dict], results: dict, constant: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = "Avg Dq" if results["loss"] == "dq" else "Avg MSE"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax.plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    ax.axhline(constant, color="gray", ls="--", label="best constant step")
    if results["avg_dq"]["fire"] is not None:
        ax.axhline(results["avg_dq"]["fire"], color="tab:red", ls=":", label="FIRE")
    ax.set_xlabel("BPTT epoch")
    ax.set_ylabel(label)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss_per_epoch.png", dpi=120)
    plt.close(fig)

    before = np.asarray(results["per_structure"]["constant_step"])
    after = np.asarray(results["per_structure"]["bptt"])
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(before, after, s=12)
    lim = float(max(before.max(), after.max())) * 1.05
    ax.plot([0, lim], [0, lim], "k--", lw=0.8)
    ax.set_xlabel(f"{label.split()[-1]} constant step (pretrained)")
    ax.set_ylabel(f"{label.split()[-1]} BPTT-tuned")
    ax.set_title("per test structure")
    fig.tight_layout()
    fig.savefig(run_dir / "per_structure.png", dpi=120)
    plt.close(fig)


def markdown_table(results: dict) -> str:
    """The final comparison as a markdown table."""
    a = results["avg_dq"]
    metric = "Avg Dq" if results["loss"] == "dq" else "Avg MSE"
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    basins = results.get("basins") or {}
    clean = results.get("avg_dq_without_diverged") or {}
    thr = basins.get("threshold_dq")
    lines = [f"| method | {metric} | without diverged | diverged | in basin (Dq < {fmt(thr)}) | ADwT | frames |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| unrelaxed start | {fmt(a['initial'])} | | | {basins.get('initial', '-')} | | |"]
    ctrl = results.get("force_control") or {}
    oracle = results.get("oracle") or {}
    names = [(f"constant step (η={results['constant_step_best']:g})", "constant_step"), ("FIRE", "fire"),
             (f"oracle forces, constant step (η={oracle.get('step_size', 0):g})", "oracle"),
             (f"equal-compute force training (+{ctrl.get('epochs', 0)} epochs)", "force_control"),
             (f"BPTT-tuned (epoch {(results.get('bptt_selection') or {}).get('kept_epoch')})", "bptt")]
    for name, key in names:
        if a.get(key) is None:
            continue
        lines.append(f"| {name} | {fmt(a[key])} | {fmt(clean.get(key))} | {results['diverged'].get(key, '-')} "
                     f"| {basins.get(key, '-')} | {fmt(results['adwt'].get(key))} | {fmt(results['frames'].get(key))} |")
    lines.append("")
    extra = [f"vs FIRE: {results['reduction_vs_fire_pct']:.1f}%" if results.get("reduction_vs_fire_pct")
             is not None else None,
             f"vs equal-compute force training: {results['reduction_vs_force_control_pct']:.1f}%"
             if results.get("reduction_vs_force_control_pct") is not None else None]
    lines.append(f"reduction vs best constant step: {results['reduction_pct']:.1f}%"
                 + "".join(f"; {e}" for e in extra if e))
    f = results["force_l2"]
    if f["pretrained"] is not None:
        lines.append(f"force L2 error (test frames): pretrained {f['pretrained']:.4g}, BPTT-tuned {f['bptt']:.4g}"
                     + (f", equal-compute force training {f['force_control']:.4g}" if f.get("force_control")
                        is not None else ""))
    sel = results.get("bptt_selection") or {}
    if sel.get("val_loss"):
        lines.append("validation " + metric + " per epoch (0 = pretrained): "
                     + ", ".join(fmt(v) for v in sel["val_loss"]) + f"; kept epoch {sel.get('kept_epoch')}")
    return "\n".join(lines)
