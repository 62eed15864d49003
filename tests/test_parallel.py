"""Data parallelism (jax.sharding over a "data" mesh axis), multi-process runs and the bfloat16 matmul option.

The multi-device checks run in subprocesses: the CPU device count (``XLA_FLAGS``) and ``jax.distributed`` are
fixed when JAX starts, so they cannot be changed inside the pytest process.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax import parallel
from bptt_jax.bptt import BPTT, jit_train_step
from bptt_jax.models import build_model
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import Batch
from conftest import TEST_XLA_FLAGS, rattled_si

KEY = jax.random.PRNGKey(0)
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _env(**extra):
    """The environment of a subprocess: CPU only, this checkout importable, and XLA_FLAGS the suite's compile
    settings (:data:`conftest.TEST_XLA_FLAGS`) plus ``extra``'s, not what the calling shell had."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    env["XLA_FLAGS"] = " ".join([*TEST_XLA_FLAGS, extra.pop("XLA_FLAGS", "")]).strip()
    env.update(extra)
    return env


def _batch(seeds):
    pairs = [rattled_si(seed=s) for s in seeds]
    return Batch.from_structures([s for s, _ in pairs], [t for _, t in pairs])


# Shared by the subprocesses: a tiny ADAPT, 4 two-atom Si cells, 3 relaxation frames.
SETUP = """
import jax, jax.numpy as jnp, numpy as np
from bptt_jax import parallel
from bptt_jax.bptt import BPTT, jit_fit_step, jit_train_step
from bptt_jax.models import build_model
from bptt_jax.relax import RelaxConfig
from bptt_jax.structures import Batch
from conftest import rattled_si

def make_batch(seeds):
    pairs = [rattled_si(seed=s) for s in seeds]
    return Batch.from_structures([s for s, _ in pairs], [t for _, t in pairs])

bptt = BPTT(build_model("adapt", "tiny"), RelaxConfig(step_size=0.05, step_mode="learned", max_frames=3))
key = jax.random.PRNGKey(0)
full = make_batch(range(4))
params = bptt.init_params(key, full)
state = bptt.init_state(params, key)
"""

