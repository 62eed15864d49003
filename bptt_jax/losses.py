"""Structural and force losses, all mask-aware and minimum-image under periodic boundaries.

Per-structure functions return (B,) arrays; :func:`masked_mean` averages them over real structures
(batch padding excluded). Structural losses count free atoms only: fixed atoms and padding never move
and never count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_jax.structures import Batch, displacement, safe_sqrt

Array = jax.Array


def masked_mean(values: Array, mask: Array) -> Array:
    """Mean of ``values`` where ``mask`` (0 if nothing is selected)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def dq(pred: Array, target: Array, masses: Array, cell: Array, pbc: Array, mask: Array) -> Array:
    """Mass-weighted displacement (paper Eq. 1), per structure.

    ``Dq = sqrt(sum_j m_j |X*_j - X^_j|^2)`` over the atoms in ``mask``, with minimum-image displacements.

    Args:
      pred: (B, N, 3) predicted positions, Å.
      target: (B, N, 3) reference positions, Å.
      masses: (B, N) amu.
      cell: (B, 3, 3) Å.  pbc: (B, 3).
      mask: (B, N) atoms that count.

    Returns:
      (B,) Dq in sqrt(amu)·Å.
    """
    d = displacement(pred, target, cell, pbc)
    sq = jnp.sum(d * d, axis=-1) * masses * mask
    return safe_sqrt(jnp.sum(sq, axis=-1))


def position_mse(pred: Array, target: Array, cell: Array, pbc: Array, mask: Array) -> Array:
    """Mean over counted atoms of the squared minimum-image displacement, per structure, Å²."""
    d = displacement(pred, target, cell, pbc)
    sq = jnp.sum(d * d, axis=-1) * mask
    return jnp.sum(sq, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def force_mse(pred: Array, target: Array, mask: Array) -> Array:
    """Mean squared force error per component over real atoms, per structure, (eV/Å)²."""
    sq = jnp.sum((pred - target) ** 2, axis=-1) * mask
    return jnp.sum(sq, axis=-1) / jnp.maximum(3 * jnp.sum(mask, axis=-1), 1)


def force_l2(pred: Array, target: Array, mask: Array) -> Array:
    """L2 norm of the whole structure's force error, ``sqrt(sum_j |F_j - F^_j|^2)``, per structure, eV/Å
    (the paper's Table 2 "L2 force error", averaged over structures by the caller)."""
    sq = jnp.sum((pred - target) ** 2, axis=-1) * mask
    return safe_sqrt(jnp.sum(sq, axis=-1))


def structure_loss(kind: str, final_positions: Array, batch: Batch) -> Array:
    """Per-structure loss of final positions against ``batch.target_positions``: ``"dq"`` or ``"mse"``."""
    if batch.target_positions is None:
        raise ValueError("batch has no target_positions")
    mask = batch.free_mask
    if kind == "dq":
        return dq(final_positions, batch.target_positions, batch.masses, batch.cell, batch.pbc, mask)
    if kind == "mse":
        return position_mse(final_positions, batch.target_positions, batch.cell, batch.pbc, mask)
    raise ValueError(f"unknown structural loss {kind!r}; expected 'dq' or 'mse'")
