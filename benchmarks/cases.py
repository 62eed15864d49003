"""One benchmark case per process: ``python -m benchmarks.cases '<spec json>'``.

The driver (:mod:`benchmarks.run`) starts each case in a fresh interpreter so its peak RSS is its own and
one framework's memory never counts against the other (the PyTorch cases never import JAX). The child
prints one line ``BENCH_RESULT {json}`` (other output is ignored).

Timing protocol: the first call (JAX: ahead-of-time ``lower().compile()`` then one warm-up call; PyTorch:
one warm-up call) is excluded and reported as ``compile_s`` / ``warmup_s``; then ``repeats`` timed calls,
each ending in ``block_until_ready`` (JAX) or a host value (PyTorch), and the median is
``seconds_per_step``. Relaxations run exactly ``frames`` frames (``tol=0`` never converges,
``skip_converged=False``).

Memory: ``peak_rss_mb`` is the process's high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``, including
imports and compilation); ``steady_peak_rss_mb`` is the high-water mark during the timed calls only (VmHWM
after resetting it through ``/proc/self/clear_refs``; null where the kernel does not allow that);
``baseline_rss_mb`` is the RSS after imports and data set-up, before the first call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from benchmarks.data import si_atoms_list, si_structures
from benchmarks.memory import hwm_mb, maxrss_mb, peak_rss_mb, reset_hwm, rss_mb, trim_heap

# ------------------------------------------------------------------------------------------------------
# Measurement helpers (memory: benchmarks.memory)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class OverBudget(Exception):
    """The case would not fit the memory budget; ``partial`` is the row measured so far."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


