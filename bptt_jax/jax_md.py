"""A bptt-jax model in `jax-md <https://github.com/jax-md/jax-md>`_: its forces and energy as jax-md's
``force_fn(R, **kwargs)`` / ``energy_fn(R, **kwargs)``, and the tuned relaxation as an ``(init_fn, apply_fn)``
minimiser, as ``jax_md.minimize`` writes them::

    from jax_md import minimize, space
    from bptt_jax.jax_md import cell_to_box, force_fn, learned_descent, run_to_stop

    run = bptt_jax.load_run("runs/X")
    box = cell_to_box(atoms.cell.array)          # jax-md's box: lattice vectors as columns, Å
    R = atoms.get_scaled_positions(wrap=False)   # fractional, as periodic_general's default
    displacement, shift = space.periodic_general(box, wrapped=False)
    force = force_fn(run.params, run.model, atoms.numbers, box, fractional_coordinates=True)
    init, apply = minimize.fire_descent(force, shift, dt_max=1.0)      # any jax-md minimiser or integrator
    init, apply = learned_descent(run, shift, atoms.numbers, box, fractional_coordinates=True)
    state = run_to_stop(apply, init(R))          # the tuned relaxation, stopped by the run's own stop rule

jax-md is not a dependency of this module (extra ``jaxmd``): the functions here only follow its conventions.

Conventions (jax-md's, ``jax_md/space.py``):

- ``box``: a side length, (3,) side lengths or a (3, 3) matrix whose *columns* are the lattice vectors, Å
  (``box = cell.T`` for an ASE / bptt-jax cell with vectors as rows). None: free space (``space.free()``).
- Coordinates: with ``fractional_coordinates=True`` (``space.periodic_general``'s default) ``R`` is fractional
  and the Cartesian positions are ``box @ R``; with False (``space.periodic``, ``space.free``, or
  ``periodic_general(..., fractional_coordinates=False)``) ``R`` is Cartesian, Å. A function given a box must be
  told which (there is no default: the two spaces' defaults differ, and a mismatch would be silently wrong).
- Forces are Cartesian, eV/Å, in both cases: ``shift_fn(R, dR)`` takes a Cartesian ``dR`` and converts it, so
  ``shift_fn(R, dt * force(R))`` is right in every space. Derivatives with respect to fractional ``R`` live in
  real space, as jax-md's ``space.transform`` defines them: ``jax.grad(energy)(R) = dE/dR_cartesian``, so
  ``-jax.grad(energy)`` is the Cartesian force (``quantity.force``) and ``jax.jacfwd(force)`` the Cartesian
  Jacobian.
- Keyword arguments at call time: ``box=`` replaces the box for that call (as ``periodic_general``'s
  displacement and shift functions take it); ``perturbation=`` (a strain, for ``quantity.stress``) is refused:
  the models' minimum-image lattice translation is a ``stop_gradient`` constant, so their derivative by the cell
  is not the strain derivative (see :mod:`bptt_jax.ase`); any other keyword (``neighbor=``, ...) is ignored, the
  models see every atom.
- Wrapping: a model with absolute coordinates among its inputs (ADAPT ``coords="cartesian"``: the paper's model,
  presets ``tiny``, ``small``, ``paper``; the step head) gives other forces for a wrapped image of the same
  structure. To follow the positions bptt-jax follows, make the space with ``wrapped=False``. Models with
  invariant inputs (presets ``small_geo``, ``small_energy``) give the same forces either way.
- ``species`` are atomic numbers (not jax-md's 0-based species labels).
- Fixed atoms (``fixed``, OC20's flag, ASE's ``FixAtoms``) are an input of the models; ``force_fn`` gives them
  zero force, so jax-md's minimisers and integrators keep them in place. ``energy_fn`` is the whole structure's
  energy: its gradient is ``-force_fn`` on the free atoms.

FIRE: ``minimize.precon_fire_descent(force, shift_fn, use_armijo=False)`` is bptt-jax's FIRE (rule ``"fire"``,
ASE's) frame for frame; ``minimize.fire_descent`` is jax-md's own (velocity Verlet, no step limit; ``dt_max=1.0``
gives it bptt-jax's parameters), which finds the same minima by another path.

A model with a fixed atom count (ResMLP) sees the structure padded to its ``max_atoms``; the others see it as is.
Everything is a pure function of ``R`` (and of ``params`` when the functions are built inside a transformed
function): it jits, vmaps over ``R`` and differentiates with respect to ``R`` and ``params``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
from ase.data import atomic_masses

from bptt_jax.relax.loop import Status, initial_status, rms_movement, stop_rule
from bptt_jax.structures import Batch

Array = jax.Array
Box = Union[float, Array]


# ----------------------------------------------------------------------------------------------------
# Coordinates


def cell_to_box(cell) -> Array:
    """jax-md's box (lattice vectors as columns) from an ASE / bptt-jax cell (vectors as rows), Å."""
    return jnp.asarray(cell).T


