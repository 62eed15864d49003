"""Evaluation: relaxing the test split and scoring it (:func:`evaluate_relaxation`: Avg Dq or MSE, ADwT,
diverged, basins), the baselines the paper compares against (the best constant step of a grid, FIRE, the
generating potential's own forces: :func:`run_oracle`), the equal-compute force-training control
(:func:`force_control`) and the fine-tuned model's final scores.

Three of the pipeline's stages live here: :func:`baselines`, :func:`evaluate_tuned` and
:func:`equal_compute_control`; an :class:`Evaluator` relaxes the run's splits for all of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from bptt_jax import parallel
from bptt_jax.bptt import BPTT, OptimConfig
from bptt_jax.losses import structure_loss
from bptt_jax.pipeline.config import PretrainConfig, RunConfig
from bptt_jax.pipeline.data import Data, force_batches, generated_dir
from bptt_jax.pipeline.pretraining import force_errors, make_force_step, pretrain
from bptt_jax.structures import Batch, Structure, displacement

log = logging.getLogger("bptt_jax")


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
    positions: Optional[np.ndarray] = None  # (S, N, 3) final positions, Å, padded to the widest structure

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
    final = np.zeros((n_items, width, 3))
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
        final[idx] = preds[-1]
        tgts.append(np.pad(np.asarray(batch.target_positions)[:k], pad))
        cells.append(np.asarray(batch.cell)[:k])
        pbcs.append(np.asarray(batch.pbc)[:k])
        frees.append(np.pad(np.asarray(batch.free_mask)[:k], pad[:2]))
    score = adwt(np.concatenate(preds), np.concatenate(tgts), np.concatenate(cells), np.concatenate(pbcs),
                 np.concatenate(frees))
    return EvalResult(float(per.mean()), per, frames, int(bad.sum()), score, dq_per, bad, final)


def initial_loss(batches, n_items: int, loss: str) -> np.ndarray:
    per = np.zeros(n_items)
    for idx, batch in batches:
        per[idx] = np.asarray(structure_loss(loss, batch.positions, batch))[:len(idx)]
    return per


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
                "max_frames": cfg.relax.max_frames, "diverge_distance": cfg.relax.diverge_distance,
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
                              loss=cfg.data.loss, tol=cfg.relax.tol, max_frames=cfg.relax.max_frames,
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
# The stages


@dataclasses.dataclass
class Evaluator:
    """Relaxes the run's test and validation splits (split over this process's devices, ``mesh``) and measures
    the model's force errors on the test split's frames.

    ``grid_bptt`` relaxes with a constant step: one compiled evaluator for every step of the grid, the step size
    being a traced parameter."""

    data: Data
    grid_bptt: BPTT
    step_grid: tuple[float, ...]
    key: jax.Array  # initialises the grid's step-size parameters
    mesh: Any = None
    progress: bool = True
    errors_fn: Any = None  # jitted: (params, Batch) -> per-structure (force MSE, force L2)
    test_force_batches: list[Batch] = dataclasses.field(default_factory=list)  # the test split's frames

    @classmethod
    def create(cls, cfg: RunConfig, model, data: Data, key: jax.Array) -> "Evaluator":
        """The evaluator of a run: ``cfg``'s relaxation, step grid and loss, on ``data``'s splits."""
        mesh = parallel.local_mesh()
        if mesh is not None:
            log.info("test relaxations split over %d local devices", mesh.size)
        grid_bptt = BPTT(model, dataclasses.replace(cfg.relax, rule="descent", step_mode="learned", step_head=()),
                         OptimConfig(loss=cfg.data.loss))
        _, errors_fn = make_force_step(model, optax.identity())
        test_force_batches = (force_batches(data.test_frames, cfg.pretrain.batch_size, data.buckets)
                              if data.test_frames else [])
        return cls(data, grid_bptt, tuple(cfg.eval.step_grid), key, mesh, cfg.progress, errors_fn, test_force_batches)

    def test(self, bptt: BPTT, params) -> EvalResult:
        """``bptt``'s relaxations of the test split with ``params``."""
        return evaluate_relaxation(bptt, params, self.data.test_batches, len(self.data.test_items), self.mesh)

    def val(self, bptt: BPTT, params) -> Optional[EvalResult]:
        """The same on the validation split (None when there is none)."""
        if not self.data.val_items:
            return None
        return evaluate_relaxation(bptt, params, self.data.val_batches, len(self.data.val_items), self.mesh)

    def grid(self, model_params, split: str, desc: str) -> dict[float, EvalResult]:
        """The ``split`` (``test`` or ``val``) relaxed at each constant step of the grid: {η: result}."""
        out: dict[float, EvalResult] = {}
        for eta in tqdm(self.step_grid, desc=desc, disable=not self.progress):
            p = self.grid_bptt.with_model_params(model_params, self.key, self.data.sample, step_size=float(eta))
            out[float(eta)] = self.test(self.grid_bptt, p) if split == "test" else self.val(self.grid_bptt, p)
        return out

    def force_errors(self, model_params) -> tuple[Optional[float], Optional[float]]:
        """(force MSE, force L2) of the model on the test split's frames; (None, None) without any."""
        if not self.test_force_batches:
            return None, None
        return force_errors(self.errors_fn, model_params, self.test_force_batches)


