import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, molecule

from bptt_jax.runtime import add_xla_flags
from bptt_jax.structures import Structure

# The suite compiles hundreds of small programs and runs most of them a few times, so compiling is most of its
# time: XLA's CPU backend is told to spend less on LLVM optimisation (about a third off a compile-bound test,
# measured on the sharded-step test: 89 s -> 59 s; running the programs is ~20% slower). The flags are set in this
# process's environment before JAX starts, so the CLI runs and the other subprocesses the tests start inherit
# them. The programs' float32 results can differ from the optimised ones in the last bits; every comparison in
# the suite is within one setting (or has a tolerance). BPTT_TEST_OPTIMIZED=1 runs the suite with XLA's defaults.
TEST_XLA_FLAGS: tuple[str, ...] = () if os.environ.get("BPTT_TEST_OPTIMIZED") else (
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
add_xla_flags(TEST_XLA_FLAGS)


def rattled_si(repeat=(1, 1, 1), sigma=0.1, seed=0, cubic=False, drop=0):
    """A diamond-Si cell (optionally with ``drop`` atoms removed), rattled; returns (start, target)."""
    atoms = bulk("Si", "diamond", a=5.431, cubic=cubic).repeat(repeat)
    if drop:
        del atoms[list(range(drop))]
    target = atoms.positions.copy()
    atoms.positions += np.random.default_rng(seed).normal(0.0, sigma, atoms.positions.shape)
    return Structure.from_atoms(atoms), target


@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory):
    """Shared by the CLI runs of a test session: the generated datasets, and the persistent XLA compilation
    cache (``compile_cache_dir``), so that a run compiling the programs of an earlier one loads them from disk."""
    return tmp_path_factory.mktemp("cli_cache")


@pytest.fixture(scope="session", autouse=True)
def xla_cache(cli_cache):
    """The test process compiles into the same persistent cache as the CLI runs (one per pytest-xdist worker,
    so no two processes write one directory at once): the in-process pipeline runs and the many tests that
    build the same tiny models then load programs an earlier test compiled. In-memory jit caches, which the
    recompilation tests count, are not affected."""
    from bptt_jax.runtime import enable_compile_cache

    return enable_compile_cache(cli_cache / "xla", min_compile_s=0.5)


@pytest.fixture
def si_pairs():
    """Three Si structures of different sizes (2, 8 and 7 atoms) with targets."""
    return [rattled_si(seed=0), rattled_si(cubic=True, seed=1), rattled_si(cubic=True, seed=2, drop=1)]


@pytest.fixture
def water():
    atoms = molecule("H2O")
    return Structure.from_atoms(atoms)


def to64(tree):
    """A pytree with every leaf cast to float64 (inside ``jax.enable_x64``)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def get_leaf(tree, path):
    """The leaf of a nested dict at ``path``."""
    for p in path:
        tree = tree[p]
    return tree


def set_leaf(tree, path, index, value):
    """A copy of ``tree`` with element ``index`` of the leaf at ``path`` set to ``value``."""
    tree = jax.tree_util.tree_map(lambda x: x, tree)  # copy the containers
    parent = get_leaf(tree, path[:-1])
    parent[path[-1]] = parent[path[-1]].at[index].set(value)
    return tree


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` (each a minute or more: subprocess and whole-pipeline runs) go first, so that
    under ``make test``'s two xdist workers the short tests fill in around them instead of one long test
    running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: the TFRecord checksum."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tensorboard_events(log_dir):
    """Every event of the TensorBoard event files in ``log_dir`` (file by file, in name order), read from the
    TFRecord framing (uint64 length, its masked CRC-32C, the record, the record's masked CRC-32C; little endian)
    with both checksums verified, and decoded with tensorboardX's ``Event`` message."""
    import struct
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            header = raw[pos:pos + 8]
            (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[pos + 8:pos + 12])
            data = raw[pos + 12:pos + 12 + length]
            (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
            assert header_crc == _masked_crc(header) and data_crc == _masked_crc(data), f"{path}: bad record at {pos}"
            events.append(Event.FromString(data))
            pos += 16 + length
    return events


def tensorboard_scalars(log_dir) -> dict:
    """{tag: [(step, value), ...]} of the scalars in ``log_dir``'s event files, in the order written."""
    scalars: dict = {}
    for event in tensorboard_events(log_dir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