def _box_matrix(box: Box, dtype) -> Array:
    """The (3, 3) box, columns the lattice vectors, from jax-md's scalar, (3,) or (3, 3) box."""
    box = jnp.asarray(box, dtype)
    if box.ndim == 0:
        return jnp.eye(3, dtype=dtype) * box
    if box.ndim == 1:
        return jnp.diag(box)
    return box


@jax.custom_jvp
def to_cartesian(box: Array, R: Array) -> Array:
    """Cartesian positions ``box @ R`` (Å) of (N, 3) fractional ``R`` in a (3, 3) box (columns the lattice vectors).

    Its derivative follows jax-md's ``space.transform``: a tangent of ``R`` passes through unchanged, so
    derivatives with respect to fractional coordinates come out in real space (eV/Å, not eV)."""
    return R @ box.T


@to_cartesian.defjvp
def _to_cartesian_jvp(primals, tangents):
    box, R = primals
    dbox, dR = tangents
    return to_cartesian(box, R), dR + R @ dbox.T


# ----------------------------------------------------------------------------------------------------
# Forces and energies


def model_variables(params: Any) -> Any:
    """The model's Flax variables from either the variables themselves or a run's parameters
    (``LoadedRun.params``: ``{"model": ..., ["log_step_size"], ["step_head"]}``)."""
    if isinstance(params, dict) and "model" in params and "params" not in params:
        return params["model"]
    return params


