"""bptt_jax.jax_md: a model's forces and energy in jax-md's conventions, and the tuned relaxation as a jax-md
minimiser. The tests that need jax-md itself (extra ``jaxmd``) skip without it; the rest run everywhere."""

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, molecule

from bptt_jax import BPTT, Batch, LoadedRun, RelaxConfig, Structure
from bptt_jax import jax_md as bmd
from bptt_jax.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _si(n_remove=0, seed=0, fixed=()):
    """A rattled 8-atom cubic Si cell (``n_remove`` atoms fewer; ``fixed`` atoms held): the structure, jax-md's box
    and the fractional positions."""
    atoms = bulk("Si", cubic=True)
    del atoms[list(range(n_remove))]
    atoms.rattle(0.1, seed=seed)
    s = Structure.from_atoms(atoms)
    s.fixed[list(fixed)] = True
    return s, bmd.cell_to_box(s.cell), jnp.asarray(atoms.get_scaled_positions(wrap=False), jnp.float32)


def _model(kind):
    if kind == "energy":
        return build_model("adapt", "small_energy", d_model=16, n_layers=1, n_heads=2, ffn_dim=32)
    return build_model(kind, "tiny")


@pytest.fixture(scope="module")
def models():
    """Each kind of model with its variables: ``adapt`` (forces, absolute coordinates among its inputs),
    ``energy`` (an energy head, periodic) and ``resmlp`` (a fixed atom count)."""
    s, _, _ = _si()
    out = {}
    for kind in ("adapt", "energy", "resmlp"):
        model = _model(kind)
        batch = Batch.from_structures([s], n_atoms=getattr(model, "max_atoms", None))
        out[kind] = model, jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    return out


def _reference_forces(model, variables, s):
    batch = Batch.from_structures([s], n_atoms=getattr(model, "max_atoms", None))
    return np.array(jax.jit(model.apply)(variables, batch))[0, :len(s)]


@pytest.mark.parametrize("kind", ["adapt", "resmlp"])
def test_force_fn_gives_the_models_forces_in_every_space(models, kind):
    model, variables = models[kind]  # resmlp: a fixed atom count, the structure is padded to it
    s, box, R = _si(fixed=[2])
    expected = _reference_forces(model, variables, s)
    assert np.all(expected[2] != 0)  # the model gives the fixed atom a force; force_fn holds it
    expected[2] = 0.0
    frac = bmd.force_fn(variables, model, s.numbers, box, fractional_coordinates=True, fixed=s.fixed)
    cart = bmd.force_fn({"model": variables}, model, s.numbers, box, fractional_coordinates=False, fixed=s.fixed)
    np.testing.assert_allclose(jax.jit(frac)(R), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(cart)(jnp.asarray(s.positions, jnp.float32)), expected, rtol=1e-5, atol=1e-5)
    # Free space: a molecule, no box, Cartesian positions.
    water = Structure.from_atoms(molecule("H2O"))
    free = bmd.force_fn(variables, model, water.numbers)
    np.testing.assert_allclose(jax.jit(free)(jnp.asarray(water.positions, jnp.float32)),
                               _reference_forces(model, variables, water), rtol=1e-5, atol=1e-5)


def test_the_structure_the_model_sees(models):
    """jax-md's boxes (a side, (3,) sides, a matrix of columns) as bptt-jax cells; pbc and padding."""
    model, _ = models["resmlp"]
    s, box, R = _si()
    side = float(s.cell[0, 0])
    for b in (side, jnp.full(3, side), box):
        batch = bmd.structure_fn(model, s.numbers, b, fractional_coordinates=True)(R)
        np.testing.assert_allclose(batch.cell[0], s.cell, atol=1e-6)
        np.testing.assert_allclose(batch.positions[0, :8], s.positions, atol=1e-5)
    assert batch.positions.shape == (1, model.max_atoms, 3) and int(batch.n_atoms[0]) == 8
    assert np.all(np.asarray(batch.pbc)) and np.all(np.asarray(batch.masses[0, :8]) > 28)
    skewed = np.array([[5.0, 0.0, 0.0], [1.0, 5.0, 0.0], [0.5, 0.5, 5.0]])  # rows, as ASE writes them
    batch = bmd.structure_fn(model, s.numbers, bmd.cell_to_box(skewed), fractional_coordinates=True)(R)
    np.testing.assert_allclose(batch.positions[0, :8], np.asarray(R) @ skewed, rtol=1e-6, atol=1e-6)
    free = bmd.structure_fn(model, s.numbers)(jnp.asarray(s.positions, jnp.float32))
    assert not np.any(np.asarray(free.pbc))


