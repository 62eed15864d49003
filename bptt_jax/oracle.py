"""The oracle row: relax with the exact forces of the potential that generated a dataset.

A model is scored by relaxing the test structures with ``X ← X + η F_model(X)`` (:func:`bptt_jax.relax.descent`
with a constant step) and comparing the final positions with the reference relaxed ones. The *oracle row*
runs the same rule with the generating potential's own forces (an ASE calculator: Tersoff/Stillinger–Weber
for ``si_defects``, EMT for ``catalysts`` and ``pure_crystals``) over a grid of step sizes. It shows what the
iterated map reaches with perfect forces, within the frame budget and the stop tolerance: how much relaxing
matters on a dataset at all (its best row against the unrelaxed loss) and what a pretrained model's
constant-step row loses to force errors. It is a reference, not a floor: BPTT tunes forces to reach the
target in fewer frames, which exact forces are not made for.

The stop rule is the library's, frame for frame (:func:`bptt_jax.relax.rollout`)::

    F = forces(X) on free atoms (fixed atoms never move)
    X_new = X + η F                                    one frame (counted, whatever happens next)
    non-finite X_new, or RMS |X_new − X_0| > diverge_distance   → diverged; X stays (the last good state)
    else X = X_new; RMS |X_new − X_old| < tol                  → converged
    at most max_frames frames; a structure without free atoms takes none

RMS is over free atoms. Forces are evaluated once per frame, in float64 with numpy (the library's rollouts
run in the model's precision, float32 by default). Losses are :func:`bptt_jax.losses.structure_loss` (Dq in
√amu·Å or position MSE in Å², minimum image) of the final positions against the targets.

``python -m bptt_jax.oracle DATA_DIR [--loss mse] [--max-frames 200]`` prints the row for a generated
dataset's test split (the first ``--n-test`` trajectories, unusable ones skipped, as the training pipeline
takes them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from bptt_jax.structures import Structure

CalculatorSource = Union["BaseCalculator", Callable[[], "BaseCalculator"]]  # noqa: F821

DEFAULT_STEP_GRID: tuple[float, ...] = (0.002, 0.003, 0.005, 0.007, 0.01, 0.02, 0.03, 0.05, 0.077, 0.1)


@dataclasses.dataclass(frozen=True)
class DescentOutcome:
    """One structure relaxed by :func:`descent_relax`.

    Attributes:
      positions: (n, 3) final positions, Å (the last good state for a diverged structure).
      frames: frames taken (a frame that diverged counts).
      converged: stopped by the movement tolerance.
      diverged: stopped by non-finite positions or a drift beyond ``diverge_distance``.
    """

    positions: np.ndarray
    frames: int
    converged: bool
    diverged: bool


@dataclasses.dataclass(frozen=True)
class OracleRow:
    """The oracle's relaxation of a set of structures at one constant step size.

    Attributes:
      step_size: η, Å²/eV.
      avg: mean loss over the structures (√amu·Å for Dq, Å² for MSE).
      per_structure: (S,) loss per structure, in input order.
      frames: (S,) frames each structure took.
      converged: (S,) stopped by the movement tolerance.
      diverged_mask: (S,) diverged (frozen at the last good state; their loss still counts in ``avg``).
      positions: S final positions, (n, 3) each, Å.
      seconds: time spent relaxing at this step size, s.
    """

    step_size: float
    avg: float
    per_structure: np.ndarray
    frames: np.ndarray
    converged: np.ndarray
    diverged_mask: np.ndarray
    positions: list = dataclasses.field(repr=False)
    seconds: float = 0.0

    @property
    def diverged(self) -> int:
        """Number of diverged structures."""
        return int(self.diverged_mask.sum())


def _rms(d: np.ndarray, free: np.ndarray) -> float:
    """RMS over free atoms of |d| (Å), as :func:`bptt_jax.relax.rms_movement`."""
    sq = np.sum(d[free] ** 2)
    return float(np.sqrt(sq / max(int(free.sum()), 1)))


def descent_relax(atoms, step_size: float, free: np.ndarray, *, tol: float = 1e-3, max_frames: int = 75,
                  diverge_distance: float = 5.0) -> DescentOutcome:
    """Relax ``atoms`` with its calculator's forces by ``X ← X + η F(X)`` under the library's stop rule.

    Args:
      atoms: an ``ase.Atoms`` with a calculator attached; its positions are the start and are left at the
        final state. Constraints are ignored: ``free`` says which atoms move.
      step_size: η, Å²/eV.
      free: (n,) atoms that move and count in the stop statistics.
      tol: stop when the RMS movement over free atoms in one frame is below this, Å.
      max_frames: frame budget.
      diverge_distance: RMS drift from the start (Å) beyond which the structure counts as diverged.
    """
    free = np.asarray(free, bool)
    start = atoms.get_positions()
    X = start.copy()
    frames, converged, diverged = 0, False, False
    if free.any():
        for _ in range(max_frames):
            atoms.positions = X
            F = atoms.get_forces(apply_constraint=False)
            X_new = X.copy()
            X_new[free] += step_size * F[free]
            frames += 1
            drift = _rms(X_new - start, free)
            if not np.all(np.isfinite(X_new[free])) or not drift <= diverge_distance:
                diverged = True
                break
            move = _rms(X_new - X, free)
            X = X_new
            if move < tol:
                converged = True
                break
    atoms.positions = X
    return DescentOutcome(X, frames, converged, diverged)


def _new_calculator(calculator: CalculatorSource):
    from ase.calculators.calculator import BaseCalculator

    return calculator if isinstance(calculator, BaseCalculator) else calculator()


def structure_losses(kind: str, structures: Sequence[Structure], targets: Sequence[np.ndarray],
                     positions: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """(S,) :func:`bptt_jax.losses.structure_loss` of ``positions`` (default: the starting positions, i.e.
    the unrelaxed loss) against ``targets``, in float64."""
    import jax

    from bptt_jax.losses import structure_loss
    from bptt_jax.structures import Batch

    positions = [s.positions for s in structures] if positions is None else positions
    with jax.enable_x64(True):
        batch = Batch.from_structures(list(structures), list(targets), buckets=None)
        pred = np.array(batch.positions)
        for i, p in enumerate(positions):
            pred[i, : len(p)] = p
        return np.asarray(_jit(structure_loss, 0)(kind, jax.numpy.asarray(pred), batch), np.float64)


@functools.lru_cache(maxsize=None)
def _jit(fn, *static_argnums):
    import jax

    return jax.jit(fn, static_argnums=static_argnums)


def _relax_structure(structure: Structure, calculator: CalculatorSource, step_grid: Sequence[float], tol: float,
                     max_frames: int, diverge_distance: float) -> tuple[list[DescentOutcome], list[float]]:
    """One structure at every step size, with one calculator; returns the outcomes and seconds per step size."""
    atoms = structure.to_atoms()
    atoms.set_constraint()  # descent_relax moves free atoms only
    atoms.calc = _new_calculator(calculator)
    outcomes, seconds = [], []
    for eta in step_grid:
        t = time.perf_counter()
        atoms.positions = structure.positions
        outcomes.append(descent_relax(atoms, float(eta), ~structure.fixed, tol=tol, max_frames=max_frames,
                                      diverge_distance=diverge_distance))
        seconds.append(time.perf_counter() - t)
    return outcomes, seconds


def oracle_rows(structures: Sequence[Structure], targets: Sequence[np.ndarray], calculator: CalculatorSource,
                step_grid: Sequence[float] = DEFAULT_STEP_GRID, *, loss: str = "dq", tol: float = 1e-3,
                max_frames: int = 75, diverge_distance: float = 5.0, workers: int = 1,
                progress: bool = False) -> list[OracleRow]:
    """Relax every structure at every step size of ``step_grid`` with the calculator's exact forces.

    Args:
      structures: starting structures (their ``fixed`` atoms never move).
      targets: (n, 3) reference relaxed positions per structure, Å (as ``Trajectory.relaxation_pair``).
      calculator: an ASE calculator factory (called once per structure, and the calculator reused for all
        its step sizes; :func:`oracle_calculator_for` gives one), or a calculator instance shared by all.
      step_grid: η values, Å²/eV.
      loss: ``"dq"`` or ``"mse"``.
      tol, max_frames, diverge_distance: the stop rule, as :func:`descent_relax`.
      workers: processes relaxing structures in parallel (``calculator`` must then be a picklable factory,
        as :func:`oracle_calculator_for`'s is). Each structure gets a fresh calculator from the factory, so
        the results do not depend on the number of workers.
      progress: a progress bar over structures.

    Returns:
      One :class:`OracleRow` per step size, in grid order. ``OracleRow.seconds`` adds up the time spent in
      each step size's relaxations (over all workers).
    """
    if len(structures) != len(targets):
        raise ValueError(f"{len(targets)} targets for {len(structures)} structures")
    if loss not in ("dq", "mse"):
        raise ValueError(f"unknown structural loss {loss!r}; expected 'dq' or 'mse'")
    from tqdm.auto import tqdm

    step_grid = [float(eta) for eta in step_grid]
    job = functools.partial(_relax_structure, calculator=calculator, step_grid=step_grid, tol=tol,
                            max_frames=max_frames, diverge_distance=diverge_distance)
    bar = tqdm(total=len(structures), desc="oracle", unit="structure", disable=not progress)
    results = []
    if workers > 1 and len(structures) > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(min(workers, len(structures)), mp_context=get_context("spawn")) as pool:
            for out in pool.map(job, structures):
                results.append(out)
                bar.update()
    else:
        for s in structures:
            results.append(job(s))
            bar.update()
    bar.close()
    rows = []
    for j, eta in enumerate(step_grid):
        outs = [r[0][j] for r in results]
        per = structure_losses(loss, structures, targets, [o.positions for o in outs])
        rows.append(OracleRow(eta, float(per.mean()), per, np.array([o.frames for o in outs], int),
                              np.array([o.converged for o in outs], bool), np.array([o.diverged for o in outs], bool),
                              [o.positions for o in outs], round(sum(r[1][j] for r in results), 3)))
    return rows


def best_row(rows: Sequence[OracleRow]) -> OracleRow:
    """The row with the lowest average loss (the constant-step baseline's rule: best of the grid)."""
    if not rows:
        raise ValueError("no oracle rows")
    return min(rows, key=lambda r: r.avg)


def best_step_size(rows: Sequence[OracleRow]) -> float:
    """η (Å²/eV) of :func:`best_row`."""
    return best_row(rows).step_size


# ---------------------------------------------------------------------------------------------------
# Generated datasets


def _read_manifest(source: Union[str, Path, dict]) -> tuple[dict, Optional[Path]]:
    from bptt_jax.data.generate import MANIFEST

    if isinstance(source, dict):
        return source, None
    path = Path(source)
    manifest = path / MANIFEST if path.is_dir() else path
    if manifest.name != MANIFEST or not manifest.is_file():
        raise ValueError(f"{path}: no {MANIFEST}, so not a dataset made by `python -m bptt_jax.data generate`; "
                         f"no oracle is known for user files")
    return json.loads(manifest.read_text()), manifest.parent


def oracle_calculator_for(source: Union[str, Path, dict]) -> Callable[[], Any]:
    """A factory of the ASE calculator that generated a dataset (fresh calculator per call).

    Args:
      source: a generated dataset's directory, its ``manifest.json``, or the manifest as a dict.

    Raises:
      ValueError: (one line) the source is not a generated dataset, or names an unknown generator.
    """
    from bptt_jax.data.generate import PARAMS, generator_calculator, make_params

    manifest, _ = _read_manifest(source)
    name = manifest.get("generator")
    if name not in PARAMS:
        raise ValueError(f"manifest names generator {name!r}, not one of {sorted(PARAMS)}; no oracle is known")
    params = make_params(name, **{k: v for k, v in manifest.get("params", {}).items() if k != "n"})
    oracle = manifest.get("oracle")
    return functools.partial(generator_calculator, name, params, None if oracle == "default" else oracle)


def load_test_pairs(data_dir: Union[str, Path], n_test: int = 100) -> tuple[list[Structure], list[np.ndarray]]:
    """The test split of a generated dataset as the training pipeline takes it: the first ``n_test``
    trajectories in manifest order, then the unusable ones among them skipped (≤ 2 frames); returns
    (starting structures, target positions)."""
    from bptt_jax.data.readers import read_trajectories
    from bptt_jax.data.trajectory import filter_usable

    manifest, root = _read_manifest(data_dir)
    if root is None:
        raise ValueError("load_test_pairs needs a dataset directory, not a manifest dict")
    records = (manifest.get("trajectories") or [])[:n_test]
    trajs = (t for rec in records for t in read_trajectories(root / rec["file"]))
    pairs = [t.relaxation_pair() for t in filter_usable(trajs)]
    return [s for s, _ in pairs], [x for _, x in pairs]


def format_rows(rows: Sequence[OracleRow], unrelaxed: float, loss: str) -> str:
    """A markdown table of the rows, the unrelaxed loss and the best row's reduction."""
    best = best_row(rows)
    lines = [f"| η (Å²/eV) | Avg {loss} | mean frames | converged | diverged | s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mark = " (best)" if r is best else ""
        lines.append(f"| {r.step_size:g}{mark} | {r.avg:.4f} | {r.frames.mean():.1f} | {int(r.converged.sum())} "
                     f"| {r.diverged} | {r.seconds:.1f} |")
    lines.append(f"unrelaxed Avg {loss} {unrelaxed:.4f}; oracle best η={best.step_size:g}: {best.avg:.4f} "
                 f"({100 * (1 - best.avg / unrelaxed):.1f}% lower)" if unrelaxed > 0 else "")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bptt_jax.oracle", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="a dataset made by `python -m bptt_jax.data generate`")
    parser.add_argument("--loss", default="dq", choices=["dq", "mse"])
    parser.add_argument("--max-frames", type=int, default=75, help="frame budget (catalysts: 200)")
    parser.add_argument("--tol", type=float, default=1e-3, help="stop tolerance, Å RMS movement per frame")
    parser.add_argument("--diverge-distance", type=float, default=5.0, help="Å RMS drift from the start")
    parser.add_argument("--n-test", type=int, default=100, help="the first N trajectories (the test split)")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_STEP_GRID), help="step sizes η")
    parser.add_argument("--workers", type=int, default=1, help="processes relaxing structures in parallel")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        calc = oracle_calculator_for(args.data_dir)
        structures, targets = load_test_pairs(args.data_dir, args.n_test)
        if not structures:
            raise ValueError(f"{args.data_dir}: no usable trajectory among the first {args.n_test}")
        t0 = time.time()
        rows = oracle_rows(structures, targets, calc, args.grid, loss=args.loss, tol=args.tol,
                           max_frames=args.max_frames, diverge_distance=args.diverge_distance,
                           workers=args.workers, progress=not args.quiet)
        wall = time.time() - t0
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    unrelaxed = float(structure_losses(args.loss, structures, targets).mean())
    print(f"{args.data_dir}: {len(structures)} structures, {sum(len(s) for s in structures) / len(structures):.1f} "
          f"atoms on average ({sum(int((~s.fixed).sum()) for s in structures) / len(structures):.1f} free), "
          f"{wall:.1f} s")
    print(format_rows(rows, unrelaxed, args.loss))
    if args.json:
        best = best_row(rows)
        Path(args.json).write_text(json.dumps({
            "data_dir": str(args.data_dir), "n": len(structures), "loss": args.loss, "tol": args.tol,
            "max_frames": args.max_frames, "unrelaxed": unrelaxed, "best_step_size": best.step_size,
            "seconds": round(wall, 2),
            "rows": [{"step_size": r.step_size, "avg": r.avg, "mean_frames": float(r.frames.mean()),
                      "converged": int(r.converged.sum()), "diverged": r.diverged,
                      "diverged_index": np.flatnonzero(r.diverged_mask).tolist(), "seconds": r.seconds,
                      "per_structure": r.per_structure.tolist()} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
