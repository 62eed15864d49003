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


def attention(query: Array, key: Array, value: Array, *, bias: Optional[Array] = None, mask: Optional[Array] = None,
              dropout_rate: float = 0.0, deterministic: bool = True, dropout_rng: Optional[Array] = None,
              force_fp32_for_softmax: bool = False) -> Array:
    """Scaled dot-product attention; the same function as :func:`flax.linen.dot_product_attention`.

    query, key, value: (B, N, H, d_h) (flax's layout); bias: broadcastable to (B, H, N, N), added to the logits;
    mask: broadcastable to (B, H, N, N), False entries get no weight; returns (B, N, H, d_h). The two
    products run heads-major, on (B, H, N, d_h) operands: XLA:CPU computes flax's head-interleaved
    einsums far slower in forward-only programs (one encoder attention, B = 8, d_model 128: forward
    15.5–17.5 → 3.7–3.9 ms at N = 216, 0.9–1.2 → 0.7–0.9 ms at N = 64; forward + backward about equal;
    ``python -m benchmarks.attention``, benchmarks/NOTES.md).
    ``force_fp32_for_softmax``: logits and softmax in float32 (bfloat16 matmuls).
    """
    dtype = query.dtype
    q, k, v = (jnp.swapaxes(t, -3, -2) for t in (query, key, value))  # (B, H, N, d_h)
    q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
    logits = jnp.einsum("...hqd,...hkd->...hqk", q, k)
    if bias is not None:
        logits = logits + bias
    if force_fp32_for_softmax:
        logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if dropout_rate > 0.0 and not deterministic:
        if dropout_rng is None:
            raise ValueError("attention dropout needs dropout_rng")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(dtype)
    out = jnp.einsum("...hqk,...hkd->...hqd", weights, v.astype(dtype))
    return jnp.swapaxes(out, -3, -2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameters of :class:`flax.linen.MultiHeadDotProductAttention`
    (``query``/``key``/``value`` kernels (d, H, d_h), ``out`` kernel (H, d_h, d_out), biases; checkpoints of
    either load into the other) computed by :func:`attention`.
    """

    num_heads: int
    qkv_features: int
    out_features: int
    dropout_rate: float = 0.0
    dtype: Optional[Any] = None
    force_fp32_for_softmax: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None, deterministic: bool = True) -> Array:
        if self.qkv_features % self.num_heads:
            raise ValueError(f"qkv_features {self.qkv_features} is not a multiple of num_heads {self.num_heads}")
        head_dim = self.qkv_features // self.num_heads
        dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # (B, N, H, d_h)
        rng = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
        out = attention(q, k, v, mask=mask, dropout_rate=self.dropout_rate, deterministic=deterministic,
                        dropout_rng=rng, force_fp32_for_softmax=self.force_fp32_for_softmax)
        return nn.DenseGeneral(self.out_features, axis=(-2, -1), dtype=self.dtype, name="out")(out)


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
        attn = SelfAttention(num_heads=self.n_heads, qkv_features=self.d_model, out_features=self.d_model,
                             dropout_rate=self.dropout, dtype=self.dtype, force_fp32_for_softmax=self.dtype is not None,
                             name="attn")(x, mask, deterministic=deterministic)
        attn = nn.Dropout(self.dropout, deterministic=deterministic)(attn)
        h1 = nn.LayerNorm(name="ln_attn")(x + attn)
        h2 = MLP((self.ffn_dim, self.d_model), act=self.act, dtype=self.dtype, name="ffn")(
            nn.LayerNorm(name="ln_ffn_in")(h1))
        h2 = nn.Dropout(self.dropout, deterministic=deterministic)(h2)
        return nn.LayerNorm(name="ln_out")(h2 + h1)
