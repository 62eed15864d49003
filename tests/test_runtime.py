"""XLA flag handling of the CLI (bptt_jax.runtime)."""

import subprocess
import sys

from bptt_jax.runtime import CPU_XLA_FLAGS, add_xla_flags


def test_add_xla_flags_appends_and_keeps_the_users_setting():
    env = {}
    assert add_xla_flags(CPU_XLA_FLAGS, env) == list(CPU_XLA_FLAGS)
    assert env["XLA_FLAGS"] == " ".join(CPU_XLA_FLAGS)
    assert add_xla_flags(CPU_XLA_FLAGS, env) == []  # already there: nothing twice

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="}
    assert add_xla_flags(["--xla_cpu_experimental_ynn_fusion_type=-individual_dot", "--xla_cpu_enable_fast_math=false"],
                         env) == ["--xla_cpu_enable_fast_math=false"]
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                        "--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_enable_fast_math=false"]


def test_flags_reach_xla_only_before_the_backend_starts():
    """In a fresh process the added flag takes effect (two forced host devices); once a backend exists the call
    warns and changes nothing."""
    code = """
import logging, os
logging.basicConfig(level=logging.WARNING)
from bptt_jax.runtime import add_xla_flags, backends_started
os.environ.pop("XLA_FLAGS", None)
assert not backends_started()
assert add_xla_flags(["--xla_force_host_platform_device_count=2"])
import jax
assert jax.device_count() == 2, jax.devices()
assert backends_started()
assert add_xla_flags(["--xla_cpu_enable_fast_math=false"]) == []
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "already started" in out.stderr
