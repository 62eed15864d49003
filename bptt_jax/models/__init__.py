"""Force models (pure functions of a params pytree via Flax ``apply``) and the step-size head.

:func:`build_model` turns a name, an optional preset and overrides into a module.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from bptt_jax.models.adapt import ADAPT
from bptt_jax.models.layers import AtomFeaturizer, EncoderBlock
from bptt_jax.models.resmlp import ResMLP, fit_input_stats
from bptt_jax.models.step_head import StepHead

MODELS: dict[str, type[nn.Module]] = {"adapt": ADAPT, "resmlp": ResMLP}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "adapt": {
        # The ADAPT release's size.
        "paper": dict(d_model=256, n_layers=8, n_heads=8, ffn_dim=512),
        # CPU-sized: the default training job and the benchmarks.
        "small": dict(d_model=64, n_layers=3, n_heads=4, ffn_dim=128),
        # CPU-sized and geometry-aware (distance-biased attention, radial input, equivariant vector head):
        # learns Si-defect forces in minutes where the coordinate-only "small" does not.
        "small_geo": dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=128, coords="none", attn_bias="rbf",
                          force_head="vector", radial_channels=4, n_rbf=8, head_hidden=16, cutoff=5.0,
                          output_transform="expm1"),
        # small_geo's encoder with an energy head: forces = -dE/dR (conservative, usable for MD; BPTT
        # differentiates through the force gradient: double backprop).
        "small_energy": dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=128, coords="none", attn_bias="rbf",
                             force_head="linear", radial_channels=4, n_rbf=8, cutoff=5.0, output_transform="none",
                             energy_head=True),
        "bench": dict(d_model=128, n_layers=4, n_heads=4, ffn_dim=512),
        "tiny": dict(d_model=16, n_layers=1, n_heads=2, ffn_dim=32, species_dim=4),
    },
    "resmlp": {
        "paper": dict(max_atoms=220, width=4096, n_blocks=6),
        "small": dict(max_atoms=96, width=512, n_blocks=4),
        "tiny": dict(max_atoms=16, width=32, n_blocks=2),
    },
}


def build_model(name: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """A force model by name (``adapt`` or ``resmlp``), preset (see ``PRESETS``) and field overrides."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    kwargs: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS[name]:
            raise ValueError(f"unknown preset {preset!r} for {name}; choose from {sorted(PRESETS[name])}")
        kwargs.update(PRESETS[name][preset])
    kwargs.update(overrides)
    return MODELS[name](**kwargs)


__all__ = ["ADAPT", "ResMLP", "StepHead", "AtomFeaturizer", "EncoderBlock", "MODELS", "PRESETS", "build_model",
           "fit_input_stats"]
