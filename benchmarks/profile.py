"""Per-op profile of a benchmark program: ``python -m benchmarks.profile [--what bptt|rollout] [--mode remat] ...``.

Traces a few calls of the same jitted program the benchmark times (:mod:`benchmarks.cases`: the BPTT train
step in one gradient mode, or the inference rollout) with :func:`jax.profiler.trace`, reads the perfetto
trace, and sums the time of every XLA:CPU thunk (one fusion, dot, copy, ... of the optimised HLO) over
the traced calls. Each thunk is matched to its instruction in ``compiled.as_text()`` for its kind and the
``op_name`` of the JAX source it came from (``jvp(...)/encoder_0/attn/...``, ``transpose(...)`` for the
backward pass). Prints JSON lines (``--json``) or tables: time per category (dot products, fusions, layout
copies, ...), per model part, and the heaviest thunks.

Thunk times overlap where XLA runs independent thunks concurrently, so the sum can exceed the wall time;
the wall time per call is printed beside it. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from bptt_jax.runtime import CPU_XLA_FLAGS, add_xla_flags

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*[^=]*?\s([a-z][\w\-]*)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=(%?[\w.\-]+)")


CONTAINERS = ("while", "conditional", "call")


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name → (opcode, op_name) over every computation of an optimised HLO module; a fusion's
    op_name is that of its root, or of its first instruction carrying one."""
    out: dict[str, tuple[str, str]] = {}
    comp_ops: dict[str, list[str]] = collections.defaultdict(list)
    comp = None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and "{" in line and "(" in line:
            comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else line.split()[1].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.group(1).lstrip("%"), m.group(2)
        op = _OPNAME.search(line)
        opname = op.group(1) if op else ""
        calls = _CALLS.search(line)
        out[name] = (opcode, opname if opname else ("@" + calls.group(1).lstrip("%") if calls else ""))
        if comp and opname:
            comp_ops[comp].append(opname)
    for name, (opcode, opname) in list(out.items()):  # fusions: borrow the op_name of their body
        if opname.startswith("@"):
            body = comp_ops.get(opname[1:])
            out[name] = (opcode, body[-1] if body else "")
    return out


def category(thunk: str, opcode: str, hlo_op: str) -> str:
    if "ynn" in thunk or "ynn" in hlo_op:
        return "ynn fusion (YNNPACK)"
    if opcode in ("dot", "convolution") or thunk.startswith("dot"):
        return "dot (Eigen)"
    if opcode in ("copy", "transpose") or "copy" in thunk or "transpose" in thunk:
        return "copy / transpose"
    if opcode == "fusion":
        return "fusion (elementwise / reduction)"
    return opcode or "other"


def part(opname: str) -> str:
    """The model part of a JAX op_name (encoder sub-layer, embedding, head, ...) and the pass: forward,
    recompute (the forward inside ``jax.checkpoint``'s backward) or backward."""
    if "rematted_computation" in opname:
        phase = " (recompute)"
    elif "transpose(" in opname:
        phase = " (backward)"
    else:
        phase = ""
    for key, label in (("attn/query", "attention q/k/v"), ("attn/key", "attention q/k/v"),
                       ("attn/value", "attention q/k/v"), ("attn/out", "attention out"),
                       ("attention", "attention core"), ("attn", "attention core"), ("ffn", "ffn"),
                       ("ln_", "layer norm"), ("embed", "embedding"), ("features", "features"),
                       ("proj", "force head"), ("vector_head", "force head"), ("radial", "descriptors"),
                       ("angular", "descriptors"), ("pair_geometry", "pair geometry")):
        if key in opname:
            return label + phase
    if not opname:
        return "(no source)"
    return "other" + phase


