"""Benchmark driver: ``python -m benchmarks.run [--quick] [--only NAME ...] [--out FILE] [--list]``.

Runs every case (see :func:`build_cases`) in its own subprocess (:mod:`benchmarks.cases`), so each peak RSS
belongs to one case and one framework. Progress goes to stderr; stdout gets one JSON line per case and
then markdown tables (all cases; JAX vs PyTorch; ASE vs batched; FLOP/s vs the matmul peak). The JSON lines
are also written to ``--out`` (default ``benchmarks/results/latest.jsonl``, or ``quick.jsonl`` with
``--quick``; each line is appended as its case finishes and the file is rewritten with the derived
fields at the end) and the tables to the same path with ``.md``.

``--only`` takes names, prefixes or shell patterns (``bptt_jax``, ``rollout_torch``, ``*_n216``).
``--quick`` runs tiny sizes with one repeat (a smoke test, not a measurement).

Every JSON line carries at least: name, impl (``jax`` or ``torch``), mode (``rollout``, a gradient mode of
the BPTT step, or ``matmul``), batch, atoms, frames, d_model, layers, seconds_per_step (median),
frames_per_s, peak_rss_mb; see benchmarks/NOTES.md for the other fields.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.memory import mem_available_mb, rss_mb
from bptt_jax.runtime import CPU_XLA_FLAGS, add_xla_flags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REQUIRED_KEYS = ("name", "impl", "mode", "batch", "atoms", "frames", "d_model", "layers", "seconds_per_step",
                 "frames_per_s", "peak_rss_mb")


# Settings of a gradient mode's benchmark case (RelaxConfig fields): first_order as the gradient-mode study
# measured it closest to full BPTT for its cost (results/grad_modes.md).
MODE_SETTINGS: dict[str, dict[str, Any]] = {"first_order": {"window": 0, "sample_frames": 32}}


def build_cases(quick: bool = False, torch_threads: int = 2) -> list[dict[str, Any]]:
    """All benchmark cases as specs for :mod:`benchmarks.cases` (PyTorch with ``torch_threads`` threads)."""
    from bptt_jax.models import PRESETS
    from bptt_jax.relax import REGISTRY  # every gradient mode of the BPTT step

    if quick:
        batch, sizes, frames, preset, repeats = 2, (8,), 5, "tiny", 1
        relax = dict(n_structures=4, atoms=8, batch=2, frames=5, presets=("tiny",), repeats=1)
        matmul = dict(size=256, repeats=3)
    else:
        # 5 repeats: PyTorch's 2 OpenMP threads lose 10-40% on some repeats when the VM deschedules them
        # (benchmarks/NOTES.md); the tables give the median and the fastest repeat.
        batch, sizes, frames, preset, repeats = 8, (64, 216), 75, "bench", 5
        relax = dict(n_structures=100, atoms=64, batch=50, frames=75, presets=("small", "bench"), repeats=3)
        matmul = dict(size=2048, repeats=10)
    cfg = PRESETS["adapt"][preset]
    common = dict(batch=batch, frames=frames, preset=preset, repeats=repeats, step_size=0.01,
                  d_model=cfg["d_model"], layers=cfg["n_layers"], heads=cfg["n_heads"], ffn=cfg["ffn_dim"])
    cases: list[dict[str, Any]] = [
        dict(name="matmul_jax", case="jax_matmul", impl="jax", mode="matmul", **matmul),
        dict(name="matmul_torch", case="torch_matmul", impl="torch", mode="matmul", threads=torch_threads, **matmul),
    ]
    for n in sizes:
        cases.append(dict(name=f"rollout_jax_n{n}", case="jax_rollout", impl="jax", mode="rollout", atoms=n,
                          **common))
        cases.append(dict(name=f"rollout_torch_n{n}", case="torch_rollout", impl="torch", mode="rollout", atoms=n,
                          threads=torch_threads, model_cfg=cfg, **common))
        for mode in REGISTRY:
            cases.append(dict(name=f"bptt_jax_{mode}_n{n}", case="jax_bptt", impl="jax", mode=mode, atoms=n,
                              relax_extra=MODE_SETTINGS.get(mode, {}), **common))
        cases.append(dict(name=f"bptt_torch_full_n{n}", case="torch_bptt", impl="torch", mode="full", atoms=n,
                          threads=torch_threads, model_cfg=cfg, **common))
        # Data parallel over 2 forced CPU devices (the batch split 4 + 4; bptt.jit_train_step on a mesh): the
        # single-threaded parts (elementwise fusions, copies) of the two halves then run side by side.
        cases.append(dict(name=f"rollout_jax_n{n}_dp2", case="jax_rollout", impl="jax", mode="rollout", atoms=n,
                          devices=2, **common))
        for mode in ("full", "remat", "first_order"):
            cases.append(dict(name=f"bptt_jax_{mode}_n{n}_dp2", case="jax_bptt", impl="jax", mode=mode, atoms=n,
                              devices=2, relax_extra=MODE_SETTINGS.get(mode, {}), **common))
    for p in relax["presets"]:
        pc = PRESETS["adapt"][p]
        rc = dict(n_structures=relax["n_structures"], atoms=relax["atoms"], frames=relax["frames"], preset=p,
                  repeats=relax["repeats"], mode="rollout", impl="jax", d_model=pc["d_model"],
                  layers=pc["n_layers"], heads=pc["n_heads"], ffn=pc["ffn_dim"], fmax=0.0)
        s = relax["n_structures"]
        cases.append(dict(name=f"relax{s}_ase_{p}", case="relax_ase", batch=1, **rc))
        cases.append(dict(name=f"relax{s}_batched_{p}", case="relax_batched", batch=relax["batch"], **rc))
        cases.append(dict(name=f"relax{s}_batched_{p}_dp2", case="relax_batched", batch=relax["batch"], devices=2,
                          **rc))
    return cases


def select(cases: list[dict], patterns: Optional[list[str]]) -> list[dict]:
    if not patterns:
        return cases

    def hit(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or name.startswith(p) for p in patterns)

    return [c for c in cases if hit(c["name"])]


def run_case(spec: dict, timeout: float, max_rss_mb: Optional[float] = None, xla_flags: str = "",
             malloc_hugepages: bool = False) -> dict:
    """Run one case in a fresh interpreter; on failure return a row with ``error``.

    With ``max_rss_mb``, the child is killed as soon as its RSS exceeds it (a machine-wide guard: a full
    BPTT tape can outgrow the RAM) and JAX cases skip themselves when XLA predicts more."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    flags = xla_flags.split()
    if (spec.get("devices") or 1) > 1:  # data-parallel case: that many CPU devices
        flags.append(f"--xla_force_host_platform_device_count={spec['devices']}")
    if flags:
        add_xla_flags(flags, env)
    if malloc_hugepages:
        # glibc backs large allocations with transparent huge pages: a full-unroll tape (GBs, allocated anew by
        # every step) then costs a few thousand page faults per step instead of ~900,000 (benchmarks/NOTES.md).
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
        env["GLIBC_TUNABLES"] = ":".join(tunables + ["glibc.malloc.hugetlb=1"])
    if max_rss_mb:
        spec = dict(spec, max_rss_mb=max_rss_mb)
    cmd = [sys.executable, "-m", "benchmarks.cases", json.dumps(spec)]
    t0 = time.perf_counter()
    err, seen = None, 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=errf, text=True)
        while proc.poll() is None:
            rss = rss_mb(proc.pid) or 0.0
            seen = max(seen, rss)
            if max_rss_mb and rss > max_rss_mb:
                proc.kill()
                proc.wait()
                err = f"killed at RSS {rss:.0f} MB: over the memory budget of {max_rss_mb:.0f} MB"
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                err = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.1)
        out.seek(0)
        errf.seek(0)
        stdout, stderr = out.read(), errf.read()
    if err is None:
        for line in stdout.splitlines():
            if line.startswith("BENCH_RESULT "):
                row = json.loads(line[len("BENCH_RESULT "):])
                row["wall_s"] = time.perf_counter() - t0
                row["env"] = {k: env.get(k) for k in ("XLA_FLAGS", "GLIBC_TUNABLES")}
                return row
        tail = (stderr or stdout).strip().splitlines()[-8:]
        err = f"exit code {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode == -9 else "") + \
            (": " + " | ".join(tail) if tail else "")
    row = {k: spec.get(k) for k in REQUIRED_KEYS}
    row.update(preset=spec.get("preset"), error=err, wall_s=time.perf_counter() - t0,
               peak_rss_mb_at_least=seen or None)
    return row


