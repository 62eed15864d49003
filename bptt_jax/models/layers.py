"""Building blocks shared by the models: atom featurisation and the post-LN Transformer encoder block."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bptt_jax.elements import N_ELEMENTS, descriptor_table
from bptt_jax.structures import fractional

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}


MATMUL_DTYPES: dict[str, Any] = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(matmul_dtype: Optional[str]) -> Optional[Any]:
    """The Flax ``dtype=`` of Dense/attention layers for a ``matmul_dtype`` setting.

    ``"float32"`` (or None): None, Flax's default: layers compute in their inputs' and parameters' dtype
    (float32; float64 under ``jax_enable_x64``), bit-identical to not having the option. ``"bfloat16"``:
    matrix products (and their gradients) in bfloat16 with float32 parameters, float32 accumulation of
    residuals, layer norms and softmax; meant for accelerators with bfloat16 units (TPU, recent GPUs).
    """
    if matmul_dtype is None:
        return None
    try:
        return MATMUL_DTYPES[matmul_dtype]
    except KeyError:
        raise ValueError(f"unknown matmul_dtype {matmul_dtype!r}; choose from {sorted(MATMUL_DTYPES)}") from None


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


class AtomFeaturizer(nn.Module):
    """Per-atom input features: coordinates, species information and the fixed flag.

    Attributes:
      coords: ``"cartesian"`` (the paper's points in space, scaled by ``coord_scale``), ``"periodic"``
        (sin/cos of 2π·fractional coordinates along periodic axes, so periodic images look alike), or
        ``"both"``, or ``"none"`` (no coordinates: invariant features for geometry-aware models).
      species: ``"embedding"`` (learned, ``species_dim`` wide), ``"descriptors"`` (fixed elemental
        descriptors, see :mod:`bptt_jax.elements`) or ``"both"``.
      coord_scale: multiplies Cartesian coordinates (Å⁻¹), keeping first-layer inputs O(1).
      fixed_flag: append 1.0 for fixed atoms (surface slabs: the model can tell bulk from surface).
    """

    coords: str = "cartesian"
    species: str = "both"
    species_dim: int = 16
    coord_scale: float = 0.1
    fixed_flag: bool = True

    @nn.compact
    def __call__(self, positions: Array, numbers: Array, cell: Array, pbc: Array, fixed_mask: Array) -> Array:
        """Args: positions (B, N, 3) Å; numbers (B, N); cell (B, 3, 3); pbc (B, 3); fixed_mask (B, N).
        Returns (B, N, F)."""
        parts = []
        if self.coords in ("cartesian", "both"):
            parts.append(positions * self.coord_scale)
        if self.coords in ("periodic", "both"):
            angle = 2 * jnp.pi * fractional(positions, cell)
            periodic = pbc[:, None, :]
            parts.append(jnp.where(periodic, jnp.sin(angle), 0.0))
            parts.append(jnp.where(periodic, jnp.cos(angle), 0.0))
        if self.coords not in ("cartesian", "periodic", "both", "none"):
            raise ValueError(f"unknown coords {self.coords!r}; expected cartesian, periodic, both or none")
        if self.species in ("embedding", "both"):
            parts.append(nn.Embed(N_ELEMENTS, self.species_dim, name="species_embedding")(numbers))
        if self.species in ("descriptors", "both"):
            table = jnp.asarray(descriptor_table(), positions.dtype)
            parts.append(table[numbers])
        if self.species not in ("embedding", "descriptors", "both"):
            raise ValueError(f"unknown species {self.species!r}; expected embedding, descriptors or both")
        if self.fixed_flag:
            parts.append(fixed_mask[..., None].astype(positions.dtype))
        return jnp.concatenate([p.astype(positions.dtype) for p in parts], axis=-1)


class MLP(nn.Module):
    """Dense layers with an activation between them (none after the last)."""

    features: tuple[int, ...]
    act: str = "gelu"
    dtype: Optional[Any] = None  # computation dtype of the Dense layers (see compute_dtype)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, f in enumerate(self.features):
            x = nn.Dense(f, dtype=self.dtype, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = activation(self.act)(x)
        return x


class EncoderBlock(nn.Module):
    """Post-LN Transformer encoder block of the paper's Eq. 6::

        H1 = LN(X + Attn(X));  H2 = FFN(LN(H1));  X_out = LN(H2 + H1)

    with a key-padding mask and dropout after the attention and the FFN. ``dtype``: computation dtype of
    the attention and FFN matrix products (see :func:`compute_dtype`); layer norms and the softmax stay in
    float32.
    """

    d_model: int
    n_heads: int
    ffn_dim: int
    dropout: float = 0.0
    act: str = "gelu"
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool = True) -> Array:
        """x: (B, N, d_model); mask: (B, 1, N, N) attention mask. Returns (B, N, d_model)."""
        low = {} if self.dtype is None else {"dtype": self.dtype, "force_fp32_for_softmax": True}
        attn = nn.MultiHeadDotProductAttention(num_heads=self.n_heads, qkv_features=self.d_model,
                                               out_features=self.d_model, dropout_rate=self.dropout,
                                               deterministic=deterministic, name="attn", **low)(x, x, mask=mask)
        attn = nn.Dropout(self.dropout, deterministic=deterministic)(attn)
        h1 = nn.LayerNorm(name="ln_attn")(x + attn)
        h2 = MLP((self.ffn_dim, self.d_model), act=self.act, dtype=self.dtype, name="ffn")(
            nn.LayerNorm(name="ln_ffn_in")(h1))
        h2 = nn.Dropout(self.dropout, deterministic=deterministic)(h2)
        return nn.LayerNorm(name="ln_out")(h2 + h1)
