"""A tuned model in jax-md: relax one structure with jax-md's FIRE and with the run's learned descent, and check
both against bptt-jax's own relaxations.

    python examples/jax_md_relax.py [RUN_DIR] [--structure FILE]

Without RUN_DIR it makes a small run first, runs/jax_md_example (reused when it is there): the pipeline on the
tiny Si-defect data set with a small energy-head model and one BPTT epoch (a few minutes on a CPU, mostly
compilation). The structure is FILE's first image, or a rattled Si vacancy in a 2x2x2 conventional cell. Needs jax-md
(``pip install -e .[jaxmd]``).

It compares, on the same structure and model:

1. ``jax_md.minimize.fire_descent`` (its own FIRE: velocity Verlet, no step limit), run until every force is
   below ``--fmax``, with bptt-jax's FIRE (ASE's rule) run to a tolerance of ``--tol`` Å per frame: two
   integrators, one minimum; the final structures agree to about |F|/curvature.
2. ``jax_md.minimize.precon_fire_descent(..., use_armijo=False)`` (without a preconditioner: ASE's FIRE) with
   bptt-jax's FIRE, under the same stop rule: the same rule, so the same frames.
3. ``bptt_jax.jax_md.learned_descent`` with ``load_run(...).relax``, the run's tuned relaxation, frame by frame.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bptt_jax as bj
from bptt_jax import jax_md as bmd
from bptt_jax.losses import dq

DEFAULT_RUN = Path("runs/jax_md_example")


def make_small_run(run_dir: Path = DEFAULT_RUN, cache_dir: Path = Path("data")) -> Path:
    """A small finished run in ``run_dir``: the pipeline with a conservative model (energy head, so FIRE has a
    minimum to find) on the tiny Si-defect data set (generated into ``cache_dir``), one BPTT epoch."""
    from bptt_jax.pipeline import (DataConfig, EvalConfig, FinetuneConfig, ModelConfig, PretrainConfig, RunConfig,
                                   run_pipeline)

    cfg = RunConfig(
        # The tiny preset's cells have 64-65 atoms; one size bucket makes one program of each kind.
        data=DataConfig(name="si_defects", preset="tiny", n=10, n_test=4, workers=1, cache_dir=str(cache_dir),
                        buckets=(72,)),
        model=ModelConfig(preset="small_energy", overrides=dict(d_model=16, n_layers=1, n_heads=2, ffn_dim=32)),
        relax=bj.RelaxConfig(max_frames=20, step_size=None, step_mode="learned"),
        pretrain=PretrainConfig(max_epochs=30, patience=None),
        finetune=FinetuneConfig(epochs=1),
        eval=EvalConfig(step_grid=(0.005, 0.01, 0.02), fire=False, oracle=False),
        run_dir=str(run_dir), progress=False, plots=False)
    run_pipeline(cfg)
    return Path(run_dir)


def si_vacancy(seed: int = 0):
    """A rattled (0.05 Å) Si vacancy: a 2x2x2 conventional diamond cell without its first atom, 63 atoms."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    del atoms[0]
    atoms.rattle(0.05, seed=seed)
    return atoms


def fire_frames(init_fn, apply_fn, R, stop):
    """jax-md's loop: frames of a minimiser until ``stop(old_state, new_state, frames)``; returns the last state and
    the frames taken."""
    def cond(carry):
        return ~carry[2]

    def body(carry):
        state, k, _ = carry
        new = apply_fn(state)
        return new, k + 1, stop(state, new, k + 1)

    state, frames, _ = jax.jit(lambda R: jax.lax.while_loop(cond, body, (init_fn(R), 0, False)))(R)
    return state, int(frames)


