"""Gradient-mode study on Si defects: cost, agreement with full BPTT, and fine-tuned quality.

Three parts, each appending JSON lines under ``results/grad_modes/`` and a report ``results/grad_modes.md``:

``cost``     peak RSS and seconds per BPTT step for every gradient mode at 25/75/200 frames and 64/216 atoms
             (rattled diamond-Si cells, the default ``small_geo`` ADAPT, ``tol=0`` so that every mode runs
             exactly the stated number of frames; each measurement in its own process).
``cosine``   cosine similarity of each mode's gradient to ``full`` on test structures that converge within the
             frame budget under the pretrained model (per batch, then averaged).
``quality``  fine-tunes the same pretrained model in each mode (and through FIRE) with the training CLI and
             reads the test Avg Dq and the number of test structures ending in the right basin (final
             Dq < ``--basin`` √amu·Å, default 3: about 0.57 Å of total displacement in Si) from each run's
             ``results.json``.

    python -m experiments.grad_modes cost
    python -m experiments.grad_modes cosine --pretrained runs/large
    python -m experiments.grad_modes quality --pretrained runs/large
    python -m experiments.grad_modes seeds --pretrained runs/base --windows 10 25 40 --seeds 0 1 2
    python -m experiments.grad_modes report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from benchmarks.memory import maxrss_mb, mem_available_mb
from bptt_jax.relax import REGISTRY, method_fields
from bptt_jax.runtime import CPU_XLA_FLAGS, add_xla_flags

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "grad_modes"
MODES = tuple(REGISTRY)  # every gradient method, in registry order
WINDOW = 10
SAMPLES = 32  # first_order: frames per structure whose parameter derivative is evaluated (RelaxConfig default)
WINDOWED = tuple(m for m in MODES if "window" in method_fields(m))


def method_options(mode: str, window: Optional[int], samples: int) -> dict:
    """The RelaxConfig fields of the study's variant of ``mode``: its window, its sampled frames and, for remat,
    √n checkpointing (``remat_segment=0``); only the options the method takes (RelaxConfig rejects others)."""
    wanted = {"window": window, "sample_frames": samples, "remat_segment": 0}
    return {k: v for k, v in wanted.items() if k in method_fields(mode)}


def parse_variant(name: str) -> tuple[str, Optional[int], int]:
    """``"mode[-wW][-kK]"`` → (mode, window, samples): e.g. ``first_order-w10-k8``, ``truncated-w25``, ``full``.
    Without ``-wW`` the window is None: the mode's default (``RelaxConfig.window_frames``)."""
    window, samples = None, SAMPLES
    mode, *parts = name.split("-")
    for p in parts:
        if p[:1] == "w" and p[1:].isdigit():
            window = int(p[1:])
        elif p[:1] == "k" and p[1:].isdigit():
            samples = int(p[1:])
        else:
            raise ValueError(f"bad variant {name!r}: expected mode[-wW][-kK]")
    if mode not in MODES:
        raise ValueError(f"bad variant {name!r}: unknown mode {mode!r}")
    return mode, window, samples


def variant_name(mode: str, window: int, samples: int) -> str:
    if mode == "first_order":
        return f"{mode}-w{window}-k{samples}"
    return f"{mode}-w{window}" if mode in WINDOWED else mode


# ----------------------------------------------------------------------------------------------------
# cost