TWO_DEVICES = SETUP + """
import time
assert jax.device_count() == 2, jax.devices()
mesh = parallel.data_mesh()
rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)

# The batch really is split: two shards of two structures, one per device.
sharded = parallel.shard_batch(full, mesh)
shards = sharded.positions.addressable_shards
assert len(shards) == 2 and {s.device for s in shards} == set(jax.devices()), shards
assert all(s.data.shape == (2, 8, 3) for s in shards), [s.data.shape for s in shards]
assert sharded.atom_mask.sharding.spec == jax.sharding.PartitionSpec("data")

# A batch that does not divide by the device count is padded with an empty structure.
odd = parallel.shard_batch(make_batch(range(3)), mesh)
assert odd.positions.shape[0] == 4 and np.asarray(odd.structure_mask).tolist() == [True, True, True, False]
assert np.allclose(np.asarray(odd.cell[3]), np.eye(3))

# Gradients of the loss: one device vs the 2-device mesh.
grad_fn = jax.value_and_grad(lambda p, b: bptt.loss(p, b, None)[0])
grad_one = jax.jit(grad_fn)
grad_two = jax.jit(grad_fn, in_shardings=(rep, data), out_shardings=rep)
loss1, g1 = grad_one(params, full)
loss2, g2 = grad_two(params, sharded)
np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-6)
assert g1["log_step_size"].sharding.device_set == {jax.devices()[0]} and g2["log_step_size"].sharding.is_fully_replicated
for path, a in jax.tree_util.tree_leaves_with_path(g1):
    b = g2
    for k in path:
        b = b[k.key]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
assert float(jnp.abs(g1["model"]["params"]["proj"]["kernel"]).sum()) > 0

# One sharded train step = the optimiser applied to the one-device gradients.
import optax
from bptt_jax.bptt import make_optimizer
updates, _ = make_optimizer(bptt.optim).update(g1, state.opt_state, params)
p1 = optax.apply_updates(params, updates)
step = jit_train_step(bptt, mesh)
# The step donates its state, and a replicated copy shares device 0's buffers with its source: fresh states
# (init_state copies params and key) keep `state` alive for what follows.
s_rep = parallel.replicate(bptt.init_state(params, key), mesh)
s2, m2 = step(s_rep, sharded, None)
assert s_rep.params["log_step_size"].is_deleted()
assert s2.params["log_step_size"].sharding.is_fully_replicated and int(s2.step) == 1
np.testing.assert_allclose(float(m2["loss"]), float(loss1), rtol=1e-5)
np.testing.assert_allclose(float(m2["grad_norm"]), float(optax.tree.norm(g1)), rtol=1e-5)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7),
                       p1, s2.params)
s3, _ = step(s2, sharded, None)  # a second step of the same shapes compiles nothing
assert step._cache_size() == 1 and int(s3.step) == 2
# The sharded fit step (what the pipeline runs): with length_quantum, the early-exit probe on the sharded batch
# picks a shorter scan, and the step equals the one-device fit step.
import dataclasses
bq = BPTT(bptt.model, dataclasses.replace(bptt.relax, max_frames=24, tol=0.1, length_quantum=4), bptt.optim)
fit_one, fit_two = jit_fit_step(bq), jit_fit_step(bq, mesh)
length = fit_two.length(state, sharded)
assert length == fit_one.length(state, full) == 4, length  # every structure stops after its first frame
s_one, m_one = fit_one(bq.init_state(params, key), full)
s_two, m_two = fit_two(parallel.replicate(bq.init_state(params, key), mesh), sharded, None)
np.testing.assert_allclose(float(m_two["loss"]), float(m_one["loss"]), rtol=1e-5)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7),
                       s_one.params, s_two.params)
print("FIT LENGTH", length, flush=True)
# first_order gathers each structure's recorded states and samples frames per structure: also split correctly.
bf = BPTT(bptt.model, dataclasses.replace(bptt.relax, grad_mode="first_order", window=1, sample_frames=2), bptt.optim)
fo = jax.value_and_grad(lambda p, b: bf.loss(p, b, key)[0])
(lf1, gf1), (lf2, gf2) = jax.jit(fo)(params, full), jax.jit(fo, in_shardings=(rep, data), out_shardings=rep)(
    params, sharded)
np.testing.assert_allclose(float(lf2), float(lf1), rtol=1e-6)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7),
                       gf1, gf2)
# Test-set relaxations split over the local devices (the pipeline's baselines and evaluations) and in-flight
# relaxation with its slots split over them give the one-device results.
from bptt_jax import pipeline
from bptt_jax.inference import relax_many
lm = parallel.local_mesh()
assert lm is not None and lm.size == 2
plan = [([0, 1, 2], make_batch(range(3))), ([3, 4], make_batch(range(3, 5)))]  # odd sizes: padded for the mesh
e1 = pipeline.evaluate_relaxation(bptt, params, plan, 5)
e2 = pipeline.evaluate_relaxation(bptt, parallel.replicate(params, mesh), plan, 5, lm)
np.testing.assert_allclose(e2.per_structure, e1.per_structure, rtol=1e-5, atol=1e-7)
assert e2.frames.tolist() == e1.frames.tolist() and e2.adwt == e1.adwt
structs = [rattled_si(seed=s, sigma=0.05 * (1 + s))[0] for s in range(5)]
# A tolerance between the structures' first-frame movements: some stop at once, the others run on, so slots
# are refilled at different times.
probe = BPTT(bptt.model, dataclasses.replace(bptt.relax, max_frames=1, tol=0.0), bptt.optim)
b5 = Batch.from_structures(structs)
moved = np.asarray(probe.relax_batch(params, b5, mode="while").positions - b5.positions)
tol = float(np.median(np.sqrt((moved ** 2).sum((1, 2)) / np.asarray(b5.free_mask).sum(1))))
bi = BPTT(bptt.model, dataclasses.replace(bptt.relax, max_frames=12, tol=tol), bptt.optim)
o1, st1 = relax_many(bi, params, structs, batch_size=2, chunk_frames=2)
o2, st2 = relax_many(bi, params, structs, batch_size=2, chunk_frames=2, mesh=lm)
assert [o.frames for o in o2] == [o.frames for o in o1] and st2.chunks == st1.chunks > 1
assert len({o.frames for o in o1}) > 1, [o.frames for o in o1]
for a, b in zip(o1, o2):
    np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
try:
    relax_many(bi, params, structs, batch_size=3, mesh=lm)
    raise AssertionError("a batch size the mesh does not divide must be refused")
except ValueError as err:
    assert "multiple" in str(err)
print("FRAMES IN FLIGHT", [o.frames for o in o1], flush=True)
# Compiled gradient time: one device vs two (a tiny problem: the collectives cost more than they save).
for name, fn, b in (("one", grad_one, full), ("two", grad_two, sharded)):
    jax.block_until_ready(fn(params, b))
    t = time.time()
    for _ in range(5):
        jax.block_until_ready(fn(params, b))
    print(f"TIME {name} device(s): {(time.time() - t) / 5 * 1e3:.2f} ms per gradient", flush=True)
print("OK", flush=True)
"""