def test_force_fn_refuses_what_it_cannot_do(models):
    model, variables = models["adapt"]
    s, box, R = _si()
    with pytest.raises(ValueError, match="fractional_coordinates=True for space.periodic_general"):
        bmd.force_fn(variables, model, s.numbers, box)
    with pytest.raises(ValueError, match="fractional coordinates need a box"):
        bmd.force_fn(variables, model, s.numbers, fractional_coordinates=True)
    force = bmd.force_fn(variables, model, s.numbers, box, fractional_coordinates=True)
    with pytest.raises(ValueError, match=r"positions of shape \(7, 3\) for 8 atoms"):
        jax.eval_shape(force, R[:7])
    with pytest.raises(NotImplementedError, match="no stress"):
        jax.eval_shape(lambda R: force(R, perturbation=jnp.eye(3)), R)
    with pytest.raises(ValueError, match="no energy head"):
        bmd.energy_fn(variables, model, s.numbers, box, fractional_coordinates=True)


def test_force_fn_jits_vmaps_and_differentiates(models):
    model, variables = models["adapt"]
    s, box, R = _si()
    X = jnp.asarray(s.positions, jnp.float32)
    force = bmd.force_fn(variables, model, s.numbers, box, fractional_coordinates=True)
    cart = bmd.force_fn(variables, model, s.numbers, box, fractional_coordinates=False)
    jitted = jax.jit(force)
    other = R + 0.01
    jitted(R)
    assert jitted._cache_size() == 1 and np.isfinite(np.asarray(jitted(other))).all()
    assert jitted._cache_size() == 1  # new positions, the same program
    batch = Batch.from_structures([s])

    def loss_md(v):  # force_fn built inside the differentiated function
        return jnp.sum(bmd.force_fn(v, model, s.numbers, box, fractional_coordinates=True)(R) ** 2)

    def loss_model(v):
        return jnp.sum(model.apply(v, batch) ** 2)

    @jax.jit
    def everything(v):
        return (jax.vmap(force)(jnp.stack([R, other])), force(other), jax.grad(loss_md)(v), jax.grad(loss_model)(v),
                jax.jacfwd(force)(R), jax.jacfwd(cart)(X))

    both, single, g_md, g_model, jac_frac, jac_cart = everything(variables)
    np.testing.assert_allclose(both[1], single, rtol=1e-5, atol=1e-6)
    # With respect to the parameters, as the model's own gradient.
    leaves = jax.tree_util.tree_leaves(g_md)
    assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_md, g_model)
    # With respect to the positions (forward mode): the Jacobian by fractional R is the Cartesian one.
    np.testing.assert_allclose(jac_frac, jac_cart, rtol=1e-4, atol=1e-5)


def test_energy_gradient_is_minus_the_force_in_fractional_and_cartesian_coordinates(models):
    model, variables = models["energy"]
    s, box, R = _si(fixed=[0])
    X = jnp.asarray(s.positions, jnp.float32)
    kw = dict(fixed=s.fixed)
    e_frac = bmd.energy_fn(variables, model, s.numbers, box, fractional_coordinates=True, **kw)
    e_cart = bmd.energy_fn(variables, model, s.numbers, box, fractional_coordinates=False, **kw)
    force = bmd.force_fn(variables, model, s.numbers, box, fractional_coordinates=True, **kw)
    strained = box * 1.02
    other = bmd.force_fn(variables, model, s.numbers, strained, fractional_coordinates=True, **kw)

    @jax.jit
    def everything(R, X):
        return (e_frac(R), e_cart(X), jax.grad(e_frac)(R), jax.grad(e_cart)(X), force(R), force(R, box=strained),
                other(R), force(R.at[3].add(jnp.array([1.0, -1.0, 0.0]))))

    E_frac, E_cart, g_frac, g_cart, F, F_kw, F_strained, F_wrapped = everything(R, X)
    np.testing.assert_allclose(E_frac, E_cart, rtol=1e-6)
    np.testing.assert_allclose(g_frac, g_cart, rtol=1e-4, atol=1e-5)  # eV/Å, not eV: real-space derivatives
    np.testing.assert_allclose(-g_frac[1:], F[1:], rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(F[0]) == 0) and np.all(np.asarray(g_frac[0]) != 0)  # the fixed atom
    # box= at call time replaces the box; this model is periodic, so a wrapped atom feels the same force.
    np.testing.assert_allclose(F_kw, F_strained, rtol=1e-5, atol=1e-6)
    assert not np.allclose(F_strained, F, atol=1e-3)
    np.testing.assert_allclose(F_wrapped, F, rtol=1e-4, atol=1e-5)


