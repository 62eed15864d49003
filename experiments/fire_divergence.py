"""Why FIRE diverges: the pretrained model's FIRE relaxations of a run's test split, taken apart.

    python -m experiments.fire_divergence RUN_DIR [--out results/catalysts_fire.md]

For every test structure of the run (its pretrained checkpoint, its data set, its frame budget and stop rule)
this relaxes with FIRE twice: with the model's forces (the pipeline's FIRE baseline) and, on generated data,
with the generating potential's exact forces (ASE's ``FIRE``, same constants and budget). For each relaxation
that diverges (RMS drift of the free atoms beyond ``relax.diverge_distance``) it says what moved:

- ``adsorbate``: the adsorbate (H, C, N, O atoms on a metal slab) left: most of the squared drift is on it;
- ``slab translation``: the free slab atoms slid together: the mean displacement of the free metal atoms
  carries most of their squared drift (a rigid translation over the fixed layers);
- ``slab distortion``: the rest.

and, for every relaxation, how far the atoms went (RMS drift, largest single-atom shift) and what carried the
drift, with each force source; and compares the net force on the free atoms at the start (|Σ F| per free
atom; on a slab the fixed layers take up the rest) between the model and the reference (first frame's forces).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from experiments.headline import cpu_name

ADSORBATE_Z = (1, 6, 7, 8)  # H, C, N, O


def _run_config(run: Path):
    """The run's data, model and relaxation settings (its ``run_config.json``, of any version) and the raw dict."""
    from bptt_jax.pipeline import RunConfig

    cfg = json.loads((run / "run_config.json").read_text())
    rc = RunConfig.from_dict(cfg)
    return rc.data, rc.model, rc.relax, cfg


def classify(start: np.ndarray, final: np.ndarray, free: np.ndarray, adsorbate: np.ndarray) -> dict:
    """What moved in a relaxation from ``start`` to ``final`` (n, 3): shares of the free atoms' squared drift."""
    d = (final - start)[free]
    ads, metal = adsorbate[free], ~adsorbate[free]
    total = float((d ** 2).sum()) or 1e-30
    ads_share = float((d[ads] ** 2).sum()) / total
    dm = d[metal]
    mean = dm.mean(0) if len(dm) else np.zeros(3)
    rigid_share = float(len(dm) * (mean ** 2).sum()) / max(float((dm ** 2).sum()), 1e-30) if len(dm) else 0.0
    kind = ("adsorbate" if ads_share > 0.5 else "slab translation" if rigid_share > 0.5 else "slab distortion")
    return {"kind": kind, "adsorbate_share": ads_share, "rigid_share_of_slab": rigid_share,
            "rms_drift": float(np.sqrt((d ** 2).sum(1).mean())), "slab_mean_shift": mean.tolist(),
            "max_atom_shift": float(np.sqrt((d ** 2).sum(1)).max())}


def net_force(F: np.ndarray, free: np.ndarray) -> float:
    """|Σ F| over the free atoms divided by their number (eV/Å)."""
    return float(np.linalg.norm(F[free].sum(0)) / max(int(free.sum()), 1))


def exact_fire(structure, calculator, *, max_frames: int, tol: float, diverge_distance: float) -> dict:
    """ASE's FIRE (the library's constants) with exact forces under the library's stop rule: stop when the
    free atoms' RMS movement in one frame is below ``tol``; diverged when their RMS drift passes the bound."""
    from ase.constraints import FixAtoms
    from ase.optimize import FIRE

    atoms = structure.to_atoms()
    free = ~structure.fixed
    atoms.set_constraint(FixAtoms(mask=structure.fixed))
    atoms.calc = calculator
    start = atoms.get_positions()
    opt = FIRE(atoms, logfile=None, dt=0.1, maxstep=0.2, dtmax=1.0, Nmin=5, finc=1.1, fdec=0.5, astart=0.1,
               fa=0.99)
    prev, frames, diverged, converged = start.copy(), 0, False, False
    for _ in range(max_frames):
        opt.step()
        frames += 1
        X = atoms.get_positions()
        if not np.all(np.isfinite(X)) or np.sqrt(((X - start)[free] ** 2).sum(1).mean()) > diverge_distance:
            diverged = True
            break
        moved = np.sqrt(((X - prev)[free] ** 2).sum(1).mean())
        prev = X.copy()
        if moved < tol:
            converged = True
            break
    return {"positions": atoms.get_positions(), "frames": frames, "diverged": diverged, "converged": converged}


