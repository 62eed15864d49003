"""A bptt-jax model as an ASE calculator: ASE's optimizers, MD and analysis driven by a tuned MLIP.

    from bptt_jax.ase import Calculator
    atoms.calc = Calculator.from_run("runs/X")      # the run's delivered model (bptt_jax.load_run)
    ase.optimize.FIRE(atoms).run(fmax=0.05)
    LearnedRelaxation(atoms, run="runs/X").run()    # the tuned relaxation itself, as an ASE optimizer

Forces come from the model. A model with an energy head (preset ``small_energy``: forces = -dE/dR) also gives
the energy and, for a cell periodic along all three axes, the stress ``(1/V) ∂E/∂ε`` (the derivative by a
homogeneous strain of positions and cell together; ASE's sign and Voigt order), so ASE's cell filters
(``FrechetCellFilter``) and NPT dynamics work with it. Each structure is padded to its size bucket
(:func:`~bptt_jax.structures.bucket_size`) and each jitted function compiles once per bucket, not once per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes
from ase.optimize.optimize import Optimizer

from bptt_jax.structures import DEFAULT_BUCKETS, Batch, Structure, bucket_size


class Calculator(_AseCalculator):
    """ASE calculator for a bptt-jax force model.

    Args:
      model: a Flax force model (``model.apply(variables, batch) -> (B, N, 3)`` eV/Å).
      variables: its parameters (``params["model"]`` of a run).
      buckets: padding sizes; a structure larger than the largest is an error.
      **kwargs: passed to :class:`ase.calculators.calculator.Calculator`.

    Properties: ``forces`` (eV/Å); with an energy-head model also ``energy`` and ``free_energy`` (eV) and, for a
    fully periodic cell, ``stress`` (eV/Å³, Voigt order xx, yy, zz, yz, xz, xy; computed when asked for).
    """

    def __init__(self, model, variables: Any, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, **kwargs):
        super().__init__(**kwargs)
        self.model, self.variables = model, variables
        self.buckets = tuple(buckets) if buckets is not None else None
        self.has_energy = bool(getattr(model, "energy_head", False))
        self.implemented_properties = (["forces", "energy", "free_energy", "stress"] if self.has_energy
                                       else ["forces"])
        self._forces = jax.jit(lambda v, b: model.apply(v, b))
        self._energy = jax.jit(lambda v, b: model.apply(v, b, method="energy")) if self.has_energy else None
        self._virial = jax.jit(jax.grad(self._strained_energy, argnums=2)) if self.has_energy else None

    def _strained_energy(self, variables: Any, batch: Batch, strain: jax.Array) -> jax.Array:
        """The energy (eV) of the first structure with positions and cell strained by ``I + strain`` (3, 3)."""
        deform = jnp.eye(3, dtype=batch.cell.dtype) + strain
        strained = batch.replace(positions=batch.positions @ deform, cell=batch.cell @ deform)
        return self.model.apply(variables, strained, method="energy")[0]

    @classmethod
    def from_run(cls, run_dir: Union[str, Path], checkpoint: Union[str, int] = "final", **kwargs) -> "Calculator":
        """The model of a run directory (:func:`bptt_jax.load_run`), with the run's size buckets."""
        from bptt_jax.load import load_run

        run = load_run(run_dir, checkpoint)
        return cls(run.model, run.params["model"], buckets=run.buckets, **kwargs)

    def _batch(self, atoms) -> tuple[Batch, int]:
        s = Structure.from_atoms(atoms)
        n_pad = bucket_size(len(s), self.buckets)
        return Batch.from_structures([s], n_atoms=n_pad), len(s)

    def calculate(self, atoms=None, properties: Sequence[str] = ("forces",),
                  system_changes: Sequence[str] = all_changes):
        super().calculate(atoms, properties, system_changes)
        batch, n = self._batch(self.atoms)
        # FixAtoms constraints are an input of the model (as OC20's fixed flag): ASE's constraint then zeroes
        # those atoms' forces where it applies.
        forces = np.asarray(self._forces(self.variables, batch), np.float64)[0, :n]
        self.results = {"forces": forces}
        if self.has_energy:
            energy = float(self._energy(self.variables, batch)[0])
            self.results.update(energy=energy, free_energy=energy)
        if "stress" in properties:
            if not self.has_energy:
                raise PropertyNotImplementedError("stress needs a model with an energy head (e.g. small_energy)")
            if not self.atoms.pbc.all():
                raise PropertyNotImplementedError("stress needs a cell periodic along all three axes")
            dE = np.asarray(self._virial(self.variables, batch, jnp.zeros((3, 3), batch.cell.dtype)), np.float64)
            sigma = 0.5 * (dE + dE.T) / self.atoms.get_volume()
            self.results["stress"] = sigma.flat[[0, 4, 8, 5, 2, 1]]