def _xla_memory(compiled, result: dict, spec: dict) -> None:
    """XLA's compile-time buffer sizes (MB) of a compiled program; raises :class:`OverBudget` when the
    predicted footprint (RSS now + temporaries + outputs) exceeds ``spec["max_rss_mb"]``."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (best-effort API)
        m = None
    if m is None:
        return
    mb = lambda x: None if x is None else x / 2 ** 20  # noqa: E731
    result["xla_temp_mb"] = mb(getattr(m, "temp_size_in_bytes", None))
    result["xla_argument_mb"] = mb(getattr(m, "argument_size_in_bytes", None))
    result["xla_output_mb"] = mb(getattr(m, "output_size_in_bytes", None))
    predicted = (rss_mb() or 0.0) + (result["xla_temp_mb"] or 0.0) + (result["xla_output_mb"] or 0.0)
    result["predicted_rss_mb"] = predicted
    budget = spec.get("max_rss_mb")
    if budget and predicted > budget:
        raise OverBudget(f"XLA predicts {predicted:.0f} MB (temporaries {result['xla_temp_mb']:.0f} MB), over the "
                         f"memory budget of {budget:.0f} MB: not run", result)


def _base(spec: dict) -> dict[str, Any]:
    keys = ("name", "impl", "mode", "batch", "atoms", "frames", "d_model", "layers", "heads", "ffn", "preset",
            "devices")
    out = {k: spec.get(k) for k in keys}
    out["host"] = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    # Load average when the case started: measurements taken next to other CPU work are not comparable.
    out["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return out


def _finish(result: dict, times: list[float], steady: bool, work_frames: float | None = None) -> dict:
    """Fill seconds_per_step (median), throughput and memory fields."""
    med = statistics.median(times)
    result["seconds_per_step"] = med
    result["seconds_min"] = min(times)  # the fastest repeat: least disturbed by other work on a shared VM
    result["seconds_all"] = times
    result["repeats"] = len(times)
    frames, batch = result.get("frames"), result.get("batch")
    if work_frames is not None:  # relax100: structure-frames of the whole job
        result["frames_per_s"] = work_frames / med
        result["structure_frames_per_s"] = work_frames / med
    elif frames:
        result["frames_per_s"] = frames / med
        result["structure_frames_per_s"] = frames * (batch or 1) / med
    else:
        result["frames_per_s"] = None
    result["steady_peak_rss_mb"] = hwm_mb() if steady else None
    result["peak_rss_mb"] = peak_rss_mb()  # the whole process's, the part before reset_hwm included
    return result


# ------------------------------------------------------------------------------------------------------
# JAX


def _jax_setup(spec: dict):
    import jax

    from bptt_jax.models import PRESETS, build_model
    from bptt_jax.structures import Batch, Structure

    data = si_structures(spec["batch"], spec["atoms"], seed=spec.get("seed", 0))
    structs = [Structure(data["positions"][i], data["numbers"][i], data["cell"][i], data["pbc"][i])
               for i in range(spec["batch"])]
    batch = Batch.from_structures(structs, [data["target"][i] for i in range(spec["batch"])],
                                  n_atoms=spec["atoms"])
    model = build_model("adapt", spec["preset"])
    return jax, model, batch, PRESETS["adapt"][spec["preset"]]


def _data_parallel(spec: dict, jax, batch):
    """For ``spec["devices"] > 1`` (the driver forces that many CPU devices): the mesh over them and the batch
    split along it; else (None, batch)."""
    n = spec.get("devices") or 1
    if n <= 1:
        return None, batch
    from bptt_jax.parallel import data_mesh, shard_batch

    if jax.device_count() != n:
        raise RuntimeError(f"case asks for {n} devices, JAX has {jax.device_count()}")
    mesh = data_mesh()
    return mesh, None if batch is None else shard_batch(batch, mesh)


def _relax_config(spec: dict, mode: str, frames: int, **extra):
    """RelaxConfig for a fixed-length benchmark relaxation with gradient mode ``mode``."""
    from bptt_jax.relax import REGISTRY, RelaxConfig

    kw = dict(max_frames=frames, tol=0.0, step_mode="fixed", step_size=spec.get("step_size", 0.01),
              skip_converged=False)
    if mode == spec.get("mode"):  # the case's own mode: its settings (e.g. first_order's window and samples)
        kw.update(spec.get("relax_extra") or {})
    kw.update(extra)
    kw["grad_mode"] = mode
    if REGISTRY[mode].uses_adjoint:
        # tol=0: nothing converges; "solve" runs the adjoint solve anyway, so its cost is measured.
        kw["adjoint_unconverged"] = "solve"
    return RelaxConfig(**kw)


def _flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program (None if unavailable). Loop bodies are counted once."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (best-effort API)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _model_info(result: dict, cfg: dict, n_params: int, impl_version: str) -> None:
    result.update(d_model=cfg["d_model"], layers=cfg["n_layers"], heads=cfg["n_heads"], ffn=cfg["ffn_dim"],
                  n_params=n_params, version=impl_version)


def jax_rollout(spec: dict) -> dict:
    jax, model, batch, cfg = _jax_setup(spec)
    from bptt_jax.bptt import BPTT, OptimConfig, count_params

    frames = spec["frames"]
    bptt = BPTT(model, _relax_config(spec, "full", frames), OptimConfig())
    params = bptt.init_params(jax.random.PRNGKey(0), batch)
    batch1, params1 = batch, params  # one-device copies for the FLOP count
    mesh, batch = _data_parallel(spec, jax, batch)
    if mesh is not None:
        from bptt_jax.parallel import replicate

        params = replicate(params, mesh)

    def relax(p, b):
        r = bptt.rollout(p, b, None, mode="while")
        return r.positions, r.frames

    result = _base(spec)
    _model_info(result, cfg, count_params(params["model"]), jax.__version__)
    result["baseline_rss_mb"] = rss_mb()
    t0 = time.perf_counter()
    compiled = jax.jit(relax).lower(params, batch).compile()
    result["compile_s"] = time.perf_counter() - t0
    result["rss_after_compile_mb"] = rss_mb()
    trim_heap()
    _xla_memory(compiled, result, spec)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, batch))
    result["warmup_s"] = time.perf_counter() - t0
    assert int(np.min(np.asarray(out[1]))) == frames, "the rollout must run exactly `frames` frames"
    steady = reset_hwm()
    times = timed(lambda: jax.block_until_ready(compiled(params, batch)), spec["repeats"])
    _finish(result, times, steady)
    # FLOPs: XLA counts a while-loop body once, so count one frame and multiply.
    bptt1 = BPTT(model, _relax_config(spec, "full", 1), OptimConfig())
    one = jax.jit(lambda p, b: bptt1.rollout(p, b, None, mode="while").positions).lower(params1, batch1).compile()
    per_frame = _flops(one)
    result["flops_per_frame"] = per_frame
    result["flops"] = per_frame * frames if per_frame else None
    result["final_mean_disp"] = float(np.mean(np.linalg.norm(np.asarray(out[0]) - np.asarray(batch1.positions), axis=-1)))
    return result


def jax_bptt(spec: dict) -> dict:
    jax, model, batch, cfg = _jax_setup(spec)
    from bptt_jax.bptt import BPTT, OptimConfig, count_params, jit_train_step

    frames, mode = spec["frames"], spec["mode"]
    relax_cfg = _relax_config(spec, mode, frames)
    bptt = BPTT(model, relax_cfg, OptimConfig())
    key = jax.random.PRNGKey(0)
    params = bptt.init_params(key, batch)
    state0 = bptt.init_state(params, key)
    # One-device shapes for the FLOP count (the step donates state0, so not the arrays themselves).
    batch1, state1 = batch, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state0)
    mesh, batch = _data_parallel(spec, jax, batch)
    if mesh is not None:  # data parallel: the pipeline's sharded step (state replicated, batch split over the devices)
        from bptt_jax.parallel import replicate

        state0 = replicate(state0, mesh)
    train_step, extra_args = jit_train_step(bptt, mesh), (None,)  # ref_params None: a mesh's jit takes no defaults

    result = _base(spec)
    _model_info(result, cfg, count_params(params["model"]), jax.__version__)
    result["relax_config"] = {k: v for k, v in dataclasses.asdict(relax_cfg).items()
                              if k in ("grad_mode", "remat_segment", "sample_frames", "adjoint_solver",
                                       "adjoint_iters", "adjoint_tol", "adjoint_unconverged", "max_frames", "tol",
                                       "step_size")}
    result["relax_config"]["window"] = relax_cfg.window_frames
    result["baseline_rss_mb"] = rss_mb()
    t0 = time.perf_counter()
    compiled = train_step.lower(state0, batch, *extra_args).compile()
    result["compile_s"] = time.perf_counter() - t0
    result["rss_after_compile_mb"] = rss_mb()
    trim_heap()
    _xla_memory(compiled, result, spec)
    holder = {"state": state0}

    def step():  # the step donates its state: each call starts from the state the previous one returned
        state, metrics = compiled(holder["state"], batch, *extra_args)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return metrics

    t0 = time.perf_counter()
    metrics = step()
    result["warmup_s"] = time.perf_counter() - t0
    steady = reset_hwm()
    times = timed(step, spec["repeats"])
    _finish(result, times, steady)
    result["metrics_first_step"] = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    # FLOPs of one frame forward (rollout) and of one frame forward+backward (a 1-frame BPTT step); XLA
    # counts loop bodies once. "Model FLOPs": recomputation (remat) is not counted as useful work.
    fwd_cfg = _relax_config(spec, "full", 1)
    b_fwd = BPTT(model, fwd_cfg, OptimConfig())
    fwd = _flops(jax.jit(lambda p, b: b_fwd.rollout(p, b, None, mode="while").positions)
                 .lower(params, batch1).compile())
    b_step = BPTT(model, fwd_cfg, OptimConfig())
    fb = _flops(jit_train_step(b_step).lower(state1, batch1).compile())
    result["flops_per_frame_fwd"], result["flops_per_frame_fwd_bwd"] = fwd, fb
    flops = None
    if fwd and fb:
        if mode in ("full", "remat"):
            flops = frames * fb
        elif mode == "truncated":
            w = min(relax_cfg.window_frames, frames)
            flops = frames * fwd + w * fb
        elif mode == "first_order":  # the forward pass, the window, and the sampled frames' VJPs
            w = min(relax_cfg.window_frames, frames)
            k = relax_cfg.sample_frames or (frames - w)
            flops = frames * fwd + (w + min(k, frames - w)) * fb
        # implicit / guided: the adjoint solve's iteration count is not reported, so no FLOP count.
    result["flops"] = flops
    return result


def jax_matmul(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    n = spec["size"]
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    result = _base(spec)
    result.update(version=jax.__version__, size=n, baseline_rss_mb=rss_mb())
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    result["compile_s"] = time.perf_counter() - t0
    steady = reset_hwm()
    times = timed(lambda: jax.block_until_ready(f(a, b)), spec["repeats"])
    _finish(result, times, steady)
    result["flops"] = 2.0 * n ** 3
    result["peak_flops_per_s"] = result["flops"] / result["seconds_per_step"]
    return result


# ------------------------------------------------------------------------------------------------------
# PyTorch eager


def _torch_setup(spec: dict):
    import torch

    from benchmarks import torch_adapt as ta

    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = spec["model_cfg"]
    model = ta.TorchADAPT(cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["ffn_dim"], cfg.get("species_dim", 16),
                          attention=spec.get("attention", "sdpa"))
    data = si_structures(spec["batch"], spec["atoms"], seed=spec.get("seed", 0))
    batch = ta.TorchBatch(data)
    result = _base(spec)
    _model_info(result, cfg, ta.count_params(model), torch.__version__)
    result.update(threads=threads, attention=spec.get("attention", "sdpa"))
    if spec.get("expect_params") is not None and result["n_params"] != spec["expect_params"]:
        raise AssertionError(f"torch ADAPT has {result['n_params']} parameters, flax {spec['expect_params']}")
    return torch, ta, model, batch, result


def _time_torch(result: dict, fn, repeats: int):
    """Warm-up call (eager: nothing to compile), then the timed repeats; returns the warm-up's output."""
    result["baseline_rss_mb"] = rss_mb()
    t0 = time.perf_counter()
    out = fn()
    result["compile_s"] = 0.0
    result["warmup_s"] = time.perf_counter() - t0
    steady = reset_hwm()
    _finish(result, timed(fn, repeats), steady)
    return out


