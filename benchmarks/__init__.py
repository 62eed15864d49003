"""Benchmarks of bptt-jax (``python -m benchmarks.run``; see benchmarks/NOTES.md).

Modules:

- :mod:`benchmarks.run`: the driver; runs every case in its own subprocess, prints JSON lines and a table.
- :mod:`benchmarks.cases`: the cases (JAX rollout / BPTT step per gradient mode, the PyTorch reference,
  ASE FIRE vs batched relaxation, matmul peak); ``python -m benchmarks.cases SPEC_JSON`` runs one.
- :mod:`benchmarks.torch_adapt`: ADAPT and the unrolled BPTT step in PyTorch eager (the paper's way).
- :mod:`benchmarks.data`: the benchmark structures (rattled diamond-Si cells), numpy only.
"""