def trace_events(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads = {(e.get("pid"), e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [dict(e, thread=threads.get((e.get("pid"), e.get("tid")), "")) for e in events if e.get("ph") == "X"]


def build(args):
    """(jitted callable of no arguments, compiled executable) for the requested program."""
    import jax

    from benchmarks.cases import _jax_setup, _relax_config
    from bptt_jax.bptt import BPTT, OptimConfig, jit_train_step

    spec = dict(batch=args.batch, atoms=args.atoms, preset=args.preset, step_size=0.01)
    jax_, model, batch, _ = _jax_setup(spec)
    key = jax.random.PRNGKey(0)
    if args.what == "rollout":
        bptt = BPTT(model, _relax_config(spec, "full", args.frames), OptimConfig())
        params = bptt.init_params(key, batch)
        compiled = jax.jit(lambda p, b: bptt.rollout(p, b, None, mode="while").positions).lower(params, batch).compile()
        return (lambda: jax.block_until_ready(compiled(params, batch))), compiled
    bptt = BPTT(model, _relax_config(spec, args.mode, args.frames), OptimConfig())
    params = bptt.init_params(key, batch)
    holder = {"state": bptt.init_state(params, key)}
    compiled = jit_train_step(bptt).lower(holder["state"], batch).compile()

    def call():  # the step donates its state: each call starts from the state the previous one returned
        out = jax.block_until_ready(compiled(holder["state"], batch))
        holder["state"] = out[0]
        return out

    return call, compiled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=("bptt", "rollout"), default="bptt")
    ap.add_argument("--mode", default="remat", help="gradient mode of the BPTT step (default remat)")
    ap.add_argument("--atoms", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=10, help="frames per call (the benchmark uses 75)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--calls", type=int, default=3, help="traced calls (after one untraced warm-up)")
    ap.add_argument("--top", type=int, default=25, help="heaviest thunks listed")
    ap.add_argument("--xla-flags", default=" ".join(CPU_XLA_FLAGS), help="appended to XLA_FLAGS")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    args = ap.parse_args(argv)
    add_xla_flags(args.xla_flags.split())

    import jax

    call, compiled = build(args)
    hlo = instructions(compiled.as_text())
    call()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    wall = (time.perf_counter() - t0) / args.calls
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.calls):
                call()
        events = trace_events(tmp)

    per_thunk: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for e in events:
        if not e["thread"].startswith("tf_XLA") or e["name"].startswith(("end:", "ThunkExecutor", "SlinkyThreadPool")):
            continue
        per_thunk[e["name"]] += e.get("dur", 0.0) / 1e3 / args.calls  # ms per call
        counts[e["name"]] += 1
    by_cat: dict[str, float] = collections.Counter()
    by_part: dict[str, float] = collections.Counter()
    rows = []
    for name, ms in per_thunk.items():
        opcode, opname = hlo.get(name, ("", ""))
        if opcode in CONTAINERS or name.split(".")[0] in CONTAINERS:  # its body's thunks are counted themselves
            continue
        cat, prt = category(name, opcode, name), part(opname)
        by_cat[cat] += ms
        by_part[prt] += ms
        rows.append(dict(thunk=name, opcode=opcode, category=cat, part=prt, ms_per_call=ms,
                         runs_per_call=counts[name] / args.calls, op_name=opname[-120:]))
    total = sum(r["ms_per_call"] for r in rows)
    head = dict(what=args.what, mode=args.mode if args.what == "bptt" else "rollout", atoms=args.atoms,
                batch=args.batch, frames=args.frames, preset=args.preset, wall_ms_per_call=1e3 * wall,
                thunk_ms_per_call=total, xla_flags=args.xla_flags, utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                loadavg_1m=os.getloadavg()[0])
    rows.sort(key=lambda r: -r["ms_per_call"])
    if args.json:
        print(json.dumps(dict(head, by_category=dict(by_cat), by_part=dict(by_part))))
        for r in rows[:args.top]:
            print(json.dumps(r))
        return 0
    print(f"# {head['what']} {head['mode']} B={args.batch} N={args.atoms} frames={args.frames} {args.preset}: "
          f"wall {head['wall_ms_per_call']:.1f} ms/call, thunks {total:.1f} ms/call (overlap counted twice), "
          f"load {head['loadavg_1m']:.1f}")
    for title, table in (("category", by_cat), ("model part", by_part)):
        print(f"\n| {title} | ms/call | % of thunk time |\n|---|---|---|")
        for k, v in sorted(table.items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v:.1f} | {100 * v / total:.1f} |")
    print("\n| thunk | kind | part | ms/call | runs/call | op_name (tail) |\n|---|---|---|---|---|---|")
    for r in rows[:args.top]:
        print(f"| {r['thunk']} | {r['category']} | {r['part']} | {r['ms_per_call']:.2f} | {r['runs_per_call']:.0f} | "
              f"{r['op_name'][-70:]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