def test_conventions_are_jax_mds(models):
    jax_md = pytest.importorskip("jax_md")
    from jax_md import minimize, space

    s, box, R = _si()
    # to_cartesian differentiates as jax-md's space.transform does (any energy of Cartesian positions will do).
    def energy(X):
        return jnp.sum(jnp.sin(X) * X[::-1]) + jnp.sum((X[:, None] - X[None]) ** 2)

    for ours, theirs in ((jax.grad, jax.grad), (jax.jacfwd, jax.jacfwd)):
        np.testing.assert_allclose(ours(lambda R: energy(bmd.to_cartesian(box, R)))(R),
                                   theirs(lambda R: energy(jax_md.space.transform(box, R)))(R), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.grad(lambda b: energy(bmd.to_cartesian(b, R)))(box),
                               jax.grad(lambda b: energy(jax_md.space.transform(b, R)))(box), rtol=1e-5, atol=1e-3)
    # The same descent in periodic_general (fractional R) and in periodic (orthorhombic, Cartesian R): shift_fn
    # takes the Cartesian step in both.
    model, variables = models["adapt"]
    side = jnp.asarray(np.diag(s.cell), jnp.float32)
    ends = []
    for (_, shift), fractional, b, start in ((space.periodic_general(box, wrapped=False), True, box, R),
                                             (space.periodic(side, wrapped=False), False, side,
                                              jnp.asarray(s.positions, jnp.float32))):
        f = bmd.force_fn(variables, model, s.numbers, b, fractional_coordinates=fractional)
        init, apply = minimize.gradient_descent(f, shift, step_size=0.01)
        end = jax.jit(lambda R: jax.lax.fori_loop(0, 3, lambda i, r: apply(r), init(R)))(start)
        ends.append(np.asarray(bmd.to_cartesian(box, end) if fractional else end))
    np.testing.assert_allclose(ends[0], ends[1], rtol=1e-5, atol=1e-5)
    assert np.abs(ends[0] - s.positions).max() > 1e-3


def _loaded(model, s, variables=None, **relax):
    """A run in memory: the model (with ``variables``, else fresh ones) and the relaxation ``relax`` describes."""
    bptt = BPTT(model, RelaxConfig(**relax))
    batch = Batch.from_structures([s], n_atoms=getattr(model, "max_atoms", None))
    params = bptt.init_params(jax.random.PRNGKey(3), batch)
    if variables is not None:
        params["model"] = variables
    return LoadedRun(Path("."), None, bptt, params, "final", 0), batch


@pytest.mark.parametrize("relax", [
    # Stops by its tolerance after 7 frames: the RMS movement per frame, 0.163 Å at first, 0.170 at the second,
    # falls to 0.1627 and 0.1609 at the sixth and seventh (momentum and annealing).
    dict(step_size=0.05, step_mode="learned", momentum=0.05, anneal=0.99, tol=0.162),
    dict(step_size=0.05, step_mode="network", step_head=dict(output_init="random", d_model=8, ffn_dim=16), tol=0.0),
], ids=["learned", "step_head"])
def test_learned_descent_follows_the_runs_relaxation_frame_by_frame(models, relax):
    pytest.importorskip("jax_md")
    from jax_md import space

    model, variables = models["adapt"]
    s, box, R = _si(n_remove=1, fixed=[0])  # 7 atoms: bptt-jax pads them to 8
    run, batch = _loaded(model, s, variables, max_frames=12, **relax)
    ref = run.bptt.relax_batch(run.params, batch, mode="scan", record=True)
    _, shift = space.periodic_general(box, wrapped=False)
    init, apply = bmd.learned_descent(run, shift, s.numbers, box, fractional_coordinates=True, fixed=s.fixed)

    def frame(state, _):
        state = apply(state)
        return state, (state.position, state.step_size)
    last, (trajectory, etas) = jax.jit(lambda R: jax.lax.scan(frame, init(R), None, length=12))(R)
    cart = jax.vmap(lambda p: bmd.to_cartesian(box, p))(trajectory)
    np.testing.assert_allclose(cart, ref.trajectory[:, 0, :7], atol=1e-5)
    assert (int(last.frames), bool(last.converged)) == (int(ref.frames[0]), bool(ref.converged[0]))
    if relax["step_mode"] == "network":
        assert int(last.frames) == 12 and len(set(np.round(np.asarray(etas), 6))) > 1  # η changes every frame
        return
    assert (int(last.frames), bool(last.converged)) == (7, True)
    # The user's while loop stops where the scan froze.
    stopped = jax.jit(lambda R: bmd.run_to_stop(apply, init(R)))(R)
    np.testing.assert_allclose(stopped.position, last.position, atol=1e-6)
    assert int(stopped.frames) == 7


