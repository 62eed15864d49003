"""ADAPT (paper App. A.1, Eqs. 6-9): a graph-free Transformer encoder over atoms as points in space.

``MLIP = proj ∘ enc^n ∘ emb``: per-atom features → 3-layer embedding MLP → ``n_layers`` post-LN encoder
blocks with a key-padding mask → linear projection to three force components (eV/Å). There is no
positional encoding, so permuting atoms permutes the forces, and padding atoms never influence real ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from bptt_jax.models.layers import MLP, AtomFeaturizer, EncoderBlock
from bptt_jax.structures import Batch

Array = jax.Array


class ADAPT(nn.Module):
    """ADAPT force model.

    Attributes:
      d_model: width of the encoder. n_layers, n_heads, ffn_dim: encoder depth, heads, FFN width.
      dropout: dropout rate, active only when ``deterministic=False`` (off inside rollouts by default).
      act: activation of the embedding MLP and FFNs.
      coords, species, species_dim, coord_scale, fixed_flag: see :class:`AtomFeaturizer`.
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

    @nn.compact
    def __call__(self, batch: Batch, deterministic: bool = True) -> Array:
        """Forces (B, N, 3) in eV/Å at ``batch.positions``; zero on padding atoms."""
        feats = AtomFeaturizer(self.coords, self.species, self.species_dim, self.coord_scale,
                               self.fixed_flag, name="features")(
            batch.positions, batch.numbers, batch.cell, batch.pbc, batch.fixed_mask)
        x = MLP((self.d_model, self.d_model, self.d_model), act=self.act, name="embed")(feats)
        mask = nn.make_attention_mask(batch.atom_mask, batch.atom_mask)
        for i in range(self.n_layers):
            x = EncoderBlock(self.d_model, self.n_heads, self.ffn_dim, self.dropout, self.act,
                             name=f"encoder_{i}")(x, mask, deterministic)
        forces = nn.Dense(3, name="proj")(x)
        return forces * batch.atom_mask[..., None]
