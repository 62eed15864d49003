"""Data parallelism with ``jax.sharding``: one mesh axis ``"data"`` over every device, batch split along it.

Single host, several devices (GPUs, TPU cores, or ``--xla_force_host_platform_device_count`` CPU devices)::

    mesh = data_mesh()                                  # all devices, axis "data"
    step = jit_train_step(bptt, mesh)                   # bptt_jax.bptt: state replicated, batch split
    state = replicate(state, mesh)
    state, metrics = step(state, shard_batch(batch, mesh), None)

:meth:`BPTT.loss <bptt_jax.bptt.BPTT.loss>` is a masked mean over the *global* batch, so jitting the
unchanged train step with these shardings (:func:`~bptt_jax.bptt.jit_train_step`, the one place it is jitted,
with :func:`replicated` and :func:`batch_sharding`) makes XLA insert the all-reduces: the gradients, the update
and the metrics are exactly those of one device on the same batch (up to floating-point summation order).

Several hosts (processes): every process calls :func:`initialize` first (``jax.distributed.initialize``;
on CPU the cross-process collectives are gloo's, selected with ``jax_cpu_collectives_implementation``),
then builds the same mesh over the *global* devices. A process either holds only its own part of the
global batch (``shard_batch(local_part, mesh)``) or the same whole batch as every other process
(``shard_batch(batch, mesh, process_local=False)``, what the pipeline does). When one process fails (an
exception, a kill), the others stop within seconds and name it (:func:`fail_together`, ``heartbeat_timeout``).

Batches are padded to a multiple of the device count with empty structures (no real atom; see
:func:`pad_batch`), which every loss and metric already masks out.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bptt_jax.structures import Batch

log = logging.getLogger("bptt_jax")

DATA_AXIS = "data"


# ---------------------------------------------------------------------------------------------------
# Multi-host initialisation


@dataclasses.dataclass
class DistributedConfig:
    """``jax.distributed`` settings (config node ``distributed``).

    Attributes:
      enabled: call ``jax.distributed.initialize`` at the start of a run.
      coordinator_address: ``host:port`` of process 0 (None: auto-detected on TPU pods, Slurm, Open MPI).
      num_processes: number of processes (None: auto-detected).
      process_id: this process's index in ``0..num_processes-1`` (None: auto-detected).
      local_device_ids: restrict this process to these local devices (GPUs); None = all.
      cpu_collectives: cross-process collectives of the CPU backend, ``"gloo"`` (TCP, no extra
        dependency) or ``"mpi"``; None leaves JAX's default. Ignored by GPU/TPU backends.
      initialization_timeout: seconds to wait for every process to connect.
      barrier_timeout: seconds a process waits at a host-side barrier (:func:`sync`) for the others, e.g.
        while process 0 alone generates a missing data set.
      heartbeat_timeout: seconds without a heartbeat after which JAX's coordination service counts a process as
        dead (killed, or its machine lost) and stops all the others (``jax.distributed``'s own default: 100 s).
        A process that fails with an exception tells the others at once (:func:`fail_together`).
    """

    enabled: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[Sequence[int]] = None
    cpu_collectives: Optional[str] = "gloo"
    initialization_timeout: int = 300
    barrier_timeout: int = 3600
    heartbeat_timeout: int = 10

    def __post_init__(self):
        if self.cpu_collectives not in (None, "gloo", "mpi"):
            raise ValueError(f"distributed.cpu_collectives must be gloo, mpi or null, not {self.cpu_collectives!r}")
        if self.local_device_ids is not None:
            self.local_device_ids = [int(i) for i in self.local_device_ids]


def initialize(cfg: DistributedConfig) -> bool:
    """Join the multi-process JAX cluster described by ``cfg`` (a no-op unless ``cfg.enabled``).

    Must run before any JAX computation in the process. Idempotent: a second call (or a cluster
    initialised elsewhere) is left alone. Returns whether the distributed system is initialised.
    """
    if not cfg.enabled:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    if cfg.cpu_collectives is not None:
        # Read when the CPU backend is created, i.e. after initialize(); without it a multi-process CPU
        # computation has no cross-process collectives.
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    global _barrier_timeout_s
    _barrier_timeout_s = int(cfg.barrier_timeout)
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id, local_device_ids=cfg.local_device_ids,
                               initialization_timeout=cfg.initialization_timeout,
                               heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.process_count() > 1:
        _start_watch()
    return True


# ---------------------------------------------------------------------------------------------------
# One process fails: the others stop
#
# A killed process stops sending heartbeats; after ``heartbeat_timeout`` JAX's coordination service stops every
# other process itself (its message names the dead task: "The following tasks are unhealthy (stopped sending
# heartbeats): 1", or, when process 0 died, "the leader task was preempted/died"). A process that fails with an
# exception still heartbeats, and would leave the others waiting at their next collective or barrier
# (``barrier_timeout``) while it waits for them in jax.distributed's shutdown: so it writes its error into the
# coordination service's key-value store (:func:`announce_failure`), where a thread of every other process looks
# twice a second (:func:`_watch`), and those stop with one line naming it.

_FAILED = "bptt_jax/failed/"  # + process index: its error
_STOPPED = "bptt_jax/stopped/"  # + process index: it read a failure and stops
_EXITING = "bptt_jax/exiting/"  # + process index: it is leaving (exit_now)
_POLL_S = 0.5
_EXIT_WAIT_S = 10.0
_watch_done = threading.Event()


def _client():
    from jax._src.distributed import global_state

    return global_state.client


def _start_watch() -> None:
    _watch_done.clear()
    threading.Thread(target=_watch, name="bptt_jax peer watch", daemon=True).start()
    # Before jax.distributed's own shutdown at exit (atexit runs the handlers registered last first): a finished
    # run must not read the coordination service going away as a failure.
    atexit.register(_watch_done.set)


def _watch() -> None:
    """Stop this process (``os._exit(3)``) when another one announces a failure, or when the coordination service
    (on process 0) stays unreachable for three polls in a row."""
    me, client, unreachable = jax.process_index(), _client(), 0
    while not _watch_done.wait(_POLL_S):
        try:
            failed = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in client.key_value_dir_get(_FAILED))
            unreachable = 0
        except Exception as err:  # the service's RPC errors are plain JaxRuntimeErrors
            unreachable += 1
            if unreachable < 3:
                continue
            failed = [(0, f"the coordination service on process 0 is unreachable ({str(err).splitlines()[0]})")]
        failed = [(pid, why) for pid, why in failed if pid != me]
        if failed and not _watch_done.is_set():
            causes = "; ".join(f"process {pid} failed: {why}" for pid, why in failed)
            log.error("process %d stops: %s", me, causes)
            try:
                client.key_value_set(f"{_STOPPED}{me}", "stopped")
                if me == 0:
                    # The coordination service lives in process 0: leaving first would make JAX abort the failing
                    # processes before they have reported their own error.
                    _wait_for(client, _EXITING, {pid for pid, _ in failed}, _EXIT_WAIT_S)
                    time.sleep(0.5)
            except Exception:
                pass
            exit_now(3)


def announce_failure(message: str, wait_s: float = 5.0) -> None:
    """Tell the other processes of a multi-process run that this one failed with ``message`` (one line): each
    stops within a second or so, naming this process. Waits up to ``wait_s`` for them to stop, so that they
    read the message before process 0, should it be the one failing, takes the coordination service down.
    A no-op with one process."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    _watch_done.set()  # this process is failing on its own account: its watch must not stop it first
    me = jax.process_index()
    try:
        client.key_value_set(f"{_FAILED}{me}", message, allow_overwrite=True)
        _wait_for(client, _STOPPED, set(range(jax.process_count())) - {me}, wait_s)
    except Exception as err:  # the service is gone already: nobody left to tell
        log.debug("announcing the failure: %s", err)


def _wait_for(client, prefix: str, processes: set[int], timeout_s: float) -> None:
    """Until the coordination service has the key ``prefix + i`` of every process ``i`` in ``processes``, or
    ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if processes <= {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(prefix)}:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def fail_together():
    """Around the work of a multi-process run: an exception inside it is announced to the other processes
    (:func:`announce_failure`), which stop, before it propagates. Nothing changes with one process.

    The failing process should then exit with :func:`exit_now`: jax.distributed's shutdown at a normal exit
    waits at a barrier for the processes that have just stopped."""
    try:
        yield
    except BaseException as err:
        if jax.process_count() > 1:
            first = str(err).splitlines()[0] if str(err) else ""
            announce_failure(f"{type(err).__name__}: {first}" if first else type(err).__name__)
        raise


def exit_now(code: int) -> None:
    """End the process with ``code`` at once (``os._exit``), after flushing the logs and standard streams: no
    atexit handlers, so no jax.distributed shutdown barrier. In a multi-process run it says so first in the
    coordination service (process 0, stopping for another's failure, waits for that)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    client = _client()
    if client is not None and jax.process_count() > 1:
        try:
            client.key_value_set(f"{_EXITING}{jax.process_index()}", str(code), allow_overwrite=True)
        except Exception:
            pass
    os._exit(code)


# ---------------------------------------------------------------------------------------------------
# Mesh and shardings


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices for the data mesh")
    auto = (jax.sharding.AxisType.Auto,)
    try:
        # Topology-aware device order (TPU rings); the plain order on CPU and GPU.
        return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=auto, devices=devices)
    except ValueError:  # e.g. multi-slice TPU topologies, which make_mesh does not take
        return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,), axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``"data"`` axis, everything else whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def local_mesh_size(mesh: Mesh) -> int:
    """How many of ``mesh``'s devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


# ---------------------------------------------------------------------------------------------------
# Batches


def pad_batch(batch: Batch, multiple: int) -> Batch:
    """``batch`` with empty structures appended until its size is a multiple of ``multiple``.

    Padding structures look like :meth:`Batch.from_structures`'s: every array zero (no real atom, so
    ``structure_mask`` is False), except an identity cell (invertible). The batch is returned unchanged
    when no padding is needed.
    """
    if multiple < 1:
        raise ValueError(f"pad multiple must be positive, got {multiple}")
    b = batch.positions.shape[0]
    extra = -b % multiple
    if extra == 0:
        return batch

    def pad(name: str, x):
        if x is None:
            return None
        if name == "cell":
            fill = jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), (extra,) + x.shape[1:])
        else:
            fill = jnp.zeros((extra,) + x.shape[1:], x.dtype)
        return jnp.concatenate([jnp.asarray(x), fill], axis=0)

    return batch.replace(**{f.name: pad(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def shard_batch(batch: Batch, mesh: Mesh, *, process_local: bool = True) -> Batch:
    """Put a host batch onto ``mesh``, split along the batch axis (padded with empty structures first).

    Args:
      batch: with one process, the whole batch. With several, ``process_local=True``: this process's part
        of the global batch (every process passes the same size; the global batch is the processes'
        parts in process order); ``process_local=False``: the whole global batch, the same on every
        process (each process transfers only the slices of its own devices).
      mesh: from :func:`data_mesh`.

    Returns:
      A :class:`Batch` of global ``jax.Array`` s sharded with :func:`batch_sharding`.
    """
    sharding = batch_sharding(mesh)
    if sharding.is_fully_addressable:  # one process, or a mesh of this process's devices
        return jax.device_put(pad_batch(batch, mesh.size), sharding)
    if process_local:
        batch = pad_batch(batch, local_mesh_size(mesh))
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
    batch = pad_batch(batch, mesh.size)
    return jax.tree_util.tree_map(lambda x: _from_global_host_value(np.asarray(x), sharding), batch)


def _from_global_host_value(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def local_mesh() -> Optional[Mesh]:
    """A data mesh over this process's own devices when it has several (None with one): for work each process
    does alone, such as evaluating a replicated model, split over its local devices without collectives
    across processes."""
    return data_mesh(jax.local_devices()) if jax.local_device_count() > 1 else None


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy a pytree of arrays (the same on every process) to every device of ``mesh``."""
    sharding = replicated(mesh)
    if sharding.is_fully_addressable:  # one process, or a mesh of this process's devices
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(lambda x: _from_global_host_value(np.asarray(x), sharding), tree)


def is_primary() -> bool:
    """Whether this is process 0, the one that writes files in a multi-host run (true with one process)."""
    return jax.process_index() == 0


_barrier_timeout_s = DistributedConfig.barrier_timeout


def sync(name: str) -> None:
    """Barrier across all processes of a multi-host run (a no-op with one process); ``name`` is used once.

    A host-side barrier of the coordination service with a timeout of ``distributed.barrier_timeout``, not a
    device collective: a CPU (gloo) collective gives up after its connect timeout (tens of seconds), far too
    soon for a process that waits while process 0 alone generates the data set.
    """
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=f"bptt_jax:{name}", timeout_ms=1000 * _barrier_timeout_s)


def unreplicate(tree: Any) -> Any:
    """One local copy of replicated arrays (on this process's first device of each), for host-side work
    such as single-device evaluation; other leaves pass through."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


__all__ = ["DATA_AXIS", "DistributedConfig", "announce_failure", "batch_sharding", "data_mesh", "exit_now",
           "fail_together", "initialize", "is_primary", "local_mesh", "local_mesh_size", "pad_batch", "replicate",
           "replicated", "shard_batch", "sync", "unreplicate"]
