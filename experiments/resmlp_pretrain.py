"""Why the small ResMLP does not learn forces, and what was tried: force pretraining alone, per variant.

    python -m experiments.resmlp_pretrain [--dataset si_defects] [--out results/resmlp_pretrain.md]

For each variant (input features, input standardization, learning rate, epochs) this pretrains the ``small``
ResMLP exactly as the pipeline does (same data set and split, same frames, cosine schedule, best epoch by
validation force MSE, seed 0) and reports the last epoch's training force MSE, the best validation force MSE
and the force MSE on the test split's frames, beside the MSE of predicting zero force (what a model that
learned nothing but the mean scores). A ``fit`` column says whether the variant can memorise a small set
(every 10th frame of 20 training trajectories, 300 epochs of Adam at 1e-3): the capacity check.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from experiments.headline import cpu_name

VARIANTS: list[tuple[str, dict, dict]] = [
    # name, model overrides, pretrain overrides
    ("preset small (Cartesian × 0.1, lr 2e-3)", {}, {}),
    ("Cartesian × 1.0", {"coord_scale": 1.0}, {}),
    ("lr 3e-4", {}, {"learning_rate": 3e-4}),
    ("input_norm, Cartesian", {"input_norm": True}, {}),
    ("input_norm, periodic", {"input_norm": True, "coords": "periodic"}, {}),
    ("input_norm, periodic, lr 5e-4", {"input_norm": True, "coords": "periodic"}, {"learning_rate": 5e-4}),
    ("input_norm, periodic, lr 5e-4, 48 epochs", {"input_norm": True, "coords": "periodic"},
     {"learning_rate": 5e-4, "max_epochs": 48}),
]

DATASETS = {"si_defects": {}, "catalysts": {"name": "catalysts"},
            "pure_crystals": {"name": "pure_crystals", "loss": "mse"}}


def memorises(model, frames, buckets, epochs: int = 300) -> float:
    """Training force MSE after ``epochs`` of Adam (1e-3, no clipping) on ``frames``: the capacity check."""
    import jax
    import numpy as np
    import optax

    from bptt_jax.models.resmlp import fit_input_stats
    from bptt_jax.pipeline import force_batches, make_force_step

    batches = force_batches(frames, 32, buckets)
    params = fit_input_stats(model, model.init(jax.random.PRNGKey(0), batches[0]), batches)
    opt = optax.adam(1e-3)
    state = opt.init(params)
    step, _ = make_force_step(model, opt)
    losses = []
    for epoch in range(epochs):
        losses = []
        for b in batches:
            params, state, loss, _ = step(params, state, b)
            losses.append(float(loss))
    return float(np.mean(losses))


def study(dataset: str, variants=VARIANTS, memorise_epochs: int = 300, stride: int = 3,
          data_overrides: dict | None = None) -> list[dict]:
    import jax
    import numpy as np
    import optax

    from bptt_jax.data.trajectory import SkipLog
    from bptt_jax.models import build_model
    from bptt_jax.models.resmlp import fit_input_stats
    from bptt_jax.pipeline import (DataConfig, PretrainConfig, force_batches, force_errors, force_items,
                                   load_split, make_force_step, model_buckets, pretrain)
    from bptt_jax.structures import DEFAULT_BUCKETS

    rows = []
    split = None
    for name, model_kw, pre_kw in variants:
        model = build_model("resmlp", "small", **model_kw)
        if split is None:
            split = load_split(DataConfig(**{**DATASETS[dataset], **(data_overrides or {})}), SkipLog(), False,
                               model.max_atoms)
            frames, test_frames = force_items(split.train, stride), force_items(split.test, stride)
            small = force_items(split.train[:20], 10)
            buckets = model_buckets(DEFAULT_BUCKETS, model.max_atoms)
            # force_mse of a zero prediction: per component over each structure's atoms, mean over structures
            zero = float(np.mean([np.mean(np.asarray(f.forces) ** 2) for f in test_frames]))
        cfg = PretrainConfig(**{"max_epochs": 16, "patience": None, "schedule": "cosine", **pre_kw})
        t = time.time()
        params = model.init(jax.random.PRNGKey(0), force_batches(frames[:2], 2, buckets)[0])
        params = fit_input_stats(model, params, force_batches(frames, cfg.batch_size, buckets))
        params, hist = pretrain(model, params, frames, cfg, buckets, 0, False)
        _, errors = make_force_step(model, optax.identity())
        test_mse = force_errors(errors, params, force_batches(test_frames, 32, buckets))[0]
        seconds = time.time() - t
        fit = memorises(model, small, buckets, memorise_epochs) if memorise_epochs else None
        rows.append({"variant": name, "epochs": len(hist), "train_mse": hist[-1]["train_force_mse"],
                     "best_val_mse": min(h["val_force_mse"] for h in hist),
                     "first_val_mse": hist[0]["val_force_mse"], "test_mse": test_mse, "zero_mse": zero,
                     "memorise_mse": fit, "seconds": seconds, "n_frames": len(frames), "n_small": len(small)})
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], dataset: str, command: str, wall: float) -> str:
    r0 = rows[0]
    out = [f"# ResMLP force pretraining on {dataset}: what was tried", "",
           f"Command: `{command}`", "",
           f"Machine: {cpu_name()}, written "
           f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min.", "",
           f"Preset `small` (96 atoms, width 512, 4 blocks), seed 0, {r0['n_frames']} training frames (every 3rd), "
           f"{r0['epochs']} epochs of clip + Adam with a cosine decay unless stated, best epoch by validation force MSE. "
           f"Force MSE in (eV/Å)² per component; predicting zero force scores {r0['zero_mse']:.3f} on the test "
           f"frames. *fit*: training MSE after 300 epochs on {r0['n_small']} frames of 20 trajectories.", "",
           "| variant | last train MSE | validation MSE, epoch 1 → best | test MSE | fit (capacity) |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows:
        fit = "-" if r["memorise_mse"] is None else f"{r['memorise_mse']:.3f}"
        out.append(f"| {r['variant']} | {r['train_mse']:.3f} | "
                   f"{r['first_val_mse']:.3f} → {r['best_val_mse']:.3f} | {r['test_mse']:.3f} | {fit} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="si_defects", choices=sorted(DATASETS))
    ap.add_argument("--memorise-epochs", type=int, default=300, help="0: skip the capacity check")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t = time.time()
    rows = study(args.dataset, memorise_epochs=args.memorise_epochs)
    cmd = f"python -m experiments.resmlp_pretrain --dataset {args.dataset}" + (
        f" --out {args.out}" if args.out else "")
    text = report(rows, args.dataset, cmd, time.time() - t)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