class LearnedRelaxation(Optimizer):
    """A run's tuned relaxation as an ASE optimizer: each ``step`` is one frame of the learned update rule
    (the run's model, its learned step size or step head, momentum and annealing), and the run's stop rule
    decides when it has converged (RMS movement of the free atoms in one frame below ``relax.tol``, or the
    frame budget ``relax.max_frames``, or divergence), exactly as :func:`bptt_jax.load_run`'s ``relax`` does::

        opt = LearnedRelaxation(atoms, run="runs/X")
        opt.run()            # at most max_frames steps; opt.status: frames, converged, diverged

    ``run(fmax=...)`` also stops once every force is below ``fmax`` (eV/Å); by default only the learned stop
    rule applies. ``atoms.calc`` is set to the run's :class:`Calculator` when it has none (ASE's logging and
    trajectory read the forces from it). The log lists each step's RMS movement.
    """

    def __init__(self, atoms, run, checkpoint: Union[str, int] = "final", logfile=None, trajectory=None,
                 **kwargs):
        from bptt_jax.load import LoadedRun, load_run
        from bptt_jax.relax.loop import initial_status, make_frame

        loaded = run if isinstance(run, LoadedRun) else load_run(run, checkpoint)
        if atoms.calc is None:
            atoms.calc = Calculator(loaded.model, loaded.params["model"], buckets=loaded.buckets)
        super().__init__(atoms, logfile=logfile, trajectory=trajectory, **kwargs)
        self.loaded = loaded
        s = Structure.from_atoms(atoms)
        self._n, self._free = len(s), ~s.fixed
        batch = Batch.from_structures([s], n_atoms=bucket_size(len(s), loaded.buckets))
        relax = loaded.bptt.relax
        rule = loaded.bptt.update_rule(loaded.params, batch)
        frame = make_frame(rule.step_fn, batch.positions, batch.free_mask, relax.tol, relax.diverge_distance,
                           relax.max_frames)
        self._frame = jax.jit(frame)
        self._carry = (rule.init_fn(batch.positions), initial_status(batch.free_mask))
        self.max_frames = relax.max_frames
        self.movement = float("inf")

    @property
    def status(self) -> dict[str, Any]:
        """Frames taken, and whether the relaxation converged (movement below ``tol``) or diverged."""
        st = self._carry[1]
        return {"frames": int(st.frames[0]), "converged": bool(st.converged[0]), "diverged": bool(st.diverged[0]),
                "done": bool(st.done[0])}

    def step(self, forces=None):
        old = np.asarray(self._carry[0].positions[0, :self._n])
        self._carry = self._frame(self._carry)
        new = np.asarray(self._carry[0].positions[0, :self._n], np.float64)
        moved = (new - old)[self._free]
        self.movement = float(np.sqrt(np.mean(np.sum(moved ** 2, axis=-1)))) if len(moved) else 0.0
        self.optimizable.atoms.set_positions(new)

    def gradient_converged(self, gradient):
        if self.status["done"]:
            return True
        return self.fmax is not None and self.optimizable.converged(gradient, self.fmax)

    def run(self, fmax: Optional[float] = None, steps: Optional[int] = None):
        """Frames until the learned stop rule (or ``fmax``) says done; at most ``steps`` (default max_frames)."""
        return super().run(fmax=fmax, steps=self.max_frames if steps is None else steps)

    def log(self, gradient):
        if self.logfile is not None:
            self.logfile.write(f"LearnedRelaxation: {self.nsteps:4d}  RMS movement {self.movement:.3e} Å\n")
