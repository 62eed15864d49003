"""Orbax checkpoints of a run: ``checkpoints/pretrained`` (the pretrained model's parameters, step 0, with the
pretraining history), ``checkpoints/pretraining`` (pretraining in progress: parameters, optimiser state, best
parameters and where the loop stands, the last two of them) and ``checkpoints/bptt`` (BPTT's whole train state, one
step per epoch, with the metrics so far). A run resumes from them (``resume=True``) and a later run starts from
another's pretrained model (``model.init_from``, :func:`init_from_dir`).

Every step written here carries a list of its files' SHA-256 sums (``bptt_jax_checksums.json``, written after orbax
has finalised the step). A step whose files no longer match is damaged: :func:`restore_checkpoint` refuses it,
and a resume (:func:`restore_latest`) sets it aside into ``checkpoints/damaged/`` with a warning naming it and uses
the step before. A save that was interrupted leaves an orbax ``*.orbax-checkpoint-tmp-*`` folder, which no step
listing counts and the next save removes. Steps written before the checksums (or killed between orbax's finalising
and the checksums) are restored unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import parallel

log = logging.getLogger("bptt_jax")

CHECKSUMS = "bptt_jax_checksums.json"


class DamagedCheckpointError(ValueError):
    """A checkpoint step whose files do not match the checksums written with it."""


def pretrained_dir(run_dir: Path) -> Path:
    """Where a run keeps its pretrained model."""
    return Path(run_dir) / "checkpoints" / "pretrained"


def pretraining_dir(run_dir: Path) -> Path:
    """Where a run keeps pretraining's state while it trains (and its final state after)."""
    return Path(run_dir) / "checkpoints" / "pretraining"


def bptt_dir(run_dir: Path) -> Path:
    """Where a run keeps BPTT's train state, one step per epoch."""
    return Path(run_dir) / "checkpoints" / "bptt"


def init_from_dir(path: str) -> Path:
    """The checkpoint directory ``model.init_from`` names: a run directory's pretrained model, or the
    checkpoint directory itself."""
    src = Path(path)
    return pretrained_dir(src) if (src / "checkpoints").exists() else src


def _ckpt_manager(path: Path, max_to_keep: Optional[int] = None, writer: bool = False):
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames at INFO
    extra = {}
    if jax.process_count() > 1:
        # Multi-host: each manager acts for its own process alone (no cross-process barriers). Only process 0
        # saves (host-local copies of the replicated state, see save_checkpoint); every process may restore.
        me = jax.process_index()
        extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        extra["create"] = False  # orbax refuses create=True with active_processes; save_checkpoint makes the folder
    # The writer removes the tmp folders of saves that were interrupted; a reader must not: it could remove the one
    # a run still training (or another process of this one) is writing.
    return ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, cleanup_tmp_directories=writer, **extra))


def save_checkpoint(path: Path, step: int, tree: Any, meta: dict, max_to_keep: Optional[int] = None) -> None:
    """Save ``tree`` (and JSON ``meta``) as step ``step``, then its checksums (keeping the newest ``max_to_keep``
    steps; None: all). In a multi-process run only process 0 writes, a host-local copy of replicated arrays (the
    other processes return at once)."""
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:
        if not parallel.is_primary():
            return
        tree = jax.device_get(parallel.unreplicate(tree))
        path.mkdir(parents=True, exist_ok=True)
    with _ckpt_manager(path, max_to_keep, writer=True) as mngr:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                  force=True)
    _write_checksums(path / str(step))


def _file_sums(step_dir: Path) -> dict[str, str]:
    sums = {}
    for f in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        sums[f.relative_to(step_dir).as_posix()] = h.hexdigest()
    return sums


def _write_checksums(step_dir: Path) -> None:
    tmp = step_dir / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps(_file_sums(step_dir), indent=0))
    os.replace(tmp, step_dir / CHECKSUMS)  # atomic: a checksum file that exists is whole


def damage(step_dir: Path) -> Optional[str]:
    """What is wrong with the checkpoint step ``step_dir`` by its checksums (None: nothing, or no checksums)."""
    listed = step_dir / CHECKSUMS
    if not listed.exists():
        return None
    try:
        expected = json.loads(listed.read_text())
    except ValueError:
        return f"{CHECKSUMS} is unreadable"
    found = _file_sums(step_dir)
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
    changed = sorted(k for k in expected if found[k] != expected[k])
    if changed:
        return f"{changed[0]} does not match its checksum" + (f" (and {len(changed) - 1} more files)"
                                                              if len(changed) > 1 else "")
    return None