def torch_rollout(spec: dict) -> dict:
    torch, ta, model, batch, result = _torch_setup(spec)
    bptt = ta.TorchBPTT(model, step_size=spec.get("step_size", 0.01), frames=spec["frames"])
    out = _time_torch(result, lambda: bptt.relax(batch), spec["repeats"])
    result["final_mean_disp"] = float((out - batch.positions).norm(dim=-1).mean())
    return result


def torch_bptt(spec: dict) -> dict:
    torch, ta, model, batch, result = _torch_setup(spec)
    if spec["mode"] != "full":
        raise ValueError("the PyTorch reference implements the full unroll only")
    bptt = ta.TorchBPTT(model, step_size=spec.get("step_size", 0.01), frames=spec["frames"])
    result["metrics_first_step"] = _time_torch(result, lambda: bptt.train_step(batch), spec["repeats"])
    return result


def torch_matmul(spec: dict) -> dict:
    import torch

    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    n = spec["size"]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    result = _base(spec)
    result.update(version=torch.__version__, size=n, threads=threads, baseline_rss_mb=rss_mb())
    t0 = time.perf_counter()
    torch.mm(a, b)
    result["compile_s"] = 0.0
    result["warmup_s"] = time.perf_counter() - t0
    steady = reset_hwm()
    times = timed(lambda: torch.mm(a, b), spec["repeats"])
    _finish(result, times, steady)
    result["flops"] = 2.0 * n ** 3
    result["peak_flops_per_s"] = result["flops"] / result["seconds_per_step"]
    return result


