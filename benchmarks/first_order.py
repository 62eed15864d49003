"""``first_order`` BPTT steps at bench size under several settings (sampled frames, chunk size, window).

    .venv/bin/python -m benchmarks.first_order [--atoms 64] [--samples 32] [--chunks 0 8 4 2 1] [--window 0]
                                               [--frames 75] [--batch 8] [--preset bench]

One device, the bench case's set-up (B = 8 rattled Si cells, bench ADAPT, 75 frames, nothing converges). Prints
one JSON line per setting: the fastest of ``--repeats`` compiled steps after a warm-up, and XLA's temporary
buffer size; a last line times the forward pass alone (``truncated`` with a 1-frame window). Figures and what
they decided are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import time

from bptt_jax.runtime import CPU_XLA_FLAGS, add_xla_flags


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atoms", type=int, default=64, choices=[8, 64, 216])
    ap.add_argument("--frames", type=int, default=75)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--samples", nargs="+", type=int, default=[32])
    ap.add_argument("--chunks", nargs="+", type=int, default=[0, 8, 4, 2, 1])
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    add_xla_flags(CPU_XLA_FLAGS)  # before JAX starts

    import jax

    from benchmarks import cases
    from bptt_jax.bptt import BPTT, OptimConfig, jit_train_step

    spec = dict(batch=args.batch, atoms=args.atoms, frames=args.frames, preset=args.preset, step_size=0.01,
                mode="first_order")
    _, model, batch, _ = cases._jax_setup(spec)
    settings = [("first_order", dict(window=args.window, sample_frames=k, sample_chunk=c))
                for k in args.samples for c in args.chunks]
    settings.append(("truncated", dict(window=1)))
    for mode, extra in settings:
        bptt = BPTT(model, cases._relax_config(spec, mode, args.frames, **extra), OptimConfig())
        state = bptt.init_state(bptt.init_params(jax.random.PRNGKey(0), batch), jax.random.PRNGKey(0))
        step = jit_train_step(bptt).lower(state, batch).compile()
        state, metrics = step(state, batch)  # the step donates its state: each step takes the previous one's
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        temp = step.memory_analysis().temp_size_in_bytes / 2**20
        print(json.dumps({"atoms": args.atoms, "frames": args.frames, "mode": mode, **extra,
                          "seconds_min": round(min(times), 4), "xla_temp_mb": round(temp),
                          "loss": float(metrics["loss"])}), flush=True)


if __name__ == "__main__":
    main()
