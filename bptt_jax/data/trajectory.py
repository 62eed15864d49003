"""The one record type every reader and generator produces: a relaxation :class:`Trajectory`.

A trajectory is the ordered ionic steps of one relaxation (DFT or a real potential): positions, forces and
energies per frame, with the atoms' numbers, masses, cell(s), pbc, fixed mask and OC20 tags. Readers
report bad records with :class:`DataError`, whose message is one line naming the file and the record.

Conventions (paper App. E): the first ``n_test`` usable trajectories are the test split; trajectories
with at most two frames or with a changing atom count are skipped and counted. A *changing cell* (MPtrj
relaxations change the lattice) is kept; bptt-jax relaxes positions in a fixed cell, so the target of a
variable-cell trajectory is its final structure's fractional coordinates placed in the initial cell
(:meth:`Trajectory.relaxation_pair`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from ase.data import atomic_masses, chemical_symbols

from bptt_jax.structures import Structure


class DataError(ValueError):
    """A bad record in an input file. ``str(err)`` is one line: ``file: record: reason``."""

    def __init__(self, source: str, record: object, reason: str, kind: str = "bad_record"):
        self.source, self.record, self.reason, self.kind = str(source), record, reason, kind
        where = f"{self.source}: record {record}" if record is not None else self.source
        super().__init__(f"{where}: {reason}")


@dataclasses.dataclass
class Trajectory:
    """One relaxation, frame by frame.

    Attributes:
      positions: (T, n, 3) Å.
      numbers: (n,) atomic numbers.
      cell: (T, 3, 3) lattice vectors as rows per frame, Å.
      pbc: (3,) periodic flags.
      forces: (T, n, 3) eV/Å, or None when the source has none.
      energy: (T,) eV, or None.
      masses: (n,) amu (standard atomic masses by default).
      fixed: (n,) atoms held in place.
      tags: (n,) OC20 tags (0 subsurface, 1 surface, 2 adsorbate); zeros when unknown.
      id: identifier (file stem, mp-id/task, OC20 sid, ...).
      source: where it came from (file path and record), for messages.
      endpoints_only: the frames are only the initial and the relaxed structure (OC20 IS2RE/IS2RS
        LMDB records), not every ionic step; the minimum-length rule does not apply to them.
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    forces: Optional[np.ndarray] = None
    energy: Optional[np.ndarray] = None
    masses: Optional[np.ndarray] = None
    fixed: Optional[np.ndarray] = None
    tags: Optional[np.ndarray] = None
    id: str = ""
    source: str = ""
    endpoints_only: bool = False

    def __post_init__(self):
        where = self.source or self.id or "trajectory"
        self.positions = np.asarray(self.positions, np.float64)
        if self.positions.ndim != 3 or self.positions.shape[-1] != 3:
            raise DataError(where, None, f"positions must be (frames, atoms, 3), got {self.positions.shape}")
        t, n, _ = self.positions.shape
        self.numbers = np.asarray(self.numbers, np.int32).reshape(-1)
        if self.numbers.shape != (n,):
            raise DataError(where, None, f"{len(self.numbers)} atomic numbers for {n} atoms")
        if n and (self.numbers.min() < 1 or self.numbers.max() >= len(chemical_symbols)):
            bad = self.numbers[(self.numbers < 1) | (self.numbers >= len(chemical_symbols))][0]
            raise DataError(where, None, f"unknown element with atomic number {bad}")
        cell = np.asarray(self.cell, np.float64)
        self.cell = np.broadcast_to(cell.reshape(-1, 3, 3), (t, 3, 3)).copy() if cell.size in (9, 9 * t) else cell
        if self.cell.shape != (t, 3, 3):
            raise DataError(where, None, f"cell must be (3, 3) or (frames, 3, 3), got {cell.shape}")
        self.pbc = np.broadcast_to(np.asarray(self.pbc, bool), (3,)).copy()
        if self.forces is not None:
            self.forces = np.asarray(self.forces, np.float64)
            if self.forces.shape != self.positions.shape:
                raise DataError(where, None, f"forces {self.forces.shape} do not match positions {self.positions.shape}")
        if self.energy is not None:
            self.energy = np.asarray(self.energy, np.float64).reshape(-1)
            if self.energy.shape != (t,):
                raise DataError(where, None, f"{len(self.energy)} energies for {t} frames")
        self.masses = atomic_masses[self.numbers] if self.masses is None else np.asarray(self.masses, np.float64)
        self.fixed = np.zeros(n, bool) if self.fixed is None else np.asarray(self.fixed, bool).reshape(n)
        self.tags = np.zeros(n, np.int32) if self.tags is None else np.asarray(self.tags, np.int32).reshape(n)
        for name, values in (("coordinates", self.positions), ("cell", self.cell), ("forces", self.forces),
                             ("energy", self.energy)):
            if values is not None and not np.all(np.isfinite(values)):
                bad = int(np.argwhere(~np.isfinite(values.reshape(t, -1)))[0, 0])
                raise DataError(where, None, f"non-finite {name} at frame {bad}")
        if self.masses.shape != (n,) or not np.all(np.isfinite(self.masses) & (self.masses > 0)):
            raise DataError(where, None, f"masses must be {n} positive numbers (amu)")
        if self.pbc.any():
            from bptt_jax.structures import complete_cell

            for i in range(t):
                try:
                    complete_cell(self.cell[i], self.pbc)
                except (ValueError, np.linalg.LinAlgError):
                    raise DataError(where, None, f"degenerate periodic cell at frame {i}: "
                                                 f"{np.round(self.cell[i], 6).tolist()}") from None

    @property
    def n_frames(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[1]

    @property
    def cell_changes(self) -> bool:
        return bool(np.abs(self.cell - self.cell[0]).max() > 1e-6)

    def frame(self, i: int) -> Structure:
        """Frame ``i`` as a :class:`Structure` (with its reference forces when present)."""
        return Structure(self.positions[i], self.numbers, self.cell[i], self.pbc, self.masses, self.fixed,
                         None if self.forces is None else self.forces[i])

    @property
    def initial(self) -> Structure:
        return self.frame(0)

    @property
    def final(self) -> Structure:
        return self.frame(self.n_frames - 1)

    def relaxation_pair(self) -> tuple[Structure, np.ndarray]:
        """The starting structure and the target positions (n, 3) to relax it to, in the initial cell.

        The target is the final frame as the nearest periodic image of each starting atom (DFT codes
        may wrap atoms back into the cell); when the cell changes during the relaxation, the final
        fractional coordinates are placed in the initial cell.
        """
        start = self.initial
        cell0 = self.cell[0]
        if not self.pbc.any():
            return start, self.positions[-1].copy()
        from bptt_jax.structures import complete_cell

        c0 = complete_cell(cell0, self.pbc)
        cf = complete_cell(self.cell[-1], self.pbc)
        f0 = np.linalg.solve(c0.T, self.positions[0].T).T
        ff = np.linalg.solve(cf.T, self.positions[-1].T).T
        delta = ff - f0
        delta[:, self.pbc] -= np.round(delta[:, self.pbc])
        return start, (f0 + delta) @ c0

    def to_atoms_list(self):
        """Frames as ``ase.Atoms`` with a SinglePointCalculator holding energy and forces."""
        from ase.calculators.singlepoint import SinglePointCalculator

        out = []
        for i in range(self.n_frames):
            atoms = self.frame(i).to_atoms()
            atoms.set_tags(self.tags)
            e = None if self.energy is None else float(self.energy[i])
            f = None if self.forces is None else self.forces[i]
            if e is not None or f is not None:
                atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
            out.append(atoms)
        return out


@dataclasses.dataclass
class SkipLog:
    """Records skipped and counted: reason → count, plus the first few messages."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    messages: list[str] = dataclasses.field(default_factory=list)
    keep: int = 20

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.messages) < self.keep:
            self.messages.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipLog") -> None:
        self.counts.update(other.counts)
        self.messages.extend(other.messages[: max(0, self.keep - len(self.messages))])


def unusable_reason(traj: Trajectory, min_frames: int = 3) -> Optional[str]:
    """Why a trajectory cannot be used for BPTT (None if it can): too few frames (paper: length ≤ 2)."""
    if traj.n_frames < (2 if traj.endpoints_only else min_frames):
        return f"only {traj.n_frames} frame(s)"
    if traj.n_atoms == 0:
        return "no atoms"
    return None


def filter_usable(trajs: Iterable[Trajectory], skipped: Optional[SkipLog] = None,
                  min_frames: int = 3) -> Iterator[Trajectory]:
    """Yield the usable trajectories, counting the rest in ``skipped``."""
    for traj in trajs:
        reason = unusable_reason(traj, min_frames)
        if reason is None:
            yield traj
        elif skipped is not None:
            skipped.add("too_short" if "frame" in reason else "empty", f"{traj.source or traj.id}: {reason}")


def split(trajs: Sequence[Trajectory], n_test: int = 100) -> tuple[list[Trajectory], list[Trajectory]]:
    """(train, test): the first ``n_test`` trajectories are the test split (paper App. E)."""
    trajs = list(trajs)
    return trajs[n_test:], trajs[:n_test]
