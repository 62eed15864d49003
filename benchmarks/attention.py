"""One encoder attention block: flax's ``MultiHeadDotProductAttention`` against bptt_jax's heads-major
:class:`~bptt_jax.models.layers.SelfAttention` (the same parameters), forward and forward + backward.

    .venv/bin/python -m benchmarks.attention [--atoms 64 216] [--repeats 60]

Prints one JSON line per (atoms, implementation, pass) with the median time in ms; figures and the reason
for the change are in benchmarks/NOTES.md. Runs with the training CLI's default XLA flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bptt_jax.runtime import CPU_XLA_FLAGS, add_xla_flags


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atoms", nargs="+", type=int, default=[64, 216])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args(argv)
    add_xla_flags(CPU_XLA_FLAGS)  # before JAX starts

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bptt_jax.models.layers import SelfAttention

    def median_ms(fn, *a) -> float:
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    d = args.d_model
    for n in args.atoms:
        x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, n, d))
        mask = jnp.ones((args.batch, 1, n, n), bool)
        flax_mha = nn.MultiHeadDotProductAttention(num_heads=args.heads, qkv_features=d, out_features=d)
        ours = SelfAttention(num_heads=args.heads, qkv_features=d, out_features=d)
        variables = flax_mha.init(jax.random.PRNGKey(2), x, x, mask=mask)
        impls = {"flax": lambda p, x: flax_mha.apply(p, x, x, mask=mask),
                 "heads_major": lambda p, x: ours.apply(p, x, mask)}
        np.testing.assert_allclose(impls["flax"](variables, x), impls["heads_major"](variables, x),
                                   rtol=1e-4, atol=1e-5)
        for name, f in impls.items():
            fwd = jax.jit(f)
            fwd_bwd = jax.jit(jax.grad(lambda p, x, f=f: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1)))
            for kind, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                print(json.dumps({"atoms": n, "batch": args.batch, "d_model": d, "heads": args.heads, "impl": name,
                                  "pass": kind, "ms": round(median_ms(fn, variables, x), 3)}), flush=True)


if __name__ == "__main__":
    main()