def analyse(run: Path, exact: bool = True, limit: Optional[int] = None) -> dict:
    import jax

    from bptt_jax.bptt import BPTT
    from bptt_jax.data.trajectory import SkipLog
    from bptt_jax.models import build_model
    from bptt_jax.oracle import oracle_calculator_for, structure_losses
    from bptt_jax.pipeline import (generated_dir, load_split, model_buckets, pretrained_dir, relax_batches,
                                   relaxation_items, restore_checkpoint)

    data, mcfg, relax, cfg = _run_config(run)
    model = build_model(mcfg.name, mcfg.preset, **dict(mcfg.overrides))
    max_atoms = getattr(model, "max_atoms", None)
    items = relaxation_items(load_split(data, SkipLog(), progress=False, max_atoms=max_atoms).test)
    if limit:
        items = items[:limit]
    batches = relax_batches(items, int(cfg["eval"]["batch_size"]), model_buckets(data.buckets, max_atoms))
    params, _, _ = restore_checkpoint(pretrained_dir(run), model.init(jax.random.PRNGKey(0), batches[0][1]))
    import dataclasses

    fire = BPTT(model, dataclasses.replace(relax, rule="fire", step_mode="fixed", step_head=()))
    rows: list[dict] = [{} for _ in items]
    finals: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
    for idx, b in batches:
        res = fire.relax_batch({"model": params}, b)
        F0 = np.asarray(fire.forces({"model": params}, b))
        for k, i in enumerate(idx):
            s, _ = items[i]
            n = len(s)
            finals[i] = np.asarray(res.positions[k, :n], np.float64)
            free = ~s.fixed
            rows[i] = {"frames": int(res.frames[k]), "diverged": bool(res.diverged[k]),
                       "converged": bool(res.converged[k]),
                       "net_force_model": net_force(F0[k, :n], free),
                       "net_force_reference": net_force(s.forces, free) if s.forces is not None else None,
                       "formula": s.to_atoms().get_chemical_formula()}
    loss = data.loss
    structs, targets = [s for s, _ in items], [t for _, t in items]
    model_loss = structure_losses(loss, structs, targets, finals)
    for i, (s, _) in enumerate(items):
        ads = np.isin(s.numbers, ADSORBATE_Z)
        rows[i]["loss"] = float(model_loss[i])
        rows[i]["what_moved"] = classify(s.positions, finals[i], ~s.fixed, ads)
    out = {"run": str(run), "dataset": data.name, "n": len(items), "max_frames": relax.max_frames,
           "tol": relax.tol, "diverge_distance": relax.diverge_distance, "model": rows}
    if exact and data.path is None:
        calc = oracle_calculator_for(generated_dir(data))
        ex = []
        t = time.time()
        for s, _ in items:
            r = exact_fire(s, calc(), max_frames=relax.max_frames, tol=relax.tol,
                           diverge_distance=relax.diverge_distance)
            ads = np.isin(s.numbers, ADSORBATE_Z)
            ex.append({"frames": r["frames"], "diverged": r["diverged"], "converged": r["converged"],
                       "what_moved": classify(s.positions, r["positions"], ~s.fixed, ads),
                       "positions": r["positions"]})
        ex_loss = structure_losses(loss, structs, targets, [r.pop("positions") for r in ex])
        for r, v in zip(ex, ex_loss):
            r["loss"] = float(v)
        out["exact"] = ex
        out["exact_seconds"] = time.time() - t
    out["unrelaxed"] = structure_losses(loss, structs, targets).tolist()
    return out


def _avg(values, keep=None) -> str:
    v = [x for j, x in enumerate(values) if keep is None or keep[j]]
    return f"{np.mean(v):.3f}" if v else "-"


