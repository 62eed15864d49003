"""ADAPT (paper App. A.1, Eqs. 6-9): a graph-free Transformer encoder over atoms as points in space.

``MLIP = proj ∘ enc^n ∘ emb``: per-atom features → 3-layer embedding MLP → ``n_layers`` post-LN encoder
blocks with a key-padding mask → linear projection to three force components (eV/Å). There is no
positional encoding, so permuting atoms permutes the forces, and padding atoms never influence real ones.

Geometry-aware options (all off by default, which is the paper's model):

- ``coords="none"``: no absolute coordinates in the input (rotation/translation-invariant atom features);
- ``radial_channels > 0``: a species-resolved radial density of each atom's neighbourhood is appended to
  the input features (:class:`~bptt_jax.models.geometry.RadialDescriptor`);
- ``attn_bias="rbf"``: per-head attention bias from radial basis functions of minimum-image pair distances
  with a smooth cutoff (:class:`~bptt_jax.models.geometry.GeometricEncoderBlock`);
- ``force_head="vector"`` (or ``"both"``): forces ``F_i = Σ_j w_ij (r_j − r_i)`` from pair weights
  (:class:`~bptt_jax.models.geometry.VectorForceHead`), rotation-equivariant, translation-invariant and
  periodic; ``"both"`` adds the paper's linear projection.

With ``coords="none"``, ``radial_channels > 0``, ``attn_bias="rbf"`` and ``force_head="vector"`` the model
is permutation-, translation-, rotation- and periodic-image-equivariant (preset ``"small_geo"``).

Conservative option ``energy_head=True`` (preset ``"small_energy"``): the encoder output is read out by a
``Dense(1)`` to a per-atom energy (eV, zero on padding atoms), the structure's energy is their sum,
``E(R) = Σ_i ε_i``, and the forces are ``F = −∂E/∂R``, taken inside the module call with the lifted
:func:`flax.linen.grad` with respect to ``batch.positions``. The forces are then curl-free (a symmetric
force Jacobian) and the tuned model stays a potential usable for MD; BPTT differentiates through that
gradient (double backprop). :meth:`ADAPT.energy` returns ``E`` (``model.apply(variables, batch,
method="energy")``). With rotation/translation-invariant inputs (``coords="none"`` plus the radial
descriptor and/or ``attn_bias="rbf"``) ``E`` is invariant and periodic and ``F`` equivariant. The force
options ``force_head`` and ``output_transform`` do not apply (combining them raises ``ValueError``);
``force_scale`` scales ``E`` and hence ``F``. Forces on padding atoms are exactly zero; fixed atoms get
their ``−∂E/∂R`` like any other atom (the relaxation keeps them in place).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bptt_jax.models.geometry import (AngularDescriptor, GeometricEncoderBlock, RadialDescriptor, VectorForceHead,
                                       pair_geometry)
from bptt_jax.models.layers import MLP, AtomFeaturizer, EncoderBlock, compute_dtype
from bptt_jax.structures import Batch, safe_norm

Array = jax.Array


class ADAPT(nn.Module):
    """ADAPT force model.

    Attributes:
      d_model: width of the encoder. n_layers, n_heads, ffn_dim: encoder depth, heads, FFN width.
      dropout: dropout rate, active only when ``deterministic=False`` (off inside rollouts by default).
      act: activation of the embedding MLP and FFNs.
      coords, species, species_dim, coord_scale, fixed_flag: see :class:`AtomFeaturizer` (``coords`` may
        also be ``"none"``).
      attn_bias: ``"none"`` (paper) or ``"rbf"`` (distance-biased attention).
      force_head: ``"linear"`` (paper), ``"vector"`` or ``"both"``.
      radial_channels: species channels of the radial descriptor input (0 = off).
      cutoff: smooth cutoff radius of all pair terms, Å. n_rbf: radial basis functions.
      angular_channels: channels of the three-body (l = 1, 2 moment) descriptor input (0 = off).
      attn_window: multiply attention weights by the smooth cutoff (local attention; with ``attn_bias="rbf"``).
      head_hidden: hidden width of the vector head's pair MLP.
      force_scale: multiplies the output forces (eV/Å per unit of network output); a target-scale prior.
      output_transform: ``"none"`` or ``"expm1"``: per-atom force vectors ``u`` become
        ``u · expm1(|u|) / |u|`` (direction kept, magnitude ``e^|u| − 1``), so forces spanning orders of
        magnitude (0.01 to 100+ eV/Å at clashing atoms) are reachable with O(1) outputs.
      energy_head: conservative model: per-atom energies from a ``Dense(1)`` readout, forces ``−∂E/∂R``
        (see the module docstring); requires ``force_head="linear"`` and ``output_transform="none"``.
      matmul_dtype: ``"float32"`` (default) or ``"bfloat16"``: matrix products of the embedding, encoder and
        force heads in bfloat16 with float32 parameters (accelerators); the input features, pair geometry,
        layer norms, softmax and the returned forces stay float32 (see :func:`compute_dtype`).
    """

    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    ffn_dim: int = 512
    dropout: float = 0.0
    act: str = "gelu"
    coords: str = "cartesian"
    species: str = "both"
    species_dim: int = 16
    coord_scale: float = 0.1
    fixed_flag: bool = True
    attn_bias: str = "none"
    force_head: str = "linear"
    radial_channels: int = 0
    cutoff: float = 5.0
    n_rbf: int = 16
    head_hidden: int = 32
    angular_channels: int = 0
    attn_window: bool = False
    force_scale: float = 1.0
    output_transform: str = "none"
    energy_head: bool = False
    matmul_dtype: str = "float32"

    def __call__(self, batch: Batch, deterministic: bool = True) -> Array:
        """Forces (B, N, 3) in eV/Å at ``batch.positions`` (Å); zero on padding atoms."""
        if not self.energy_head:
            return self._run(batch, deterministic, "forces")

        def total_energy(mdl: "ADAPT", positions: Array) -> Array:
            return jnp.sum(mdl._run(batch.replace(positions=positions), deterministic, "energy"))

        # Lifted grad: differentiates w.r.t. positions only; the parameters stay differentiable from outside
        # (BPTT and force matching take gradients of these forces: double backprop).
        (grad,) = nn.grad(total_energy, self, batch.positions)
        return jnp.where(batch.atom_mask[..., None], -grad, 0.0)

    def energy(self, batch: Batch, deterministic: bool = True) -> Array:
        """(B,) total energies in eV at ``batch.positions`` (``energy_head=True`` only); 0 for empty
        structures. Use as ``model.apply(variables, batch, method="energy")``."""
        if not self.energy_head:
            raise ValueError("ADAPT.energy needs energy_head=True (a force model has no energy)")
        return self._run(batch, deterministic, "energy")

    @nn.compact
    def _run(self, batch: Batch, deterministic: bool, output: str) -> Array:
        """The network: ``output="forces"`` (direct heads, (B, N, 3)) or ``"energy"`` ((B,) eV)."""
        if self.energy_head:
            if self.force_head != "linear" or self.output_transform != "none":
                raise ValueError(
                    "energy_head=True computes forces as -dE/dR; force_head and output_transform do not apply: "
                    f"got force_head={self.force_head!r} (needs 'linear'), output_transform="
                    f"{self.output_transform!r} (needs 'none')")
            if self.coords == "none" and self.attn_bias == "none" and not (self.radial_channels > 0
                                                                          or self.angular_channels > 0):
                raise ValueError("energy_head=True with coords='none' needs a geometric input (attn_bias='rbf', "
                                 "radial_channels > 0 or angular_channels > 0): the energy would not depend "
                                 "on positions")
        if self.attn_bias not in ("none", "rbf"):
            raise ValueError(f"unknown attn_bias {self.attn_bias!r}; expected none or rbf")
        if self.force_head not in ("linear", "vector", "both"):
            raise ValueError(f"unknown force_head {self.force_head!r}; expected linear, vector or both")
        needs_geometry = (self.attn_bias != "none" or self.force_head != "linear" or self.radial_channels > 0
                          or self.angular_channels > 0)
        geom = None
        if needs_geometry:
            geom = pair_geometry(batch.positions, batch.cell, batch.pbc, batch.atom_mask, self.cutoff, self.n_rbf)
        feats = AtomFeaturizer(self.coords, self.species, self.species_dim, self.coord_scale,
                               self.fixed_flag, name="features")(
            batch.positions, batch.numbers, batch.cell, batch.pbc, batch.fixed_mask)
        if self.radial_channels > 0:
            radial = RadialDescriptor(self.radial_channels, name="radial")(geom, batch.numbers)
            feats = jnp.concatenate([feats, radial.astype(feats.dtype)], axis=-1)
        if self.angular_channels > 0:
            angular = AngularDescriptor(self.angular_channels, name="angular")(geom, batch.numbers, self.cutoff)
            feats = jnp.concatenate([feats, angular.astype(feats.dtype)], axis=-1)
        dt = compute_dtype(self.matmul_dtype)
        x = MLP((self.d_model, self.d_model, self.d_model), act=self.act, dtype=dt, name="embed")(feats)
        mask = nn.make_attention_mask(batch.atom_mask, batch.atom_mask)
        for i in range(self.n_layers):
            if self.attn_bias == "rbf":
                x = GeometricEncoderBlock(self.d_model, self.n_heads, self.ffn_dim, self.dropout, self.act,
                                          self.attn_window, dtype=dt, name=f"encoder_{i}")(x, geom, mask, deterministic)
            else:
                x = EncoderBlock(self.d_model, self.n_heads, self.ffn_dim, self.dropout, self.act, dtype=dt,
                                 name=f"encoder_{i}")(x, mask, deterministic)
        if output == "energy":
            # Read out and summed in the positions' precision (also with matmul_dtype="bfloat16").
            x = x.astype(batch.positions.dtype)
            atom_energy = nn.Dense(1, name="energy_proj")(x)[..., 0] * batch.atom_mask  # (B, N) eV
            return self.force_scale * jnp.sum(atom_energy, axis=-1)
        forces = 0.0
        if self.force_head in ("linear", "both"):
            forces = nn.Dense(3, dtype=dt, name="proj")(x)
        if self.force_head in ("vector", "both"):
            forces = forces + VectorForceHead(self.head_hidden, dtype=dt, name="vector_head")(x, geom)
        if dt is not None:
            forces = forces.astype(batch.positions.dtype)
        if self.output_transform == "expm1":
            forces = forces * expm1_ratio(safe_norm(forces, axis=-1, keepdims=True))
        elif self.output_transform != "none":
            raise ValueError(f"unknown output_transform {self.output_transform!r}; expected none or expm1")
        return self.force_scale * forces * batch.atom_mask[..., None]


def expm1_ratio(x: Array) -> Array:
    """``expm1(x) / x`` for x ≥ 0 (1 at x = 0, smooth, finite gradient everywhere)."""
    small = x < 1e-3
    safe = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 + x / 2 + x * x / 6, jnp.expm1(safe) / safe)
