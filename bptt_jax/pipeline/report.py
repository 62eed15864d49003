"""Reporting: the run directory's ``run_config.json``, ``results.json``, ``metrics.csv`` and plots, and the
final comparison as a markdown table (:func:`markdown_table`, printed by ``python -m bptt_jax.train``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import parallel
from bptt_jax.files import atomic_path, write_text_atomic
from bptt_jax.pipeline.config import RunConfig
from bptt_jax.pipeline.data import Data
from bptt_jax.pipeline.evaluate import Baselines, Control, EvalResult, Evaluation
from bptt_jax.pipeline.finetuning import Tuned
from bptt_jax.pipeline.pretraining import Pretrained
from bptt_jax.structures import Structure, displacement


def jsonable(x):
    if dataclasses.is_dataclass(x):
        return {k: jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _pct(before: float, after: float) -> float:
    return 100.0 * (before - after) / before if before > 0 else float("nan")


def build_results(cfg: RunConfig, data: Data, pre: Pretrained, base: Baselines, tuned: Tuned, final: Evaluation,
                  control: Optional[Control]) -> dict[str, Any]:
    """``results.json``: every figure of the run, from the stages' outputs."""
    wall = {"data": data.seconds, "pretrain": pre.seconds, "baselines": base.seconds, "bptt": tuned.seconds,
            "evaluate": final.seconds}
    if control:
        wall["force_control"] = control.seconds
    step_final = tuned.bptt.step_size(tuned.params)
    thr = cfg.eval.basin_dq
    methods = {"constant_step": base.constant_step, "fire": base.fire, "bptt": final.tuned,
               "force_control": control.result if control else None}
    summary = {k: v.summary(thr) for k, v in methods.items() if v is not None}
    if base.oracle is not None:
        summary["oracle"] = {k: base.oracle[k] for k in ("avg", "avg_without_diverged", "diverged", "basins")}
    results = {
        "dataset": cfg.data.path or cfg.data.name,
        "model": cfg.model.name,
        "loss": cfg.data.loss,
        "seed": cfg.seed,
        "elements": sorted({int(z) for s in data.frames for z in s.numbers}
                           | {int(z) for s, _ in data.fit_items + data.val_items for z in s.numbers}),
        "n_train": len(data.fit_items),
        "n_val": len(data.val_items),
        "n_test": len(data.test_items),
        "split": {"test_records": data.split.test_records, "test_used": len(data.test),
                  "train_records": data.split.train_records, "train_used": len(data.train),
                  "bptt_train": len(data.fit_items), "bptt_validation": len(data.val_items)},
        "avg_dq": {"initial": float(base.initial.mean()), "constant_step": base.constant_step.avg,
                   "fire": base.fire.avg if base.fire else None, "bptt": final.tuned.avg,
                   "oracle": base.oracle["avg"] if base.oracle else None,
                   "force_control": control.result.avg if control else None},
        "avg_dq_without_diverged": {k: v["avg_without_diverged"] for k, v in summary.items()},
        "basins": {"threshold_dq": thr, "initial": int((base.initial_dq < thr).sum()),
                   **{k: v["basins"] for k, v in summary.items()}},
        "constant_step_best": base.best_step,
        "constant_step_grid": {str(k): v.avg for k, v in base.grid.items()},
        "validation_step_grid": {str(k): v.avg for k, v in base.val_grid.items()},
        "reduction_pct": _pct(base.constant_step.avg, final.tuned.avg),
        "reduction_vs_fire_pct": _pct(base.fire.avg, final.tuned.avg) if base.fire else None,
        "reduction_vs_force_control_pct": _pct(control.result.avg, final.tuned.avg) if control else None,
        "force_l2": {"pretrained": final.force_pretrained[1], "bptt": final.force_tuned[1],
                     "force_control": control.force_l2 if control else None},
        "force_mse": {"pretrained": final.force_pretrained[0], "bptt": final.force_tuned[0]},
        "adwt": {"constant_step": base.constant_step.adwt, "fire": base.fire.adwt if base.fire else None,
                 "bptt": final.tuned.adwt},
        "frames": {"constant_step": float(base.constant_step.frames.mean()),
                   "fire": float(base.fire.frames.mean()) if base.fire else None,
                   "bptt": float(final.tuned.frames.mean()),
                   "oracle": base.oracle["frames"] if base.oracle else None},
        "diverged": {k: v["diverged"] for k, v in summary.items()},
        "skipped": {"total": data.skipped.total, "by_reason": dict(data.skipped.counts),
                    "examples": data.skipped.messages[:5]},
        # Training relaxations that diverged (left out of their step's loss and gradient), summed over BPTT's
        # steps, and optimiser updates not applied because something was non-finite (per epoch: metrics.csv).
        "bptt_train_diverged": sum(r.get("train_diverged", 0) for r in tuned.metrics),
        "bptt_skipped_updates": sum(r.get("skipped_updates", 0) for r in tuned.metrics),
        "pretrain_skipped_updates": sum(r.get("skipped_updates", 0) for r in pre.history),
        "step_size_initial": tuned.step_size_initial,
        "step_size_final": float(step_final) if step_final is not None else None,
        "bptt_selection": {"kept_epoch": tuned.kept_epoch if cfg.finetune.epochs else None,
                           "criterion": "validation loss",
                           "val_loss": [tuned.val_start] + [r.get("val_loss") for r in tuned.metrics],
                           "test_loss": [r["test_loss"] for r in tuned.metrics],
                           "test_loss_start": tuned.test_start,
                           "train_loss": [r["train_loss"] for r in tuned.metrics]},
        "oracle": ({k: v for k, v in base.oracle.items() if k != "per_structure"} if base.oracle else None),
        "force_control": ({"epochs": control.epochs, "constant_step_best": control.step_size,
                           "bptt_structure_frames": control.bptt_structure_frames,
                           "force_frames_per_epoch": control.frames_per_epoch,
                           "seconds": round(control.seconds, 2)} if control else None),
        "grad_mode": cfg.relax.grad_mode,
        "finetune_rule": cfg.relax.rule,
        "finetune": jsonable(cfg.finetune),
        "seconds_per_bptt_step": (float(np.mean([r["seconds"] for r in tuned.metrics]))
                                  / max(tuned.steps_per_epoch, 1) if tuned.metrics else None),
        "pretrain_epochs": len(pre.history),
        "pretrain_stop": pre.history[-1].get("stop") if pre.history else None,
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "per_structure": {"initial": base.initial.tolist(),
                          "constant_step": base.constant_step.per_structure.tolist(),
                          "fire": base.fire.per_structure.tolist() if base.fire else None,
                          "bptt": final.tuned.per_structure.tolist(),
                          "oracle": base.oracle["per_structure"] if base.oracle else None},
    }
    return results