# ------------------------------------------------------------------------------------------------------
# (d) ASE FIRE, one structure at a time, vs the batched FIRE rollout


def _relax_setup(spec: dict):
    import jax

    from bptt_jax.bptt import BPTT, OptimConfig, count_params
    from bptt_jax.models import PRESETS, build_model
    from bptt_jax.structures import Batch, Structure

    atoms_list = si_atoms_list(spec["n_structures"], spec["atoms"], seed=spec.get("seed", 0))
    model = build_model("adapt", spec["preset"])
    cfg = PRESETS["adapt"][spec["preset"]]
    template = Batch.from_structures([Structure.from_atoms(atoms_list[0])], n_atoms=spec["atoms"])
    variables = model.init(jax.random.PRNGKey(0), template)
    result = _base(spec)
    _model_info(result, cfg, count_params(variables), jax.__version__)
    result.update(n_structures=spec["n_structures"], fmax=spec.get("fmax", 0.0))
    return jax, model, variables, atoms_list, result, BPTT, OptimConfig, Batch, Structure


def make_calculator(model, variables, Batch, Structure):
    """An ASE calculator calling the jitted flax force model on one structure (B = 1) per call.

    ADAPT is a force model without an energy; ``energy`` is reported as 0.0 only because ASE's optimiser
    log line asks for it (FIRE without ``downhill_check`` never uses it)."""
    import jax
    import jax.numpy as jnp
    from ase.calculators.calculator import Calculator, all_changes

    force = jax.jit(lambda v, b: model.apply(v, b))

    class ModelCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def __init__(self):
            super().__init__()
            self.template = None
            self.calls = 0

        def calculate(self, atoms=None, properties=("forces",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            if self.template is None or {"numbers", "cell", "pbc"} & set(system_changes) or \
                    self.template.positions.shape[1] != len(self.atoms):
                # The static part of the input is rebuilt only when it changes.
                self.template = Batch.from_structures([Structure.from_atoms(self.atoms)], n_atoms=len(self.atoms))
            pos = jnp.asarray(self.atoms.positions[None], self.template.positions.dtype)
            f = force(variables, self.template.replace(positions=pos))
            self.results["forces"] = np.asarray(f[0], np.float64)
            self.results["energy"] = 0.0
            self.calls += 1

    return ModelCalculator


def relax_ase(spec: dict) -> dict:
    jax, model, variables, atoms_list, result, *_rest, Batch, Structure = _relax_setup(spec)
    from ase.optimize import FIRE

    Calc = make_calculator(model, variables, Batch, Structure)
    frames, fmax = spec["frames"], spec.get("fmax", 0.0)
    result["baseline_rss_mb"] = rss_mb()
    t0 = time.perf_counter()
    warm = atoms_list[0].copy()
    warm.calc = Calc()
    warm.get_forces()  # compile
    result["compile_s"] = time.perf_counter() - t0
    result["warmup_s"] = result["compile_s"]
    finals = {}

    def relax_all():
        calc = Calc()
        for i, a in enumerate(atoms_list):
            a = a.copy()
            a.calc = calc
            FIRE(a, logfile=None).run(fmax=fmax, steps=frames)
            finals[i] = a.get_positions()
        return calc.calls

    steady = reset_hwm()
    calls = []
    times = timed(lambda: calls.append(relax_all()), spec["repeats"])
    _finish(result, times, steady, work_frames=len(atoms_list) * frames)
    result["structures_per_s"] = len(atoms_list) / result["seconds_per_step"]
    result["force_calls_per_structure"] = calls[-1] / len(atoms_list)
    disp = [np.linalg.norm(finals[i] - atoms_list[i].get_positions(), axis=-1).mean() for i in finals]
    result["final_mean_disp"] = float(np.mean(disp))
    return result


def relax_batched(spec: dict) -> dict:
    jax, model, variables, atoms_list, result, BPTT, OptimConfig, Batch, Structure = _relax_setup(spec)
    frames, bs = spec["frames"], spec["batch"]
    from bptt_jax.relax import RelaxConfig

    bptt = BPTT(model, RelaxConfig(rule="fire", max_frames=frames, tol=0.0, skip_converged=False), OptimConfig())
    params = {"model": variables}
    structs = [Structure.from_atoms(a) for a in atoms_list]
    result["baseline_rss_mb"] = rss_mb()
    mesh, _ = _data_parallel(spec, jax, None)
    if mesh is not None:  # data parallel: each batch split over the devices (padded to a multiple of them)
        from bptt_jax.parallel import replicate, shard_batch

        params = replicate(params, mesh)

    def batches():  # host → device batching is part of the job, as the ASE loop's per-call conversion is
        for i in range(0, len(structs), bs):
            b = Batch.from_structures(structs[i:i + bs], n_atoms=spec["atoms"], batch_size=bs)
            yield b if mesh is None else shard_batch(b, mesh)

    first = next(batches())
    t0 = time.perf_counter()
    jax.block_until_ready(bptt.relax_batch(params, first, mode="while"))
    result["compile_s"] = time.perf_counter() - t0
    result["warmup_s"] = result["compile_s"]
    finals = []

    def relax_all():
        finals.clear()
        for b in batches():
            r = bptt.relax_batch(params, b, mode="while")
            n = min(bs, len(structs) - bs * len(finals))  # real structures of this batch (the rest is padding)
            finals.append((np.asarray(r.positions)[:n], np.asarray(r.frames)[:n], np.asarray(b.positions)[:n]))

    steady = reset_hwm()
    times = timed(relax_all, spec["repeats"])
    _finish(result, times, steady, work_frames=len(atoms_list) * frames)
    result["structures_per_s"] = len(atoms_list) / result["seconds_per_step"]
    frames_done = np.concatenate([f for _, f, _ in finals])
    assert frames_done.size == len(atoms_list) and int(frames_done.min()) == frames, \
        "every structure must run exactly `frames` frames"
    disp = np.concatenate([np.linalg.norm(p - p0, axis=-1).mean(-1) for p, _, p0 in finals])
    result["final_mean_disp"] = float(disp.mean())
    return result


CASES: dict[str, Callable[[dict], dict]] = {
    "jax_rollout": jax_rollout, "jax_bptt": jax_bptt, "jax_matmul": jax_matmul,
    "torch_rollout": torch_rollout, "torch_bptt": torch_bptt, "torch_matmul": torch_matmul,
    "relax_ase": relax_ase, "relax_batched": relax_batched,
}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    try:
        result = CASES[spec["case"]](spec)
    except OverBudget as e:
        result = dict(e.partial, error=str(e))
        result.setdefault("seconds_per_step", None)
        result.setdefault("frames_per_s", None)
        result["peak_rss_mb"] = maxrss_mb()
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
