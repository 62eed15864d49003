"""The conservative ADAPT option (``energy_head=True``): forces = −∂E/∂R inside the module (double backprop)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bptt_jax.bptt import BPTT, jit_train_step
from bptt_jax.models import ADAPT, build_model
from bptt_jax.pipeline import make_force_step
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import Batch, Structure
from conftest import get_leaf, rattled_si, set_leaf, to64

KEY = jax.random.PRNGKey(0)


def _model(**kw):
    """A tiny invariant energy model (cutoff below half the 5.43 Å cubic cell: one image per pair)."""
    cfg = dict(d_model=8, n_layers=1, n_heads=2, ffn_dim=8, species_dim=4, coords="none", attn_bias="rbf",
               radial_channels=2, n_rbf=4, cutoff=2.7, energy_head=True)
    cfg.update(kw)
    return ADAPT(**cfg)


def _batch(pairs, **kw):
    return Batch.from_structures([s for s, _ in pairs], [t for _, t in pairs], **kw)


def _energy_fn(model, variables, batch):
    return jax.jit(lambda R: model.apply(variables, batch.replace(positions=R), method="energy"))


def _jitted(model):
    """Jitted (init, forces, energy) of a model (eager Flax calls dispatch op by op and are slow)."""
    return (jax.jit(model.init), jax.jit(model.apply),
            jax.jit(lambda v, b: model.apply(v, b, method="energy")))


def test_forces_are_minus_energy_gradient_and_match_finite_differences():
    with jax.enable_x64(True):
        # An 8-atom and a 7-atom cubic Si cell (one padding atom) in one batch.
        batch = _batch([rattled_si(cubic=True, seed=1), rattled_si(cubic=True, seed=2, drop=1)])
        model = _model()
        init, apply, _ = _jitted(model)
        variables = init(KEY, batch)
        forces = np.asarray(apply(variables, batch))
        energy = _energy_fn(model, variables, batch)
        assert energy(batch.positions).shape == (2,)
        grad = np.asarray(jax.grad(lambda R: jnp.sum(energy(R)))(batch.positions))
        mask = np.asarray(batch.atom_mask)
        np.testing.assert_allclose(forces[mask], -grad[mask], rtol=1e-12, atol=1e-12)
        assert np.all(forces[~mask] == 0)
        assert np.abs(forces[mask]).max() > 1e-3  # not trivially zero

        eps = 1e-5
        R0 = np.asarray(batch.positions)
        fd = np.zeros_like(R0)
        for b, i, x in zip(*np.nonzero(np.broadcast_to(mask[..., None], R0.shape))):
            up, down = R0.copy(), R0.copy()
            up[b, i, x] += eps
            down[b, i, x] -= eps
            fd[b, i, x] = -(float(energy(jnp.asarray(up))[b]) - float(energy(jnp.asarray(down))[b])) / (2 * eps)
        np.testing.assert_allclose(forces[mask], fd[mask], rtol=1e-6, atol=1e-8)


def test_force_jacobian_is_symmetric():
    with jax.enable_x64(True):
        s, _ = rattled_si(cubic=True, seed=3, drop=5)  # 3 atoms in the cubic cell
        batch = Batch.from_structures([s], n_atoms=5)  # with two padding atoms
        n = len(s)

        def jacobian(model):
            variables = jax.jit(model.init)(KEY, batch)
            fn = lambda R: model.apply(variables, batch.replace(positions=R))[0, :n].reshape(-1)  # noqa: E731
            jac = jax.jit(jax.jacfwd(fn))(batch.positions)[:, 0]  # (3n, N, 3)
            return np.asarray(jac), np.asarray(jac[:, :n].reshape(3 * n, 3 * n))

        full, jac = jacobian(_model())
        assert np.abs(jac).max() > 1e-3
        np.testing.assert_allclose(jac, jac.T, rtol=0, atol=1e-10 * np.abs(jac).max())
        assert np.all(full[:, n:] == 0)  # padding positions do not move real forces
        # The check has teeth: the direct (non-conservative) vector head is not curl-free.
        _, direct = jacobian(_model(energy_head=False, force_head="vector", head_hidden=4))
        assert np.abs(direct - direct.T).max() > 1e-4 * np.abs(direct).max()


def test_padding_invariance(si_pairs):
    model = _model()
    small = _batch(si_pairs, batch_size=3)
    big = _batch(si_pairs, batch_size=5, n_atoms=16)
    noise = jax.random.normal(KEY, big.positions.shape) * 7.0
    big = big.replace(positions=jnp.where(big.atom_mask[..., None], big.positions, noise))
    init, apply, energy = _jitted(model)
    variables = init(KEY, small)
    a, b = np.asarray(apply(variables, small)), np.asarray(apply(variables, big))
    mask = np.asarray(small.atom_mask)
    np.testing.assert_allclose(b[:3, :8][mask], a[mask], atol=1e-5)
    assert np.all(b[~np.asarray(big.atom_mask)] == 0) and np.all(a[~mask] == 0)
    e_small = np.asarray(energy(variables, small))
    e_big = np.asarray(energy(variables, big))
    np.testing.assert_allclose(e_big[:3], e_small, rtol=1e-5)
    assert np.all(e_big[3:] == 0)  # empty batch slots


def test_invariance_and_periodicity():
    with jax.enable_x64(True):
        s, _ = rattled_si(cubic=True, seed=4)
        batch = Batch.from_structures([s])
        init, apply, energy_fn = _jitted(_model())
        variables = init(KEY, batch)
        energy = lambda b: float(energy_fn(variables, b)[0])  # noqa: E731
        e0 = energy(batch)
        f0 = np.asarray(apply(variables, batch))[0]
        tol = dict(rel=0, abs=1e-6)
        # Rigid translation (not a lattice vector).
        shift = jnp.asarray([0.37, -1.21, 2.05])
        assert energy(batch.replace(positions=batch.positions + shift)) == pytest.approx(e0, **tol)
        # One atom moved by a lattice vector.
        moved = batch.positions.at[0, 3].add(batch.cell[0, 0] - batch.cell[0, 2])
        assert energy(batch.replace(positions=moved)) == pytest.approx(e0, **tol)
        # Rotation of positions and cell (rows are lattice vectors): E invariant, F rotates with them.
        q, r = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        q = q if np.linalg.det(q) > 0 else -q
        rotated = batch.replace(positions=batch.positions @ q.T, cell=batch.cell @ q.T)
        assert energy(rotated) == pytest.approx(e0, **tol)
        np.testing.assert_allclose(np.asarray(apply(variables, rotated))[0], f0 @ q.T, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_bptt_double_backprop(si_pairs):
    relax = RelaxConfig(max_frames=5, step_mode="learned", step_size=0.01, tol=0.0)
    batch = _batch(si_pairs, batch_size=4)
    bptt = BPTT(_model(), relax)
    state = bptt.init_state(jax.jit(bptt.init_params)(KEY, batch), KEY)
    kernel = ("params", "energy_proj", "kernel")
    before = np.array(get_leaf(state.params["model"], kernel))  # a host copy: the step donates the state
    new, metrics = jit_train_step(bptt)(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["frames"]) == 5
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert not np.allclose(np.asarray(get_leaf(new.params["model"], kernel)), before)

    with jax.enable_x64(True):
        batch = _batch(si_pairs, batch_size=4)
        bptt = BPTT(_model(), relax)
        params = to64(jax.jit(bptt.init_params)(KEY, batch))
        # One compiled function for the gradient and the differences (compiling dominates at this size).
        value_and_grad = jax.jit(jax.value_and_grad(lambda p: bptt.loss(p, batch)[0]))
        _, grads = value_and_grad(params)
        loss = lambda p: float(value_and_grad(p)[0])  # noqa: E731
        # Central differences: at eps=1e-6 the loss's float64 rounding (~1e-15 of 1.4) is already 1e-9 of a
        # 1.5e-5 derivative; at 1e-4 the differences agree with the gradient to 3e-7 (1e-3 .. 1e-6 compared).
        eps = 1e-4
        for path, index in [(("model", "params", "energy_proj", "kernel"), (3, 0)),
                            (("model", "params", "encoder_0", "distance_bias", "kernel"), (1, 0)),
                            (("log_step_size",), ())]:
            x = float(get_leaf(params, path)[index])
            up, down = loss(set_leaf(params, path, index, x + eps)), loss(set_leaf(params, path, index, x - eps))
            fd = (up - down) / (2 * eps)
            ad = float(get_leaf(grads, path)[index])
            assert abs(ad) > 1e-8, path
            assert ad == pytest.approx(fd, rel=2e-6), (path, ad, fd)


def test_force_matching_step_trains_the_energy(si_pairs):
    structures = [Structure(s.positions, s.numbers, s.cell, s.pbc, forces=0.1 * (t - s.positions))
                  for s, t in si_pairs]
    batch = Batch.from_structures(structures, with_forces=True)
    model = _model()
    params = jax.jit(model.init)(KEY, batch)
    optimizer = optax.chain(optax.adam(1e-2))
    step, errors = make_force_step(model, optimizer)
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(5):
        params, opt_state, loss, skipped = step(params, opt_state, batch)
        assert not skipped
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    mse, l2 = errors(params, batch)
    assert np.all(np.isfinite(np.asarray(mse))) and np.all(np.isfinite(np.asarray(l2)))


def test_options_and_preset(si_pairs):
    batch = _batch(si_pairs)
    for bad in (dict(force_head="vector"), dict(output_transform="expm1"),
                dict(attn_bias="none", radial_channels=0)):
        with pytest.raises(ValueError):
            _model(**bad).init(KEY, batch)
    direct = _model(energy_head=False)
    with pytest.raises(ValueError, match="energy_head"):
        direct.apply(jax.jit(direct.init)(KEY, batch), batch, method="energy")

    model = build_model("adapt", "small_energy")
    assert model.energy_head and model.force_head == "linear" and model.output_transform == "none"
    init, apply, _ = _jitted(model)
    variables = init(KEY, batch)
    assert "energy_proj" in variables["params"] and "proj" not in variables["params"]
    forces = apply(variables, batch)
    assert forces.shape == batch.positions.shape and np.all(np.isfinite(np.asarray(forces)))
