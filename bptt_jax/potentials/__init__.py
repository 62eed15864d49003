"""Published empirical potentials in JAX, as offline "ground truth" oracles.

- :class:`StillingerWeber`: Stillinger & Weber, PRB 31, 5262 (1985), Si.
- :class:`Tersoff`: Tersoff, PRB 39, 5566 (1989), Si, C, Ge and their mixtures.
- :class:`JaxCalculator`: an ASE calculator (float64, padded neighbour lists, forces by ``jax.grad``).

Each potential's energy is also a pure JAX function, ``potential.energy(positions, species, nbrs)``, of
positions and a :class:`Neighbors` list from :func:`build_neighbors`.
"""

from __future__ import annotations

from ase.calculators.calculator import Calculator

from bptt_jax.potentials.base import Potential, pair_geometry
from bptt_jax.potentials.calculator import DEFAULT_SKIN, JaxCalculator
from bptt_jax.potentials.neighbors import NeighborList, Neighbors, build_neighbors
from bptt_jax.potentials.stillinger_weber import StillingerWeber
from bptt_jax.potentials.tersoff import CHI_1989, TERSOFF_1989, Tersoff, TersoffElement

POTENTIALS = {"sw": StillingerWeber, "tersoff": Tersoff}


def get_calculator(name: str, skin: float = DEFAULT_SKIN, **kwargs) -> Calculator:
    """An ASE calculator for a named potential.

    Args:
      name: ``"sw"`` (Stillinger–Weber Si) or ``"tersoff"`` (Tersoff 1989 Si/C/Ge); case-insensitive.
      skin: neighbour-list skin, Å.
      **kwargs: passed to the potential's constructor (e.g. ``elements=("Si", "Ge")`` for Tersoff).

    Returns:
      A :class:`JaxCalculator`.

    Raises:
      ValueError: for an unknown name.
    """
    key = name.strip().lower()
    if key not in POTENTIALS:
        raise ValueError(f"unknown potential {name!r}; choose from {', '.join(sorted(POTENTIALS))}")
    return JaxCalculator(POTENTIALS[key](**kwargs), skin=skin)


__all__ = [
    "CHI_1989", "DEFAULT_SKIN", "JaxCalculator", "NeighborList", "Neighbors", "POTENTIALS", "Potential",
    "StillingerWeber", "TERSOFF_1989", "Tersoff", "TersoffElement", "build_neighbors", "get_calculator",
    "pair_geometry",
]
