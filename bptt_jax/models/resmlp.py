"""ResMLP (paper App. A.2, Eq. 10): a residual MLP over the whole flattened, padded structure.

``t_i = σ(W_i h_{i-1} + b_i)``, ``h_i = LN(P_i t_i + t_i)`` for ``n_blocks`` blocks, ``y = W h_last``
reshaped to ``max_atoms × 3`` forces. The input is every atom's features, zero for padding atoms, padded to
a fixed ``max_atoms`` (paper: 220), so the output for real atoms does not depend on padding.

``input_norm=True`` standardizes each of the flattened inputs with the mean and standard deviation it has over
the training frames (:func:`fit_input_stats`, kept in the ``input_stats`` collection and held constant by a
stop-gradient). Displacements that decide the forces are ~0.1 Å against coordinates spanning the cell; the raw
inputs leave them a 10⁻³ relative change that the network does not pick up in a CPU budget (it learns the
mean force and stops), while standardized ones are O(1).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.models.layers import AtomFeaturizer, activation, compute_dtype
from bptt_jax.structures import Batch

Array = jax.Array


class ResMLP(nn.Module):
    """Residual MLP force model.

    Attributes:
      max_atoms: fixed input size in atoms (paper: 220); batches may be padded to at most this many.
      width: nodes per layer (paper: 4096). n_blocks: residual blocks (paper: 6).
      species: species input (default the fixed elemental descriptors; see :class:`AtomFeaturizer`).
      matmul_dtype: ``"float32"`` (default) or ``"bfloat16"`` (Dense layers in bfloat16 with float32
        parameters; layer norms and the returned forces stay float32; see :func:`compute_dtype`).
    """

    max_atoms: int = 220
    width: int = 4096
    n_blocks: int = 6
    act: str = "gelu"
    dropout: float = 0.0
    coords: str = "cartesian"
    species: str = "descriptors"
    species_dim: int = 8
    coord_scale: float = 0.1
    fixed_flag: bool = True
    matmul_dtype: str = "float32"
    input_norm: bool = False
    input_eps: float = 1e-3

    @nn.compact
    def __call__(self, batch: Batch, deterministic: bool = True, inputs_only: bool = False) -> Array:
        """Forces (B, N, 3) in eV/Å at ``batch.positions``; zero on padding atoms. ``inputs_only``: the
        flattened, zero-padded input vectors (B, max_atoms · F) before standardization instead."""
        b, n = batch.atom_mask.shape
        if n > self.max_atoms:
            raise ValueError(f"ResMLP takes at most max_atoms={self.max_atoms} atoms; batch is padded to {n}")
        feats = AtomFeaturizer(self.coords, self.species, self.species_dim, self.coord_scale,
                               self.fixed_flag, name="features")(
            batch.positions, batch.numbers, batch.cell, batch.pbc, batch.fixed_mask)
        feats = feats * batch.atom_mask[..., None]
        feats = jnp.pad(feats, ((0, 0), (0, self.max_atoms - n), (0, 0)))
        h = feats.reshape(b, -1)
        if inputs_only:
            return h
        if self.input_norm:
            mean = self.variable("input_stats", "mean", jnp.zeros, h.shape[-1:], jnp.float32)
            std = self.variable("input_stats", "std", jnp.ones, h.shape[-1:], jnp.float32)
            h = (h - jax.lax.stop_gradient(mean.value)) / jax.lax.stop_gradient(std.value)
        dt = compute_dtype(self.matmul_dtype)
        for i in range(self.n_blocks):
            t = activation(self.act)(nn.Dense(self.width, dtype=dt, name=f"W_{i}")(h))
            t = nn.Dropout(self.dropout, deterministic=deterministic)(t)
            h = nn.LayerNorm(name=f"ln_{i}")(nn.Dense(self.width, use_bias=False, dtype=dt, name=f"P_{i}")(t) + t)
        y = nn.Dense(self.max_atoms * 3, use_bias=False, dtype=dt, name="out")(h).reshape(b, self.max_atoms, 3)
        if dt is not None:
            y = y.astype(batch.positions.dtype)
        return y[:, :n] * batch.atom_mask[..., None]


def fit_input_stats(model: ResMLP, variables, batches) -> dict:
    """``variables`` with the ``input_stats`` of a ``input_norm`` ResMLP set to the mean and standard deviation
    (floored at ``input_eps``) of each input over the real structures of ``batches`` (the training frames).
    Inputs that never vary (padding slots, a single element's descriptors) map to zero."""
    if not getattr(model, "input_norm", False):
        return variables
    inputs = jax.jit(lambda v, b: model.apply(v, b, inputs_only=True))
    total, total_sq, count = 0.0, 0.0, 0
    for batch in batches:
        x = np.asarray(inputs(variables, batch), np.float64)[np.asarray(batch.structure_mask)]
        total, total_sq, count = total + x.sum(0), total_sq + (x * x).sum(0), count + len(x)
    if not count:
        raise ValueError("no frames to fit the ResMLP input statistics on")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0) + model.input_eps ** 2)
    out = dict(variables)
    out["input_stats"] = {"mean": jnp.asarray(mean, jnp.float32), "std": jnp.asarray(std, jnp.float32)}
    return out
