import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import fcc111, add_adsorbate
from ase.constraints import FixAtoms

from bptt_jax.structures import (Batch, Structure, bucket_size, complete_cell, minimum_image, safe_norm)


def test_bucket_size():
    assert bucket_size(1) == 8
    assert bucket_size(8) == 8
    assert bucket_size(9) == 16
    assert bucket_size(64) == 64
    assert bucket_size(65) == 72
    assert bucket_size(97) == 112
    assert bucket_size(513) == 576
    assert bucket_size(5, buckets=(4, 10)) == 10
    assert bucket_size(5, buckets=None) == 5


def test_batch_padding_and_masks(si_pairs):
    structs = [s for s, _ in si_pairs]
    targets = [t for _, t in si_pairs]
    batch = Batch.from_structures(structs, targets, batch_size=5)
    assert batch.positions.shape == (5, 8, 3)
    assert batch.numbers.shape == (5, 8)
    assert batch.cell.shape == (5, 3, 3) and batch.pbc.shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(batch.n_atoms), [2, 8, 7, 0, 0])
    np.testing.assert_array_equal(np.asarray(batch.structure_mask), [True, True, True, False, False])
    np.testing.assert_allclose(np.asarray(batch.positions[2, :7]), structs[2].positions, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(batch.target_positions[1, :8]), targets[1], rtol=1e-6)
    assert np.asarray(batch.numbers[0, 2:]).sum() == 0
    assert np.asarray(batch.masses[0, 2:]).sum() == 0
    np.testing.assert_allclose(np.asarray(batch.masses[0, :2]), 28.085, atol=1e-2)
    # Structures of 2..8 atoms share one bucket: same shape whatever the mix.
    assert Batch.from_structures(structs[:1], batch_size=5).positions.shape == (5, 8, 3)
    back = batch.to_structures()
    assert [len(s) for s in back] == [2, 8, 7]
    np.testing.assert_allclose(back[1].positions, structs[1].positions, rtol=1e-6)


def test_batch_errors(si_pairs):
    structs = [s for s, _ in si_pairs]
    with pytest.raises(ValueError, match="batch_size"):
        Batch.from_structures(structs, batch_size=2)
    with pytest.raises(ValueError, match="padded size"):
        Batch.from_structures(structs, n_atoms=4)
    with pytest.raises(ValueError, match="target 0"):
        Batch.from_structures(structs, [np.zeros((3, 3))] * 3)
    with pytest.raises(ValueError, match="no reference forces"):
        Batch.from_structures(structs, with_forces=True)


def test_fixed_atoms_from_ase():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=10.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 3]))
    s = Structure.from_atoms(slab)
    assert s.fixed.sum() == 4 and not s.fixed[-1]
    batch = Batch.from_structures([s])
    assert int(batch.free_mask.sum()) == len(slab) - 4
    np.testing.assert_array_equal(np.asarray(batch.pbc[0]), [True, True, False])
    assert s.to_atoms().constraints[0].get_indices().tolist() == [0, 1, 2, 3]


def test_complete_cell_for_molecules(water):
    cell = complete_cell(water.cell, water.pbc)
    assert abs(np.linalg.det(cell)) > 1e-6
    # A slab-like cell with a zero c vector keeps a and b and gets a c orthogonal to them.
    ab = np.array([[3.0, 0, 0], [1.0, 2.5, 0], [0, 0, 0]])
    c = complete_cell(ab, np.array([True, True, False]))
    np.testing.assert_allclose(c[:2], ab[:2])
    assert abs(c[2] @ ab[0]) < 1e-9 and abs(c[2] @ ab[1]) < 1e-9
    with pytest.raises(ValueError, match="singular periodic"):
        complete_cell(ab, np.array([True, True, True]))


def _brute_minimum_image(d, cell, pbc, reach=4):
    best = None
    center = np.zeros(3)
    if pbc.any():  # nearest lattice point of the periodic sublattice, by least squares
        coef = np.linalg.lstsq(cell[pbc].T, d, rcond=None)[0]
        center[pbc] = -np.round(coef)
    ranges = [range(-reach, reach + 1) if p else [0] for p in pbc]
    for n in itertools.product(*ranges):
        cand = d + (center + np.asarray(n)) @ cell
        if best is None or cand @ cand < best @ best:
            best = cand
    return best


def test_minimum_image_orthorhombic_wrap():
    cell = np.diag([10.0, 10.0, 10.0])
    d = np.array([[9.8, -9.9, 0.3]])
    out = minimum_image(jnp.asarray(d), jnp.asarray(cell), jnp.asarray([True, True, True]))
    np.testing.assert_allclose(np.asarray(out), [[-0.2, 0.1, 0.3]], atol=1e-6)
    # Non-periodic axes are not wrapped.
    out = minimum_image(jnp.asarray(d), jnp.asarray(cell), jnp.asarray([True, False, True]))
    np.testing.assert_allclose(np.asarray(out), [[-0.2, -9.9, 0.3]], atol=1e-6)


def test_minimum_image_triclinic_matches_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(20):
        # Skewed cells (60°-ish angles, like hexagonal/rhombohedral cells), random displacements.
        cell = np.eye(3) * rng.uniform(3, 8, 3)
        cell[1, 0] = rng.uniform(-0.6, 0.6) * cell[1, 1]
        cell[2, :2] = rng.uniform(-0.5, 0.5, 2) * cell[2, 2]
        pbc = rng.random(3) < 0.8
        d = rng.uniform(-20, 20, (16, 3))
        out = np.asarray(minimum_image(jnp.asarray(d), jnp.asarray(cell), jnp.asarray(pbc)))
        ref = np.stack([_brute_minimum_image(x, cell, pbc) for x in d])
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(ref, axis=1), atol=1e-4)
        # The result is an image of the input: differs by a lattice vector along periodic axes only.
        n = np.linalg.solve(cell.T, (out - d).T).T
        np.testing.assert_allclose(n, np.round(n), atol=1e-4)
        assert np.all(np.abs(n[:, ~pbc]) < 1e-4)


def test_safe_norm_gradient_finite_at_zero():
    g = jax.grad(lambda x: safe_norm(x))(jnp.zeros(3))
    assert np.all(np.isfinite(np.asarray(g)))
    g = jax.grad(lambda x: jnp.sum(minimum_image(x, jnp.eye(3) * 5, jnp.ones(3, bool)) ** 2))(jnp.zeros((4, 3)))
    assert np.all(np.isfinite(np.asarray(g)))
