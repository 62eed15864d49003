import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.losses import dq, force_l2, force_mse, masked_mean, structure_loss
from bptt_jax.structures import Batch, Structure


def _pair():
    # Si pred at x=0.1, target at x=9.9 in a 10 Å periodic cube: the displacement is 0.2 Å across the
    # boundary, not 9.8 Å. C moves (0.3, 0, -0.4): 0.5 Å. A fixed O atom is 1 Å off and must not count.
    cell = np.eye(3) * 10.0
    start = Structure([[0.1, 5, 5], [3, 3, 3], [1, 1, 1]], [14, 6, 8], cell, True,
                      masses=[28.0, 12.0, 16.0], fixed=[False, False, True])
    target = np.array([[9.9, 5, 5], [3.3, 3, 2.6], [2, 1, 1]])
    return start, target


def test_dq_hand_computed_with_periodic_wrap():
    start, target = _pair()
    batch = Batch.from_structures([start], [target], batch_size=2)
    per = structure_loss("dq", batch.positions, batch)
    expected = np.sqrt(28.0 * 0.2**2 + 12.0 * 0.5**2)  # = sqrt(1.12 + 3.0) = 2.0298
    np.testing.assert_allclose(float(per[0]), expected, rtol=1e-5)
    assert float(per[1]) == 0.0  # batch padding
    assert float(masked_mean(per, batch.structure_mask)) == pytest.approx(expected, rel=1e-5)
    # Without periodicity the wrap is not taken.
    open_batch = batch.replace(pbc=jnp.zeros_like(batch.pbc))
    far = np.sqrt(28.0 * 9.8**2 + 12.0 * 0.5**2)
    np.testing.assert_allclose(float(structure_loss("dq", open_batch.positions, open_batch)[0]), far, rtol=1e-5)


def test_position_mse():
    start, target = _pair()
    batch = Batch.from_structures([start], [target])
    per = structure_loss("mse", batch.positions, batch)
    np.testing.assert_allclose(float(per[0]), (0.2**2 + 0.5**2) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown structural loss"):
        structure_loss("mae", batch.positions, batch)


def test_dq_gradient_finite_at_zero_and_with_padding():
    start, target = _pair()
    batch = Batch.from_structures([start], [target], batch_size=3, n_atoms=8)

    def f(R):
        return masked_mean(dq(R, R, batch.masses, batch.cell, batch.pbc, batch.free_mask), batch.structure_mask)

    g = jax.grad(f)(batch.positions)
    assert np.all(np.isfinite(np.asarray(g)))
    g = jax.grad(lambda R: jnp.sum(structure_loss("dq", R, batch)))(batch.positions)
    assert np.all(np.isfinite(np.asarray(g)))
    # Gradient only on free real atoms.
    assert np.all(np.asarray(g)[0, 2:] == 0) and np.all(np.asarray(g)[1:] == 0)


def test_force_errors():
    pred = jnp.asarray([[[1.0, 0, 0], [0, 2.0, 0], [5.0, 5, 5]]])
    ref = jnp.asarray([[[0.0, 0, 0], [0, 0.0, 0], [0.0, 0, 0]]])
    mask = jnp.asarray([[True, True, False]])
    np.testing.assert_allclose(float(force_l2(pred, ref, mask)[0]), np.sqrt(5.0), rtol=1e-6)
    np.testing.assert_allclose(float(force_mse(pred, ref, mask)[0]), 5.0 / 6.0, rtol=1e-6)
