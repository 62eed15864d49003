"""Geometry-aware ADAPT options: symmetry, padding, periodic images and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bptt_jax.models import ADAPT, build_model
from bptt_jax.models.geometry import pair_displacements, pair_geometry
from bptt_jax.structures import Batch, Structure, minimum_image
from conftest import rattled_si

KEY = jax.random.PRNGKey(0)
GEO = dict(d_model=16, n_layers=2, n_heads=2, ffn_dim=16, species_dim=4, coords="none", attn_bias="rbf",
           force_head="vector", radial_channels=2, n_rbf=6, head_hidden=8, cutoff=4.0,
           angular_channels=3, attn_window=True)


def _model(**kw):
    return ADAPT(**{**GEO, **kw})


def _forces(model, structures, params=None, **kw):
    batch = Batch.from_structures(structures, **kw)
    params = model.init(KEY, batch) if params is None else params
    return np.asarray(model.apply(params, batch)), params


def _alloy(seed=0):
    """A rattled 8-atom cubic Si cell with one Ge and one C (so species matter)."""
    s, t = rattled_si(cubic=True, seed=seed)
    numbers = s.numbers.copy()
    numbers[2], numbers[5] = 32, 6
    return Structure(s.positions, numbers, s.cell, s.pbc), t


def test_pair_displacements_match_minimum_image():
    rng = np.random.default_rng(0)
    cell = np.array([[5.0, 0.0, 0.0], [2.4, 4.6, 0.0], [1.1, 0.9, 5.5]])  # triclinic
    for pbc in ([True] * 3, [True, True, False], [False] * 3):
        R = jnp.asarray(rng.uniform(-3, 9, (1, 7, 3)), jnp.float32)
        c, p = jnp.asarray(cell[None], jnp.float32), jnp.asarray([pbc])
        fast = pair_displacements(R, c, p)
        ref = minimum_image((R[:, None] - R[:, :, None]).reshape(1, 49, 3), c, p).reshape(1, 7, 7, 3)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-4)


@pytest.mark.parametrize("head", ["vector", "both"])
def test_shapes_padding_zero_and_padding_invariance(si_pairs, head):
    model = _model(force_head=head)
    starts = [s for s, _ in si_pairs]
    small = Batch.from_structures(starts, batch_size=3)
    big = Batch.from_structures(starts, batch_size=5, n_atoms=16)
    noise = jax.random.normal(KEY, big.positions.shape) * 7.0
    big = big.replace(positions=jnp.where(big.atom_mask[..., None], big.positions, noise))
    params = model.init(KEY, small)
    a = np.asarray(model.apply(params, small))
    b = np.asarray(model.apply(params, big))
    assert np.all(np.isfinite(b)) and np.all(b[~np.asarray(big.atom_mask)] == 0)
    mask = np.asarray(small.atom_mask)
    np.testing.assert_allclose(b[:3, :8][mask], a[mask], atol=1e-4)


def test_permutation_equivariance():
    s, _ = _alloy()
    model = _model()
    f, params = _forces(model, [s])
    perm = np.random.default_rng(1).permutation(len(s))
    s_perm = Structure(s.positions[perm], s.numbers[perm], s.cell, s.pbc)
    f_perm, _ = _forces(model, [s_perm], params)
    np.testing.assert_allclose(f_perm[0], f[0][perm], atol=1e-4)


def test_rotation_and_translation_equivariance():
    s, _ = _alloy()
    model = _model()
    f, params = _forces(model, [s])
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    shift = np.array([0.7, -2.3, 11.0])
    moved = Structure(s.positions @ rot.T + shift, s.numbers, s.cell @ rot.T, s.pbc)
    f_moved, _ = _forces(model, [moved], params)
    np.testing.assert_allclose(f_moved[0], f[0] @ rot.T, atol=1e-4)
    assert np.abs(f).max() > 1e-3  # not trivially zero


def test_periodic_image_invariance():
    s, _ = _alloy()
    model = _model()
    f, params = _forces(model, [s])
    wrapped = Structure(s.positions.copy(), s.numbers, s.cell, s.pbc)
    wrapped.positions[[0, 4]] += s.cell[0] - 2 * s.cell[1] + s.cell[2]
    f_w, _ = _forces(model, [wrapped], params)
    np.testing.assert_allclose(f_w, f, atol=1e-4)


def test_forces_vanish_for_isolated_atoms():
    # Two atoms far beyond the cutoff in a non-periodic box: no pair term, so no force.
    s = Structure(np.array([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]]), np.array([14, 14]))
    f, _ = _forces(_model(), [s])
    np.testing.assert_allclose(f, 0.0, atol=1e-7)


@pytest.mark.slow
def test_finite_gradients_wrt_positions_with_padding(si_pairs):
    model = _model(output_transform="expm1")
    batch = Batch.from_structures([s for s, _ in si_pairs], batch_size=4, n_atoms=16)
    params = model.init(KEY, batch)

    def energy_like(R):
        f = model.apply(params, batch.replace(positions=R))
        return jnp.sum(f ** 2)

    g = np.asarray(jax.grad(energy_like)(batch.positions))
    assert np.all(np.isfinite(g))
    assert np.all(g[~np.asarray(batch.atom_mask)] == 0)
    assert np.abs(g).max() > 0
    gp = jax.grad(lambda p: jnp.sum(model.apply(p, batch) ** 2))(params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(gp))


def test_pair_geometry_masks_and_cutoff(si_pairs):
    batch = Batch.from_structures([s for s, _ in si_pairs], batch_size=4, n_atoms=16)
    geom = pair_geometry(batch.positions, batch.cell, batch.pbc, batch.atom_mask, 3.0, 5)
    mask = np.asarray(geom.mask)
    assert not mask[:, np.arange(16), np.arange(16)].any()
    assert np.all(np.asarray(geom.rbf)[~mask] == 0) and np.all(np.asarray(geom.cut)[~mask] == 0)
    assert np.all(np.asarray(geom.cut)[np.asarray(geom.dist) >= 3.0] == 0)


def test_preset_and_defaults_unchanged(si_pairs):
    batch = Batch.from_structures([s for s, _ in si_pairs])
    model = build_model("adapt", "small_geo")
    params = model.init(KEY, batch)
    assert np.asarray(model.apply(params, batch)).shape == batch.positions.shape
    plain = build_model("adapt", "small")
    assert plain.coords == "cartesian" and plain.attn_bias == "none" and plain.force_head == "linear"
    with pytest.raises(ValueError):
        _model(force_head="scalar").init(KEY, batch)
    with pytest.raises(ValueError):
        _model(attn_bias="alibi").init(KEY, batch)


def test_pair_displacements_cutoff_shortcut_is_exact_inside_cutoff():
    rng = np.random.default_rng(3)
    for cell in (np.diag([10.9, 10.9, 10.9]), np.array([[11.0, 0, 0], [5.0, 10.0, 0], [0.5, 1.0, 10.5]])):
        R = jnp.asarray(rng.uniform(0, 11, (1, 20, 3)), jnp.float32)
        c, p = jnp.asarray(cell[None], jnp.float32), jnp.asarray([[True] * 3])
        full = np.asarray(pair_displacements(R, c, p))
        fast = np.asarray(pair_displacements(R, c, p, cutoff=3.0))
        inside = np.linalg.norm(full, axis=-1) < 3.0
        np.testing.assert_allclose(fast[inside], full[inside], atol=1e-4)
        assert np.all(np.linalg.norm(fast[~inside], axis=-1) >= 3.0 - 1e-4)


@pytest.mark.parametrize("cutoff", [None, 3.0, 1.0])  # the image search, and the shortcut (wide cells)
def test_pair_displacements_strain_with_the_cell(cutoff):
    """Straining positions and cell together by ``I + ε`` strains every minimum-image displacement: its
    derivative by ε is ``vec ⊗ δ`` (``d vec_k / d ε_ij = vec_i δ_jk``), including the pairs' lattice translations.
    The derivative by positions alone stays that of ``r_j − r_i``."""
    rng = np.random.default_rng(4)
    cell = np.array([[5.0, 0.0, 0.0], [2.4, 4.6, 0.0], [1.1, 0.9, 5.5]])
    for pbc in ([True] * 3, [True, True, False]):
        R = jnp.asarray(rng.uniform(-3, 9, (1, 6, 3)), jnp.float32)
        c, p = jnp.asarray(cell[None], jnp.float32), jnp.asarray([pbc])

        def strained(eps):
            deform = jnp.eye(3) + eps
            return pair_displacements(R @ deform, c @ deform, p, cutoff)

        vec = np.asarray(strained(jnp.zeros((3, 3))))
        jac = np.asarray(jax.jacfwd(strained)(jnp.zeros((3, 3))))  # (1, N, N, 3, 3, 3): d vec_k / d eps_ij
        expected = np.einsum("bnmi,jk->bnmkij", vec, np.eye(3))
        np.testing.assert_allclose(jac, expected, atol=1e-4)
        d_pos = np.asarray(jax.jacfwd(lambda r: pair_displacements(r, c, p, cutoff))(R))  # (1,N,N,3, 1,N,3)
        eye = np.eye(R.shape[1])
        want = np.einsum("nmq,kl->nmkql", eye[None, :, :] - eye[:, None, :], np.eye(3))  # (δ_mq − δ_nq) δ_kl
        np.testing.assert_allclose(d_pos[0, :, :, :, 0], want, atol=1e-6)