def structure_fn(model, species, box: Optional[Box] = None, *, fractional_coordinates: Optional[bool] = None,
                 pbc=None, fixed=None) -> Callable[..., Batch]:
    """``batch_at(R, **kwargs) -> Batch``: the one-structure :class:`~bptt_jax.structures.Batch` the model sees at
    positions ``R`` (see the module docstring for ``box``, ``fractional_coordinates`` and the keyword arguments).

    Args:
      model: the force model (padded to its ``max_atoms`` when it has one).
      species: (N,) atomic numbers.
      box: jax-md's box, Å; None: free space.
      fractional_coordinates: whether ``R`` is fractional; required with a box.
      pbc: (3,) periodic axes; default: all with a box, none without.
      fixed: optional (N,) bool, atoms held in place.
    """
    numbers = jnp.asarray(species, jnp.int32)
    if numbers.ndim != 1:
        raise ValueError(f"species must be (N,) atomic numbers, not shape {numbers.shape}")
    n = numbers.shape[0]
    if box is None:
        if fractional_coordinates:
            raise ValueError("fractional coordinates need a box")
        if pbc is not None and bool(jnp.any(jnp.asarray(pbc))):
            raise ValueError("periodic axes need a box")
        fractional = False
    elif fractional_coordinates is None:
        raise ValueError("with a box, say whether R is fractional: fractional_coordinates=True for "
                         "space.periodic_general(box) (its default), False for space.periodic(side) or "
                         "periodic_general(box, fractional_coordinates=False)")
    else:
        fractional = bool(fractional_coordinates)
    periodic = jnp.broadcast_to(jnp.asarray(box is not None if pbc is None else pbc, bool), (3,))
    held = jnp.zeros(n, bool) if fixed is None else jnp.asarray(fixed, bool).reshape(n)
    n_pad = getattr(model, "max_atoms", None) or n
    if n > n_pad:
        raise ValueError(f"{n} atoms, more than the model's {n_pad}")
    pad = n_pad - n
    numbers_p = jnp.pad(numbers, (0, pad))
    atom_mask = jnp.arange(n_pad) < n
    fixed_p = jnp.pad(held, (0, pad))
    mass_table = jnp.asarray(atomic_masses)

    def batch_at(R: Array, **kwargs) -> Batch:
        if "perturbation" in kwargs:
            raise NotImplementedError("no stress: the models' derivative by the cell is not the strain derivative "
                                      "(their minimum-image lattice translation is a stop_gradient constant)")
        R = jnp.asarray(R)
        if R.shape != (n, 3):
            raise ValueError(f"positions of shape {R.shape} for {n} atoms; expected ({n}, 3)")
        b = kwargs.get("box", box)
        if b is None:
            cell = jnp.eye(3, dtype=R.dtype)  # nothing wraps: any invertible cell will do
            cart = R
        else:
            frame = _box_matrix(b, R.dtype)
            cell = frame.T
            cart = to_cartesian(frame, R) if fractional else R
        # Padding atoms sit on the first real atom, as Batch.from_structures puts them.
        positions = jnp.concatenate([cart, jnp.broadcast_to(cart[:1], (pad, 3))]) if pad else cart
        masses = jnp.where(atom_mask, mass_table[numbers_p], 0.0).astype(R.dtype)
        return Batch(positions=positions[None], numbers=numbers_p[None], masses=masses[None], cell=cell[None],
                     pbc=periodic[None], atom_mask=atom_mask[None], fixed_mask=fixed_p[None])

    return batch_at


def force_fn(params: Any, model, species, box: Optional[Box] = None, *,
             fractional_coordinates: Optional[bool] = None, pbc=None, fixed=None) -> Callable[..., Array]:
    """The model's forces as jax-md's ``force_fn(R, **kwargs) -> (N, 3)`` Cartesian forces in eV/Å.

    Args:
      params: the model's variables, or a run's parameters (``load_run(...).params``).
      model: the Flax force model (``load_run(...).model``).
      species: (N,) atomic numbers.
      box: jax-md's box (a side, (3,) sides or (3, 3) with the lattice vectors as columns), Å; None: free space.
      fractional_coordinates: whether ``R`` is fractional (``space.periodic_general``'s default) or Cartesian;
        required with a box.
      pbc: (3,) periodic axes (default: all with a box, none without).
      fixed: optional (N,) bool, atoms held in place: an input of the model, and zero force.

    ``R`` is (N, 3), fractional or Cartesian (Å) as the space stores it; ``box=`` at call time replaces the box.
    Pass the result to any jax-md minimiser or integrator, e.g. ``minimize.fire_descent(force, shift_fn)``.
    """
    variables = model_variables(params)
    batch_at = structure_fn(model, species, box, fractional_coordinates=fractional_coordinates, pbc=pbc,
                            fixed=fixed)

    def force(R: Array, **kwargs) -> Array:
        batch = batch_at(R, **kwargs)
        forces = model.apply(variables, batch)
        return jnp.where(batch.free_mask[..., None], forces, 0.0)[0, :len(R)]

    return force


