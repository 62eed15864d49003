"""What every JAX potential here shares: species lookup and NaN-safe pair geometry."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from bptt_jax.potentials.neighbors import Neighbors

Array = jax.Array


class Potential:
    """Base class of the empirical potentials: a pure JAX energy over a padded neighbour list.

    Subclasses set ``name``, ``elements`` (chemical symbols, in species-index order) and ``cutoff`` (the
    largest pair cutoff, Å) and implement :meth:`energies`.
    """

    name: str = "potential"
    elements: tuple[str, ...] = ()
    cutoff: float = 0.0

    def species(self, numbers: Sequence[int]) -> np.ndarray:
        """Species indices of atomic numbers.

        Args:
          numbers: (n,) atomic numbers.

        Returns:
          (n,) int32 indices into ``self.elements``.

        Raises:
          ValueError: for an element the potential does not cover.
        """
        numbers = np.asarray(numbers, int).reshape(-1)
        table = {atomic_numbers[s]: k for k, s in enumerate(self.elements)}
        missing = sorted(set(numbers.tolist()) - set(table))
        if missing:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
            raise ValueError(f"{self.name} does not cover element {names}; it covers {', '.join(self.elements)}")
        return np.array([table[z] for z in numbers.tolist()], np.int32)

    def energies(self, positions: Array, species: Array, nbrs: Neighbors) -> Array:
        """Per-atom energies.

        Args:
          positions: (N, 3) Cartesian positions, Å (padding rows arbitrary).
          species: (N,) int species indices (padding rows arbitrary).
          nbrs: padded :class:`Neighbors` built with a cutoff >= ``self.cutoff``.

        Returns:
          (N,) energies, eV; padding atoms (no neighbours) get exactly 0.
        """
        raise NotImplementedError

    def energy(self, positions: Array, species: Array, nbrs: Neighbors) -> Array:
        """Total energy, eV: a pure function of ``positions`` for a fixed neighbour list."""
        return jnp.sum(self.energies(positions, species, nbrs))


def pair_geometry(positions: Array, nbrs: Neighbors) -> tuple[Array, Array]:
    """Bond vectors and lengths of every neighbour slot, safe at padding.

    Padding slots have a zero bond vector; ``sqrt`` has an infinite derivative at 0, so the squared length
    is replaced by 1 there *before* the square root (double-``where``) and gradients stay finite.

    Args:
      positions: (N, 3) Cartesian positions, Å.
      nbrs: padded neighbour list.

    Returns:
      ``(vec, r)``: (N, M, 3) vectors from atom i to its neighbour, Å, and (N, M) lengths, Å (1 at
      padding slots).
    """
    vec = positions[nbrs.idx] + nbrs.shift - positions[:, None, :]
    r2 = jnp.sum(vec * vec, axis=-1)
    r = jnp.sqrt(jnp.where(nbrs.mask, r2, 1.0))
    return vec, r