def start_run(cfg: RunConfig) -> Path:
    """Make the run directory and write its ``run_config.json``."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if parallel.is_primary():
        write_text_atomic(run_dir / "run_config.json", json.dumps(jsonable(cfg), indent=1))
    return run_dir


def write_run(cfg: RunConfig, run_dir: Path, results: dict, pretrain_rows: list[dict], bptt_rows: list[dict],
              metrics: bool = True) -> None:
    """Write ``results.json``, ``metrics.csv`` (unless ``metrics`` is False: an evaluation without training) and
    (``cfg.plots``) the plots into the run directory.

    Multi-host: every process runs every stage; process 0 alone writes the run directory (config, checkpoints,
    results, metrics, plots), so processes sharing one run_dir do not clobber each other's files, and nobody
    leaves (and tears down the distributed runtime) before it has written."""
    if parallel.is_primary():
        write_text_atomic(run_dir / "results.json", json.dumps(jsonable(results), indent=1))
        if metrics:
            _write_metrics(run_dir / "metrics.csv", pretrain_rows, bptt_rows)
        if cfg.plots:
            _plots(run_dir, bptt_rows, results, results["avg_dq"]["constant_step"])
    if jax.process_count() > 1:
        parallel.sync("run written")


def write_error_picture(cfg: RunConfig, run_dir: Path, items: Sequence[tuple[Structure, np.ndarray]],
                        before: EvalResult, after: EvalResult, step_size: float) -> None:
    """``displacement_errors.png`` (:func:`error_picture`): the best constant step's relaxations of the test split
    with the pretrained model beside the fine-tuned model's (``cfg.plots``; process 0)."""
    if cfg.plots and parallel.is_primary() and items:
        metric = "Dq" if cfg.data.loss == "dq" else "MSE"
        error_picture(run_dir / "displacement_errors.png", items, before, after,
                      (f"pretrained, constant step η={step_size:g}", "BPTT-tuned"), metric)