def energy_fn(params: Any, model, species, box: Optional[Box] = None, *,
              fractional_coordinates: Optional[bool] = None, pbc=None, fixed=None) -> Callable[..., Array]:
    """The energy of a model with an energy head (preset ``small_energy``) as jax-md's ``energy_fn(R, **kwargs)``,
    eV. Arguments as :func:`force_fn`; ``-jax.grad(energy)(R)`` is the Cartesian force, equal to ``force_fn``'s on
    the free atoms (``fixed`` atoms feel a force here; ``force_fn`` holds them).

    Raises:
      ValueError: the model has no energy head (a force model has no energy; use :func:`force_fn`).
    """
    if not getattr(model, "energy_head", False):
        raise ValueError(f"{type(model).__name__} has no energy head, so no energy (a force model; preset "
                         "small_energy has one): use bptt_jax.jax_md.force_fn, or jax-md's minimisers with it")
    variables = model_variables(params)
    batch_at = structure_fn(model, species, box, fractional_coordinates=fractional_coordinates, pbc=pbc,
                            fixed=fixed)

    def energy(R: Array, **kwargs) -> Array:
        return model.apply(variables, batch_at(R, **kwargs), method="energy")[0]

    return energy


# ----------------------------------------------------------------------------------------------------
# The tuned relaxation as a jax-md minimiser


@flax.struct.dataclass
class LearnedDescentState:
    """State of :func:`learned_descent`: one structure, every field a pytree leaf.

    Attributes:
      position: (N, 3) positions as the space stores them (fractional or Cartesian Å).
      velocity: (N, 3) the last frame's Cartesian displacement (the momentum buffer), Å.
      displacement: (N, 3) Cartesian displacement from the start, Å (unwrapped; the stop rule's divergence bound).
      step_size: () η of the last frame (annealed), Å²/eV.
      movement: () RMS displacement of the free atoms in the last frame, Å (inf before the first).
      frames: () frames taken.
      done: () the stop rule stopped the relaxation (tolerance, divergence or the frame budget); every later
        ``apply_fn`` returns the state unchanged.
      converged: () stopped by the tolerance: ``movement < tol``.
      diverged: () stopped by non-finite positions or an RMS displacement beyond ``diverge_distance``; the state is
        the last good one.
    """

    position: Array
    velocity: Array
    displacement: Array
    step_size: Array
    movement: Array
    frames: Array
    done: Array
    converged: Array
    diverged: Array


def _load(run, checkpoint):
    if isinstance(run, (str, Path)):
        from bptt_jax.load import load_run

        return load_run(run, checkpoint)
    return run


