"""The multicomponent Tersoff potential for Si, C and Ge.

J. Tersoff, Phys. Rev. B 39, 5566 (1989); erratum Phys. Rev. B 41, 3248 (1990)::

    E = 1/2 sum_i sum_{j != i} fC_ij(r_ij) [fR_ij(r_ij) + b_ij fA_ij(r_ij)]
    fR_ij(r) = A_ij exp(-lambda_ij r),   fA_ij(r) = -B_ij exp(-mu_ij r)
    b_ij = chi_ij (1 + beta_i^n_i zeta_ij^n_i)^(-1 / (2 n_i))
    zeta_ij = sum_{k != i, j} fC_ik(r_ik) g_i(theta_ijk)
    g_i(theta) = 1 + c_i^2 / d_i^2 - c_i^2 / (d_i^2 + (h_i - cos theta)^2)
    fC_ij(r) = 1 (r < R_ij),  1/2 + 1/2 cos(pi (r - R_ij) / (S_ij - R_ij)) (R_ij < r < S_ij),  0 (r > S_ij)

with the mixing rules lambda_ij = (lambda_i + lambda_j)/2, mu_ij = (mu_i + mu_j)/2, A_ij = sqrt(A_i A_j),
B_ij = sqrt(B_i B_j), R_ij = sqrt(R_i R_j), S_ij = sqrt(S_i S_j), and chi_SiC = 0.9776, chi_SiGe = 1.00061,
chi_ii = 1. In the 1989 model omega_ik = 1 and there is no exp(lambda3^m (r_ij - r_ik)^m) factor.

Conventions vs. LAMMPS ``pair_style tersoff`` (``SiCGe.tersoff``, ``SiC_1989.tersoff``): LAMMPS writes
m = 3, gamma = 1, lambda3 = 0 (so the exponential factor is 1), costheta0 = h, lambda1 = lambda (the
paper's repulsive decay), lambda2 = mu, and the cutoff as a centre and half-width, R_L = (R + S)/2,
D = (S - R)/2 (its 1/2 - 1/2 sin(pi/2 (r - R_L)/D) is the same function as the paper's cosine). LAMMPS
folds chi into the mixed B (e.g. B_SiC = 0.9776 sqrt(B_Si B_C) = 395.1 eV) and takes beta, n, c, d, h
from the centre atom i and the cutoff of fC_ik from the (i, k) pair, exactly as here.

The element parameters (Table I of the paper) agree with the C, Si(D) and Ge entries of LAMMPS'
``SiCGe.tersoff`` (2025 release) and with ``SiC_1989.tersoff``: B_C = 346.74 eV (older copies of
``SiCGe.tersoff`` had 346.7) and d_C = 4.3484 (the erratum's value). Mixed values are computed here in full
precision (LAMMPS files print them rounded, e.g. R_SiC = 2.3573, D_SiC = 0.1527; ~1e-6 eV/atom). With the
same parameters, LAMMPS ``pair_style tersoff`` and this code agree to ~1e-11 eV (tests/test_potentials.py).
Tersoff published no C-Ge interaction: by default chi_CGe = 1 with the same mixing rules, an assumption
(LAMMPS refuses a C-Ge pair) that only matters when a C and a Ge atom come within 2.55 Å of each other.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.potentials.base import Potential, pair_geometry
from bptt_jax.potentials.neighbors import Neighbors

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TersoffElement:
    """Single-element Tersoff (1989) parameters, in the paper's notation.

    Attributes:
      A: repulsive prefactor, eV.
      B: attractive prefactor, eV.
      lam: repulsive decay (LAMMPS lambda1), 1/Å.
      mu: attractive decay (LAMMPS lambda2), 1/Å.
      beta, n: bond-order constants.
      c, d, h: angular constants (``h`` is LAMMPS' costheta0).
      R, S: cutoff function start and end, Å.
    """

    A: float
    B: float
    lam: float
    mu: float
    beta: float
    n: float
    c: float
    d: float
    h: float
    R: float
    S: float


# Tersoff, PRB 39, 5566 (1989), Table I (with the erratum's d_C).
TERSOFF_1989: dict[str, TersoffElement] = {
    "C": TersoffElement(A=1.3936e3, B=3.4674e2, lam=3.4879, mu=2.2119, beta=1.5724e-7, n=7.2751e-1,
                        c=3.8049e4, d=4.3484, h=-5.7058e-1, R=1.8, S=2.1),
    "Si": TersoffElement(A=1.8308e3, B=4.7118e2, lam=2.4799, mu=1.7322, beta=1.1000e-6, n=7.8734e-1,
                         c=1.0039e5, d=1.6217e1, h=-5.9825e-1, R=2.7, S=3.0),
    "Ge": TersoffElement(A=1.769e3, B=4.1923e2, lam=2.4451, mu=1.7047, beta=9.0166e-7, n=7.5627e-1,
                         c=1.0643e5, d=1.5652e1, h=-4.3884e-1, R=2.8, S=3.1),
}

# chi_ij of the 1989 paper; pairs not listed (like-element pairs and C-Ge) use 1.
CHI_1989: dict[frozenset, float] = {frozenset({"Si", "C"}): 0.9776, frozenset({"Si", "Ge"}): 1.00061}


class Tersoff(Potential):
    """Multicomponent Tersoff (1989) potential.

    Args:
      elements: chemical symbols to cover, in species-index order (default Si, C, Ge).
      params: per-element parameters (default :data:`TERSOFF_1989`).
      chi: pair mixing factors keyed by ``frozenset({el1, el2})`` (default :data:`CHI_1989`); missing
        unlike pairs use 1.
    """

    name = "Tersoff (1989)"

    def __init__(self, elements: Sequence[str] = ("Si", "C", "Ge"),
                 params: Optional[Mapping[str, TersoffElement]] = None,
                 chi: Optional[Mapping[frozenset, float]] = None):
        params = TERSOFF_1989 if params is None else params
        chi = CHI_1989 if chi is None else chi
        unknown = [e for e in elements if e not in params]
        if unknown:
            raise ValueError(f"no Tersoff parameters for {', '.join(unknown)}")
        self.elements = tuple(elements)
        self.params = {e: params[e] for e in self.elements}
        ns = len(self.elements)
        pair = {k: np.zeros((ns, ns)) for k in ("A", "B", "lam", "mu", "R", "S")}
        for (a, ea), (b, eb) in itertools.product(enumerate(self.elements), repeat=2):
            pa, pb = self.params[ea], self.params[eb]
            x = 1.0 if ea == eb else chi.get(frozenset({ea, eb}), 1.0)
            pair["A"][a, b] = math.sqrt(pa.A * pb.A)
            pair["B"][a, b] = x * math.sqrt(pa.B * pb.B)  # chi folded into B, as LAMMPS does
            pair["lam"][a, b] = 0.5 * (pa.lam + pb.lam)
            pair["mu"][a, b] = 0.5 * (pa.mu + pb.mu)
            pair["R"][a, b] = math.sqrt(pa.R * pb.R)
            pair["S"][a, b] = math.sqrt(pa.S * pb.S)
        self.pair = pair
        self.single = {k: np.array([getattr(self.params[e], k) for e in self.elements])
                       for k in ("beta", "n", "c", "d", "h")}
        self.cutoff = float(pair["S"].max())
        # Hashable identity: calculators with equal potentials share jit-compiled code.
        self._key = (self.elements, tuple(self.params.values()),
                     tuple(sorted((tuple(sorted(k)), float(v)) for k, v in chi.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, Tersoff) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Tersoff(elements={self.elements})"

    def energies(self, positions: Array, species: Array, nbrs: Neighbors) -> Array:
        """Per-atom energies, eV: ``E_i = 1/2 sum_j V_ij`` (the bonds seen from atom i).

        Args:
          positions: (N, 3) Cartesian positions, Å.
          species: (N,) int species indices into ``self.elements``.
          nbrs: padded neighbour list with cutoff >= ``self.cutoff``.

        Returns:
          (N,) energies, eV.
        """
        dtype = positions.dtype
        tab = {k: jnp.asarray(v, dtype) for k, v in self.pair.items()}
        one = {k: jnp.asarray(v, dtype)[species] for k, v in self.single.items()}  # (N,) centre params
        si = species[:, None]
        sj = species[nbrs.idx]  # (N, M)

        vec, r = pair_geometry(positions, nbrs)
        R, S = tab["R"][si, sj], tab["S"][si, sj]
        # Clipping the cosine's argument makes fC exactly 1 below R and 0 above S with zero gradient there.
        t = jnp.clip((r - R) / (S - R), 0.0, 1.0)
        fc = jnp.where(nbrs.mask, 0.5 + 0.5 * jnp.cos(jnp.pi * t), 0.0)  # (N, M)
        f_rep = tab["A"][si, sj] * jnp.exp(-tab["lam"][si, sj] * r)
        f_att = -tab["B"][si, sj] * jnp.exp(-tab["mu"][si, sj] * r)

        unit = vec / r[..., None]
        cos = jnp.einsum("nmc,nkc->nmk", unit, unit)  # (N, M, M): angle j-i-k
        c2, d2 = (one["c"] ** 2)[:, None, None], (one["d"] ** 2)[:, None, None]
        delta2 = (one["h"][:, None, None] - cos) ** 2
        # 1 + c^2/d^2 - c^2/(d^2 + delta^2), rearranged to avoid cancelling two ~1e7 terms.
        g = 1.0 + c2 * delta2 / (d2 * (d2 + delta2))
        m = nbrs.idx.shape[1]
        off_diag = 1.0 - jnp.eye(m, dtype=dtype)  # k != j by slot (periodic images are distinct k)
        zeta = jnp.sum(fc[:, None, :] * g * off_diag, axis=2)  # (N, M)

        # (beta zeta)^n has an infinite derivative at zeta = 0 (an isolated bond, or padding): evaluate
        # it at zeta = 1 there and substitute b = 1 (double-where).
        beta, n = one["beta"][:, None], one["n"][:, None]
        positive = zeta > 0.0
        zs = jnp.where(positive, zeta, 1.0)
        b = jnp.where(positive, (1.0 + jnp.exp(n * jnp.log(beta * zs))) ** (-0.5 / n), 1.0)

        v = fc * (f_rep + b * f_att)
        return 0.5 * jnp.sum(v, axis=1)