def _write_metrics(path: Path, pretrain_rows: list[dict], bptt_rows: list[dict]) -> None:
    rows = [{"stage": "pretrain", **r} for r in pretrain_rows] + [{"stage": "bptt", **r} for r in bptt_rows]
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _plots(run_dir: Path, rows: list[dict], results: dict, constant: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = "Avg Dq" if results["loss"] == "dq" else "Avg MSE"
    if rows:  # the training curve (an evaluation of a saved model has none)
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


def per_atom_errors(final: np.ndarray, structure: Structure, target: np.ndarray) -> np.ndarray:
    """(n,) distance in Å of each atom's final position from its reference position, by minimum image."""
    n = len(structure)
    d = displacement(jnp.asarray(final[:n]), jnp.asarray(target[:n]), jnp.asarray(structure.cell),
                     jnp.asarray(structure.pbc))
    return np.linalg.norm(np.asarray(d), axis=-1)


def error_picture(path: Path, items: Sequence[tuple[Structure, np.ndarray]], before: EvalResult,
                  after: EvalResult, labels: tuple[str, str], metric: str, count: int = 3) -> list[int]:
    """Test structures coloured by per-atom displacement error, before fine-tuning and after, side by side.

    The ``count`` structures the ``before`` relaxation got most wrong (largest per-structure loss, diverged ones
    left out) are drawn at their reference (DFT-relaxed) positions, each atom coloured by how far it ended from
    its reference position, on one colour scale per structure: where the pretrained model misplaced a defect's
    neighbours they light up on the left and, if fine-tuning fixed them, fade on the right. Returns the test
    indices drawn (in the order of the rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase.visualize.plot import plot_atoms

    order = np.argsort(-np.asarray(before.per_structure))
    bad = before.diverged_mask if before.diverged_mask is not None else np.zeros(len(order), bool)
    chosen = [int(i) for i in order if not bad[i]][:count]
    if not chosen:
        return []
    cmap = plt.get_cmap("inferno")
    fig, axes = plt.subplots(len(chosen), 2, figsize=(8.4, 3.8 * len(chosen)), squeeze=False)
    for row, i in zip(axes, chosen):
        structure, target = items[i]
        errors = [per_atom_errors(res.positions[i], structure, target) for res in (before, after)]
        norm = matplotlib.colors.Normalize(0.0, max(float(max(e.max() for e in errors)), 1e-3))
        atoms = structure.to_atoms()
        atoms.positions = np.asarray(target[:len(structure)], float)
        for ax, err, res, label in zip(row, errors, (before, after), labels):
            plot_atoms(atoms, ax, rotation="10x,-20y,0z", radii=0.5, colors=[cmap(norm(e)) for e in err])
            ax.set_title(f"test {i}, {label}\n{metric} {res.per_structure[i]:.3g}, largest error {err.max():.2f} Å",
                         fontsize=9)
            ax.set_axis_off()
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(row), shrink=0.8,
                     label="distance from the reference position (Å)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return chosen


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
                     f"| {basins.get(key, '-')} | {fmt(results['adwt'].get(key))} "
                     f"| {fmt(results['frames'].get(key))} |")
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
    health = [(results.get(k) or 0, what) for k, what in (
        ("bptt_train_diverged", "diverged BPTT training relaxations (left out of the loss)"),
        ("bptt_skipped_updates", "skipped BPTT updates (non-finite)"),
        ("pretrain_skipped_updates", "skipped pretraining updates (non-finite)"))]
    if any(n for n, _ in health):
        lines.append("training: " + ", ".join(f"{n} {what}" for n, what in health))
    sel = results.get("bptt_selection") or {}
    if sel.get("val_loss"):
        lines.append("validation " + metric + " per epoch (0 = pretrained): "
                     + ", ".join(fmt(v) for v in sel["val_loss"]) + f"; kept epoch {sel.get('kept_epoch')}")
    return "\n".join(lines)
