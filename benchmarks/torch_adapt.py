"""The PyTorch-eager reference: ADAPT and BPTT through an unrolled relaxation, the way the paper did it.

The same computation as :class:`bptt_jax.models.ADAPT` with ``coords="cartesian"``, ``species="both"``,
``fixed_flag=True`` and a linear force head (the preset ``"bench"`` and its relatives)::

    features (0.1·R, species embedding, elemental descriptors, fixed flag)
      → 3-layer embedding MLP (GELU, tanh approximation as flax's ``nn.gelu``)
      → n_layers post-LN encoder blocks  H1 = LN(X + Attn(X)); H2 = FFN(LN(H1)); X' = LN(H2 + H1)
        (multi-head attention with a key-padding mask, LayerNorm ε = 1e-6 as flax)
      → Linear(d_model, 3), zero on padding atoms.

The parameter count equals the flax model's (:func:`count_params`; the benchmark prints both), and
:func:`load_flax_params` copies a flax parameter tree (as numpy) into the module so tests can check that
both give the same forces.

The BPTT step (:class:`TorchBPTT`) unrolls ``x ← x + η F(x)`` (free atoms only) for a fixed number of
frames with the whole unroll in the autograd graph, takes the mass-weighted displacement Dq to the target
(minimum image), averages over structures, backpropagates, clips the global gradient norm and takes an
Adam step: the same as ``bptt_jax.BPTT.train_step`` with ``RelaxConfig(tol=0, step_mode="fixed")`` and
``OptimConfig()`` (the JAX step also evaluates its stop and divergence rules each frame, a small extra).

Importing this module does not import JAX (the benchmark measures each framework's memory alone).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_ELEMENTS = 119


def descriptor_table() -> np.ndarray:
    """``bptt_jax.elements.descriptor_table`` loaded from its file, without importing the ``bptt_jax``
    package (whose ``__init__`` imports JAX)."""
    path = Path(__file__).resolve().parents[1] / "bptt_jax" / "elements.py"
    spec = importlib.util.spec_from_file_location("_bptt_elements", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.descriptor_table()


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _flax_like_linear_init(layer: nn.Linear) -> None:
    """flax ``Dense`` defaults: lecun-normal (truncated at ±2σ, variance 1/fan_in) kernel, zero bias."""
    fan_in = layer.weight.shape[1]
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)


class EncoderBlock(nn.Module):
    """Post-LN encoder block of the paper's Eq. 6 (as ``bptt_jax.models.layers.EncoderBlock``)."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, attention: str = "sdpa"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.n_heads, self.head_dim, self.attention = n_heads, d_model // n_heads, attention
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ln_attn = nn.LayerNorm(d_model, eps=1e-6)
        self.ffn_0 = nn.Linear(d_model, ffn_dim)
        self.ffn_1 = nn.Linear(ffn_dim, d_model)
        self.ln_ffn_in = nn.LayerNorm(d_model, eps=1e-6)
        self.ln_out = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B, N, d); bias: (B, 1, N, N) additive attention bias (0 or the dtype's minimum)."""
        b, n, d = x.shape

        def heads(t):
            return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if self.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:  # "math": spelled out, as flax's dot_product_attention
            logits = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1) + bias
            a = torch.softmax(logits, dim=-1) @ v
        attn = self.out(a.transpose(1, 2).reshape(b, n, d))
        h1 = self.ln_attn(x + attn)
        h2 = self.ffn_1(_gelu(self.ffn_0(self.ln_ffn_in(h1))))
        return self.ln_out(h2 + h1)