def cost_child(mode: str, frames: int, atoms: int, batch: int, repeats: int) -> dict:
    """One measurement (runs in a fresh process so that ru_maxrss is this configuration's peak)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ase.build import bulk

    from bptt_jax.bptt import BPTT, jit_train_step
    from bptt_jax.models import build_model
    from bptt_jax.relax import RelaxConfig
    from bptt_jax.structures import Batch, Structure

    reps = {64: 2, 216: 3}[atoms]
    rng = np.random.default_rng(0)
    structs, targets = [], []
    for _ in range(batch):
        a = bulk("Si", "diamond", a=5.431, cubic=True).repeat(reps)
        targets.append(a.positions.copy())
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        structs.append(Structure.from_atoms(a))
    b = Batch.from_structures(structs, targets, batch_size=batch)
    model = build_model("adapt", "small_geo")
    # tol=0: every mode runs all frames; implicit/guided then solve the adjoint for every structure anyway
    # (adjoint_unconverged="solve"), so their rows are the cost of a real solve.
    relax = RelaxConfig(step_size=0.005, step_mode="learned", max_frames=frames, tol=0.0, skip_converged=False,
                        grad_mode=mode, **method_options(mode, None, SAMPLES),
                        **({"adjoint_unconverged": "solve"} if REGISTRY[mode].uses_adjoint else {}),
                        # a fresh model's forces drift the cell without end; with the default 5 Å bound the
                        # 216-atom cells were all frozen as diverged by frame ~38 of 200 and the step ran short
                        diverge_distance=float("inf"))
    bptt = BPTT(model, relax)
    state = bptt.init_state(bptt.init_params(jax.random.PRNGKey(0), b), jax.random.PRNGKey(1))
    base_rss = maxrss_mb()
    t0 = time.perf_counter()
    step = jit_train_step(bptt).lower(state, b).compile()
    mem = step.memory_analysis()
    temp_mb = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2 ** 20 if mem is not None else 0.0
    avail_mb = (mem_available_mb() or float("inf")) - 1024.0
    if temp_mb > avail_mb:  # a full-unroll tape that does not fit in RAM: report instead of swapping or dying
        return {"part": "cost", "mode": mode, "frames": frames, "atoms": atoms, "batch": batch,
                "xla_temp_mb": temp_mb, "loadavg_1m": os.getloadavg()[0], "error": f"not run: XLA needs {temp_mb:.0f} MB of buffers, "
                                                 f"{avail_mb:.0f} MB available"}
    def fresh():  # the step donates the state it is given: a copy of `state`, made before the clock starts
        return jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, state))

    _, m = step(fresh(), b)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    # Every timed step starts from the same state: advancing it, a fresh model's first Adam steps at 200
    # frames blew the relaxation up to NaN at frame 1, and the early-exit modes then timed a 1-frame step.
    for _ in range(repeats):
        start = fresh()
        t0 = time.perf_counter()
        _, m = step(start, b)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"part": "cost", "mode": mode, "frames": frames, "atoms": atoms, "batch": batch,
            "seconds_per_step": sec, "frames_per_s": frames * batch / sec, "first_step_s": compile_s,
            "xla_temp_mb": temp_mb, "loadavg_1m": os.getloadavg()[0],
            "peak_rss_mb": maxrss_mb(), "base_rss_mb": base_rss, "repeats": repeats,
            "window": relax.window_frames if mode in WINDOWED else None,
            "adjoint_residual": float(m["adjoint_residual"]) if "adjoint_residual" in m else None,
            # what the step really ran: a structure that diverges is frozen, and a batch whose structures have
            # all diverged stops early, so frames/s is only comparable where mean_frames == frames
            "mean_frames": float(m["frames"]), "diverged": int(m["diverged"]),
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "GLIBC_TUNABLES")}}


def run_cost(args) -> None:
    out = OUT / "cost.jsonl"
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)  # the training CLI's default XLA flags, and huge pages for the big tapes (NOTES.md)
    add_xla_flags(CPU_XLA_FLAGS, env)
    env["GLIBC_TUNABLES"] = env.get("GLIBC_TUNABLES") or "glibc.malloc.hugetlb=1"
    for atoms in args.atoms:
        for frames in args.frames:
            for mode in args.modes:
                repeats = 3 if frames * atoms <= 75 * 64 else 2
                cmd = [sys.executable, "-m", "experiments.grad_modes", "_cost_child", mode, str(frames), str(atoms),
                       str(args.batch), str(repeats)]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    row = {"part": "cost", "mode": mode, "frames": frames, "atoms": atoms, "batch": args.batch,
                           "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------
# cosine


def run_cosine(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bptt_jax.bptt import BPTT
    from bptt_jax.data.trajectory import SkipLog
    from bptt_jax.models import build_model
    from bptt_jax.pipeline import (DataConfig, load_split, pretrained_dir, relax_batches, relaxation_items,
                                   restore_checkpoint)
    from bptt_jax.relax import RelaxConfig

    run = Path(args.pretrained)
    meta = json.loads((run / "results.json").read_text())
    data = DataConfig(name="si_defects", n=240, cache_dir=str(ROOT / "data"), n_test=100)
    items = relaxation_items(load_split(data, SkipLog(), progress=False).test)
    model = build_model("adapt", "small_geo")
    batches = relax_batches(items, 8, data.buckets)
    sample = batches[0][1]
    params, _, _ = restore_checkpoint(pretrained_dir(run), model.init(jax.random.PRNGKey(0), sample))
    eta = float(meta["constant_step_best"])
    base = RelaxConfig(step_size=eta, step_mode="learned", max_frames=75, tol=1e-3)
    p = {"model": params, "log_step_size": jnp.log(jnp.asarray(eta, jnp.float32))}

    # Keep the structures that converge under the pretrained model, re-batched by size.
    probe = BPTT(model, base)
    keep = []
    for idx, b in batches:
        res = probe.relax_batch(p, b)
        keep += [i for k, i in enumerate(idx) if bool(res.converged[k])]
    conv_items = [items[i] for i in keep]
    conv_batches = relax_batches(conv_items, 8, data.buckets)
    print(f"{len(keep)} of {len(items)} test structures converge within 75 frames", flush=True)

    def flat(tree):
        return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])

    grads: dict[str, list] = {}
    rows = []
    for name in ["full"] + [v for v in (args.variants or MODES) if v != "full"]:  # full first: the reference
        mode, window, samples = parse_variant(name)
        bp = BPTT(model, RelaxConfig(step_size=eta, step_mode="learned", max_frames=75, tol=1e-3, grad_mode=mode,
                                     **method_options(mode, window, samples)))
        fn = jax.jit(jax.grad(lambda q, b, k: bp.loss(q, b, k)[0]))
        # A fixed key per batch: sampled modes (first_order with samples > 0) draw their frames from it.
        grads[name] = [flat(fn(p, b, jax.random.PRNGKey(i))) for i, (_, b) in enumerate(conv_batches)]
        cos = [float(g @ f / (jnp.linalg.norm(g) * jnp.linalg.norm(f))) for g, f in zip(grads[name], grads["full"])]
        rel = [float(jnp.linalg.norm(g - f) / jnp.linalg.norm(f)) for g, f in zip(grads[name], grads["full"])]
        row = {"part": "cosine", "mode": name if args.variants else mode, "cosine_mean": float(np.mean(cos)),
               "cosine_min": float(np.min(cos)), "rel_error_mean": float(np.mean(rel)), "batches": len(cos),
               "structures": len(keep), "pretrained": str(args.pretrained),
               "window": bp.relax.window_frames if mode in WINDOWED else None,
               "samples": samples if mode == "first_order" else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "cosine.jsonl").open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------------------------------
# quality


def _pretrained_eta(args) -> float:
    if args.eta is not None:
        return args.eta
    return float(json.loads((Path(args.pretrained) / "results.json").read_text())["constant_step_best"])


def _finetune(name: str, mode: str, extra: list[str], args, eta: float, window: int, run_dir: Path,
              samples: int = SAMPLES) -> dict:
    """Fine-tune the pretrained model with the training CLI (one variant: gradient method ``mode`` with its
    window and samples where it takes them) and read its test results."""
    options = [f"relax.{k}={v}" for k, v in method_options(mode, window, samples).items()]
    cmd = [sys.executable, "-m", "bptt_jax.train", f"model.init_from={Path(args.pretrained).resolve()}",
           f"eval.step_grid=[{eta}]", "eval.fire=false", "progress=false", "plots=false",
           f"finetune.epochs={args.epochs}", f"relax.grad_mode={mode}", *options,
           f"hydra.run.dir={run_dir}", *extra]
    t0 = time.time()
    if args.reuse and (run_dir / "results.json").exists():  # a finished run of this variant: read it
        proc = subprocess.CompletedProcess(cmd, 0)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"mode": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.loads((run_dir / "results.json").read_text())
    per = res["per_structure"]
    return {"mode": name, "avg_dq": res["avg_dq"]["bptt"],
            "constant_step": res["avg_dq"]["constant_step"], "initial": res["avg_dq"]["initial"],
            "reduction_pct": res["reduction_pct"], "basin_threshold": args.basin,
            "in_basin": int(sum(v < args.basin for v in per["bptt"])),
            "in_basin_constant_step": int(sum(v < args.basin for v in per["constant_step"])),
            "n_test": res["n_test"], "bptt_s": res["wall_s"]["bptt"],
            "seconds_per_bptt_step": res.get("seconds_per_bptt_step"), "epochs": args.epochs,
            "diverged": res["diverged"]["bptt"], "step_size_final": res["step_size_final"],
            "window": window if mode in WINDOWED else None,
            "samples": samples if mode == "first_order" else None,
            "per_structure": per["bptt"], "pretrained": str(args.pretrained), "wall_s": round(time.time() - t0, 1)}


def _append(path: Path, row: dict) -> None:
    print(json.dumps({k: v for k, v in row.items() if k != "per_structure"}), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_quality(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    eta = _pretrained_eta(args)
    variants = [(m, m, []) for m in args.modes]
    if args.fire:
        variants.append(("full+fire", "full", ["relax.rule=fire"]))
    for name, mode, extra in variants:
        name = name + args.tag
        row = _finetune(name, mode, [*extra, *args.set], args, eta, args.window, ROOT / "runs" / "grad_modes" / name)
        _append(OUT / "quality.jsonl", {"part": "quality", **row})


def run_seeds(args) -> None:
    """Seed spread of fine-tuned quality: every (mode, window) variant at a fixed step size, once per seed
    (the seed sets the order of the training batches and any initialisation not taken from the pretrained
    model), so that a mode's difference from ``full`` can be compared with full's own seed-to-seed spread."""
    OUT.mkdir(parents=True, exist_ok=True)
    eta = _pretrained_eta(args)
    label = args.label or Path(args.pretrained).name
    variants = []
    for mode in args.modes:
        for w in (args.windows if mode in WINDOWED else [WINDOW]):
            for k in (args.samples if mode == "first_order" else [SAMPLES]):
                variants.append((variant_name(mode, w, k), mode, w, k))
    for seed in args.seeds:  # seed-major: an interrupted study still holds complete pairs
        for name, mode, w, k in variants:
            run_dir = ROOT / "runs" / "grad_modes" / "seeds" / label / f"{name}-s{seed}"
            row = _finetune(name, mode, ["relax.step_mode=fixed", f"seed={seed}", *args.set], args, eta, w,
                            run_dir, k)
            _append(OUT / "seeds.jsonl", {"part": "seeds", "study": label, "variant": name, "seed": seed,
                                          "eta": eta, **row})


# ----------------------------------------------------------------------------------------------------
# report


def _latest(path: Path, key) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[key(r)] = r
    return rows


def seeds_section(path: Path) -> list[str]:
    """Markdown of the seed-spread study: per variant the test Avg Dq over seeds and, seed by seed, its
    difference from ``full`` with the same seed (the latest row of each study/variant/seed counts)."""
    rows = _latest(path, lambda r: (r["study"], r["variant"], r["seed"]))
    # A study without its own `full` runs is compared with those of a study from the same pretrained model,
    # step size and epochs.
    full_runs = {(r["pretrained"], r["eta"], r["epochs"], r["seed"]): r for (_, v, _), r in rows.items()
                 if v == "full" and "avg_dq" in r}
    out: list[str] = []
    for study in sorted({k[0] for k in rows}):
        mine = {k[1:]: r for k, r in rows.items() if k[0] == study and "avg_dq" in r}
        if not mine:
            continue
        r0 = next(iter(mine.values()))
        borrowed = not any(v == "full" for v, _ in mine)
        if borrowed:
            mine.update({("full", k[3]): r for k, r in full_runs.items() if k[:3] == (r0["pretrained"], r0["eta"],
                                                                                       r0["epochs"])})
        variants = sorted({v for v, _ in mine}, key=lambda v: (v != "full", v))
        out += [f"## Seed spread of fine-tuned quality (study `{study}`: pretrained `{r0['pretrained']}`, fixed step "
                f"{r0['eta']:g}, {r0['epochs']} epochs, test set of {r0['n_test']}; best constant step "
                f"{r0['constant_step']:.3f})", "",
                "Each seed fixes the order of the training batches. Δ vs full: the variant's Avg Dq over full's with "
                "the same seed, minus 1 (negative: better)."
                + (" The `full` rows are those of another study of the same pretrained model, step and epochs."
                   if borrowed and any(v == "full" for v, _ in mine) else ""), "",
                "| variant | seeds | test Avg Dq per seed | mean ± sd | Δ vs full per seed | mean Δ | diverged test "
                "relaxations per seed | s / BPTT step |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v in variants:
            seeds = sorted(s for vv, s in mine if vv == v)
            dq = [mine[(v, s)]["avg_dq"] for s in seeds]
            sd = statistics.stdev(dq) if len(dq) > 1 else 0.0
            deltas = [mine[(v, s)]["avg_dq"] / mine[("full", s)]["avg_dq"] - 1 for s in seeds if ("full", s) in mine]
            sps = [mine[(v, s)].get("seconds_per_bptt_step") for s in seeds]
            sps = [x for x in sps if x]
            out.append(f"| {v} | {', '.join(map(str, seeds))} | {' / '.join(f'{x:.3f}' for x in dq)} | "
                       f"{statistics.mean(dq):.3f} ± {sd:.3f} | "
                       f"{' / '.join(f'{100 * d:+.1f}%' for d in deltas) if v != 'full' else '–'} | "
                       f"{f'{100 * statistics.mean(deltas):+.1f}%' if deltas and v != 'full' else '–'} | "
                       f"{' / '.join(str(mine[(v, s)].get('diverged', '?')) for s in seeds)} | "
                       f"{f'{statistics.median(sps):.2f}' if sps else ''} |")
        out.append("")
    return out


def run_report(args) -> None:
    cost = _latest(OUT / "cost.jsonl", lambda r: (r["atoms"], r["frames"], r["mode"]))
    # Rows from before the "pretrained" field were measured on runs/large (2026-11-30).
    cosine = _latest(OUT / "cosine.jsonl", lambda r: (r.get("pretrained", "runs/large"), r["mode"]))
    quality = _latest(OUT / "quality.jsonl", lambda r: r["mode"])
    lines = ["# Gradient modes on Si defects", "",
             "Produced by `python -m experiments.grad_modes {cost,cosine,quality,report}` "
             "(see the module docstring). 2 CPU cores; ADAPT `small_geo`; window = "
             f"{WINDOW} frames for truncated/guided; remat = √n checkpointing; implicit/guided: GMRES adjoint "
             "(restart 20, at most 200 products, tol 1e-4) on converged structures only (in training). The cost "
             "rows carry the 1-minute load average at their start; the quality runs shared the machine with other "
             "jobs, so their seconds per step are indicative only.", ""]
    if not cost:
        lines += ["## Cost per BPTT step", "",
                  "Not measured here yet (`python -m experiments.grad_modes cost` needs a quiet machine). Per-mode "
                  "time and peak RSS at B = 8, 75 frames, N = 64 / 216 (bench-size ADAPT) are in "
                  "`benchmarks/NOTES.md` (`make bench`).", ""]
    if cost:
        lines += ["## Cost per BPTT step (batch of 4 rattled Si cells, tol = 0 so that every mode runs all frames)", "",
                  "implicit / guided solve the adjoint for every structure (`relax.adjoint_unconverged=solve`), so "
                  "their rows include a real solve (worst relative residual in the last column). XLA buffers = "
                  "XLA's compile-time temporaries + outputs of the step. Peak RSS includes ~0.6 GB of runtime (imports, "
                  "XLA). Frames run: the mean number of frames the timed step relaxed (every timed step starts from "
                  "the same state; nothing diverges). The grid was measured on 2026-12-01 on a 2-core AMD EPYC, "
                  "before attention was computed heads-major (benchmarks/NOTES.md): since then every mode's "
                  "forward passes are faster, most at 216 atoms.", "",
                  "| atoms | frames | mode | s / step | frames/s | peak RSS (MB) | XLA buffers (MB) | first step (s) "
                  "| load | adjoint residual | frames run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (atoms, frames, mode), r in sorted(cost.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                               MODES.index(kv[0][2]))):
            if "error" in r:
                lines.append(f"| {atoms} | {frames} | {mode} | {r['error'][:70]} | | | "
                             f"{r.get('xla_temp_mb') or 0:.0f} | | | | |")
            else:
                res = r.get("adjoint_residual") if mode in REGISTRY and REGISTRY[mode].uses_adjoint else None
                ran = r.get("mean_frames")  # mean frames the last timed step ran (rows from before: not recorded)
                lines.append(f"| {atoms} | {frames} | {mode} | {r['seconds_per_step']:.2f} | {r['frames_per_s']:.0f} "
                             f"| {r['peak_rss_mb']:.0f} | {r.get('xla_temp_mb') or 0:.0f} | {r['first_step_s']:.1f} "
                             f"| {r.get('loadavg_1m') or 0:.1f} | {'' if res is None else f'{res:.2g}'} "
                             f"| {'' if ran is None else f'{ran:.0f}'} |")
        lines += ["", "Against `full` at the same size and length (time ratio < 1: faster; RSS ratio: peak RSS over "
                  "full's):", "", "| atoms | frames | " + " | ".join(f"{m} time / RSS" for m in MODES[1:]) + " |",
                  "| --- | --- |" + " --- |" * (len(MODES) - 1)]
        for atoms, frames in sorted({(a, f) for a, f, _ in cost}):
            ref = cost.get((atoms, frames, "full"), {})
            if "seconds_per_step" not in ref:
                continue
            cells = []
            for mode in MODES[1:]:
                r = cost.get((atoms, frames, mode), {})
                cells.append(f"{r['seconds_per_step'] / ref['seconds_per_step']:.2f} / "
                             f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if "seconds_per_step" in r else "–")
            lines.append(f"| {atoms} | {frames} | " + " | ".join(cells) + " |")
        lines.append("")
    for pre in sorted({k[0] for k in cosine}):
        mine = {k[1]: r for k, r in cosine.items() if k[0] == pre}
        r0 = next(iter(mine.values()))
        lines += [f"## Agreement with full BPTT ({r0['structures']} converged test structures, "
                  f"{r0['batches']} batches, pretrained model `{pre}`)", "",
                  "Variants: mode-wW-kK = window W frames unrolled exactly, K frames sampled per structure "
                  "(first_order; K = 0: every frame); a plain mode name: the mode's default window (truncated and "
                  f"guided {WINDOW}, first_order 0), {SAMPLES} samples.", "",
                  "| mode | mean cosine | min cosine | mean relative error |",
                  "| --- | --- | --- | --- |"]
        def order(v):
            mode, window, samples = parse_variant(v)
            return MODES.index(mode), -1 if window is None else window, samples

        for name in sorted(mine, key=order):
            r = mine[name]
            lines.append(f"| {name} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['rel_error_mean']:.3f} |")
        lines.append("")
    if quality:
        r0 = next((r for r in quality.values() if "avg_dq" in r), None)
        if r0:
            lines += [f"## Fine-tuned quality ({r0['epochs']} epochs from the same pretrained model; test set of "
                      f"{r0['n_test']}; unrelaxed Avg Dq {r0['initial']:.2f}; best constant step "
                      f"{r0['constant_step']:.2f}, {r0['in_basin_constant_step']} in basin)", "",
                      f"| mode | test Avg Dq | reduction vs constant step | in basin (Dq < {r0['basin_threshold']}) "
                      "| s / BPTT step | BPTT stage (s) |", "| --- | --- | --- | --- | --- | --- |"]
            for mode, r in quality.items():
                if "error" in r:
                    lines.append(f"| {mode} | failed: {r['error'][:60]} | | | | |")
                else:
                    sps = r.get("seconds_per_bptt_step")
                    lines.append(f"| {mode} | {r['avg_dq']:.3f} | {r['reduction_pct']:.1f}% | {r['in_basin']} "
                                 f"| {sps:.2f} | {r['bptt_s']:.0f} |" if sps is not None else
                                 f"| {mode} | {r['avg_dq']:.3f} | {r['reduction_pct']:.1f}% | {r['in_basin']} | | "
                                 f"{r['bptt_s']:.0f} |")
            lines.append("")
    lines += seeds_section(OUT / "seeds.jsonl")
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "grad_modes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_cost_child":
        mode, frames, atoms, batch, repeats = argv[1], *map(int, argv[2:6])
        print(json.dumps(cost_child(mode, frames, atoms, batch, repeats)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--modes", nargs="+", default=list(MODES))
    c.add_argument("--frames", nargs="+", type=int, default=[25, 75, 200])
    c.add_argument("--atoms", nargs="+", type=int, default=[64, 216], choices=[64, 216])
    c.add_argument("--batch", type=int, default=4)
    s = sub.add_parser("cosine")
    s.add_argument("--pretrained", required=True, help="a run directory with checkpoints/pretrained")
    s.add_argument("--variants", nargs="*", default=None,
                   help="mode[-wW][-kK] (window W, K sampled frames), e.g. truncated-w25 first_order-w0-k0; "
                        f"default: every mode with its default window and {SAMPLES} samples")
    q = sub.add_parser("quality")
    q.add_argument("--pretrained", required=True)
    q.add_argument("--modes", nargs="+", default=list(MODES))
    q.add_argument("--epochs", type=int, default=5)
    q.add_argument("--basin", type=float, default=3.0)
    q.add_argument("--window", type=int, default=WINDOW, help="frames differentiated by truncated / guided")
    q.add_argument("--fire", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--set", nargs="*", default=[], help="extra CLI overrides for every variant")
    q.add_argument("--tag", default="", help="suffix of the variant names (run directories and rows)")
    q.add_argument("--reuse", action="store_true", help="read variants whose run directory has results.json")
    q.add_argument("--eta", type=float, default=None,
                   help="initial step size (default: the pretrained run's best constant step)")
    d = sub.add_parser("seeds")
    d.add_argument("--pretrained", required=True)
    d.add_argument("--modes", nargs="+", default=["full", "truncated"])
    d.add_argument("--windows", nargs="+", type=int, default=[10, 25, 40],
                   help="truncated / guided / first_order windows")
    d.add_argument("--samples", nargs="+", type=int, default=[SAMPLES],
                   help="first_order: frames sampled per structure (0 = all)")
    d.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--basin", type=float, default=3.0)
    d.add_argument("--set", nargs="*", default=[], help="extra CLI overrides for every variant")
    d.add_argument("--label", default="", help="name of the study (default: the pretrained run's directory name)")
    d.add_argument("--reuse", action="store_true", help="read variants whose run directory has results.json")
    d.add_argument("--eta", type=float, default=None,
                   help="fixed step size (default: the pretrained run's best constant step)")
    sub.add_parser("report")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    {"cost": run_cost, "cosine": run_cosine, "quality": run_quality, "seeds": run_seeds,
     "report": run_report}[args.cmd](args)


if __name__ == "__main__":
    main()
