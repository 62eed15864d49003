"""``python -m bptt_jax.relax RUN_DIR IN [IN ...] -o OUT.extxyz``: relax structures with a run's tuned model.

    python -m bptt_jax.relax runs/2026-12-03_14-05-00 defects.extxyz POSCAR -o relaxed.extxyz
    python -m bptt_jax.relax runs/X in.db -o out.extxyz --trajectory         # every frame of every relaxation
    python -m bptt_jax.relax runs/X in.extxyz -o out.extxyz --fire           # FIRE with the tuned model's forces
    python -m bptt_jax.relax runs/X in.extxyz -o out.extxyz --checkpoint pretrained   # before fine-tuning

Inputs are read with ASE (any format it reads: extxyz, VASP, ASE db, CIF, ...; every image of each file);
``FixAtoms`` constraints are kept fixed. The tuned relaxation (:func:`bptt_jax.load_run`: the learned step
and the run's stop rule and frame budget) runs in size buckets with early exit and in-flight batching
(:func:`bptt_jax.relax_many`). Each written structure's ``info`` has ``bptt_status`` (``relaxed``, or why it
was not: ``too_large``, ``unseen_element``), ``bptt_frames``, ``bptt_converged``, ``bptt_diverged`` and
``source`` (file and image). A structure that cannot be relaxed is written unrelaxed, flagged, with a one-line
message; a file that cannot be read is reported in one line and the others are relaxed (exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("bptt_jax")


def read_inputs(paths: list[str]) -> tuple[list, list[str]]:
    """Every image of every file, with its source (``file@index``); unreadable files as one-line errors."""
    from ase.io import read

    atoms, errors = [], []
    for p in paths:
        try:
            images = read(p, index=":")
        except Exception as err:  # noqa: BLE001 (ASE raises many types for a malformed file)
            errors.append(f"{p}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            continue
        images = images if isinstance(images, list) else [images]
        if not images:
            errors.append(f"{p}: no structures")
        for i, a in enumerate(images):
            a.info["source"] = f"{p}@{i}"
            atoms.append(a)
    return atoms, errors


def why_not(structure, max_atoms: int, elements: Optional[set[int]]) -> Optional[str]:
    """Why ``structure`` cannot be relaxed by the model (None: it can)."""
    if len(structure) > max_atoms:
        return "too_large"
    if elements is not None and not set(int(z) for z in structure.numbers) <= elements:
        return "unseen_element"
    return None


def message(status: str, source: str, structure, max_atoms: int, elements: Optional[set[int]]) -> str:
    from ase.data import chemical_symbols

    if status == "too_large":
        return f"{source}: {len(structure)} atoms, more than the model's largest size ({max_atoms}); written unrelaxed"
    unseen = sorted({int(z) for z in structure.numbers} - (elements or set()))
    return (f"{source}: element(s) {', '.join(chemical_symbols[z] for z in unseen)} not in the run's training data "
            f"({', '.join(chemical_symbols[z] for z in sorted(elements or ()))}); written unrelaxed")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bptt_jax.relax", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory of python -m bptt_jax.train")
    ap.add_argument("inputs", nargs="+", help="structure files (any format ASE reads; all images)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="output file (extxyz recommended)")
    ap.add_argument("--trajectory", action="store_true", help="write every frame of each relaxation")
    ap.add_argument("--batch-size", type=int, default=16, help="structures relaxed together (default 16)")
    ap.add_argument("--fire", action="store_true", help="relax with FIRE and the model's forces instead")
    ap.add_argument("--checkpoint", default="final", help="final (default), pretrained, or a BPTT epoch number")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import dataclasses

    from ase.io import write
    from ase.io.formats import UnknownFileTypeError, filetype
    from tqdm.auto import tqdm

    from bptt_jax import BPTT, Structure, relax_many
    from bptt_jax.files import atomic_path
    from bptt_jax.load import load_run

    checkpoint = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    try:
        run = load_run(args.run, checkpoint)
    except (ValueError, OSError) as err:
        log.error("%s", str(err).splitlines()[0])
        return 2
    bptt = run.bptt
    if args.fire:
        bptt = BPTT(run.model, dataclasses.replace(bptt.relax, rule="fire", step_mode="fixed", step_head=()),
                    bptt.optim)
    atoms_in, errors = read_inputs(args.inputs)
    for e in errors:
        log.error("%s", e)
    buckets = run.buckets
    max_atoms = max(buckets)
    elements = run.elements
    structures = [Structure.from_atoms(a) for a in atoms_in]
    status = [why_not(s, max_atoms, elements) or "relaxed" for s in structures]
    for a, s, st in zip(atoms_in, structures, status):
        if st != "relaxed":
            log.warning("%s", message(st, a.info["source"], s, max_atoms, elements))
    todo = [i for i, st in enumerate(status) if st == "relaxed"]
    frames: dict[int, list[np.ndarray]] = {i: [structures[i].positions] for i in range(len(structures))}
    info: dict[int, tuple[int, bool, bool]] = {i: (0, False, False) for i in range(len(structures))}
    chunk = max(args.batch_size * 4, 1)
    bar = tqdm(total=len(todo), desc="relaxing", unit="structure", disable=args.no_progress)
    for start in range(0, len(todo), chunk):
        ids = todo[start:start + chunk]
        batch_structs = [structures[i] for i in ids]
        if args.trajectory:
            for i, traj, out in _recorded(bptt, run.params, batch_structs, ids, args.batch_size, buckets):
                frames[i] = traj
                info[i] = out
        else:
            outcomes, _ = relax_many(bptt, run.params, batch_structs, batch_size=args.batch_size, buckets=buckets)
            for i, o in zip(ids, outcomes):
                frames[i] = [o.positions]
                info[i] = (o.frames, o.converged, o.diverged)
        bar.update(len(ids))
    bar.close()
    out_atoms = []
    for i, a in enumerate(atoms_in):
        n_frames, converged, diverged = info[i]
        for pos in frames[i]:
            b = a.copy()
            b.set_positions(np.asarray(pos, np.float64))
            b.info.update(bptt_status=status[i], bptt_frames=int(n_frames), bptt_converged=bool(converged),
                          bptt_diverged=bool(diverged))
            out_atoms.append(b)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(args.output) as tmp:  # never a half-written output file
            write(tmp, out_atoms, format=filetype(args.output, read=False))
    except (ValueError, OSError, UnknownFileTypeError) as err:  # e.g. a format ASE cannot write, or a full disk
        log.error("%s: cannot be written (%s)", args.output,
                  str(err).splitlines()[0] if str(err) else type(err).__name__)
        return 2
    done = [info[i] for i in todo]
    log.info("%d structures relaxed (%d converged, %d diverged), %d written unrelaxed, %d unreadable file(s): %s",
             len(todo), sum(c for _, c, _ in done), sum(d for _, _, d in done), len(structures) - len(todo),
             len(errors), args.output)
    return 1 if errors else 0


def _recorded(bptt, params, structures, ids, batch_size, buckets):
    """Every frame of each structure's relaxation (scan mode, in size-bucketed batches)."""
    from bptt_jax.pipeline.data import batch_plan
    from bptt_jax.structures import Batch

    for n_pad, idx in batch_plan([len(s) for s in structures], batch_size, buckets):
        batch = Batch.from_structures([structures[k] for k in idx], n_atoms=n_pad, batch_size=batch_size)
        res = bptt.relax_batch(params, batch, mode="scan", record=True)
        traj = np.asarray(res.trajectory)  # (T, B, N, 3) after each frame
        for slot, k in enumerate(idx):
            n, f = len(structures[k]), int(res.frames[slot])
            steps = [structures[k].positions] + [traj[t, slot, :n] for t in range(f)]
            yield ids[k], steps, (f, bool(res.converged[slot]), bool(res.diverged[slot]))


if __name__ == "__main__":
    sys.exit(main())
