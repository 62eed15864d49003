"""The Stillinger–Weber potential for silicon.

F. H. Stillinger and T. A. Weber, Phys. Rev. B 31, 5262 (1985), in the form and units of LAMMPS'
``pair_style sw`` (``Si.sw``)::

    E = sum_{i<j} phi2(r_ij) + sum_i sum_{j<k} phi3(r_ij, r_ik, theta_jik)
    phi2(r) = eps A (B (sigma/r)^p - (sigma/r)^q) exp(sigma / (r - a sigma))
    phi3 = eps lambda (cos theta_jik - cos theta0)^2 exp(gamma sigma / (r_ij - a sigma))
                                                    exp(gamma sigma / (r_ik - a sigma))

both terms vanishing smoothly (with all derivatives) at the cutoff ``a sigma`` = 3.77118 Å. With the
published parameters, the diamond lattice at a = 5.431 Å has its bonds at the pair minimum
2^(1/6) sigma and its angles at theta0, so its cohesive energy is exactly -2 eps = -4.3366 eV/atom.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bptt_jax.potentials.base import Potential, pair_geometry
from bptt_jax.potentials.neighbors import Neighbors

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StillingerWeber(Potential):
    """Stillinger–Weber Si (1985 parameters by default).

    Attributes:
      epsilon: energy unit, eV.
      sigma: length unit, Å.
      a: cutoff in units of sigma.
      lam: three-body strength (the paper's lambda).
      gamma: three-body decay length in units of sigma.
      A, B, p, q: two-body constants (dimensionless; ``p`` and ``q`` integers).
      cos_theta0: ideal bond-angle cosine (-1/3, tetrahedral).
    """

    epsilon: float = 2.1683
    sigma: float = 2.0951
    a: float = 1.80
    lam: float = 21.0
    gamma: float = 1.20
    A: float = 7.049556277
    B: float = 0.6022245584
    p: int = 4
    q: int = 0
    cos_theta0: float = -1.0 / 3.0

    name = "Stillinger-Weber"
    elements = ("Si",)

    @property
    def cutoff(self) -> float:
        """Pair cutoff ``a * sigma``, Å."""
        return self.a * self.sigma

    def energies(self, positions: Array, species: Array, nbrs: Neighbors) -> Array:
        """Per-atom energies, eV: half of each pair term plus the three-body terms centred on the atom.

        Args:
          positions: (N, 3) Cartesian positions, Å.
          species: (N,) species indices (all Si; unused).
          nbrs: padded neighbour list with cutoff >= ``a * sigma``.

        Returns:
          (N,) energies, eV.
        """
        del species
        rc = self.cutoff
        vec, r = pair_geometry(positions, nbrs)
        inside = nbrs.mask & (r < rc)
        # exp(sigma / (r - rc)) is only defined below the cutoff: evaluate it at a harmless distance
        # elsewhere and zero the result (double-where keeps the gradients finite).
        rs = jnp.where(inside, r, 0.5 * rc)
        x = self.sigma / rs
        phi2 = self.epsilon * self.A * (self.B * x ** self.p - x ** self.q) * jnp.exp(self.sigma / (rs - rc))
        e2 = 0.5 * jnp.sum(jnp.where(inside, phi2, 0.0), axis=1)

        decay = jnp.where(inside, jnp.exp(self.gamma * self.sigma / (rs - rc)), 0.0)  # (N, M)
        unit = vec / rs[..., None]
        cos = jnp.einsum("nmc,nkc->nmk", unit, unit)  # (N, M, M): angle j-i-k
        m = nbrs.idx.shape[1]
        off_diag = 1.0 - jnp.eye(m, dtype=positions.dtype)  # slot pairs j != k (images count separately)
        weight = decay[:, :, None] * decay[:, None, :] * off_diag
        # Each unordered pair {j, k} appears twice among the ordered slot pairs.
        e3 = 0.5 * self.epsilon * self.lam * jnp.sum(weight * (cos - self.cos_theta0) ** 2, axis=(1, 2))
        return e2 + e3
