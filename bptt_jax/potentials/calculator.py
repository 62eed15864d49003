"""An ASE calculator around a JAX potential, computed in float64.

The rest of the library runs in float32, so the calculator never flips JAX's global precision: every
array it creates and every call it makes runs inside ``jax.enable_x64(True)``, which is scoped to the
``with`` block (and thread).
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from bptt_jax.potentials.base import Potential
from bptt_jax.potentials.neighbors import Neighbors, NeighborList, round_up

DEFAULT_SKIN = 0.5  # Å; a list rebuild every ~0.25 Å of motion, and few padded neighbours


@partial(jax.jit, static_argnums=0)
def energies_and_forces(potential: Potential, positions: jax.Array, species: jax.Array,
                        nbrs: Neighbors) -> tuple[jax.Array, jax.Array]:
    """Per-atom energies and forces of a potential, jitted (the potential is a static, hashable argument).

    Args:
      potential: the potential (calculators with equal potentials share compiled code).
      positions: (N, 3) Cartesian positions, Å.
      species: (N,) species indices.
      nbrs: padded neighbour list.

    Returns:
      ``(energies, forces)``: (N,) eV and (N, 3) eV/Å, ``forces = -dE/dpositions``.
    """
    def total(pos):
        e = potential.energies(pos, species, nbrs)
        return jnp.sum(e), e

    grad, e = jax.grad(total, has_aux=True)(positions)
    return e, -grad


class JaxCalculator(Calculator):
    """ASE calculator for a :class:`~bptt_jax.potentials.base.Potential`.

    Energies and forces (``-dE/dx`` by ``jax.grad``) come from one jitted float64 call on padded
    ``(N, M)`` neighbour arrays. ``N`` is the atom count rounded up to a multiple of 8 and ``M`` grows in
    steps of 8 and never shrinks, so a relaxation compiles once and a calculator reused on structures of
    similar size compiles a handful of times. The neighbour list is rebuilt on the host only when an atom
    moved more than ``skin / 2`` or the cell, periodicity or atom count changed.

    Args:
      potential: the JAX potential.
      skin: Verlet skin, Å.
      **kwargs: passed to :class:`ase.calculators.calculator.Calculator`.

    Properties: ``energy`` and ``free_energy`` (eV), ``energies`` ((n,) per-atom, eV), ``forces``
    ((n, 3), eV/Å).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces"]

    def __init__(self, potential: Potential, skin: float = DEFAULT_SKIN, **kwargs):
        super().__init__(**kwargs)
        self.potential = potential
        self.neighbor_list = NeighborList(potential.cutoff, skin=skin)
        self._numbers: Optional[np.ndarray] = None
        self._species: Optional[jax.Array] = None
        self._nbrs: Optional[Neighbors] = None

    def __repr__(self) -> str:
        return f"JaxCalculator({self.potential!r}, skin={self.neighbor_list.skin})"

    def calculate(self, atoms=None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        n = len(atoms)
        n_pad = round_up(n, 8)
        numbers = atoms.get_atomic_numbers()
        with jax.enable_x64(True):
            if self._numbers is None or not np.array_equal(numbers, self._numbers):
                species = np.zeros(n_pad, np.int32)
                species[:n] = self.potential.species(numbers)  # raises for uncovered elements
                self._species, self._numbers = jnp.asarray(species), numbers.copy()
            nbrs, rebuilt = self.neighbor_list.update(atoms.positions, atoms.cell.array, atoms.pbc, n_pad)
            if rebuilt or self._nbrs is None:
                self._nbrs = Neighbors(idx=jnp.asarray(nbrs.idx), shift=jnp.asarray(nbrs.shift, jnp.float64),
                                       mask=jnp.asarray(nbrs.mask))
            positions = np.zeros((n_pad, 3))
            positions[:n] = atoms.positions
            e, f = energies_and_forces(self.potential, jnp.asarray(positions, jnp.float64), self._species,
                                       self._nbrs)
            e, f = np.asarray(e, np.float64)[:n], np.asarray(f, np.float64)[:n]
        energy = float(e.sum())
        self.results = {"energy": energy, "free_energy": energy, "energies": e, "forces": f}