@dataclasses.dataclass
class Baselines:
    """The pretrained model on the test split before fine-tuning, and where BPTT starts.

    ``grid`` holds the constant-step grid's results on the test split; its best, ``best_step``, is the reported
    baseline (the paper's Table 7, the one figure chosen on the test split). BPTT starts from ``val_step``, the
    best of the grid on the validation split (``best_step`` when there is none)."""

    grid: dict[float, EvalResult]
    best_step: float
    fire: Optional[EvalResult]
    initial: np.ndarray  # (S,) the loss of the unrelaxed test structures (Dq in √amu·Å, or MSE in Å²)
    initial_dq: np.ndarray  # (S,) their Dq (√amu·Å, for the basin count)
    val_grid: dict[float, EvalResult]
    val_step: float
    oracle: Optional[dict[str, Any]]
    seconds: float

    @property
    def constant_step(self) -> EvalResult:
        return self.grid[self.best_step]


def baselines(cfg: RunConfig, model, ev: Evaluator, model_params) -> Baselines:
    """The constant-step grid, FIRE and the oracle on the test split, and the grid on the validation split."""
    t = time.time()
    data, loss_kind = ev.data, cfg.data.loss
    grid = ev.grid(model_params, "test", "constant-step grid")
    best_eta = min(grid, key=lambda e: grid[e].avg)
    fire_res = None
    if cfg.eval.fire:
        fire_eval = BPTT(model, dataclasses.replace(cfg.relax, rule="fire", step_mode="fixed", step_head=()),
                         OptimConfig(loss=loss_kind))
        fire_res = ev.test(fire_eval, {"model": model_params})
    initial = initial_loss(data.test_batches, len(data.test_items), loss_kind)
    initial_dq = initial if loss_kind == "dq" else initial_loss(data.test_batches, len(data.test_items), "dq")
    val_grid = ev.grid(model_params, "val", "validation grid") if data.val_items else {}
    val_eta = min(val_grid, key=lambda e: val_grid[e].avg) if val_grid else best_eta
    oracle_res = run_oracle(cfg, data.test_items, [t.id for t in data.test]) if cfg.eval.oracle else None
    out = Baselines(grid, best_eta, fire_res, initial, initial_dq, val_grid, val_eta, oracle_res, time.time() - t)
    log.info("baselines: best constant step %.4g (Avg %s %.4f), FIRE %s, oracle %s; validation's best step %.4g",
             best_eta, loss_kind, grid[best_eta].avg, f"{fire_res.avg:.4f}" if fire_res else "-",
             f"{oracle_res['avg']:.4f} (η={oracle_res['step_size']:g})" if oracle_res else "-", val_eta)
    return out


@dataclasses.dataclass
class Evaluation:
    """The fine-tuned model on the test split, and the force errors (MSE, L2) before and after fine-tuning."""

    tuned: EvalResult
    force_pretrained: tuple[Optional[float], Optional[float]]
    force_tuned: tuple[Optional[float], Optional[float]]
    seconds: float


def evaluate_tuned(ev: Evaluator, bptt: BPTT, tuned_params, model_params) -> Evaluation:
    """The delivered model's relaxations of the test split (with its own step size) and force errors."""
    t = time.time()
    tuned = ev.test(bptt, tuned_params)
    force_pre = ev.force_errors(model_params)
    force_bptt = ev.force_errors(tuned_params["model"])
    return Evaluation(tuned, force_pre, force_bptt, time.time() - t)


@dataclasses.dataclass
class Control:
    """The equal-compute control (:func:`force_control`): its force epochs, best constant step and scores."""

    epochs: int
    frames_per_epoch: int
    bptt_structure_frames: float  # the model evaluations BPTT made (structures × frames), matched here
    step_size: float  # its best constant step on the test split
    result: EvalResult
    force_l2: Optional[float]
    seconds: float


def equal_compute_control(cfg: RunConfig, model, ev: Evaluator, model_params,
                          bptt_rows: list[dict]) -> Optional[Control]:
    """Force training continued for as many model evaluations as BPTT made (``bptt_rows``: its epochs), then
    the constant-step grid on the test split; None when off, without BPTT epochs or with an ``init_from`` model
    (whose training frames are unknown)."""
    frames = ev.data.frames
    structure_frames = sum(r.get("structure_frames", 0.0) for r in bptt_rows)
    if not (cfg.eval.force_control and frames and bptt_rows and not cfg.model.init_from):
        return None
    t = time.time()
    out = force_control(model, model_params, frames, cfg.pretrain, ev.data.buckets, cfg.seed, structure_frames,
                        cfg.finetune.learning_rate, cfg.progress)
    grid = ev.grid(out["params"], "test", "control grid")
    eta = min(grid, key=lambda e: grid[e].avg)
    control = Control(out["epochs"], out["frames_per_epoch"], structure_frames, eta, grid[eta],
                      ev.force_errors(out["params"])[1], time.time() - t)
    log.info("equal-compute control: %d more force epochs, best constant step %.4g (Avg %s %.4f)",
             control.epochs, eta, cfg.data.loss, grid[eta].avg)
    return control
