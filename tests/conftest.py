import numpy as np
import pytest
from ase.build import bulk, molecule

from bptt_jax.structures import Structure


def rattled_si(repeat=(1, 1, 1), sigma=0.1, seed=0, cubic=False, drop=0):
    """A diamond-Si cell (optionally with ``drop`` atoms removed), rattled; returns (start, target)."""
    atoms = bulk("Si", "diamond", a=5.431, cubic=cubic).repeat(repeat)
    if drop:
        del atoms[list(range(drop))]
    target = atoms.positions.copy()
    atoms.positions += np.random.default_rng(seed).normal(0.0, sigma, atoms.positions.shape)
    return Structure.from_atoms(atoms), target


@pytest.fixture
def si_pairs():
    """Three Si structures of different sizes (2, 8 and 7 atoms) with targets."""
    return [rattled_si(seed=0), rattled_si(cubic=True, seed=1), rattled_si(cubic=True, seed=2, drop=1)]


@pytest.fixture
def water():
    atoms = molecule("H2O")
    return Structure.from_atoms(atoms)