class TorchADAPT(nn.Module):
    """ADAPT in PyTorch (see the module docstring). ``attention``: ``"sdpa"``
    (``F.scaled_dot_product_attention``, PyTorch's fused kernel) or ``"math"`` (explicit softmax)."""

    def __init__(self, d_model: int = 256, n_layers: int = 8, n_heads: int = 8, ffn_dim: int = 512,
                 species_dim: int = 16, coord_scale: float = 0.1, attention: str = "sdpa"):
        super().__init__()
        if attention not in ("sdpa", "math"):
            raise ValueError(f"unknown attention {attention!r}; expected sdpa or math")
        self.coord_scale = coord_scale
        self.species_embedding = nn.Embedding(N_ELEMENTS, species_dim)
        table = torch.tensor(descriptor_table(), dtype=torch.float32)
        self.register_buffer("descriptors", table, persistent=False)
        in_dim = 3 + species_dim + table.shape[1] + 1
        self.embed = nn.ModuleList([nn.Linear(in_dim, d_model), nn.Linear(d_model, d_model),
                                    nn.Linear(d_model, d_model)])
        self.encoders = nn.ModuleList([EncoderBlock(d_model, n_heads, ffn_dim, attention)
                                       for _ in range(n_layers)])
        self.proj = nn.Linear(d_model, 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _flax_like_linear_init(m)
        nn.init.normal_(self.species_embedding.weight, std=1.0 / math.sqrt(species_dim))

    @staticmethod
    def attention_bias(atom_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """(B, 1, N, N) additive bias: 0 between real atoms, the dtype's minimum elsewhere (as flax's mask)."""
        pair = atom_mask[:, None, :, None] & atom_mask[:, None, None, :]
        return torch.zeros(pair.shape, dtype=dtype).masked_fill(~pair, torch.finfo(dtype).min)

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, fixed: torch.Tensor,
                atom_mask: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Forces (B, N, 3) at positions (B, N, 3) Å; numbers (B, N) long; fixed, atom_mask (B, N) bool."""
        feats = torch.cat([positions * self.coord_scale, self.species_embedding(numbers),
                           self.descriptors[numbers], fixed[..., None].to(positions.dtype)], dim=-1)
        x = feats
        for i, layer in enumerate(self.embed):
            x = layer(x)
            if i < len(self.embed) - 1:
                x = _gelu(x)
        if bias is None:
            bias = self.attention_bias(atom_mask, positions.dtype)
        for block in self.encoders:
            x = block(x, bias)
        return self.proj(x) * atom_mask[..., None].to(x.dtype)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_flax_params(model: TorchADAPT, variables: Mapping[str, Any]) -> None:
    """Copy a flax ADAPT parameter tree (``{"params": ...}`` or the inner dict; leaves numpy-convertible)."""
    p = variables.get("params", variables)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731

    def dense(layer: nn.Linear, tree, kernel_in: int | None = None):
        kernel = np.asarray(tree["kernel"])
        if kernel_in is not None:  # DenseGeneral kernels (d, H, hd) or (H, hd, d) → (in, out)
            kernel = kernel.reshape(kernel_in, -1)
        layer.weight.data.copy_(t(kernel.T))
        layer.bias.data.copy_(t(np.asarray(tree["bias"]).reshape(-1)))

    def norm(layer: nn.LayerNorm, tree):
        layer.weight.data.copy_(t(tree["scale"]))
        layer.bias.data.copy_(t(tree["bias"]))

    model.species_embedding.weight.data.copy_(t(p["features"]["species_embedding"]["embedding"]))
    for i, layer in enumerate(model.embed):
        dense(layer, p["embed"][f"dense_{i}"])
    for i, block in enumerate(model.encoders):
        e = p[f"encoder_{i}"]
        d = block.query.in_features
        for name in ("query", "key", "value"):
            dense(getattr(block, name), e["attn"][name], kernel_in=d)
        dense(block.out, e["attn"]["out"], kernel_in=d)
        dense(block.ffn_0, e["ffn"]["dense_0"])
        dense(block.ffn_1, e["ffn"]["dense_1"])
        norm(block.ln_attn, e["ln_attn"])
        norm(block.ln_ffn_in, e["ln_ffn_in"])
        norm(block.ln_out, e["ln_out"])
    dense(model.proj, p["proj"])


# ------------------------------------------------------------------------------------------------------
# Relaxation and BPTT


class TorchBatch:
    """Benchmark structures as float32 / long / bool tensors (from :func:`benchmarks.data.si_structures`)."""

    def __init__(self, data: Mapping[str, np.ndarray]):
        f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.positions = f(data["positions"])
        self.target = f(data["target"])
        self.masses = f(data["masses"])
        self.cell = f(data["cell"])
        self.pbc = torch.tensor(np.asarray(data["pbc"]), dtype=torch.bool)
        self.numbers = torch.tensor(np.asarray(data["numbers"]), dtype=torch.long)
        self.fixed = torch.tensor(np.asarray(data["fixed"]), dtype=torch.bool)
        self.atom_mask = self.numbers > 0
        self.free = self.atom_mask & ~self.fixed


def rollout(model: TorchADAPT, batch: TorchBatch, step_size: float, frames: int) -> torch.Tensor:
    """``frames`` frames of ``x ← x + η F(x)`` (free atoms move); gradients flow through every frame
    unless called under ``torch.no_grad()``."""
    free = batch.free[..., None].to(batch.positions.dtype)
    bias = model.attention_bias(batch.atom_mask, batch.positions.dtype)
    x = batch.positions
    for _ in range(frames):
        x = x + step_size * model(x, batch.numbers, batch.fixed, batch.atom_mask, bias) * free
    return x


def dq(x: torch.Tensor, batch: TorchBatch) -> torch.Tensor:
    """(B,) mass-weighted minimum-image displacement to the target over free atoms (paper Eq. 1)."""
    d = x - batch.target
    frac = d @ torch.linalg.inv(batch.cell)
    frac = frac - torch.round(frac) * batch.pbc[:, None, :].to(frac.dtype)
    d = frac @ batch.cell
    sq = (d * d).sum(-1) * batch.masses * batch.free.to(d.dtype)
    return torch.sqrt(sq.sum(-1))


class TorchBPTT:
    """One BPTT step: unrolled rollout in autograd → mean Dq → backward → clip_grad_norm → Adam."""

    def __init__(self, model: TorchADAPT, *, step_size: float = 0.01, frames: int = 75,
                 learning_rate: float = 1e-4, clip_norm: float = 1.0):
        self.model, self.step_size, self.frames, self.clip_norm = model, step_size, frames, clip_norm
        self.optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

    def train_step(self, batch: TorchBatch) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        x = rollout(self.model, batch, self.step_size, self.frames)
        loss = dq(x, batch).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def relax(self, batch: TorchBatch) -> torch.Tensor:
        return rollout(self.model, batch, self.step_size, self.frames)
