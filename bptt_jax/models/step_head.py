"""Scalar step-size decoder head (paper App. B, Eqs. 11-12).

For a structure X with predicted forces F::

    Z = X |cat F                         per-atom features of X concatenated with the forces
    H = W2 Z + W1 σ(W0 Z)                lift to d_model
    M = enc^n(H)                         encoder blocks (key-padding masked)
    h0 = LN(q + Attn(q, M, M))           one all-ones query attends over the atoms
    h1 = LN(h0 + MLP(h0))
    s = W h1 + b                         one step size per structure

With ``output_init="constant"`` the output layer starts with zero weights and bias ``init_step`` (``output="exp"``:
its logarithm, ``"softplus"``: its softplus inverse), so the head initially returns exactly ``init_step``: the
paper's "constant-output initialisation", which it obtains by pretraining on noise, reached here
analytically. ``output_init="random"`` is the paper's other initialisation: the output weights are drawn like every
other layer's (LeCun normal), so the initial step size varies from structure to structure around
``init_step`` (with ``"exp"``, by a factor of about e^±1: the bias stays at ``init_step``, since a zero bias
would start every relaxation at η = 1).
``"linear"`` is the paper's head; ``"exp"`` (what :class:`~bptt_jax.bptt.BPTT` uses) keeps every step size
positive however training moves the head, and its parameters move η by relative amounts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.models.layers import MLP, AtomFeaturizer, EncoderBlock, activation
from bptt_jax.structures import Batch

Array = jax.Array


class StepHead(nn.Module):
    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 4
    ffn_dim: int = 128
    dropout: float = 0.0
    act: str = "gelu"
    init_step: float = 0.077
    output: str = "linear"  # the paper's; "exp" or "softplus": always positive
    force_scale: float = 1.0  # multiplies forces (eV/Å) before they enter Z
    output_init: str = "constant"  # constant: returns init_step exactly at first | random: output weights drawn

    @nn.compact
    def __call__(self, batch: Batch, forces: Array, deterministic: bool = True) -> Array:
        """Step sizes (B,) for structures at ``batch.positions`` with predicted ``forces`` (B, N, 3)."""
        feats = AtomFeaturizer("cartesian", "descriptors", fixed_flag=True, name="features")(
            batch.positions, batch.numbers, batch.cell, batch.pbc, batch.fixed_mask)
        z = jnp.concatenate([feats, forces * self.force_scale], axis=-1)
        h = nn.Dense(self.d_model, use_bias=False, name="W2")(z) + nn.Dense(self.d_model, name="W1")(
            activation(self.act)(nn.Dense(self.d_model, name="W0")(z)))
        mask = nn.make_attention_mask(batch.atom_mask, batch.atom_mask)
        for i in range(self.n_layers):
            h = EncoderBlock(self.d_model, self.n_heads, self.ffn_dim, self.dropout, self.act,
                             name=f"encoder_{i}")(h, mask, deterministic)
        q = jnp.ones((h.shape[0], 1, self.d_model), h.dtype)
        cross_mask = nn.make_attention_mask(jnp.ones(q.shape[:2], bool), batch.atom_mask)
        attn = nn.MultiHeadDotProductAttention(num_heads=self.n_heads, qkv_features=self.d_model,
                                               out_features=self.d_model, dropout_rate=self.dropout,
                                               deterministic=deterministic, name="cross_attn")(
            q, h, mask=cross_mask)
        attn = nn.Dropout(self.dropout, deterministic=deterministic)(attn)
        h0 = nn.LayerNorm(name="ln0")(q + attn)
        mlp = nn.Dropout(self.dropout, deterministic=deterministic)(
            MLP((self.ffn_dim, self.d_model), act=self.act, name="mlp")(h0))
        h1 = nn.LayerNorm(name="ln1")(h0 + mlp)
        if self.output == "linear":
            bias = self.init_step
        elif self.output == "softplus":
            bias = float(np.log(np.expm1(self.init_step)))
        elif self.output == "exp":
            bias = float(np.log(self.init_step))
        else:
            raise ValueError(f"unknown output {self.output!r}; expected linear, exp or softplus")
        if self.output_init not in ("constant", "random"):
            raise ValueError(f"unknown step-head output_init {self.output_init!r}; expected constant or random")
        kernel_init = nn.initializers.zeros if self.output_init == "constant" else nn.initializers.lecun_normal()
        s = nn.Dense(1, kernel_init=kernel_init, bias_init=nn.initializers.constant(bias),
                     name="out")(h1)[:, 0, 0]
        if self.output == "softplus":
            return nn.softplus(s)
        return jnp.exp(s) if self.output == "exp" else s