def test_learned_descent_state_is_made_under_jit_and_compiles_once(models):
    pytest.importorskip("jax_md")
    from jax_md import space

    model, variables = models["adapt"]
    s, box, R = _si()
    run, _ = _loaded(model, s, variables, step_size=0.05, step_mode="learned")
    _, shift = space.periodic_general(box, wrapped=False)
    init, apply = bmd.learned_descent(run, shift, s.numbers, box, fractional_coordinates=True)
    state = jax.jit(init)(R)
    assert not bool(state.done) and int(state.frames) == 0 and bool(jnp.isinf(state.movement))
    step = jax.jit(apply)
    state = step(step(state))
    assert step._cache_size() == 1 and int(state.frames) == 2
    fire, _ = _loaded(model, s, variables, rule="fire")
    with pytest.raises(ValueError, match="precon_fire_descent"):
        bmd.learned_descent(fire, shift, s.numbers, box, fractional_coordinates=True)


def test_jax_mds_ase_fire_is_bptt_jaxs_fire(models):
    """jax-md's precon_fire_descent without preconditioner or line search is ASE's FIRE, bptt-jax's rule "fire":
    the same frames, up to float32 rounding."""
    pytest.importorskip("jax_md")
    from jax_md import minimize, space

    model, variables = models["adapt"]
    s, box, R = _si()
    run, batch = _loaded(model, s, variables, rule="fire", max_frames=30, tol=0.0)
    ref = run.bptt.relax_batch(run.params, batch, mode="scan", record=True)
    _, shift = space.periodic_general(box, wrapped=False)
    force = bmd.force_fn(run.params, model, s.numbers, box, fractional_coordinates=True)
    init, apply = minimize.precon_fire_descent(force, shift, use_armijo=False)

    def frame(state, _):
        state = apply(state)
        return state, state.position
    _, trajectory = jax.jit(lambda R: jax.lax.scan(frame, init(R), None, length=30))(R)
    cart = jax.vmap(lambda p: bmd.to_cartesian(box, p))(trajectory)
    np.testing.assert_allclose(cart, ref.trajectory[:, 0, :8], atol=1e-4)
    assert np.abs(cart[-1] - s.positions).max() > 0.1  # it went somewhere


def _example():
    spec = importlib.util.spec_from_file_location("jax_md_relax", ROOT / "examples" / "jax_md_relax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_relaxes_with_jax_md_as_bptt_jax_does(tmp_path, cli_cache, capsys):
    """examples/jax_md_relax.py as a user runs it without a run directory: it makes its small run, then relaxes a
    Si vacancy with jax-md and compares; and the README's jax-md block on that run."""
    pytest.importorskip("jax_md")
    example = _example()
    run_dir = example.make_small_run(tmp_path / "run", cli_cache / "data")
    out = example.main([str(run_dir)])
    # jax-md's FIRE (another integrator) and bptt-jax's FIRE stop near one minimum, each within |F| / curvature
    # of it; the example computes that bound from both final forces and the smallest Hessian eigenvalue.
    max_dR, _ = out["fire_descent"]
    assert max_dR <= out["fire_bound"] < 0.05, out
    # The same rule (ASE's FIRE) and the run's own tuned relaxation: the same frames, up to float32 rounding.
    frames, frames_ref = out["precon_fire_frames"]
    assert out["precon_fire_descent"][0] < 1e-4 and abs(frames - frames_ref) <= 1
    frames, frames_ref, converged, converged_ref = out["learned_frames"]
    assert out["learned_descent_per_frame"] < 1e-4 and (frames, converged) == (frames_ref, converged_ref)
    assert out["energy"][1] < out["energy"][0]
    printed = capsys.readouterr().out
    assert "jax_md fire_descent" in printed and "learned_descent" in printed
    print(printed)  # the agreement table, for pytest -s

    # The README's jax-md block, on this run.
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"In jax-md \(`bptt_jax.jax_md`.*?```\n(.*?)```", readme, flags=re.S).group(1)
    import bptt_jax

    namespace = {"bptt_jax": bptt_jax, "atoms": example.si_vacancy()}
    exec(compile(block.replace("runs/X", str(run_dir)), "README.md", "exec"), namespace)
    assert int(namespace["state"].frames) == out["learned_frames"][1]
