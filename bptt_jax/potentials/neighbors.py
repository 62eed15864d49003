"""Host-side neighbour lists with fixed, padded shapes for jitted JAX potentials.

A :class:`Neighbors` holds, for every atom ``i``, up to ``M`` neighbour slots ``(j, shift)`` such that the
neighbour's position is ``positions[j] + shift`` (``shift`` is a Cartesian lattice translation, Å). Slots
beyond an atom's real neighbour count are padding: ``mask = False``, ``idx = i``, ``shift = 0``, so their
distance is exactly zero and the potentials must (and do) guard them with the double-``where`` trick.

The list is built on the host with :func:`ase.neighborlist.primitive_neighbor_list` (correct for general
triclinic cells, mixed periodicity and cells smaller than the cutoff, where an atom meets several images of
the same neighbour, or of itself). :class:`NeighborList` adds a Verlet skin: pairs are listed out to
``cutoff + skin`` and the list is rebuilt only when some atom has moved more than ``skin / 2`` since the
last build (or the cell, periodicity or atom count changed). Shapes are rounded up (``N`` and ``M`` to
multiples of ``multiple``) and ``M`` never shrinks, so ``jax.jit`` compiles once per structure size instead
of once per step.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import numpy as np
from ase.neighborlist import primitive_neighbor_list

Array = jax.Array


@flax.struct.dataclass
class Neighbors:
    """Padded neighbour slots of every atom (a JAX pytree).

    Attributes:
      idx: (N, M) int32 index of the neighbour atom (``i`` itself in padding slots).
      shift: (N, M, 3) Cartesian lattice translation to add to ``positions[idx]``, Å.
      mask: (N, M) bool, True for real neighbour slots.
    """

    idx: Array
    shift: Array
    mask: Array


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``max(n, 1)``."""
    return int(-(-max(n, 1) // multiple) * multiple)


def build_neighbors(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float,
                    n_pad: Optional[int] = None, max_neighbors: Optional[int] = None,
                    multiple: int = 8) -> Neighbors:
    """All pairs closer than ``cutoff``, as padded numpy arrays.

    Args:
      positions: (n, 3) Cartesian positions, Å (need not be wrapped into the cell).
      cell: (3, 3) lattice vectors as rows, Å; rows along non-periodic axes may be zero.
      pbc: (3,) periodic flags.
      cutoff: pair cutoff, Å.
      n_pad: number of atom rows ``N >= n`` (extra rows are padding atoms with no neighbours);
        defaults to ``n``.
      max_neighbors: minimum slot count ``M``; grown to fit the densest atom, then rounded up.
      multiple: ``M`` is rounded up to a multiple of this.

    Returns:
      :class:`Neighbors` with numpy arrays of shapes (N, M), (N, M, 3), (N, M).
    """
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    n = len(positions)
    n_pad = n if n_pad is None else int(n_pad)
    if n_pad < n:
        raise ValueError(f"n_pad={n_pad} < {n} atoms")
    if n:
        i, j, shift_int = primitive_neighbor_list("ijS", pbc, cell, positions, float(cutoff),
                                                  self_interaction=False)
    else:
        i = j = np.zeros(0, int)
        shift_int = np.zeros((0, 3), int)
    counts = np.bincount(i, minlength=n_pad)
    m = round_up(max(int(counts.max(initial=0)), int(max_neighbors or 0)), multiple)

    # ASE returns pairs sorted by i; the slot of a pair is its rank within its i block.
    order = np.argsort(i, kind="stable")
    i, j, shift_int = i[order], j[order], shift_int[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(i)) - starts[i]

    idx = np.repeat(np.arange(n_pad, dtype=np.int32)[:, None], m, axis=1)
    shift = np.zeros((n_pad, m, 3))
    mask = np.zeros((n_pad, m), bool)
    idx[i, slot] = j
    shift[i, slot] = shift_int @ cell
    mask[i, slot] = True
    return Neighbors(idx=idx, shift=shift, mask=mask)


class NeighborList:
    """A Verlet neighbour list that rebuilds itself only when needed.

    Args:
      cutoff: interaction cutoff of the potential, Å.
      skin: extra distance listed beyond ``cutoff``, Å. The list stays exact while every atom has moved
        less than ``skin / 2`` since the last build.
      multiple: shapes are rounded up to multiples of this, to limit recompilation.
    """

    def __init__(self, cutoff: float, skin: float = 0.5, multiple: int = 8):
        if skin < 0:
            raise ValueError(f"negative skin {skin}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.multiple = int(multiple)
        self.max_neighbors = 0  # slot capacity; only grows, so shapes stay stable
        self.n_builds = 0
        self._ref_positions: Optional[np.ndarray] = None
        self._cell: Optional[np.ndarray] = None
        self._pbc: Optional[np.ndarray] = None
        self.neighbors: Optional[Neighbors] = None

    def needs_rebuild(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        """Whether the current list may miss a pair for these positions."""
        if self._ref_positions is None or self._ref_positions.shape != positions.shape:
            return True
        if not (np.array_equal(self._cell, cell) and np.array_equal(self._pbc, pbc)):
            return True
        # Two atoms can approach by at most twice the largest displacement, so a pair now inside
        # `cutoff` was inside `cutoff + skin` at the last build as long as that stays below `skin`.
        disp2 = np.sum((positions - self._ref_positions) ** 2, axis=1)
        return bool(disp2.max(initial=0.0) > (0.5 * self.skin) ** 2)

    def update(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
               n_pad: Optional[int] = None) -> tuple[Neighbors, bool]:
        """Neighbours valid at ``positions``, rebuilding the list if needed.

        Args:
          positions: (n, 3) Cartesian positions, Å.
          cell: (3, 3) lattice vectors as rows, Å.
          pbc: (3,) periodic flags.
          n_pad: atom rows of the returned arrays (see :func:`build_neighbors`).

        Returns:
          ``(neighbors, rebuilt)``: numpy :class:`Neighbors` and whether it was rebuilt by this call.
        """
        positions = np.asarray(positions, np.float64).reshape(-1, 3)
        cell = np.asarray(cell, np.float64).reshape(3, 3)
        pbc = np.broadcast_to(np.asarray(pbc, bool), (3,)).copy()
        n_pad = len(positions) if n_pad is None else int(n_pad)
        stale = self.neighbors is None or self.neighbors.idx.shape[0] != n_pad
        if not (stale or self.needs_rebuild(positions, cell, pbc)):
            return self.neighbors, False
        nbrs = build_neighbors(positions, cell, pbc, self.cutoff + self.skin, n_pad=n_pad,
                               max_neighbors=self.max_neighbors, multiple=self.multiple)
        self.max_neighbors = nbrs.idx.shape[1]
        self._ref_positions, self._cell, self._pbc = positions.copy(), cell, pbc
        self.neighbors = nbrs
        self.n_builds += 1
        return nbrs, True