@pytest.mark.slow
def test_sharded_train_step_matches_one_device():
    r = subprocess.run([sys.executable, "-c", TWO_DEVICES], capture_output=True, text=True, cwd=TESTS,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "OK" in r.stdout, r.stdout[-2000:]
    print(r.stdout)


WORKER = SETUP.replace("import jax, jax.numpy", """import sys
from bptt_jax import parallel
pid, port = int(sys.argv[1]), int(sys.argv[2])
parallel.initialize(parallel.DistributedConfig(enabled=True, coordinator_address=f"localhost:{port}",
                                               num_processes=2, process_id=pid, cpu_collectives="gloo",
                                               initialization_timeout=120))
assert parallel.initialize(parallel.DistributedConfig(enabled=True))  # idempotent
import jax, jax.numpy""", 1) + """
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 2, 1)
mesh = parallel.data_mesh()
local = jax.tree_util.tree_map(lambda x: x[2 * pid:2 * pid + 2], full)  # this process's half of the batch
new, m = jit_train_step(bptt, mesh)(parallel.replicate(state, mesh), parallel.shard_batch(local, mesh), None)
# The whole batch on one device (no collectives) as the reference.
ref = float(jax.jit(lambda p, b: bptt.loss(p, b, None)[0])(params, full))
step_size = float(np.exp(parallel.unreplicate(new.params)["log_step_size"]))
print(f"RESULT {pid} {float(m['loss'])!r} {ref!r} {step_size!r}", flush=True)
"""


def _cpu_collectives_available() -> bool:
    try:
        from jax._src.lib import xla_client
    except ImportError:
        return False
    return hasattr(xla_client._xla, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(cmds, tmp_path, timeout=300, **popen):
    """Start one process per command, wait for all; returns their outputs (each asserted to exit 0)."""
    logs = [(tmp_path / f"p{i}.out").open("w+") for i in range(len(cmds))]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
             for cmd, log in zip(cmds, logs)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    failed = [f"process {i} exited {p.returncode}:\n{out[-3000:]}" for i, (p, out) in enumerate(zip(procs, outs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    return outs


BARRIER = """import sys, time
from bptt_jax import parallel
pid, port = int(sys.argv[1]), int(sys.argv[2])
parallel.initialize(parallel.DistributedConfig(enabled=True, coordinator_address=f"localhost:{port}",
                                               num_processes=2, process_id=pid, barrier_timeout=300))
if pid == 0:
    time.sleep(40)  # e.g. process 0 alone generating the data set
parallel.sync("data generated")
print("PASSED", pid, flush=True)
"""


@pytest.mark.slow
def test_barrier_waits_longer_than_a_cpu_collective_would(tmp_path):
    """parallel.sync is a coordination-service barrier with distributed.barrier_timeout: a process waits at it
    while process 0 works alone for 40 s. (A device collective, as multihost_utils.sync_global_devices, gives up
    after gloo's 30 s connect timeout: CI saw the two-process run fail that way while process 0 made the data.)"""
    if not _cpu_collectives_available():
        pytest.skip("this jaxlib has no gloo CPU collectives")
    port, script = _free_port(), tmp_path / "barrier.py"
    script.write_text(BARRIER)
    outs = _run_processes([[sys.executable, str(script), str(i), str(port)] for i in range(2)], tmp_path, timeout=240)
    assert [f"PASSED {i}" in out for i, out in enumerate(outs)] == [True, True]


@pytest.mark.slow
def test_two_processes_complete_a_training_step(tmp_path):
    if not _cpu_collectives_available():
        pytest.skip("this jaxlib has no gloo CPU collectives (cross-process CPU computations impossible)")
    port = _free_port()
    outs = _run_processes([[sys.executable, "-c", WORKER, str(i), str(port)] for i in range(2)], tmp_path, cwd=TESTS)
    results = [[line.split() for line in out.splitlines() if line.startswith("RESULT")][0] for out in outs]
    losses = [float(r[2]) for r in results]
    assert np.isfinite(losses[0]) and losses[0] == losses[1], results
    # The loss over the global batch equals the one-device loss on the whole batch; both processes end with
    # the same (replicated) updated parameters.
    assert losses[0] == pytest.approx(float(results[0][3]), rel=1e-5)
    assert results[0][4] == results[1][4] and float(results[0][4]) != 0.05


@pytest.mark.slow
def test_two_process_pipeline_writes_one_run_directory(tmp_path):
    """The CLI run as two jax.distributed processes sharing one run directory and data cache: both finish,
    process 0 alone writes results, metrics and checkpoints, and the checkpoints restore."""
    if not _cpu_collectives_available():
        pytest.skip("this jaxlib has no gloo CPU collectives (cross-process CPU computations impossible)")
    from test_train import TINY, _rows

    import orbax.checkpoint as ocp

    from bptt_jax.pipeline import latest_step

    port, run_dir = _free_port(), tmp_path / "run"
    # the tiny run, trimmed to what this test checks (one constant step, no FIRE baseline, one pretrain epoch)
    mine = {"dataset.n": "12", "finetune.batch_size": "4", "plots": "false", "eval.step_grid": "[0.01]",
            "eval.fire": "false", "pretrain.max_epochs": "1", "eval.oracle": "false", "eval.force_control": "false"}
    tiny = [o for o in TINY if o.split("=")[0] not in mine] + [f"{k}={v}" for k, v in mine.items()]
    cmds = [[sys.executable, "-m", "bptt_jax.train", f"dataset.cache_dir={tmp_path / 'data'}", *tiny,
             f"hydra.run.dir={run_dir}",
             "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
             "distributed.num_processes=2", f"distributed.process_id={i}"] for i in range(2)]
    outs = _run_processes(cmds, tmp_path, timeout=600, cwd=tmp_path)
    assert all("BPTT data parallel over 2 devices (2 processes)" in out for out in outs), outs[0][-3000:]
    tables = [out[out.index("| method"):out.index("run directory:")] for out in outs]
    assert tables[0] == tables[1]  # both processes evaluated the same replicated model
    res = json.loads((run_dir / "results.json").read_text())
    assert res["n_test"] == 4 and len(_rows(run_dir)) > 0
    assert latest_step(run_dir / "checkpoints" / "bptt") == 1
    for name, key in (("pretrained", "history"), ("bptt", "metrics")):
        with ocp.CheckpointManager((run_dir / "checkpoints" / name).absolute()) as mngr:
            out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                           meta=ocp.args.JsonRestore()))
        leaves = jax.tree_util.tree_leaves(out.state)
        assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves), name
        assert key in out.meta, (name, out.meta)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["config error", "kill"])
def test_when_one_process_fails_the_other_stops_and_names_it(tmp_path, cli_cache, failure):
    """Two-process CLI run, process 1 fails after joining: with a bad data set path of its own (an exception: it
    announces it, process 0's watch thread stops process 0 with a line naming it) or killed with SIGKILL once it
    has its data (JAX's coordination service misses its heartbeats for distributed.heartbeat_timeout=5 s and stops
    process 0, naming task 1). Either way process 0 ends within seconds, not at a collective's or barrier's
    timeout, and the failed process itself does not wait for process 0 either."""
    if not _cpu_collectives_available():
        pytest.skip("this jaxlib has no gloo CPU collectives (cross-process CPU computations impossible)")
    from test_train import TINY

    port, run_dir = _free_port(), tmp_path / "run"
    mine = {"pretrain.max_epochs": "1", "plots": "false", "eval.fire": "false", "eval.oracle": "false",
            "eval.force_control": "false"}
    tiny = [o for o in TINY if o.split("=")[0] not in mine] + [f"{k}={v}" for k, v in mine.items()]
    outs = [tmp_path / f"p{i}.out" for i in range(2)]
    procs = []
    for i in range(2):
        own = [f"dataset.path={tmp_path / 'missing'}"] if failure == "config error" and i == 1 else []
        cmd = [sys.executable, "-m", "bptt_jax.train", f"dataset.cache_dir={cli_cache / 'data'}", *tiny, *own,
               f"hydra.run.dir={run_dir}", "distributed.enabled=true", "distributed.heartbeat_timeout=5",
               f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
               f"distributed.process_id={i}"]
        with open(outs[i], "w") as out:
            procs.append(subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path))
    ended = [None, None]
    try:
        deadline = time.time() + 400
        while None in ended and time.time() < deadline:
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.time()
            if failure == "kill" and procs[1].poll() is None and "data: " in outs[1].read_text():
                procs[1].send_signal(signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = [o.read_text() for o in outs]
    assert None not in ended, text[0][-3000:]
    print(f"process 0 ended {ended[0] - ended[1]:.1f} s after process 1")
    assert procs[0].returncode != 0 and ended[0] - ended[1] < 30, text[0][-3000:]
    if failure == "config error":
        assert procs[1].returncode == 2 and "missing" in text[1], text[1][-3000:]
        assert re.search(r"process 0 stops: process 1 failed: \w+Error: .*missing", text[0]), text[0][-3000:]
    else:
        assert procs[1].returncode == -signal.SIGKILL
        assert re.search(r"stopped sending heartbeats\):\s*1\b", text[0]), text[0][-3000:]
    assert not (run_dir / "results.json").exists()


# ---------------------------------------------------------------------------------------------------
# Helpers that run in this process (one device)


def test_pad_batch_adds_empty_structures():
    batch = _batch(range(3))
    padded = parallel.pad_batch(batch, 4)
    assert padded.positions.shape == (4, 8, 3) and padded.target_positions.shape == (4, 8, 3)
    assert padded.forces is None
    assert np.asarray(padded.structure_mask).tolist() == [True, True, True, False]
    np.testing.assert_array_equal(np.asarray(padded.cell[3]), np.eye(3))
    assert parallel.pad_batch(batch, 3) is batch
    # Padding is what Batch.from_structures does for a larger batch_size.
    pairs = [rattled_si(seed=s) for s in range(3)]
    ref = Batch.from_structures([s for s, _ in pairs], [t for _, t in pairs], batch_size=4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), padded, ref)


