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
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bptt_jax import parallel
from bptt_jax.bptt import BPTT, OptimConfig
from bptt_jax.data.trajectory import SkipLog, Trajectory, filter_usable, split
from bptt_jax.losses import force_l2, force_mse, masked_mean
from bptt_jax.models import build_model
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import DEFAULT_BUCKETS, Batch, Structure, bucket_size, displacement

log = logging.getLogger("bptt_jax")

# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class DataConfig:
    """Where trajectories come from and how they are split and batched.

    ``path`` set: read any supported format (file or directory). Otherwise the offline generator ``name``
    with ``preset``/``n``/``seed`` writes (or reuses) ``cache_dir/<name>-<preset>-n<n>-s<seed>``.
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
    """Force matching on the flattened frames until the validation force error stops improving."""

    max_epochs: int = 60
    patience: int = 6
    batch_size: int = 32
    learning_rate: float = 2e-3
    min_learning_rate: float = 1e-5
    clip_norm: float = 10.0
    val_fraction: float = 0.1
    frame_stride: int = 3  # every k-th frame of each trajectory (neighbouring frames are nearly identical)
    time_budget_s: float = 150.0


@dataclasses.dataclass
class FinetuneConfig:
    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 5e-4
    clip_norm: float = 1.0
    prox_weight: float = 0.0
    step_mode: str = "learned"  # fixed | learned | network
    rule: str = "descent"  # descent | fire: the relaxation trained through
    step_size: Optional[float] = None  # None: start from the best constant step of the grid
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (decays to final_lr_fraction · learning_rate at the last step)
    final_lr_fraction: float = 0.05

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"finetune.schedule must be constant or cosine, not {self.schedule!r}")
        if self.rule not in ("descent", "fire"):
            raise ValueError(f"finetune.rule must be descent or fire, not {self.rule!r}")


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
    step_grid: tuple[float, ...] = (0.002, 0.003, 0.005, 0.007, 0.01, 0.02, 0.03, 0.05, 0.077, 0.1)
    fire: bool = True
    batch_size: int = 16


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


def load_trajectories(cfg: DataConfig, skipped: SkipLog, progress: bool = True) -> list[Trajectory]:
    """Read (or generate, then read) the configured trajectories, keeping the usable ones in order."""
    from bptt_jax.data.readers import read_trajectories

    if cfg.path:
        source = Path(cfg.path)
        trajs = read_trajectories(source, strict=cfg.strict, skipped=skipped, fmt=cfg.format)
    else:
        from bptt_jax.data.generate import generate, make_params

        n = cfg.n if cfg.n is not None else make_params(cfg.name, cfg.preset, **cfg.generator).n
        out = Path(cfg.cache_dir) / f"{cfg.name}-{cfg.preset}-n{n}-s{cfg.seed}"
        manifest = generate(cfg.name, out, preset=cfg.preset, seed=cfg.seed, workers=cfg.workers,
                            progress=progress, n=n, **cfg.generator)

        def from_manifest():
            for rec in manifest["trajectories"]:
                yield from read_trajectories(out / rec["file"], strict=cfg.strict, skipped=skipped)

        trajs = from_manifest()
    return list(filter_usable(trajs, skipped))


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


def evaluate_relaxation(bptt: BPTT, params, batches: list[tuple[list[int], Batch]], n_items: int,
                        mesh=None) -> EvalResult:
    """Relax the test batches (early-exit rollout) and collect per-structure losses and ADwT.

    ``params`` may be replicated over a multi-host mesh (the local copy is used). With ``mesh`` (a mesh of this
    process's devices, :func:`bptt_jax.parallel.local_mesh`) every batch is split over its devices and the
    parameters are copied to each; the results are those of one device."""
    per = np.zeros(n_items)
    frames = np.zeros(n_items, int)
    diverged = 0
    preds, tgts, cells, pbcs, frees = [], [], [], [], []
    width = max(b.positions.shape[1] for _, b in batches)
    params = parallel.unreplicate(params)  # one local copy (of a replicated multi-host state, too)
    if mesh is not None:
        params = parallel.replicate(params, mesh)
    for idx, batch in batches:
        out = bptt.evaluate(params, batch if mesh is None else parallel.shard_batch(batch, mesh))
        k = len(idx)
        per[idx] = np.asarray(out["per_structure"])[:k]
        frames[idx] = np.asarray(out["frames"])[:k]
        diverged += int(np.asarray(out["diverged"])[:k].sum())
        pad = ((0, 0), (0, width - batch.positions.shape[1]), (0, 0))
        preds.append(np.pad(np.asarray(out["positions"])[:k], pad))
        tgts.append(np.pad(np.asarray(batch.target_positions)[:k], pad))
        cells.append(np.asarray(batch.cell)[:k])
        pbcs.append(np.asarray(batch.pbc)[:k])
        frees.append(np.pad(np.asarray(batch.free_mask)[:k], pad[:2]))
    score = adwt(np.concatenate(preds), np.concatenate(tgts), np.concatenate(cells), np.concatenate(pbcs),
                 np.concatenate(frees))
    return EvalResult(float(per.mean()), per, frames, diverged, score)


def initial_loss(batches, n_items: int, loss: str) -> np.ndarray:
    from bptt_jax.losses import structure_loss

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
    # Halve the learning rate when the epoch-mean training loss plateaus (accumulated over one epoch).
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate),
                            optax.contrib.reduce_on_plateau(factor=0.5, patience=2, accumulation_size=n_batches,
                                                            min_scale=cfg.min_learning_rate / cfg.learning_rate))
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
        lr_scale = float(opt_state[2].scale)
        rec = {"epoch": epoch + 1, "train_force_mse": float(np.mean(losses)), "val_force_mse": val_mse,
               "val_force_l2": val_l2, "lr": cfg.learning_rate * lr_scale}
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
        bar.set_postfix(val_mse=f"{val_mse:.4f}", lr=f"{rec['lr']:.1e}")
        if val_mse < best * (1 - 1e-3):
            best, best_params, bad_epochs = val_mse, params, 0
        else:
            bad_epochs += 1
        if bad_epochs >= cfg.patience or time.time() - t0 > cfg.time_budget_s:
            break
    bar.close()
    return best_params, history


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
    trajs = load_trajectories(cfg.data, skipped, cfg.progress)
    if several and primary:
        parallel.sync("data generated")
    train_trajs, test_trajs = split(trajs, cfg.data.n_test)
    if cfg.data.max_train is not None:
        train_trajs = train_trajs[:cfg.data.max_train]
    if not train_trajs or not test_trajs:
        raise ValueError(f"need training and test trajectories; have {len(train_trajs)} train and "
                         f"{len(test_trajs)} test after skipping {skipped.total}")
    train_items, test_items = relaxation_items(train_trajs), relaxation_items(test_trajs)
    buckets = cfg.data.buckets
    test_batches = relax_batches(test_items, cfg.eval.batch_size, buckets)
    frames = force_items(train_trajs, cfg.pretrain.frame_stride)
    test_frames = force_items(test_trajs, max(1, cfg.pretrain.frame_stride))
    wall["data"] = time.time() - t
    log.info("data: %d train / %d test trajectories, %d training frames, %d skipped",
             len(train_trajs), len(test_trajs), len(frames), skipped.total)

    relax_cfg = dataclasses.replace(cfg.relax, max_frames=cfg.data.max_frames)
    model_kw = dict(cfg.model.overrides)
    if cfg.model.matmul_dtype != "float32":
        model_kw.setdefault("matmul_dtype", cfg.model.matmul_dtype)
    model = build_model(cfg.model.name, cfg.model.preset, **model_kw)
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
        model_params, pretrain_history = pretrain(model, model_params, frames, cfg.pretrain, buckets, cfg.seed,
                                                  cfg.progress)
        save_checkpoint(pre_dir, 0, model_params, {"history": pretrain_history})
    wall["pretrain"] = time.time() - t

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
    grid: dict[float, EvalResult] = {}
    for eta in tqdm(cfg.eval.step_grid, desc="constant-step grid", disable=not cfg.progress):
        p = {"model": model_params, "step_size": jnp.asarray(eta, sample.positions.dtype)}
        grid[float(eta)] = evaluate_relaxation(grid_eval, p, test_batches, len(test_items), eval_mesh)
    best_eta = min(grid, key=lambda e: grid[e].avg)
    fire_res = None
    if cfg.eval.fire:
        fire_eval = BPTT(model, dataclasses.replace(relax_cfg, rule="fire", step_mode="fixed"),
                         OptimConfig(loss=loss_kind))
        fire_res = evaluate_relaxation(fire_eval, {"model": model_params}, test_batches, len(test_items), eval_mesh)
    initial = initial_loss(test_batches, len(test_items), loss_kind)
    wall["baselines"] = time.time() - t
    log.info("baselines: best constant step %.4g (Avg %s %.4f), FIRE %s", best_eta, loss_kind, grid[best_eta].avg,
             f"{fire_res.avg:.4f}" if fire_res else "-")

    # 4. BPTT fine-tuning ----------------------------------------------------------------------------
    t = time.time()
    ft = cfg.finetune
    eta0 = best_eta if ft.step_size is None else ft.step_size
    steps_per_epoch = len(batch_plan([len(s) for s, _ in train_items], ft.batch_size, buckets,
                                     np.random.default_rng(0)))
    schedule = lr_schedule(ft, steps_per_epoch)
    # FIRE has no step size to learn: its own time step adapts.
    step_mode = "fixed" if ft.rule == "fire" else ft.step_mode
    bptt = BPTT(model, dataclasses.replace(relax_cfg, step_mode=step_mode, step_size=eta0, rule=ft.rule),
                OptimConfig(learning_rate=schedule, clip_norm=ft.clip_norm, loss=loss_kind,
                            prox_weight=ft.prox_weight))
    params0 = bptt.with_model_params(model_params, jax.random.fold_in(key, 1), sample)
    ref_params = params0 if ft.prox_weight else None
    state = bptt.init_state(params0, jax.random.fold_in(key, 2))
    ft_dir = run_dir / "checkpoints" / "bptt"
    start_epoch = 0
    metrics_rows: list[dict] = []
    if cfg.resume and latest_step(ft_dir) is not None:
        like = {"state": state}
        restored, meta, start_epoch = restore_checkpoint(ft_dir, like)
        state = restored["state"]
        metrics_rows = meta.get("metrics", [])
        log.info("resumed BPTT from epoch %d", start_epoch)
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
        losses, frames_used, diverged, residuals = [], [], 0, []
        train_batches = relax_batches(train_items, ft.batch_size, buckets, data_rng)
        inner = tqdm(train_batches, desc=f"epoch {epoch + 1}", leave=False, disable=not cfg.progress)
        for _, batch in inner:
            if mesh is not None:
                batch = parallel.shard_batch(batch, mesh, process_local=False)
            state, m = train_step(state, batch, ref_params)
            losses.append(float(m["loss"]))
            frames_used.append(float(m["frames"]))
            diverged += int(m["diverged"])
            if "adjoint_residual" in m:
                residuals.append(float(m["adjoint_residual"]))
            inner.set_postfix(loss=f"{losses[-1]:.3f}")
        test = evaluate_relaxation(epoch_eval, state.params, test_batches, len(test_items), eval_mesh)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "test_loss": test.avg,
               "train_frames": float(np.mean(frames_used)), "train_diverged": diverged,
               "test_diverged": test.diverged, "seconds": round(time.time() - te, 2)}
        if bptt.step_size(state.params) is not None:
            row["step_size"] = float(bptt.step_size(state.params))
        if residuals:
            row["adjoint_residual_max"] = max(residuals)
            row["adjoint_unconverged"] = sum(r > relax_cfg.adjoint_tol for r in residuals)
            if row["adjoint_unconverged"]:
                log.warning("epoch %d: the adjoint solve missed adjoint_tol=%g in %d of %d steps (worst residual "
                            "%.3g); raise relax.adjoint_iters or try relax.adjoint_solver=gmres", epoch + 1,
                            relax_cfg.adjoint_tol, row["adjoint_unconverged"], len(residuals), max(residuals))
        metrics_rows.append(row)
        bar.set_postfix(train=f"{row['train_loss']:.3f}", test=f"{test.avg:.3f}")
        save_checkpoint(ft_dir, epoch + 1, {"state": state},
                        {"epoch": epoch + 1, "metrics": metrics_rows})
    if mesh is not None:
        state = parallel.unreplicate(state)
    wall["bptt"] = time.time() - t

    # 5. Evaluation -----------------------------------------------------------------------------------
    t = time.time()
    tuned = evaluate_relaxation(bptt, state.params, test_batches, len(test_items), eval_mesh)
    _, errors = make_force_step(model, optax.identity())
    test_force_batches = force_batches(test_frames, cfg.pretrain.batch_size, buckets) if test_frames else []
    force_pre = force_errors(errors, model_params, test_force_batches) if test_force_batches else (None, None)
    force_bptt = force_errors(errors, state.params["model"], test_force_batches) if test_force_batches else (None, None)
    wall["evaluate"] = time.time() - t
    step_final = bptt.step_size(state.params)
    results = {
        "dataset": cfg.data.path or cfg.data.name,
        "model": cfg.model.name,
        "loss": loss_kind,
        "n_train": len(train_items),
        "n_test": len(test_items),
        "avg_dq": {"initial": float(initial.mean()), "constant_step": grid[best_eta].avg,
                   "fire": fire_res.avg if fire_res else None, "bptt": tuned.avg},
        "constant_step_best": best_eta,
        "constant_step_grid": {str(k): v.avg for k, v in grid.items()},
        "reduction_pct": _pct(grid[best_eta].avg, tuned.avg),
        "reduction_vs_fire_pct": _pct(fire_res.avg, tuned.avg) if fire_res else None,
        "force_l2": {"pretrained": force_pre[1], "bptt": force_bptt[1]},
        "force_mse": {"pretrained": force_pre[0], "bptt": force_bptt[0]},
        "adwt": {"constant_step": grid[best_eta].adwt, "fire": fire_res.adwt if fire_res else None,
                 "bptt": tuned.adwt},
        "frames": {"constant_step": float(grid[best_eta].frames.mean()),
                   "fire": float(fire_res.frames.mean()) if fire_res else None, "bptt": float(tuned.frames.mean())},
        "diverged": {"constant_step": grid[best_eta].diverged, "fire": fire_res.diverged if fire_res else None,
                     "bptt": tuned.diverged},
        "skipped": {"total": skipped.total, "by_reason": dict(skipped.counts), "examples": skipped.messages[:5]},
        "step_size_initial": eta0,
        "step_size_final": float(step_final) if step_final is not None else None,
        "grad_mode": relax_cfg.grad_mode,
        "finetune_rule": ft.rule,
        "seconds_per_bptt_step": (float(np.mean([r["seconds"] for r in metrics_rows])) / max(steps_per_epoch, 1)
                                  if metrics_rows else None),
        "pretrain_epochs": len(pretrain_history),
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "per_structure": {"initial": initial.tolist(), "constant_step": grid[best_eta].per_structure.tolist(),
                          "fire": fire_res.per_structure.tolist() if fire_res else None,
                          "bptt": tuned.per_structure.tolist()},
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
    lines = [f"| method | {metric} | ADwT | frames | diverged |", "| --- | --- | --- | --- | --- |",
             f"| unrelaxed start | {fmt(a['initial'])} | | | |"]
    for name, key in [(f"constant step (η={results['constant_step_best']:g})", "constant_step"),
                      ("FIRE", "fire"), ("BPTT-tuned", "bptt")]:
        if a[key] is None:
            continue
        lines.append(f"| {name} | {fmt(a[key])} | {fmt(results['adwt'][key])} | {fmt(results['frames'][key])} "
                     f"| {results['diverged'][key]} |")
    lines.append("")
    lines.append(f"reduction vs best constant step: {results['reduction_pct']:.1f}%"
                 + (f"; vs FIRE: {results['reduction_vs_fire_pct']:.1f}%" if results['reduction_vs_fire_pct']
                    is not None else ""))
    f = results["force_l2"]
    if f["pretrained"] is not None:
        lines.append(f"force L2 error (test frames): pretrained {f['pretrained']:.4g}, BPTT-tuned {f['bptt']:.4g}")
    return "\n".join(lines)
