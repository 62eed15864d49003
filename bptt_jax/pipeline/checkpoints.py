"""Orbax checkpoints of a run: ``checkpoints/pretrained`` (the pretrained model's parameters, step 0, with the
pretraining history) and ``checkpoints/bptt`` (BPTT's whole train state, one step per epoch, with the metrics so
far). A run resumes from them (``resume=True``) and a later run starts from another's pretrained model
(``model.init_from``, :func:`init_from_dir`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import jax

from bptt_jax import parallel

log = logging.getLogger("bptt_jax")


def pretrained_dir(run_dir: Path) -> Path:
    """Where a run keeps its pretrained model."""
    return Path(run_dir) / "checkpoints" / "pretrained"


def bptt_dir(run_dir: Path) -> Path:
    """Where a run keeps BPTT's train state, one step per epoch."""
    return Path(run_dir) / "checkpoints" / "bptt"


def init_from_dir(path: str) -> Path:
    """The checkpoint directory ``model.init_from`` names: a run directory's pretrained model, or the
    checkpoint directory itself."""
    src = Path(path)
    return pretrained_dir(src) if (src / "checkpoints").exists() else src


def _ckpt_manager(path: Path, max_to_keep: Optional[int] = None):
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames at INFO
    extra = {}
    if jax.process_count() > 1:
        # Multi-host: each manager acts for its own process alone (no cross-process barriers). Only process 0
        # saves (host-local copies of the replicated state, see save_checkpoint); every process may restore.
        me = jax.process_index()
        extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        extra["create"] = False  # orbax refuses create=True with active_processes; save_checkpoint makes the folder
    return ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, **extra))


def save_checkpoint(path: Path, step: int, tree: Any, meta: dict) -> None:
    """Save ``tree`` (and JSON ``meta``) as step ``step``. In a multi-process run only process 0 writes, a
    host-local copy of replicated arrays (the other processes return at once)."""
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:
        if not parallel.is_primary():
            return
        tree = jax.device_get(parallel.unreplicate(tree))
        path.mkdir(parents=True, exist_ok=True)
    with _ckpt_manager(path) as mngr:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                  force=True)


def restore_checkpoint(path: Path, like: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """Restore the pytree shaped like ``like`` (and its JSON metadata) from the latest (or ``step``)."""
    import orbax.checkpoint as ocp

    with _ckpt_manager(path) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {path}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), jax.tree_util.tree_leaves(out.state))
    return tree, out.meta, step


def latest_step(path: Path) -> Optional[int]:
    if not path.exists():
        return None
    with _ckpt_manager(path) as mngr:
        return mngr.latest_step()


def resume_bptt(path: Path, like: Any) -> tuple[Any, list[dict], int]:
    """BPTT's train state at the last finished epoch (shaped like the fresh state ``like``), the metrics rows
    up to it and its number."""
    restored, meta, epoch = restore_checkpoint(path, {"state": like})
    log.info("resumed BPTT from epoch %d", epoch)
    return restored["state"], meta.get("metrics", []), epoch


def bptt_params(path: Path, like: Any, epoch: int) -> Any:
    """The parameters BPTT had after ``epoch`` (``like``: a train state of the same shapes)."""
    return restore_checkpoint(path, {"state": like}, step=epoch)[0]["state"].params