def learned_descent(run, shift_fn: Callable[..., Array], species, box: Optional[Box] = None, *,
                    fractional_coordinates: Optional[bool] = None, pbc=None, fixed=None,
                    checkpoint: Union[str, int] = "final", tol: Optional[float] = None,
                    max_frames: Optional[int] = None) -> tuple[Callable[..., LearnedDescentState],
                                                               Callable[..., LearnedDescentState]]:
    """A run's tuned relaxation as a jax-md minimiser: ``(init_fn, apply_fn)``, one frame per ``apply_fn``.

    Each frame is the run's update rule (paper Eq. 2 with its ablations), with the model's forces F and the run's
    step size η (fixed, learned, or the step head's per frame)::

        η_k = η · anneal^k,   v ← momentum · v + η_k F,   R ← shift_fn(R, v)

    and the run's stop rule after it (:func:`~bptt_jax.relax.loop.stop_rule`, the library's only one): the
    relaxation is done once the RMS movement of the free atoms in one frame falls below ``tol`` (converged), after
    ``max_frames`` frames, or when it diverges (that frame is rejected). It gives the frames and positions of
    ``load_run(...).relax`` (see ``tests/test_jax_md.py``)::

        init_fn, apply_fn = learned_descent(run, shift_fn, species, box, fractional_coordinates=True)
        state = init_fn(R)                                    # R: (N, 3) as the space stores it
        state = jax.lax.while_loop(lambda s: ~s.done, apply_fn, state)    # or run_to_stop(apply_fn, state)
        state.position, state.frames, state.converged

    Args:
      run: a :class:`~bptt_jax.load.LoadedRun` or a run directory (loaded at ``checkpoint``).
      shift_fn: the space's shift function (``space.periodic_general(box, wrapped=False)[1]``, ...).
      species, box, fractional_coordinates, pbc, fixed: the structure, as in :func:`force_fn`.
      tol, max_frames: replace the run's stop rule (``relax.tol`` Å, ``relax.max_frames``).

    Raises:
      ValueError: the run relaxes with FIRE (then use ``jax_md.minimize.precon_fire_descent(force, shift_fn,
        use_armijo=False)``, which is the same rule), or with noise or dropout inside its relaxation.
    """
    run = _load(run, checkpoint)
    relax = run.bptt.relax
    if relax.rule != "descent":
        raise ValueError(f"the run relaxes with {relax.rule!r}, not a learned descent: use jax-md's FIRE with "
                         "bptt_jax.jax_md.force_fn (minimize.precon_fire_descent(force, shift, use_armijo=False) is "
                         "bptt-jax's FIRE)")
    if relax.noise or relax.dropout:
        raise ValueError("learned_descent reproduces deterministic relaxations; this run's has noise or dropout")
    tol = relax.tol if tol is None else tol
    max_frames = relax.max_frames if max_frames is None else max_frames
    model, params, step = run.model, run.params, run.bptt.step
    variables = model_variables(params)
    batch_at = structure_fn(model, species, box, fractional_coordinates=fractional_coordinates, pbc=pbc,
                            fixed=fixed)
    free = ~jnp.zeros(jnp.shape(species), bool) if fixed is None else ~jnp.asarray(fixed, bool)
    scalar = step.scalar(params)  # None: the step head

    def forces_and_step(R: Array, **kwargs) -> tuple[Array, Array]:
        batch = batch_at(R, **kwargs)
        forces = jnp.where(batch.free_mask[..., None], model.apply(variables, batch), 0.0)
        eta = scalar if scalar is not None else step.for_rule(params, batch, False)(batch.positions, forces, None)[0]
        return forces[0, :len(R)], jnp.asarray(eta, batch.positions.dtype)

    def init_fn(R: Array, **unused_kwargs) -> LearnedDescentState:
        R = jnp.asarray(R)
        status = initial_status(free[None])
        zero = jnp.zeros(R.shape, R.dtype)
        return LearnedDescentState(R, zero, zero, jnp.zeros((), R.dtype), jnp.asarray(jnp.inf, R.dtype),
                                   jnp.zeros((), jnp.int32), status.done[0], status.converged[0],
                                   status.diverged[0])

    def apply_fn(state: LearnedDescentState, **kwargs) -> LearnedDescentState:
        forces, eta = forces_and_step(state.position, **kwargs)
        eta = eta * jnp.asarray(relax.anneal, eta.dtype) ** state.frames
        velocity = relax.momentum * state.velocity + eta * forces
        displacement = state.displacement + velocity
        # The stop rule on Cartesian displacements from the start: unwrapped and in Å whatever the space stores.
        status = Status(state.done[None], state.frames[None], state.converged[None], state.diverged[None])
        accept, status = stop_rule(status, jax.lax.stop_gradient(state.displacement[None]),
                                   jax.lax.stop_gradient(displacement[None]), jnp.zeros_like(displacement[None]),
                                   free[None], tol, relax.diverge_distance, max_frames)
        moved = LearnedDescentState(shift_fn(state.position, velocity, **kwargs), velocity, displacement, eta,
                                    rms_movement(velocity[None], free[None])[0], status.frames[0], status.done[0],
                                    status.converged[0], status.diverged[0])
        kept = state.replace(frames=status.frames[0], done=status.done[0], converged=status.converged[0],
                             diverged=status.diverged[0])
        return jax.tree_util.tree_map(lambda a, b: jnp.where(accept[0], a, b), moved, kept)

    return init_fn, apply_fn


def run_to_stop(apply_fn: Callable[..., LearnedDescentState], state: LearnedDescentState,
                **kwargs) -> LearnedDescentState:
    """Frames of ``apply_fn`` until the state is done (a ``lax.while_loop``; at most the frame budget):
    ``jax.lax.while_loop(lambda s: ~s.done, lambda s: apply_fn(s, **kwargs), state)``."""
    return jax.lax.while_loop(lambda s: ~s.done, lambda s: apply_fn(s, **kwargs), state)
