"""Files written whole or not at all (bptt_jax.files): an error while writing leaves neither the target nor a
temporary file, and an earlier complete file stays as it was."""

import os

import pytest

from bptt_jax.files import atomic_path, write_text_atomic


def test_written_whole(tmp_path):
    target = tmp_path / "results.json"
    write_text_atomic(target, "{}")
    assert target.read_text() == "{}" and os.listdir(tmp_path) == ["results.json"]
    plain = tmp_path / "plain"
    plain.write_text("")
    assert target.stat().st_mode == plain.stat().st_mode  # the umask's mode, not mkstemp's private 0600


def test_an_error_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.extxyz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("killed while writing")
    assert os.listdir(tmp_path) == []
    target.write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "complete" and os.listdir(tmp_path) == ["out.extxyz"]


def test_a_killed_writers_temporary_file_is_removed_and_a_live_ones_is_not(tmp_path):
    import socket
    import subprocess
    import sys

    from bptt_jax.files import remove_stale, tmp_name

    target = tmp_path / "a.extxyz"
    mine = tmp_name(target)
    assert mine.name.startswith(".a.extxyz.tmp-") and mine.parent == tmp_path
    mine.write_text("being written")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".b.extxyz.tmp-{socket.gethostname()}-{int(dead.stdout)}"  # its process has ended
    elsewhere = tmp_path / ".c.extxyz.tmp-another-host-1"
    for p in (killed, elsewhere):
        p.write_text("half")
    assert remove_stale(tmp_path) == [killed]
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, elsewhere.name])