def _restore(path: Path, like: Any, step: int) -> tuple[Any, dict]:
    import orbax.checkpoint as ocp

    with _ckpt_manager(path) as mngr:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    # As the fresh arrays were: orbax's are committed to a device, and a jitted function would compile anew for them
    # (pretraining resumed with a cold start of its step).
    leaves = [jnp.asarray(np.asarray(x)) if isinstance(ref, jax.Array) else np.asarray(x)
              for x, ref in zip(jax.tree_util.tree_leaves(out.state), jax.tree_util.tree_leaves(like))]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves), out.meta


def restore_checkpoint(path: Path, like: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """Restore the pytree shaped like ``like`` (and its JSON metadata) from the latest (or ``step``).

    Raises:
      FileNotFoundError: no checkpoint (of that step).
      DamagedCheckpointError: its files do not match their checksums (one line naming the step's folder).
    """
    step = latest_step(path) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {path}")
    problem = damage(Path(path) / str(step))
    if problem:
        raise DamagedCheckpointError(f"damaged checkpoint {Path(path) / str(step)}: {problem}")
    tree, meta = _restore(path, like, step)
    return tree, meta, step


def all_steps(path: Path) -> list[int]:
    """The finished steps in ``path``, oldest first (an interrupted save's tmp folder is none)."""
    if not Path(path).exists():
        return []
    with _ckpt_manager(path) as mngr:
        return sorted(mngr.all_steps())


def latest_step(path: Path) -> Optional[int]:
    steps = all_steps(path)
    return steps[-1] if steps else None


def restore_latest(path: Path, like: Any) -> Optional[tuple[Any, dict, int]]:
    """What a resume continues from: the newest step of ``path`` that restores, as (tree, meta, step); None when
    there is none to restore.

    The steps after it that could not be restored are damaged: each is set aside into ``checkpoints/damaged/``
    with a warning naming it (so that training writes it again). Steps that fail to restore without a step before
    them that does, and without a checksum to prove them damaged, are no proof of damage (a run resumed with
    another model fails on every step): then the newest one's error is raised and nothing is moved. Steps proved
    damaged by their checksums, with none good before them, are set aside and None is returned.
    """
    failed: list[tuple[int, str]] = []  # (step, what went wrong)
    first_error: Optional[Exception] = None  # of a step the checksums do not prove damaged
    for step in reversed(all_steps(path)):
        step_dir = Path(path) / str(step)
        try:
            problem = damage(step_dir)
        except OSError as err:  # a file vanished while it was read
            problem = f"unreadable ({err})"
        if problem:
            failed.append((step, problem))
            continue
        try:
            tree, meta = _restore(path, like, step)
        except Exception as err:  # orbax and tensorstore raise bare Exceptions for unreadable files
            failed.append((step, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            first_error = first_error or err
            continue
        _set_aside(path, failed, f"using step {step}")
        return tree, meta, step
    if first_error is not None:
        raise first_error
    _set_aside(path, failed, "no step before it")
    return None


def _set_aside(path: Path, failed: list[tuple[int, str]], instead: str) -> None:
    for step, problem in failed:
        step_dir = Path(path) / str(step)
        log.warning("damaged checkpoint %s (%s); %s", step_dir, problem, instead)
        if parallel.is_primary() and step_dir.exists():
            dest = Path(path).parent / "damaged" / f"{Path(path).name}-{step}"
            n = 1
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{Path(path).name}-{step}.{n}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(step_dir), str(dest))


def clear(path: Path) -> None:
    """Remove the checkpoints in ``path`` (process 0; a fresh start over an earlier run's transient state)."""
    if parallel.is_primary() and Path(path).exists():
        shutil.rmtree(path)


def resume_bptt(path: Path, like: Any) -> Optional[tuple[Any, list[dict], int]]:
    """BPTT's train state at the last finished epoch that restores (shaped like the fresh state ``like``), the
    metrics rows up to it and its number; None when no epoch restores."""
    restored = restore_latest(path, {"state": like})
    if restored is None:
        return None
    tree, meta, epoch = restored
    log.info("resumed BPTT from epoch %d", epoch)
    return tree["state"], meta.get("metrics", []), epoch


def bptt_params(path: Path, like: Any, epoch: int) -> Any:
    """The parameters BPTT had after ``epoch`` (``like``: a train state of the same shapes)."""
    return restore_checkpoint(path, {"state": like}, step=epoch)[0]["state"].params
