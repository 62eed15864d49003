"""The headline table of a seed study: every figure of ``results.json`` as mean ± std over seeds.

    python -m bptt_jax.train -m seed=0,1,2 eval.force_control=true hydra.sweep.dir=runs/seeds
    python -m experiments.headline runs/seeds --out results/si_defects_adapt.md \\
        [--doubled runs/pretrain32] [--command "..."]

``--doubled`` names runs (a directory of run directories, or one run) made with twice the pretraining
epochs: their best constant step, paired by seed, says whether the baseline is converged (the issue's rule:
doubling the pretraining budget improves it by less than 3%).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

METHODS = [("unrelaxed", "initial"), ("best constant step (test grid)", "constant_step"), ("FIRE", "fire"),
           ("oracle forces, best constant step", "oracle"),
           ("equal-compute force training, best constant step", "force_control"), ("BPTT-tuned", "bptt")]


def load_runs(path: Path) -> list[dict]:
    """results.json of a run directory, or of every run directory below ``path``, ordered by seed."""
    files = [path / "results.json"] if (path / "results.json").exists() else sorted(path.glob("*/results.json"))
    runs = [json.loads(f.read_text()) | {"_dir": str(f.parent)} for f in files]
    return sorted(runs, key=lambda r: r.get("seed", 0))


def mean_std(values: list[Optional[float]]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def _col(runs: list[dict], f: Callable[[dict], Optional[float]]) -> list[Optional[float]]:
    out = []
    for r in runs:
        try:
            out.append(f(r))
        except (KeyError, TypeError):
            out.append(None)
    return out


def table(runs: list[dict]) -> list[str]:
    metric = "Avg Dq" if runs[0]["loss"] == "dq" else "Avg MSE"
    thr = runs[0].get("basins", {}).get("threshold_dq")
    lines = [f"| method | {metric} (mean ± std) | per seed | without diverged | diverged | in basin (Dq < {thr}) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, key in METHODS:
        vals = _col(runs, lambda r: r["avg_dq"][key])
        if all(v is None for v in vals):
            continue
        per = " / ".join("-" if v is None else f"{v:.3f}" for v in vals)
        clean = mean_std(_col(runs, lambda r: r["avg_dq_without_diverged"][key])) if key != "initial" else ""
        div = " / ".join(str(d) for d in _col(runs, lambda r: r["diverged"][key])) if key != "initial" else ""
        bas = " / ".join(str(b) for b in _col(runs, lambda r: r["basins"][key]))
        lines.append(f"| {name} | {mean_std(vals)} | {per} | {clean} | {div} | {bas} |")
    return lines


def _per_structure(run: dict) -> str:
    """Median per-structure loss of the best constant step → BPTT, and on how many structures BPTT is lower:
    the mean can be dominated by a few structures that no method relaxes (e.g. a reference that changes phase)."""
    try:
        c, b = run["per_structure"]["constant_step"], run["per_structure"]["bptt"]
    except (KeyError, TypeError):
        return "-"
    better = sum(x < y for x, y in zip(b, c))
    return f"{statistics.median(c):.4g} → {statistics.median(b):.4g}, {better} of {len(b)}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(runs: list[dict], doubled: list[dict], command: str) -> str:
    r0 = runs[0]
    red = _col(runs, lambda r: r["reduction_pct"])
    red_ctrl = _col(runs, lambda r: r["reduction_vs_force_control_pct"])
    red_fire = _col(runs, lambda r: r["reduction_vs_fire_pct"])
    walls = [sum(r["wall_s"].values()) for r in runs]
    out = [f"# {r0['dataset']} × {r0['model']}: seed study ({len(runs)} seed{'s' if len(runs) != 1 else ''})", "",
           f"Command: `{command}`" if command else "", "",
           f"Machine: {cpu_name()}; written "
           f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Wall time per run: "
           + ", ".join(f"{w / 60:.1f} min" for w in walls) + " (stages: "
           + ", ".join(f"{k} {statistics.mean(_col(runs, lambda r: r['wall_s'].get(k)) or [0]):.0f} s"
                       for k in r0["wall_s"]) + ", mean).", "",
           f"Test split: {r0['split']['test_used']} of the first {r0['split']['test_records']} records; BPTT trains on "
           f"{r0['n_train']} trajectories and selects its epoch on {r0['n_val']}.", ""]
    out += table(runs)
    out += ["", f"- Reduction vs the best constant step: {mean_std(red)} % (per seed "
            + " / ".join(f"{v:.1f}" for v in red if v is not None) + ")",
            f"- Reduction vs the equal-compute force-training control: {mean_std(red_ctrl)} %",
            f"- Reduction vs FIRE: {mean_std(red_fire)} %",
            "- Per structure, BPTT vs the best constant step (median loss; structures improved): " + "; ".join(
                _per_structure(r) for r in runs),
            "- Epoch delivered (validation): " + " / ".join(str(r["bptt_selection"]["kept_epoch"]) for r in runs),
            "- Validation Avg per epoch: " + "; ".join(
                ", ".join(f"{v:.3f}" for v in r["bptt_selection"]["val_loss"]) for r in runs),
            "- Learned step size, start → end: " + "; ".join(
                f"{r['step_size_initial']:.4g} → {r['step_size_final']:.4g}" for r in runs),
            "- Force L2 error on test frames, pretrained → BPTT-tuned (control): " + "; ".join(
                f"{r['force_l2']['pretrained']:.3f} → {r['force_l2']['bptt']:.3f}"
                + (f" ({r['force_l2']['force_control']:.3f})" if r["force_l2"].get("force_control") else "")
                for r in runs),
            "- Pretraining: " + "; ".join(f"{r['pretrain_epochs']} epochs ({r['pretrain_stop']})" for r in runs)]
    if r0.get("force_control"):
        out.append("- Equal-compute control: " + "; ".join(
            f"+{r['force_control']['epochs']} force epochs for {r['force_control']['bptt_structure_frames']:.0f} "
            f"BPTT structure-frames" for r in runs if r.get("force_control")))
    if doubled:
        by_seed = {r.get("seed"): r for r in doubled}
        pairs = [(r, by_seed[r.get("seed")]) for r in runs if r.get("seed") in by_seed]
        out += ["", "## Is the baseline converged? Twice the pretraining epochs", "",
                "| seed | pretrain epochs | best constant step | pretrain epochs (doubled) | best constant step "
                "(doubled) | change |", "| --- | --- | --- | --- | --- | --- |"]
        for a, b in pairs:
            ca, cb = a["avg_dq"]["constant_step"], b["avg_dq"]["constant_step"]
            out.append(f"| {a.get('seed')} | {a['pretrain_epochs']} | {ca:.3f} | {b['pretrain_epochs']} | {cb:.3f} "
                       f"| {100 * (cb - ca) / ca:+.1f}% |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="a multirun directory (or one run directory)")
    ap.add_argument("--doubled", type=Path, help="runs with twice the pretraining epochs, paired by seed")
    ap.add_argument("--command", default="", help="the command that made the runs, for the report")
    ap.add_argument("--out", type=Path, help="write the report here (default: print)")
    args = ap.parse_args(argv)
    runs = load_runs(args.runs)
    if not runs:
        raise SystemExit(f"{args.runs}: no results.json")
    text = report(runs, load_runs(args.doubled) if args.doubled else [], args.command)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