def test_one_device_mesh_and_config():
    mesh = parallel.data_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("data",) and mesh.size == 1
    b = parallel.shard_batch(_batch(range(2)), mesh)
    assert b.positions.sharding.spec == jax.sharding.PartitionSpec("data")
    assert not parallel.initialize(parallel.DistributedConfig())  # disabled: nothing happens
    with pytest.raises(ValueError, match="cpu_collectives"):
        parallel.DistributedConfig(cpu_collectives="nccl")


# ---------------------------------------------------------------------------------------------------
# bfloat16 matmuls


GEO = dict(d_model=16, n_layers=1, n_heads=2, ffn_dim=32, species_dim=4)


@pytest.mark.parametrize("name,preset,kw", [("adapt", "tiny", {}),
                                            ("adapt", "small_geo", GEO),
                                            ("resmlp", "tiny", {})])
def test_bf16_matmuls_close_to_float32(name, preset, kw):
    batch = _batch(range(3))
    f32 = build_model(name, preset, **kw)
    bf16 = build_model(name, preset, matmul_dtype="bfloat16", **kw)
    params = f32.init(KEY, batch)
    params_bf = bf16.init(KEY, batch)
    # Same parameters (float32, same initialisation) with either setting.
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_bf)):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = np.asarray(jax.jit(f32.apply)(params, batch))
    out = jax.jit(bf16.apply)(params, batch)
    assert out.dtype == jnp.float32
    out = np.asarray(out)
    assert np.all(np.isfinite(out))
    assert np.all(out[~np.asarray(batch.atom_mask)] == 0)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 5e-2, rel  # bfloat16 has an 8-bit mantissa: ~1e-2 relative error, not 0
    # The matrix products really are bfloat16 (and the default has none).
    assert "bf16" in str(jax.make_jaxpr(bf16.apply)(params, batch))
    assert "bf16" not in str(jax.make_jaxpr(f32.apply)(params, batch))


def test_float32_setting_is_the_default_model():
    batch = _batch(range(2))
    model = build_model("adapt", "tiny")
    explicit = build_model("adapt", "tiny", matmul_dtype="float32")
    params = model.init(KEY, batch)
    np.testing.assert_array_equal(np.asarray(model.apply(params, batch)), np.asarray(explicit.apply(params, batch)))
    with pytest.raises(ValueError, match="matmul_dtype"):
        build_model("adapt", "tiny", matmul_dtype="float16").init(KEY, batch)


def test_bf16_train_step_keeps_float32_parameters():
    batch = _batch(range(3))
    bptt = BPTT(build_model("adapt", "tiny", matmul_dtype="bfloat16"),
                RelaxConfig(step_size=0.05, step_mode="learned", max_frames=3))
    params = bptt.init_params(KEY, batch)
    new, metrics = jit_train_step(bptt)(bptt.init_state(params, KEY), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new.params))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    ref = BPTT(build_model("adapt", "tiny"), bptt.relax)
    loss32 = float(jax.jit(lambda p: ref.loss(p, batch)[0])(params))
    assert float(metrics["loss"]) == pytest.approx(loss32, rel=5e-2)
