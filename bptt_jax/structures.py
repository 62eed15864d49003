"""Batches of atomic structures as a JAX pytree, padding to size buckets, and periodic geometry.

Host side, a structure is a :class:`Structure` (numpy arrays). On device, many structures travel together
as one :class:`Batch` whose arrays are padded to ``(B, N, ...)``: ``N`` is rounded up to a *size bucket*
and ``B`` to a fixed batch size, so a dataset with many atom counts compiles a handful of shapes, not one
per count. Padding atoms carry ``atom_mask = False``; padding structures have no real atom at all.

Units: positions and cells in Å, masses in amu, forces in eV/Å.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_masses

Array = jax.Array

# Padded atom counts. Structures are padded to the smallest bucket that holds them; above the last bucket,
# counts are rounded up to a multiple of 64.
# Steps of about 1/8 above 64 atoms: a 65-atom interstitial cell pads to 72, not 96 (attention is O(N²)).
DEFAULT_BUCKETS: tuple[int, ...] = (8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 144, 160, 192, 224,
                                    256, 288, 320, 384, 448, 512)


def bucket_size(n_atoms: int, buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> int:
    """Smallest bucket holding ``n_atoms`` atoms (``buckets=None`` means no padding)."""
    if n_atoms < 0:
        raise ValueError(f"negative atom count {n_atoms}")
    if not buckets:
        return max(n_atoms, 1)
    for b in sorted(buckets):
        if n_atoms <= b:
            return int(b)
    return int(-(-n_atoms // 64) * 64)


@dataclasses.dataclass
class Structure:
    """One atomic structure on the host.

    Attributes:
      positions: (n, 3) Cartesian coordinates, Å.
      numbers: (n,) atomic numbers.
      cell: (3, 3) lattice vectors as rows, Å (zeros along non-periodic axes are allowed).
      pbc: (3,) periodic flags.
      masses: (n,) amu; defaults to standard atomic masses.
      fixed: (n,) atoms held in place (OC20 ``fixed``); defaults to none.
      forces: optional (n, 3) reference forces at ``positions``, eV/Å.
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3, bool))
    masses: Optional[np.ndarray] = None
    fixed: Optional[np.ndarray] = None
    forces: Optional[np.ndarray] = None

    def __post_init__(self):
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.numbers = np.asarray(self.numbers, dtype=np.int32).reshape(-1)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)).copy()
        n = len(self.numbers)
        if self.positions.shape[0] != n:
            raise ValueError(f"{self.positions.shape[0]} positions for {n} atomic numbers")
        if self.masses is None:
            self.masses = atomic_masses[self.numbers]
        self.masses = np.asarray(self.masses, dtype=np.float64).reshape(n)
        self.fixed = np.zeros(n, bool) if self.fixed is None else np.asarray(self.fixed, bool).reshape(n)
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(n, 3)

    def __len__(self) -> int:
        return len(self.numbers)

    @classmethod
    def from_atoms(cls, atoms, forces: Optional[np.ndarray] = None) -> "Structure":
        """From an ``ase.Atoms``; ``FixAtoms`` constraints become the fixed mask."""
        from ase.constraints import FixAtoms

        fixed = np.zeros(len(atoms), bool)
        for c in atoms.constraints:
            if isinstance(c, FixAtoms):
                fixed[c.get_indices()] = True
        return cls(atoms.get_positions(), atoms.get_atomic_numbers(), np.asarray(atoms.get_cell()),
                   atoms.get_pbc(), atoms.get_masses(), fixed, forces)

    def to_atoms(self):
        """As an ``ase.Atoms`` (fixed atoms become a ``FixAtoms`` constraint)."""
        from ase import Atoms
        from ase.constraints import FixAtoms

        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc,
                      masses=self.masses)
        if self.fixed.any():
            atoms.set_constraint(FixAtoms(indices=np.flatnonzero(self.fixed)))
        return atoms


def complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Replace degenerate lattice vectors along non-periodic axes so the cell is invertible.

    A molecule or slab may come with a zero vector along a non-periodic axis; fractional coordinates are
    then undefined. Any vector completing a basis works there, because nothing wraps along that axis.
    """
    cell = np.array(cell, dtype=np.float64)
    for _ in range(3):
        if abs(np.linalg.det(cell)) > 1e-8:
            return cell
        norms = np.linalg.norm(cell, axis=1)
        bad = [i for i in range(3) if not pbc[i] and norms[i] < 1e-8]
        if not bad:
            # Only non-periodic axes may be replaced; a periodic axis must have a real lattice vector.
            bad = [i for i in range(3) if not pbc[i]]
            if not bad:
                raise ValueError(f"singular periodic cell {cell.tolist()}")
        i = bad[0]
        others = np.delete(cell, i, axis=0)
        # Orthogonal complement of the span of the remaining rows (SVD handles rank 0, 1 or 2).
        _, s, vt = np.linalg.svd(others)
        rank = int((s > 1e-8).sum())
        cell[i] = vt[rank] * max(norms.max(), 1.0) if rank < 3 else np.eye(3)[i]
    if abs(np.linalg.det(cell)) <= 1e-8:
        raise ValueError(f"cannot complete cell {cell.tolist()} with pbc {pbc.tolist()}")
    return cell


@flax.struct.dataclass
class Batch:
    """Padded structures on device. All fields are arrays; ``B`` structures of ``N`` (padded) atoms.

    Attributes:
      positions: (B, N, 3) Å.
      numbers: (B, N) int32 atomic numbers (0 for padding).
      masses: (B, N) amu (0 for padding).
      cell: (B, 3, 3) lattice vectors as rows, Å; always invertible (see :func:`complete_cell`).
      pbc: (B, 3) bool.
      atom_mask: (B, N) bool, real atoms.
      fixed_mask: (B, N) bool, atoms that never move (OC20 ``fixed``); False for padding.
      target_positions: optional (B, N, 3) relaxed positions to reach, Å.
      forces: optional (B, N, 3) reference forces at ``positions``, eV/Å.
    """

    positions: Array
    numbers: Array
    masses: Array
    cell: Array
    pbc: Array
    atom_mask: Array
    fixed_mask: Array
    target_positions: Optional[Array] = None
    forces: Optional[Array] = None

    @property
    def free_mask(self) -> Array:
        """(B, N) atoms that move during relaxation and count in structural losses."""
        return self.atom_mask & ~self.fixed_mask

    @property
    def structure_mask(self) -> Array:
        """(B,) structures with at least one real atom (False for batch padding)."""
        return self.atom_mask.any(axis=-1)

    @property
    def n_atoms(self) -> Array:
        """(B,) real atom counts."""
        return self.atom_mask.sum(axis=-1)

    def without(self, drop: Array) -> "Batch":
        """The batch with the structures ``drop`` (B,) bool made empty slots, exactly as :meth:`from_structures`
        pads a batch (no atom, zero positions and masses, identity cell): the same shapes, so the same
        compilation, as the batch of the other structures alone. Traceable."""
        def empty(x, fill):
            if x is None:
                return None
            m = drop.reshape(drop.shape + (1,) * (x.ndim - 1))
            return jnp.where(m, jnp.asarray(fill, x.dtype), x)

        eye = jnp.eye(3, dtype=self.cell.dtype)
        return self.replace(positions=empty(self.positions, 0), numbers=empty(self.numbers, 0),
                            masses=empty(self.masses, 0), cell=empty(self.cell, eye), pbc=empty(self.pbc, False),
                            atom_mask=empty(self.atom_mask, False), fixed_mask=empty(self.fixed_mask, False),
                            target_positions=empty(self.target_positions, 0), forces=empty(self.forces, 0))

    @classmethod
    def from_structures(
        cls,
        structures: Sequence[Structure],
        targets: Optional[Sequence[Structure | np.ndarray]] = None,
        *,
        n_atoms: Optional[int] = None,
        batch_size: Optional[int] = None,
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
        with_forces: bool = False,
    ) -> "Batch":
        """Pad host structures into one batch.

        Args:
          structures: the starting structures.
          targets: relaxed structures (or (n, 3) position arrays), same atom order as ``structures``.
          n_atoms: padded atom count; default the bucket of the largest structure.
          batch_size: padded batch size (extra slots are empty structures); default ``len(structures)``.
          buckets: size buckets used when ``n_atoms`` is not given.
          with_forces: include reference forces (every structure must carry them).
        """
        if not structures:
            raise ValueError("no structures to batch")
        largest = max(len(s) for s in structures)
        n = bucket_size(largest, buckets) if n_atoms is None else int(n_atoms)
        if largest > n:
            raise ValueError(f"a structure has {largest} atoms, more than the padded size {n}")
        b = len(structures) if batch_size is None else int(batch_size)
        if len(structures) > b:
            raise ValueError(f"{len(structures)} structures do not fit batch_size={b}")

        pos = np.zeros((b, n, 3))
        num = np.zeros((b, n), np.int32)
        mass = np.zeros((b, n))
        cell = np.tile(np.eye(3), (b, 1, 1))
        pbc = np.zeros((b, 3), bool)
        amask = np.zeros((b, n), bool)
        fmask = np.zeros((b, n), bool)
        tgt = np.zeros((b, n, 3)) if targets is not None else None
        frc = np.zeros((b, n, 3)) if with_forces else None
        if targets is not None and len(targets) != len(structures):
            raise ValueError(f"{len(targets)} targets for {len(structures)} structures")
        for i, s in enumerate(structures):
            k = len(s)
            pos[i, :k] = s.positions
            num[i, :k] = s.numbers
            mass[i, :k] = s.masses
            cell[i] = complete_cell(s.cell, s.pbc)
            pbc[i] = s.pbc
            amask[i, :k] = True
            fmask[i, :k] = s.fixed
            # Padding atoms sit on the first real atom: finite features, and never at a distance that
            # a model would treat specially. They are masked everywhere anyway.
            if k:
                pos[i, k:] = s.positions[0]
            if targets is not None:
                t = targets[i]
                t = t.positions if isinstance(t, Structure) else np.asarray(t, np.float64)
                if t.shape != (k, 3):
                    raise ValueError(f"target {i} has shape {t.shape}, structure has {k} atoms")
                tgt[i, :k] = t
                if k:
                    tgt[i, k:] = t[0]
            if with_forces:
                if s.forces is None:
                    raise ValueError(f"structure {i} has no reference forces")
                frc[i, :k] = s.forces

        fdt = jax.dtypes.canonicalize_dtype(np.float64)
        as_f = lambda a: None if a is None else jnp.asarray(a, dtype=fdt)  # noqa: E731
        return cls(positions=as_f(pos), numbers=jnp.asarray(num), masses=as_f(mass), cell=as_f(cell),
                   pbc=jnp.asarray(pbc), atom_mask=jnp.asarray(amask), fixed_mask=jnp.asarray(fmask),
                   target_positions=as_f(tgt), forces=as_f(frc))

    def to_structures(self, positions: Optional[Array] = None) -> list[Structure]:
        """Unpad back to host structures (optionally with other positions, e.g. relaxed ones)."""
        pos = np.asarray(self.positions if positions is None else positions)
        amask = np.asarray(self.atom_mask)
        out = []
        for i in range(pos.shape[0]):
            k = int(amask[i].sum())
            if k == 0:
                continue
            out.append(Structure(pos[i, :k], np.asarray(self.numbers[i, :k]), np.asarray(self.cell[i]),
                                 np.asarray(self.pbc[i]), np.asarray(self.masses[i, :k]),
                                 np.asarray(self.fixed_mask[i, :k])))
        return out


# 27 integer lattice shifts {-1, 0, 1}^3.
_SHIFTS = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], np.float64)


def periodic_frame(cell: Array, pbc: Array) -> Array:
    """The cell with each non-periodic lattice vector replaced by its part orthogonal to the periodic ones.

    Along periodic axes nothing changes; along non-periodic axes nothing wraps, so only the direction
    matters, and making it orthogonal decouples the periodic search from the out-of-plane component
    (a slab with a tilted c vector would otherwise be wrapped to a non-shortest in-plane image).
    """
    periodic_rows = jnp.where(pbc[..., :, None], cell, 0.0)
    gram = jnp.einsum("...ik,...jk->...ij", periodic_rows, periodic_rows)
    # Projector onto the span of the periodic rows: A^T (A A^T)^+ A.
    proj = jnp.einsum("...ki,...kl,...lj->...ij", periodic_rows, jnp.linalg.pinv(gram, hermitian=True),
                      periodic_rows)
    orth = cell - jnp.einsum("...ij,...jk->...ik", cell, proj)
    return jnp.where(pbc[..., :, None], cell, orth)


def minimum_image(dR: Array, cell: Array, pbc: Array) -> Array:
    """Shortest periodic image of displacement vectors, for general (triclinic) cells and mixed pbc.

    The displacement is wrapped to fractional coordinates in [-0.5, 0.5] along periodic axes, then the
    shortest of its 27 neighbouring images is taken: for skewed cells plain rounding of fractional
    coordinates is not the minimum image, the neighbour search is (for cells that are not pathologically
    skewed, e.g. Niggli-reduced ones). Non-periodic axes never wrap.

    Args:
      dR: (..., N, 3) displacements, Å.
      cell: (..., 3, 3) lattice vectors as rows, Å (invertible).
      pbc: (..., 3) periodic flags.

    Returns:
      (..., N, 3) minimum-image displacements, Å.
    """
    frame = jax.lax.stop_gradient(periodic_frame(cell, pbc))
    frac = jnp.einsum("...ni,...ij->...nj", dR, jnp.linalg.inv(frame))
    periodic = pbc[..., None, :]
    frac = frac - jnp.where(periodic, jnp.round(jax.lax.stop_gradient(frac)), 0.0)
    shifts = jnp.asarray(_SHIFTS, frac.dtype)  # (27, 3)
    cand = frac[..., None, :] + jnp.where(periodic[..., None, :], shifts, 0.0)  # (..., N, 27, 3)
    cart = jnp.einsum("...nsi,...ij->...nsj", cand, frame)
    best = jnp.argmin(jnp.sum(jax.lax.stop_gradient(cart) ** 2, axis=-1), axis=-1)  # (..., N)
    return jnp.take_along_axis(cart, best[..., None, None], axis=-2)[..., 0, :]


def displacement(R_to: Array, R_from: Array, cell: Array, pbc: Array) -> Array:
    """Minimum-image ``R_to - R_from`` for (..., N, 3) positions in the same cell."""
    return minimum_image(R_to - R_from, cell, pbc)


def fractional(R: Array, cell: Array) -> Array:
    """Fractional coordinates of (..., N, 3) Cartesian positions in (..., 3, 3) cells."""
    return jnp.einsum("...ni,...ij->...nj", R, jnp.linalg.inv(cell))


def safe_norm(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """Euclidean norm with a finite (zero) gradient at x = 0 (padding atoms sit on top of each other)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    return safe_sqrt(sq)


def safe_sqrt(x: Array) -> Array:
    """sqrt with gradient 0 instead of inf at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)
