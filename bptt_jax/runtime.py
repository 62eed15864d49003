"""XLA flags for this process, set before JAX starts its backends.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, so flags only take effect if they are in the
environment before the first JAX computation. :func:`add_xla_flags` appends flags there, keeping any flag of
the same name the user already set. The training CLI applies the config's ``xla_flags`` list (default
:data:`CPU_XLA_FLAGS`) this way; library users who want the same call it before their first JAX operation,
or export ``XLA_FLAGS`` themselves.

The default is one XLA:CPU option, measured in ``benchmarks/NOTES.md``: plain dot products go to XLA's own
(Eigen) matrix kernels rather than YNNPACK, which on the Transformer shapes of a BPTT step
((B·N) × d_model × ffn, e.g. 512 × 128 × 512) made the bench-size step 15% faster and left the small default
model unchanged. GPU and TPU backends ignore ``xla_cpu_*`` options.

:func:`enable_compile_cache` turns on JAX's persistent compilation cache (the CLI's ``compile_cache_dir``):
a later process that compiles the same program with the same flags and devices loads it from disk instead.
Runs that repeat a configuration (resume, Hydra sweeps over step sizes, re-runs) then skip most of their
compile time; a tiny CPU run went from 52 s to 15 s on its second start.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, MutableMapping, Optional

log = logging.getLogger("bptt_jax")

CPU_XLA_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot",)


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0]


def backends_started() -> bool:
    """True once JAX has created a backend (XLA_FLAGS can no longer change anything in this process)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover (a JAX without the module: assume not started)
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if callable(started) else False


def add_xla_flags(flags: Iterable[str], environ: Optional[MutableMapping[str, str]] = None) -> list[str]:
    """Append ``flags`` (``"--name=value"``) to ``XLA_FLAGS`` in ``environ`` (default ``os.environ``), except
    those whose name is already there (the user's setting wins). Returns the flags added. Warns, and adds
    nothing, when JAX's backends have already started in this process (the flags would be ignored)."""
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    present = {_flag_name(f) for f in current.split()}
    added = [f for f in flags if f and _flag_name(f) not in present]
    if not added:
        return []
    if environ is None and backends_started():
        log.warning("JAX backends already started; XLA flags not applied: %s", " ".join(added))
        return []
    env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def enable_compile_cache(path: str | os.PathLike, min_compile_s: float = 0.0) -> str:
    """Use ``path`` (created if missing) as JAX's persistent compilation cache for this process, caching every
    program that took at least ``min_compile_s`` seconds to compile. Call it before the programs to cache are
    compiled; programs compiled earlier stay uncached. Returns the absolute path."""
    import jax

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    return path


__all__ = ["CPU_XLA_FLAGS", "add_xla_flags", "backends_started", "enable_compile_cache"]