def softest_curvature(force, R, fixed) -> float:
    """The smallest curvature (eV/Å²) of the energy surface at ``R`` along the free atoms' moves, the three rigid
    translations aside when no atom is fixed: the smallest eigenvalue of the Hessian ``-∂F/∂R`` (Cartesian: the
    derivative by fractional ``R`` is taken in real space)."""
    free = np.flatnonzero(np.repeat(~np.asarray(fixed), 3))
    hessian = -np.asarray(jax.jit(jax.jacfwd(force))(R)).reshape(R.size, R.size)[np.ix_(free, free)]
    w = np.linalg.eigvalsh(0.5 * (hessian + hessian.T))
    if not np.any(fixed):  # a translation-invariant model: three zero modes
        w = np.delete(w, np.argsort(np.abs(w))[:3])
    return float(w.min())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help=f"a finished run directory (default: make {DEFAULT_RUN})")
    ap.add_argument("--structure", help="any file ASE reads (its first image); default: a rattled Si vacancy")
    ap.add_argument("--fmax", type=float, default=1e-3, help="jax-md FIRE stops below this force, eV/Å")
    ap.add_argument("--tol", type=float, default=1e-6, help="bptt-jax FIRE stops below this movement, Å per frame")
    ap.add_argument("--max-frames", type=int, default=2000, help="frame budget of the FIRE relaxations")
    args = ap.parse_args(argv)
    from jax_md import minimize, space

    run_dir = Path(args.run) if args.run else DEFAULT_RUN
    if not (run_dir / "results.json").exists():
        if args.run:
            sys.exit(f"{run_dir}: not a finished run directory")
        print(f"making a small run in {run_dir} ...")
        make_small_run(run_dir)
    run = bj.load_run(run_dir)
    if args.structure:
        from ase.io import read

        atoms = read(args.structure, index=0)
    else:
        atoms = si_vacancy()
    s = bj.Structure.from_atoms(atoms)
    n, batch = len(s), bj.Batch.from_structures([s], buckets=run.buckets)
    print(f"run {run_dir} (epoch {run.epoch}, η {run.step_size}), {atoms.get_chemical_formula()}: {n} atoms")

    # jax-md's space: fractional coordinates in a box whose columns are the lattice vectors. Unwrapped, so the
    # positions are the ones bptt-jax follows (models with absolute coordinates among their inputs would see a
    # wrapped atom elsewhere; this run's model is periodic either way).
    box = bmd.cell_to_box(s.cell)
    _, shift = space.periodic_general(box, fractional_coordinates=True, wrapped=False)
    R = jnp.asarray(atoms.get_scaled_positions(wrap=False), batch.positions.dtype)
    force = bmd.force_fn(run.params, run.model, s.numbers, box, fractional_coordinates=True, fixed=s.fixed)
    free = jnp.asarray(~s.fixed)

    def cartesian(R):
        return np.asarray(bmd.to_cartesian(box, R))

    def fractional(positions):
        return jnp.asarray(np.linalg.solve(np.asarray(box), np.asarray(positions).T).T, R.dtype)

    forces = jax.jit(force)

    def fmax(R):
        return float(jnp.linalg.norm(forces(R), axis=-1).max())

    def compare(R, ref):
        """Largest minimum-image displacement (Å) and Dq (√amu·Å) of fractional ``R`` from Cartesian ``ref``."""
        p, r = jnp.asarray(cartesian(R))[None], jnp.asarray(ref)[None]
        d = bj.displacement(p, r, batch.cell, batch.pbc)
        q = dq(p, r, batch.masses[:, :n], batch.cell, batch.pbc, batch.atom_mask[:, :n])
        return float(jnp.linalg.norm(d, axis=-1).max()), float(q[0])

    out, rows = {}, []
    # bptt-jax's FIRE (the relax CLI's --fire: the run's model, ASE's FIRE, the library's stop rule).
    fire_cfg = dataclasses.replace(run.bptt.relax, rule="fire", step_mode="fixed", step_head=(), tol=args.tol,
                                   max_frames=args.max_frames)
    res = bj.BPTT(run.model, fire_cfg).relax_batch({"model": run.params["model"]}, batch)
    fire_ref, fire_frames_ref = np.asarray(res.positions[0, :n]), int(res.frames[0])
    rows.append(("bptt-jax FIRE (ASE's rule)", fire_frames_ref, bool(res.converged[0]), fmax(fractional(fire_ref)),
                 0.0, 0.0))

    # 1. jax-md's own FIRE with bptt-jax's FIRE parameters (jax-md's dt_max default is 0.4; it has no step limit),
    #    until every force is below fmax.
    init, apply = minimize.fire_descent(force, shift, dt_start=0.1, dt_max=1.0, n_min=5, f_inc=1.1, f_dec=0.5,
                                        alpha_start=0.1, f_alpha=0.99)

    def small_force(old, new, k):
        return (jnp.linalg.norm(new.force, axis=-1).max() < args.fmax) | (k >= args.max_frames)
    state, frames = fire_frames(init, apply, R, small_force)
    fire_minimum = state.position
    out["fire_descent"] = compare(state.position, fire_ref)
    # Each FIRE stops near the minimum, |ΔR| ≈ |F| / curvature away: so they can differ by at most about this.
    k_min = softest_curvature(force, state.position, s.fixed)
    residual = sum(float(jnp.linalg.norm(forces(x)[free])) for x in (state.position, fractional(fire_ref)))
    out["fire_bound"] = residual / k_min if k_min > 0 else float("inf")
    rows.append(("jax_md fire_descent", frames, fmax(state.position) < args.fmax, fmax(state.position),
                 *out["fire_descent"]))

    # 2. jax-md's ASE-style FIRE under bptt-jax's stop rule (RMS movement of the free atoms per frame below tol).
    def moved_less(old, new, k):
        dR = bmd.to_cartesian(box, new.position - old.position)
        return (bj.rms_movement(dR[None], free[None])[0] < args.tol) | (k >= args.max_frames)
    init, apply = minimize.precon_fire_descent(force, shift, use_armijo=False)
    state, frames = fire_frames(init, apply, R, moved_less)
    out["precon_fire_descent"] = compare(state.position, fire_ref)
    out["precon_fire_frames"] = (frames, fire_frames_ref)
    rows.append(("jax_md precon_fire_descent", frames, frames < args.max_frames, fmax(state.position),
                 *out["precon_fire_descent"]))

    # 3. The run's tuned relaxation: bptt-jax's with every frame recorded, and learned_descent in jax-md's space
    #    for as many frames (a state that is done stays as it is).
    tuned = run.bptt.relax_batch(run.params, batch, mode="scan", record=True)
    tuned_ref = np.asarray(tuned.positions[0, :n])
    init, apply = bmd.learned_descent(run, shift, s.numbers, box, fractional_coordinates=True, fixed=s.fixed)

    def frame(state, _):
        state = apply(state)
        return state, state.position
    last, trajectory = jax.jit(lambda R: jax.lax.scan(frame, init(R), None, length=run.bptt.relax.max_frames))(R)
    per_frame = np.stack([cartesian(p) for p in trajectory]) - np.asarray(tuned.trajectory[:, 0, :n])
    out["learned_descent"] = compare(last.position, tuned_ref)
    out["learned_descent_per_frame"] = float(np.linalg.norm(per_frame, axis=-1).max())
    out["learned_frames"] = (int(last.frames), int(tuned.frames[0]), bool(last.converged), bool(tuned.converged[0]))
    rows.append(("bptt-jax tuned relaxation", int(tuned.frames[0]), bool(tuned.converged[0]),
                 fmax(fractional(tuned_ref)), 0.0, 0.0))
    rows.append(("bptt_jax.jax_md.learned_descent", int(last.frames), bool(last.converged), fmax(last.position),
                 *out["learned_descent"]))

    print(f"{'':34s}{'frames':>7s} {'stopped':>8s} {'max |F| eV/Å':>13s} {'max |ΔR| Å':>11s} {'Dq √amu·Å':>10s}")
    for i, (name, k, stopped, f, d, q) in enumerate(rows):
        if i in (0, 3):
            print("against bptt-jax FIRE:" if i == 0 else "against the run's tuned relaxation:")
        print(f"  {name:32s}{k:7d} {str(stopped):>8s} {f:13.2e} {d:11.2e} {q:10.2e}")
    print(f"the two FIRE minima may differ by (|F_a| + |F_b|) / softest curvature = {out['fire_bound']:.2e} Å")
    print(f"learned_descent against bptt-jax, largest deviation over all {len(per_frame)} frames: "
          f"{out['learned_descent_per_frame']:.2e} Å")
    if getattr(run.model, "energy_head", False):
        energy = bmd.energy_fn(run.params, run.model, s.numbers, box, fractional_coordinates=True, fixed=s.fixed)
        out["energy"] = (float(energy(R)), float(energy(fire_minimum)))
        print(f"energy (bptt_jax.jax_md.energy_fn): {out['energy'][0]:.4f} eV at the start, "
              f"{out['energy'][1]:.4f} eV at jax-md FIRE's minimum")
    return out


if __name__ == "__main__":
    main()