def report(res: dict, command: str, seconds: float) -> str:
    model, exact = res["model"], res.get("exact")
    lines = [f"# Why FIRE diverges: {res['dataset']} ({res['n']} test structures)", "",
             f"Command: `{command}`  ", f"Machine: {cpu_name()}, "
             f"{datetime.now(timezone.utc):%Y-%m-%d}, {seconds / 60:.1f} min.  ",
             f"Run: `{res['run']}` (pretrained checkpoint). FIRE with the library's constants (ASE's), "
             f"{res['max_frames']} frames, stop at RMS movement < {res['tol']} Å, diverged beyond "
             f"{res['diverge_distance']} Å RMS drift of the free atoms.", "",
             "| forces | Avg loss | Avg loss without diverged | diverged | converged within budget |",
             "|---|---|---|---|---|"]
    rows = [("pretrained model", model)] + ([("exact (generating potential)", exact)] if exact else [])
    for name, rs in rows:
        keep = [not r["diverged"] for r in rs]
        conv = sum(r["converged"] for r in rs)
        lines.append(f"| {name} | {_avg([r['loss'] for r in rs])} | {_avg([r['loss'] for r in rs], keep)} | "
                     f"{sum(not k for k in keep)} | {conv} |")
    lines += ["", f"Unrelaxed: {np.mean(res['unrelaxed']):.3f}.", "",
              "How far the atoms went, every relaxation:", "",
              "| forces | median RMS drift Å | median largest atom shift Å | an atom moved > 3 Å | "
              "drift mostly on the adsorbate | loss > 2× the reference FIRE's |", "|---|---|---|---|---|---|"]
    for name, rs in rows:
        w = [r["what_moved"] for r in rs]
        worse = (sum(r["loss"] > 2 * e["loss"] for r, e in zip(rs, exact)) if exact else "-")
        lines.append(f"| {name} | {np.median([x['rms_drift'] for x in w]):.2f} | "
                     f"{np.median([x['max_atom_shift'] for x in w]):.2f} | {sum(x['max_atom_shift'] > 3 for x in w)} | "
                     f"{sum(x['kind'] == 'adsorbate' for x in w)} | {worse} |")
    lines.append("")
    for name, rs in rows:
        div = [r for r in rs if r["diverged"]]
        if not div:
            continue
        kinds: dict[str, int] = {}
        for r in div:
            kinds[r["what_moved"]["kind"]] = kinds.get(r["what_moved"]["kind"], 0) + 1
        lines.append(f"What moved in the {len(div)} diverged relaxations with {name} forces: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + ".")
    nm = [r["net_force_model"] for r in model]
    nr = [r["net_force_reference"] for r in model if r["net_force_reference"] is not None]
    div = [r["net_force_model"] for r in model if r["diverged"]]
    ok = [r["net_force_model"] for r in model if not r["diverged"]]
    lines += ["", "Net force on the free atoms at the start, |Σ F| per free atom (eV/Å): "
              f"model {np.mean(nm):.4f} (diverged {_avg(div)}, others {_avg(ok)})"
              + (f", reference {np.mean(nr):.4f}." if nr else "."), "",
              "| # | formula | model: frames | diverged | what moved | rigid share | adsorbate share | "
              "max shift Å | net F model | net F ref |" + (" exact: diverged | exact loss |" if exact else ""),
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if exact else "")]
    for i, r in enumerate(model):
        if not r["diverged"] and not (exact and exact[i]["diverged"]):
            continue
        w = r["what_moved"]
        ref = r["net_force_reference"]
        line = (f"| {i} | {r['formula']} | {r['frames']} | {r['diverged']} | {w['kind']} | "
                f"{w['rigid_share_of_slab']:.2f} | {w['adsorbate_share']:.2f} | {w['max_atom_shift']:.1f} | "
                f"{r['net_force_model']:.4f} | {'-' if ref is None else f'{ref:.4f}'} |")
        if exact:
            line += f" {exact[i]['diverged']} | {exact[i]['loss']:.3f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory with a pretrained checkpoint")
    p.add_argument("--out", type=Path, default=None, help="markdown report (and a .json beside it)")
    p.add_argument("--no-exact", action="store_true", help="skip FIRE with the generating potential")
    p.add_argument("--limit", type=int, default=None, help="only the first N test structures")
    p.add_argument("--command", default=None, help="the command to print in the report")
    args = p.parse_args(argv)
    t = time.time()
    res = analyse(args.run, exact=not args.no_exact, limit=args.limit)
    text = report(res, args.command or "python -m experiments.fire_divergence " + " ".join(argv or []),
                  time.time() - t)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
