"""Geometry-aware pieces for ADAPT: pairwise minimum-image geometry, radial basis functions with a smooth
cutoff, a per-atom radial descriptor, distance-biased attention and an equivariant vector force head.

Everything stays graph-free: pairs are dense ``(B, N, N)`` tensors over the padded atoms, masked by
``atom_mask`` and ``i ≠ j``. Distances use :func:`~bptt_jax.structures.safe_norm`, so gradients with respect
to positions are finite even where two (padding) atoms coincide, and everything is differentiable with
respect to positions (BPTT differentiates the forces through the rollout).

Units: positions, displacements, distances and cutoffs in Å; forces in eV/Å.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bptt_jax.models.layers import MLP, activation, attention
from bptt_jax.structures import _SHIFTS, periodic_frame, safe_norm

Array = jax.Array


class PairGeometry(NamedTuple):
    """Dense pairwise geometry of a padded batch.

    Attributes:
      vec: (B, N, N, 3) minimum-image displacement ``r_j - r_i``, Å (row i, column j).
      dist: (B, N, N) its length, Å (0 on the diagonal and wherever atoms coincide).
      mask: (B, N, N) bool, real pairs: both atoms real and ``i ≠ j``.
      cut: (B, N, N) smooth cutoff weight in [0, 1], 0 beyond ``cutoff`` and on masked pairs.
      rbf: (B, N, N, K) radial basis functions times ``cut`` (0 on masked pairs).
    """

    vec: Array
    dist: Array
    mask: Array
    cut: Array
    rbf: Array


def cosine_cutoff(dist: Array, cutoff: float) -> Array:
    """``0.5 (cos(π d / r_c) + 1)`` for ``d < r_c``, else 0: smooth (C¹) and 1 at d = 0. dist in Å."""
    x = jnp.clip(dist / cutoff, 0.0, 1.0)
    return 0.5 * (jnp.cos(jnp.pi * x) + 1.0)


def gaussian_rbf(dist: Array, n_rbf: int, cutoff: float) -> Array:
    """(…, K) Gaussians ``exp(-(d - μ_k)² / (2σ²))`` with K centres evenly spaced on [0, r_c] and σ the
    spacing. dist in Å."""
    mu = jnp.linspace(0.0, cutoff, n_rbf, dtype=dist.dtype)
    sigma = cutoff / max(n_rbf - 1, 1)
    return jnp.exp(-0.5 * ((dist[..., None] - mu) / sigma) ** 2)


def pair_displacements(positions: Array, cell: Array, pbc: Array, cutoff: float | None = None) -> Array:
    """(B, N, N, 3) minimum-image displacements ``r_j − r_i``, Å, for (B, N, 3) positions in (B, 3, 3) cells.

    The same convention as :func:`bptt_jax.structures.minimum_image` (wrap fractional coordinates along
    periodic axes, then the shortest of the 27 neighbouring images; triclinic cells and mixed pbc), laid out
    for all pairs at once: fractional coordinates are computed per atom, and the image search uses
    ``|c + s|² − |c|² = 2 c·s + |s|²`` as one contraction.

    With ``cutoff`` (Å) given, the 27-image search is skipped (``lax.cond``) when every periodic cell of the
    batch has all perpendicular widths ≥ 2·cutoff: the wrapped vector is then the minimum image for every
    pair closer than the cutoff, and pairs farther away stay at least ``cutoff`` apart (only pairs inside the
    cutoff matter to a cut-off model). The derivative with respect to positions is exactly that of ``r_j − r_i``
    (the chosen image is a constant); with respect to the cell it is that of ``r_j − r_i + n·cell``, the pair's
    integer lattice translation ``n`` held fixed (:func:`lattice_offset`), so that straining positions and cell
    together strains every displacement: the derivative a stress needs.
    """
    dR = positions[..., None, :, :] - positions[..., :, None, :]
    frame = jax.lax.stop_gradient(periodic_frame(cell, pbc))  # (B, 3, 3)
    inv = jnp.linalg.inv(frame)
    frac = jnp.einsum("bni,bij->bnj", jax.lax.stop_gradient(positions), inv)
    df = frac[:, None, :, :] - frac[:, :, None, :]  # (B, N, N, 3)
    wrap = jnp.where(pbc[:, None, None, :], jnp.round(df), 0.0)
    df = df - wrap
    wrapped = jnp.einsum("bnmi,bij->bnmj", df, frame)

    def search(wrapped):
        shifts = jnp.where(pbc[:, None, :], jnp.asarray(_SHIFTS, positions.dtype), 0.0)  # (B, 27, 3)
        shift_cart = jnp.einsum("bsi,bij->bsj", shifts, frame)
        score = 2 * jnp.einsum("bnmj,bsj->bnms", wrapped, shift_cart) + jnp.sum(shift_cart ** 2, -1)[:, None, None]
        best = jax.nn.one_hot(jnp.argmin(score, axis=-1), shifts.shape[-2], dtype=positions.dtype)
        return (wrapped + jnp.einsum("bnms,bsj->bnmj", best, shift_cart),
                jnp.einsum("bnms,bsi->bnmi", best, shifts) - wrap)

    if cutoff is None:
        image, n = search(wrapped)
    else:
        width = 1.0 / jnp.linalg.norm(inv, axis=-2)  # (B, 3) perpendicular widths of the cell, Å
        wide = jnp.all(jnp.where(pbc, width >= 2 * cutoff, True))
        image, n = jax.lax.cond(wide, lambda w: (w, -wrap), search, wrapped)
    return dR + jax.lax.stop_gradient(image - dR) + lattice_offset(cell, jax.lax.stop_gradient(n))


@jax.custom_jvp
def lattice_offset(cell: Array, n: Array) -> Array:
    """Zero, with the derivative of the lattice translation ``n·cell`` by the cell.

    :func:`pair_displacements` computes each pair's minimum image as a constant offset from ``r_j − r_i``; this
    adds its dependence on the cell without changing a single value: (B, N, N, 3) zeros whose tangent is
    ``n·dcell`` for (B, N, N, 3) integer translations ``n`` (fractional units, 0 along non-periodic axes, where
    the periodic frame and the cell differ). The tangent is only formed when the cell is differentiated, so
    forces and the BPTT step are computed as before.
    """
    return jnp.zeros(n.shape, cell.dtype)


@lattice_offset.defjvp
def _lattice_offset_jvp(primals, tangents):
    cell, n = primals
    dcell, _ = tangents
    return lattice_offset(cell, n), jnp.einsum("bnmi,bij->bnmj", n, dcell)


def pair_geometry(positions: Array, cell: Array, pbc: Array, atom_mask: Array, cutoff: float,
                  n_rbf: int) -> PairGeometry:
    """Pairwise minimum-image geometry.

    Args:
      positions: (B, N, 3) Å. cell: (B, 3, 3) Å. pbc: (B, 3). atom_mask: (B, N) real atoms.
      cutoff: radius of the smooth cutoff, Å (should not exceed half the shortest periodic cell width,
        so that the minimum image is the only image inside the cutoff).
      n_rbf: number of radial basis functions K.
    """
    n = positions.shape[-2]
    vec = pair_displacements(positions, cell, pbc, cutoff)  # (B, N, N, 3): r_j - r_i
    eye = jnp.eye(n, dtype=bool)
    mask = atom_mask[..., :, None] & atom_mask[..., None, :] & ~eye
    # Masked pairs get zero displacement: no gradient leaks through padding or the diagonal.
    vec = jnp.where(mask[..., None], vec, 0.0)
    dist = safe_norm(vec, axis=-1)
    cut = jnp.where(mask, cosine_cutoff(dist, cutoff), 0.0)
    rbf = gaussian_rbf(dist, n_rbf, cutoff) * cut[..., None]
    return PairGeometry(vec, dist, mask, cut, rbf)


class RadialDescriptor(nn.Module):
    """Per-atom, species-resolved radial density: ``g_i[k, c] = Σ_j rbf_k(d_ij) · e_c(Z_j)`` with a learned
    ``n_channels``-wide species embedding ``e``; rotation, translation, permutation and periodic-image
    invariant. Returns (B, N, K · n_channels), scaled by ``1 / avg_neighbors``."""

    n_channels: int = 4
    avg_neighbors: float = 10.0

    @nn.compact
    def __call__(self, geom: PairGeometry, numbers: Array) -> Array:
        from bptt_jax.elements import N_ELEMENTS

        e = nn.Embed(N_ELEMENTS, self.n_channels, embedding_init=nn.initializers.normal(1.0),
                     name="neighbor_species")(numbers)  # (B, N, C)
        g = jnp.einsum("bijk,bjc->bikc", geom.rbf, e.astype(geom.rbf.dtype)) / self.avg_neighbors
        return g.reshape(g.shape[:-2] + (-1,))


class AngularDescriptor(nn.Module):
    """Per-atom three-body invariants from l = 1 and l = 2 moments of the neighbourhood (a moment-tensor /
    SOAP-power-spectrum-like descriptor)::

        W_ijm = Σ_{k,c} rbf_k(d_ij) e_c(Z_j) A_kcm                      learned species-radial channels
        μ_im  = Σ_j W_ijm r_ij / r_c            (vector moments)
        T_im  = Σ_j W_ijm r_ij r_ijᵀ / r_c²     (tensor moments, traceless part)
        g_i   = [μ_im · μ_im', T_im : T_im']_{m ≤ m'}                   rotation invariant, sees bond angles

    Returns (B, N, n_channels · (n_channels + 1)) scaled by ``1 / avg_neighbors²``.
    """

    n_channels: int = 8
    species_channels: int = 4
    avg_neighbors: float = 10.0

    @nn.compact
    def __call__(self, geom: PairGeometry, numbers: Array, cutoff: float) -> Array:
        from bptt_jax.elements import N_ELEMENTS

        e = nn.Embed(N_ELEMENTS, self.species_channels, embedding_init=nn.initializers.normal(1.0),
                     name="neighbor_species")(numbers).astype(geom.rbf.dtype)  # (B, N, C)
        k = geom.rbf.shape[-1]
        mix = self.param("radial_mix", nn.initializers.lecun_normal(),
                         (k * self.species_channels, self.n_channels)).reshape(k, self.species_channels, -1)
        w = jnp.einsum("bijk,bjc,kcm->bijm", geom.rbf, e, mix.astype(geom.rbf.dtype))
        r = geom.vec / cutoff
        mu = jnp.einsum("bijm,bijx->bimx", w, r)
        t = jnp.einsum("bijm,bijx,bijy->bimxy", w, r, r)
        t = t - jnp.trace(t, axis1=-2, axis2=-1)[..., None, None] * jnp.eye(3, dtype=t.dtype) / 3
        iu = jnp.triu_indices(self.n_channels)
        p1 = jnp.einsum("bimx,binx->bimn", mu, mu)[..., iu[0], iu[1]]
        p2 = jnp.einsum("bimxy,binxy->bimn", t, t)[..., iu[0], iu[1]]
        return jnp.concatenate([p1, p2], axis=-1) / self.avg_neighbors ** 2


class GeometricEncoderBlock(nn.Module):
    """The post-LN encoder block of :class:`~bptt_jax.models.layers.EncoderBlock` whose attention logits get
    a per-head additive bias from the pair's radial basis functions::

        logits_hij = q_hi · k_hj / √d_h + Σ_k W_hk rbf_k(d_ij)          (rbf already includes the cutoff)

    Dense attention over all real atoms (key-padding mask), no graph. ``dtype``: computation dtype of the
    matrix products (see :func:`~bptt_jax.models.layers.compute_dtype`); the softmax stays in float32.
    """

    d_model: int
    n_heads: int
    ffn_dim: int
    dropout: float = 0.0
    act: str = "gelu"
    window: bool = False
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: Array, geom: PairGeometry, mask: Array, deterministic: bool = True) -> Array:
        """x: (B, N, d_model); mask: (B, 1, N, N) attention mask. Returns (B, N, d_model).

        ``window=True`` adds ``log(cut(d_ij))`` (1 for i = j) to the logits: attention weights are
        ``∝ cut(d_ij) e^{logit}``, local and continuous as atoms cross the cutoff."""
        head_dim = self.d_model // self.n_heads
        dense = lambda name: nn.DenseGeneral((self.n_heads, head_dim), dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # (B, N, H, dh)
        bias = nn.Dense(self.n_heads, dtype=self.dtype, name="distance_bias")(geom.rbf)  # (B, N, N, H)
        if self.window:
            n = geom.cut.shape[-1]
            w = jnp.where(jnp.eye(n, dtype=bool), 1.0, geom.cut)
            bias = bias + jnp.log(w + 1e-6)[..., None]
        bias = jnp.moveaxis(bias, -1, -3)  # (B, H, N, N)
        low = {} if self.dtype is None else {"force_fp32_for_softmax": True}
        attn = attention(q, k, v, bias=bias, mask=mask, dropout_rate=self.dropout, deterministic=deterministic,
                         dropout_rng=None if deterministic or self.dropout == 0.0 else self.make_rng("dropout"), **low)
        attn = nn.DenseGeneral(self.d_model, axis=(-2, -1), dtype=self.dtype, name="out")(attn)
        attn = nn.Dropout(self.dropout, deterministic=deterministic)(attn)
        h1 = nn.LayerNorm(name="ln_attn")(x + attn)
        h2 = MLP((self.ffn_dim, self.d_model), act=self.act, dtype=self.dtype, name="ffn")(
            nn.LayerNorm(name="ln_ffn_in")(h1))
        h2 = nn.Dropout(self.dropout, deterministic=deterministic)(h2)
        return nn.LayerNorm(name="ln_out")(h2 + h1)


class VectorForceHead(nn.Module):
    """Equivariant force head: ``F_i = Σ_j w_ij · (r_j − r_i)`` over minimum-image displacements with::

        w_ij = cut(d_ij) · Dense_1(σ(A h_i + B h_j + C rbf(d_ij)))

    For rotation-invariant atom features ``h`` the forces rotate with the structure; they are translation
    invariant, periodic and permutation equivariant, and vanish beyond the cutoff. Returns (B, N, 3) eV/Å.
    ``dtype``: computation dtype of the pair MLP (see :func:`~bptt_jax.models.layers.compute_dtype`); the
    weights are cast back to the geometry's dtype before the sum over displacements.
    """

    hidden: int = 32
    act: str = "silu"
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, h: Array, geom: PairGeometry) -> Array:
        a = nn.Dense(self.hidden, dtype=self.dtype, name="center")(h)  # (B, N, P)
        b = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name="neighbor")(h)
        c = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name="radial")(geom.rbf)  # (B, N, N, P)
        z = activation(self.act)(a[..., :, None, :] + b[..., None, :, :] + c)
        w = nn.Dense(1, dtype=self.dtype, name="weight")(z)[..., 0]
        if self.dtype is not None:
            w = w.astype(geom.cut.dtype)
        w = w * geom.cut  # (B, N, N)
        return jnp.einsum("bij,bijx->bix", w, geom.vec)
