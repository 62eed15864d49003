"""Quickstart: one BPTT step on a toy batch (rattled diamond-Si cells relaxing back to the lattice)."""
import jax
import numpy as np
from ase.build import bulk

import bptt_jax as bj

rng = np.random.default_rng(0)
starts, targets = [], []
for repeat in [(1, 1, 1), (2, 1, 1), (1, 2, 1)]:
    atoms = bulk("Si", "diamond", a=5.431).repeat(repeat)
    targets.append(atoms.positions.copy())  # the "DFT-relaxed" structure
    atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)  # the starting structure
    starts.append(bj.Structure.from_atoms(atoms))

batch = bj.Batch.from_structures(starts, targets, batch_size=4)  # padded to a size bucket
bptt = bj.BPTT(
    bj.build_model("adapt", "small"),
    bj.RelaxConfig(step_size=0.05, step_mode="learned", max_frames=30, tol=1e-3),
    bj.OptimConfig(learning_rate=1e-3, clip_norm=1.0),
)
state = bptt.init_state(bptt.init_params(jax.random.PRNGKey(0), batch), jax.random.PRNGKey(1))
train_step = bj.jit_train_step(bptt)  # jitted once per batch shape; donates the state it is given
for step in range(3):
    state, metrics = train_step(state, batch)
    print(f"step {step}: Avg Dq {float(metrics['loss']):.3f}  frames {float(metrics['frames']):.1f}  "
          f"eta {float(metrics['step_size']):.4f}")

result = bptt.relax_batch(state.params, batch)  # early-exit inference rollout
print("frames per structure:", np.asarray(result.frames))
