"""``python -m bptt_jax.train``: the staged pipeline under Hydra (configuration in ``conf/``).

    python -m bptt_jax.train                                   # embedded default: Si defects, small ADAPT
    python -m bptt_jax.train +dataset=catalysts model=resmlp
    python -m bptt_jax.train dataset.path=my_trajs/ dataset.name=mine
    python -m bptt_jax.train -m relax.step_size=0.01,0.05,0.077,0.1      # sweep; writes a summary table
    python -m bptt_jax.train hydra.run.dir=runs/X train.resume=true      # continue an interrupted run

This module only turns the config into typed arguments; the work is :func:`bptt_jax.pipeline.run_pipeline`.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bptt_jax import parallel
from bptt_jax.pipeline import RunConfig, markdown_table, run_pipeline
from bptt_jax.relax.config import require
from bptt_jax.runtime import add_xla_flags, enable_compile_cache

log = logging.getLogger("bptt_jax")


def config_from_hydra(cfg: DictConfig, run_dir: str) -> RunConfig:
    """Typed pipeline configuration from the composed Hydra config: each node is one config of the tree
    (``dataset`` → ``data``, ``train.resume`` → ``resume``), key for key. ``dataset.max_frames`` is no setting of
    its own: it reaches the relaxation as ``relax.max_frames: ${dataset.max_frames}``."""
    c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    data = {k: v for k, v in c["dataset"].items() if k != "max_frames"}
    try:
        run = RunConfig.from_dict({
            "data": data, "model": c["model"], "relax": c["relax"], "pretrain": c["pretrain"],
            "finetune": c["finetune"], "eval": c["eval"], "seed": int(c["seed"]), "run_dir": run_dir,
            "resume": bool(c["train"]["resume"]), "progress": bool(c["progress"]), "plots": bool(c["plots"]),
            "distributed": c.get("distributed") or {},
            "logging": c["logging"]})
    except TypeError as err:  # a key the typed config has no field for, e.g. +dataset.typo=1
        raise ValueError(f"config: {err}") from None
    # The library keeps negative fine-tuning rates (gradient ascent) as a control; from the command line they are
    # a typo.
    for key in ("learning_rate", "step_learning_rate"):
        value = getattr(run.finetune, key)
        require(value is None or value >= 0, f"finetune.{key}", value, "at least 0")
    return run


def runtime_settings(cfg: DictConfig) -> tuple[list[str], Optional[str]]:
    """What the process sets up before JAX starts: the XLA flags to add (``xla_flags``, and ``cpu_devices`` as
    ``--xla_force_host_platform_device_count``) and the persistent compilation cache (``compile_cache_dir``)."""
    flags = list(cfg.get("xla_flags") or [])
    n_cpu = int(cfg.get("cpu_devices") or 1)
    if n_cpu > 1 and not (cfg.get("distributed") or {}).get("enabled"):
        # The host CPU as n_cpu XLA devices: BPTT then runs data parallel over them (GPU/TPU runs ignore it).
        flags.append(f"--xla_force_host_platform_device_count={n_cpu}")
    return flags, cfg.get("compile_cache_dir") or None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    OmegaConf.save(cfg, Path(run_dir) / "config_resolved.yaml", resolve=True)
    flags, cache_dir = runtime_settings(cfg)
    added = add_xla_flags(flags)  # before the first JAX computation
    if added:
        log.info("XLA_FLAGS += %s", " ".join(added))
    if cache_dir:
        log.info("persistent compilation cache: %s", enable_compile_cache(cache_dir))
    several = False
    try:
        # A multi-process run is joined before the rest of the config is read: a process whose settings are wrong
        # fails inside the run, and the others hear of it (parallel.fail_together) instead of waiting for it.
        dist = cfg.get("distributed")
        dist = OmegaConf.to_container(dist, resolve=True) if dist is not None else {}
        several = parallel.initialize(parallel.DistributedConfig(**dist)) and jax.process_count() > 1
        with parallel.fail_together():
            results = run_pipeline(config_from_hydra(cfg, run_dir))  # config errors first, before any compute
    except (ValueError, OSError, RuntimeError) as err:
        # One line, no traceback; checkpoints already written stay in the run directory.
        log.error("%s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        if several:  # not through jax.distributed's shutdown, which waits for the processes that just stopped
            parallel.exit_now(2)
        sys.exit(2)
    except BaseException:
        if not several:
            raise
        log.exception("process %d failed", jax.process_index())
        parallel.exit_now(1)
    print()
    print(markdown_table(results))
    print(f"\nrun directory: {run_dir}")


def summarize_sweep(sweep_dir: Path) -> str:
    """Markdown table over the runs of a multirun sweep (one row per run directory with results.json)."""
    import yaml

    rows, overrides = [], []
    for res_file in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name)
                           if p.parent.name.isdigit() else p.parent.name):
        rows.append((res_file.parent.name, json.loads(res_file.read_text())))
        ov_file = res_file.parent / ".hydra" / "overrides.yaml"
        overrides.append(dict(o.split("=", 1) for o in yaml.safe_load(ov_file.read_text()) if "=" in o)
                         if ov_file.exists() else {})
    # Name each run by the overrides that differ across the sweep.
    swept = sorted({k for o in overrides for k in o if len({x.get(k) for x in overrides}) > 1})
    rows = [(" ".join(f"{k}={o.get(k)}" for k in swept) or name, r) for (name, r), o in zip(rows, overrides)]
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    cols = [("η initial", lambda r: r["step_size_initial"]), ("η final", lambda r: r["step_size_final"]),
            ("kept epoch", lambda r: (r.get("bptt_selection") or {}).get("kept_epoch")),
            ("unrelaxed", lambda r: r["avg_dq"]["initial"]), ("constant step", lambda r: r["avg_dq"]["constant_step"]),
            ("FIRE", lambda r: r["avg_dq"]["fire"]), ("oracle", lambda r: r["avg_dq"].get("oracle")),
            ("force control", lambda r: r["avg_dq"].get("force_control")), ("BPTT", lambda r: r["avg_dq"]["bptt"]),
            ("reduction %", lambda r: r["reduction_pct"]),
            ("basins const/BPTT", None)]
    lines = ["| run | " + " | ".join(c for c, _ in cols) + " |", "|" + " --- |" * (len(cols) + 1)]

    def basins(r):
        b = r.get("basins") or {}
        return f"{b.get('constant_step', '-')}/{b.get('bptt', '-')}"

    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(f(r)) if f else basins(r) for _, f in cols) + " |")
    if swept == ["seed"] and len(rows) > 1:  # a seed study: mean ± sample std of every figure
        def stat(f):
            vals = [f(r) for _, r in rows]
            if any(v is None for v in vals):
                return "-"
            return f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}"

        lines.append(f"| mean ± std ({len(rows)} seeds) | " + " | ".join(stat(f) if f else "" for _, f in cols) + " |")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write ``summary.md`` in the sweep directory and print it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = summarize_sweep(sweep_dir)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}")


if __name__ == "__main__":
    main()