# ------------------------------------------------------------------------------------------------------
# Derived fields and tables


def _key(row: dict) -> tuple:
    kind = row["name"].split("_")[0]
    return (kind, row.get("mode"), row.get("atoms"), row.get("batch"), row.get("frames"), row.get("preset"),
            row.get("devices") or 1)


def _torch_reference(row: dict, by_key: dict) -> Optional[dict]:
    """The PyTorch row a JAX row is compared with: the rollout, or the full-unroll BPTT step (PyTorch has
    no other gradient mode), at the same sizes (PyTorch runs on one device with its threads)."""
    kind, mode, *rest, _devices = _key(row)
    return by_key.get(("torch", kind, "rollout" if kind == "rollout" else "full", *rest, 1))


def derive(rows: list[dict]) -> list[str]:
    """Add FLOP/s, fraction of the matmul peak and JAX/PyTorch ratios in place; returns problems found."""
    problems = []
    ok = [r for r in rows if not r.get("error")]
    peaks = {r["impl"]: r["peak_flops_per_s"] for r in ok if r.get("mode") == "matmul"}
    peak_any = max(peaks.values()) if peaks else None
    by_key = {(r["impl"],) + _key(r): r for r in ok if r.get("mode") != "matmul"}
    for r in ok:
        if r.get("mode") == "matmul":
            continue
        if r["impl"] == "torch" and r.get("flops") is None:
            kind, mode, *rest = _key(r)
            # The JAX twin, or for the full unroll its remat twin (same model FLOPs, recomputation not counted).
            for twin_mode in (mode, "remat") if mode == "full" else (mode,):
                twin = by_key.get(("jax", kind, twin_mode, *rest))
                if twin and twin.get("flops"):
                    r["flops"] = twin["flops"]
                    r["flops_source"] = f"XLA cost analysis of the JAX {twin_mode} twin (same model FLOPs)"
                    break
        elif r.get("flops"):
            r.setdefault("flops_source", "XLA cost analysis of one frame x frames (model FLOPs)")
        if r.get("flops") and r.get("seconds_per_step"):
            r["achieved_flops_per_s"] = r["flops"] / r["seconds_per_step"]
            peak = peaks.get(r["impl"], peak_any)
            if peak:
                r["peak_flops_per_s"] = peak
                r["fraction_of_peak"] = r["achieved_flops_per_s"] / peak
        if r["impl"] == "jax":
            ref = _torch_reference(r, by_key)
            if ref is not None:
                r["torch_reference"] = ref["name"]
                r["torch_seconds_per_step"] = ref["seconds_per_step"]
                r["torch_peak_rss_mb"] = ref["peak_rss_mb"]
                r["jax_over_torch_time"] = r["seconds_per_step"] / ref["seconds_per_step"]
                r["jax_speedup_vs_torch"] = ref["seconds_per_step"] / r["seconds_per_step"]
                r["jax_over_torch_peak_rss"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
                if r.get("seconds_min") and ref.get("seconds_min"):  # fastest repeat against fastest repeat
                    r["torch_seconds_min"] = ref["seconds_min"]
                    r["jax_speedup_vs_torch_min"] = ref["seconds_min"] / r["seconds_min"]
                if ref.get("mode") == r.get("mode") and (r.get("devices") or 1) == 1:
                    # the like-for-like pair (same mode, one device) also goes on the PyTorch row
                    for k in ("jax_over_torch_time", "jax_speedup_vs_torch", "jax_over_torch_peak_rss",
                              "jax_speedup_vs_torch_min"):
                        ref[k] = r[k]
                if r.get("n_params") != ref.get("n_params"):
                    problems.append(f"{ref['name']}: torch has {ref.get('n_params')} parameters, "
                                    f"JAX {r.get('n_params')}")
    for r in ok:
        m = r.get("metrics_first_step") or {}
        if r.get("mode") in ("implicit", "guided") and (r.get("relax_config") or {}).get("adjoint_unconverged") == "solve":
            r["note"] = (f"adjoint solved for every structure (adjoint_unconverged=solve, GMRES, at most "
                         f"{r['relax_config'].get('adjoint_iters')} one-frame VJPs); worst relative residual of the "
                         f"first step {m.get('adjoint_residual', float('nan')):.2g}")
        elif r.get("mode") in ("implicit", "guided") and m.get("converged") == 0:
            r["note"] = ("no structure converged (tol=0), so the implicit gradient is zero and the adjoint solve is "
                         "skipped: the time is the forward pass" + (" plus the truncated window" if r["mode"] ==
                                                                     "guided" else "") + ", a lower bound")
    ase = {r["preset"]: r for r in ok if r["name"].startswith("relax") and "_ase_" in r["name"]
           and r.get("structures_per_s")}
    for r in ok:  # every batched row against the ASE loop of its preset; the ASE row keeps the one-device ratio
        ref = ase.get(r.get("preset"))
        if r["name"].startswith("relax") and "_batched_" in r["name"] and ref and r.get("structures_per_s"):
            r["batched_speedup_vs_ase"] = r["structures_per_s"] / ref["structures_per_s"]
            if (r.get("devices") or 1) == 1:
                ref["batched_speedup_vs_ase"] = r["batched_speedup_vs_ase"]
    return problems


def _cell(text: str, limit: int = 160) -> str:
    """Text safe inside a markdown table cell."""
    text = " ".join(str(text).replace("|", "/").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _x(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _f(x, fmt="{:.3g}") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return fmt.format(x)
    return str(x)


def tables(rows: list[dict]) -> str:
    ok = [r for r in rows if not r.get("error")]
    by_name = {r["name"]: r for r in ok}
    out = ["## All cases", "",
           "| name | impl | mode | B | N | frames | s/step (median) | frames/s | structure-frames/s | "
           "compile s | peak RSS MB | steady peak MB | GFLOP/s | % of peak | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['name']} | {r.get('impl')} | {r.get('mode')} | {_f(r.get('batch'))} | "
                       f"{_f(r.get('atoms'))} | {_f(r.get('frames'))} | FAILED: {_cell(r['error'])} "
                       "| | | | | | | | |")
            continue
        gf = r.get("achieved_flops_per_s")
        out.append(
            f"| {r['name']} | {r['impl']} | {r['mode']} | {_f(r.get('batch'))} | {_f(r.get('atoms'))} | "
            f"{_f(r.get('frames'))} | {_f(r['seconds_per_step'])} | {_f(r.get('frames_per_s'))} | "
            f"{_f(r.get('structure_frames_per_s'))} | {_f(r.get('compile_s'))} | {_f(r['peak_rss_mb'], '{:.0f}')} | "
            f"{_f(r.get('steady_peak_rss_mb'), '{:.0f}')} | {_f(gf / 1e9 if gf else None)} | "
            f"{_f(100 * r['fraction_of_peak'] if r.get('fraction_of_peak') else None, '{:.1f}')} | "
            f"{_f(r.get('loadavg_1m'), '{:.1f}')} |")
    notes = [f"- {r['name']}: {r['note']}" for r in ok if r.get("note")]
    if notes:
        out += ["", "Notes:", ""] + notes
    pairs = [r for r in ok if r["impl"] == "jax" and r.get("torch_reference")]
    if pairs:
        threads = sorted({by_name[r["torch_reference"]].get("threads") for r in pairs}, key=str)
        out += ["", "## JAX vs PyTorch eager (same model and unroll; PyTorch has the full unroll only; "
                f"torch.set_num_threads({', '.join(map(str, threads))}))", "",
                "Medians, and the fastest repeat of each side (min), which PyTorch's descheduled repeats do not "
                "disturb.", "",
                "| JAX case | JAX mode | N | JAX s | PyTorch case | PyTorch s | time JAX/PyTorch | JAX speed-up | "
                "JAX min s | PyTorch min s | speed-up, min vs min | "
                "JAX peak RSS MB | PyTorch peak RSS MB | RSS JAX/PyTorch |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pairs:
            out.append(f"| {r['name']} | {r['mode']} | {r['atoms']} | {_f(r['seconds_per_step'])} | "
                       f"{r['torch_reference']} | {_f(r['torch_seconds_per_step'])} | {_f(r['jax_over_torch_time'])} | "
                       f"{_x(r['jax_speedup_vs_torch'])} | {_f(r.get('seconds_min'))} | "
                       f"{_f(r.get('torch_seconds_min'))} | {_x(r.get('jax_speedup_vs_torch_min'))} | "
                       f"{_f(r['peak_rss_mb'], '{:.0f}')} | "
                       f"{_f(r['torch_peak_rss_mb'], '{:.0f}')} | {_f(r['jax_over_torch_peak_rss'], '{:.2f}')} |")
    rel = [r for r in ok if r["name"].startswith("relax")]
    if rel:
        out += ["", "## ASE FIRE loop (one structure per call) vs batched FIRE rollout", "",
                "| name | preset | structures | batch | frames | total s | structures/s | batched speed-up | "
                "peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rel:
            out.append(f"| {r['name']} | {r['preset']} | {r.get('n_structures')} | {r['batch']} | {r['frames']} | "
                       f"{_f(r['seconds_per_step'])} | {_f(r.get('structures_per_s'))} | "
                       f"{_x(r.get('batched_speedup_vs_ase'))} | {_f(r['peak_rss_mb'], '{:.0f}')} |")
    fl = [r for r in ok if r.get("flops")]
    if fl:
        out += ["", "## FLOP/s against the measured matmul peak", "",
                "| name | GFLOP per step | achieved GFLOP/s | peak GFLOP/s | % of peak |", "|---|---|---|---|---|"]
        for r in fl:
            ach = r.get("achieved_flops_per_s") or r.get("peak_flops_per_s")
            peak = r.get("peak_flops_per_s")
            frac = r.get("fraction_of_peak", 1.0 if r.get("mode") == "matmul" else None)
            out.append(f"| {r['name']} | {_f(r['flops'] / 1e9)} | {_f(ach / 1e9 if ach else None)} | "
                       f"{_f(peak / 1e9 if peak else None)} | {_f(100 * frac if frac else None, '{:.1f}')} |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="case names, prefixes or glob patterns")
    ap.add_argument("--out", type=Path, help="JSON-lines output (default benchmarks/results/latest.jsonl)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    ap.add_argument("--repeats", type=int, help="timed calls per case, matmul excepted (default 5; 3 for relax100)")
    ap.add_argument("--max-rss-mb", type=float,
                    help="kill a case whose RSS exceeds this (default: MemAvailable at start - 1024 MB)")
    ap.add_argument("--torch-threads", type=int, default=2,
                    help="torch.set_num_threads for the PyTorch cases (default 2, the machine's cores)")
    ap.add_argument("--keep", type=Path, action="append", default=[], metavar="FILE",
                    help="also tabulate the rows of an earlier JSON-lines file (those not re-run now)")
    ap.add_argument("--list", action="store_true", help="list the selected cases and exit")
    ap.add_argument("--xla-flags", default=" ".join(CPU_XLA_FLAGS),
                    help="appended to XLA_FLAGS of every case (default: the training CLI's default xla_flags)")
    ap.add_argument("--malloc-hugepages", action=argparse.BooleanOptionalAction, default=True,
                    help="GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for every case (default on)")
    args = ap.parse_args(argv)

    cases = select(build_cases(args.quick, args.torch_threads), args.only)
    if args.repeats:
        for c in cases:
            if c["mode"] != "matmul":
                c["repeats"] = args.repeats
    if not importlib.util.find_spec("torch"):
        skipped = [c["name"] for c in cases if c["impl"] == "torch"]
        if skipped:
            print(f"# torch is not installed (pip install torch==2.13.0, extra 'bench'): skipping {skipped}",
                  file=sys.stderr)
        cases = [c for c in cases if c["impl"] != "torch"]
    if args.list:
        for c in cases:
            print(c["name"])
        return 0
    kept: list[dict] = []
    for path in args.keep:
        kept += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = {c["name"] for c in cases}
    kept = [r for r in kept if r.get("name") not in names]
    for r in kept:  # derived fields are recomputed from the rows of this table
        for k in ("note", "achieved_flops_per_s", "fraction_of_peak", "jax_over_torch_time", "jax_speedup_vs_torch",
                  "jax_over_torch_peak_rss", "batched_speedup_vs_ase", "torch_reference", "torch_seconds_per_step",
                  "torch_peak_rss_mb"):
            r.pop(k, None)
    if not cases and not kept:
        print("no case selected", file=sys.stderr)
        return 2
    budget = args.max_rss_mb
    if budget is None:
        avail = mem_available_mb()
        budget = max(avail - 1024.0, 512.0) if avail else None
    if budget:
        print(f"# memory budget per case: {budget:.0f} MB", file=sys.stderr)
    out = args.out or RESULTS / ("quick.jsonl" if args.quick else "latest.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    rows = list(kept)
    for i, spec in enumerate(cases, 1):
        print(f"# [{i}/{len(cases)}] {spec['name']} ...", file=sys.stderr, flush=True)
        row = run_case(spec, args.timeout, budget, args.xla_flags, args.malloc_hugepages)
        row.setdefault("max_rss_mb", budget)
        row.setdefault("quick", args.quick)
        row["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if row.get("error"):
            print(f"#   FAILED: {row['error']}", file=sys.stderr, flush=True)
        else:
            print(f"#   {row['seconds_per_step']:.4g} s/step, peak RSS {row['peak_rss_mb']:.0f} MB "
                  f"(wall {row['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    problems = derive(rows)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(json.dumps(row))
    md = tables(rows)
    params = sorted({(r["impl"], r.get("preset"), r.get("n_params")) for r in rows
                     if r.get("n_params") and not r.get("error")}, key=str)
    finished = sorted(r.get("finished_utc") or r["started_utc"] for r in rows
                     if r.get("finished_utc") or r.get("started_utc"))
    when = f"cases finished {finished[0]} to {finished[-1]}" if finished else ""
    header = [f"# Benchmarks ({'quick smoke run' if args.quick else 'full run'}; {when})", "",
              "Parameter counts: " + ", ".join(f"{impl} {preset}: {n:,}" for impl, preset, n in params), ""]
    md = "\n".join(header) + "\n" + md + "\n"
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    loads = [r.get("loadavg_1m") for r in rows if r.get("loadavg_1m") is not None]
    if loads and max(loads) > 1.5 * (os.cpu_count() or 1):
        print(f"# WARNING: load average up to {max(loads):.1f} on {os.cpu_count()} CPUs during the run: the timings "
              "are not measurements", file=sys.stderr)
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    failed = [r["name"] for r in rows if r.get("error")]
    if failed:
        print(f"# failed cases: {failed}", file=sys.stderr)
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
