"""bptt_jax.ase.Calculator: a model's forces (and, with an energy head, energy and stress) inside ASE."""

import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.filters import FrechetCellFilter
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE
from ase import units

from bptt_jax.ase import Calculator
from bptt_jax.models import build_model
from bptt_jax.structures import Batch, Structure


def _model(energy: bool):
    if energy:
        return build_model("adapt", "small_energy", d_model=16, n_layers=1, n_heads=2, ffn_dim=32)
    return build_model("adapt", "tiny")


def _si(seed=0, n_remove=0):
    atoms = bulk("Si", cubic=True)
    del atoms[list(range(n_remove))]
    atoms.rattle(0.05, seed=seed)
    return atoms


def _calc(energy: bool):
    model = _model(energy)
    atoms = _si()
    variables = model.init(jax.random.PRNGKey(0), Batch.from_structures([Structure.from_atoms(atoms)]))
    return Calculator(model, variables), model, variables


def test_forces_are_the_models_and_compile_once_per_bucket():
    calc, model, variables = _calc(energy=False)
    atoms = _si()
    atoms.calc = calc
    f = atoms.get_forces()
    batch = Batch.from_structures([Structure.from_atoms(atoms)], n_atoms=8)
    np.testing.assert_allclose(f, np.asarray(model.apply(variables, batch))[0], rtol=1e-5, atol=1e-6)
    for seed, n_remove in ((1, 0), (2, 1)):  # 8 and 7 atoms: the same bucket
        other = _si(seed, n_remove)
        other.calc = calc
        assert other.get_forces().shape == (8 - n_remove, 3)
    assert calc._forces._cache_size() == 1
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_potential_energy()  # a force model has no energy


def test_energy_model_gives_consistent_energy_and_forces():
    calc, _, _ = _calc(energy=True)
    atoms = _si()
    atoms.calc = calc
    f = atoms.get_forces()
    numerical = np.array([[(_energy_at(atoms, i, k, 1e-3) - _energy_at(atoms, i, k, -1e-3)) / -2e-3 for k in range(3)]
                          for i in range(len(atoms))])
    np.testing.assert_allclose(f, numerical, atol=2e-3 * max(1, np.abs(f).max()))


@pytest.mark.filterwarnings("ignore:logm result may be inaccurate")  # scipy, inside FrechetCellFilter
def test_energy_model_stress_matches_finite_strains_and_relaxes_the_cell():
    """The stress is (1/V) dE/dε: ASE's finite-strain stress agrees (a sheared, rattled cell: every pair's lattice
    translation matters), and ASE's cell filter lowers the energy with it. A force model has none. The cell is
    wider than twice the model's cutoff, so that only the minimum image of a pair is inside it (otherwise a pair
    changing images makes the energy jump)."""
    calc, _, _ = _calc(energy=True)
    atoms = _si().repeat(2)
    atoms.set_cell(atoms.cell @ (np.eye(3) + 0.03 * np.random.default_rng(1).normal(size=(3, 3))), scale_atoms=True)
    atoms.calc = calc
    stress = atoms.get_stress()
    numerical = calculate_numerical_stress(atoms, eps=1e-3)
    assert np.abs(stress).max() > 1e-3  # a random model: not at its equilibrium cell
    np.testing.assert_allclose(stress, numerical, atol=2e-3 * np.abs(stress).max())
    e0 = atoms.get_potential_energy()
    FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-4, steps=8)
    assert atoms.get_potential_energy() < e0
    slab = _si()
    slab.pbc = [True, True, False]
    slab.calc = calc
    with pytest.raises(PropertyNotImplementedError):
        slab.get_stress()
    force_only = _si()
    force_only.calc = _calc(energy=False)[0]
    with pytest.raises(PropertyNotImplementedError):
        force_only.get_stress()


def _energy_at(atoms, i, k, d):
    moved = atoms.copy()
    moved.positions[i, k] += d
    moved.calc = atoms.calc
    return moved.get_potential_energy()


def test_ase_fire_and_md_run_on_the_model():
    calc, _, _ = _calc(energy=True)
    atoms = _si()
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    FIRE(atoms, logfile=None).run(fmax=1e-4, steps=10)
    assert atoms.get_potential_energy() < e0  # FIRE follows -dE/dR
    md = _si()
    md.calc = calc
    VelocityVerlet(md, timestep=0.5 * units.fs, logfile=None).run(4)
    assert np.all(np.isfinite(md.get_positions())) and np.isfinite(md.get_total_energy())
