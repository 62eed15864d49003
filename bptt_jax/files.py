"""Files written whole or not at all.

A run directory, a generated data set's cache and the relax CLI's output are read again later (by a resume, a
second run, the user). A file cut short by an error or a kill in the middle of writing it would be read as
complete, so every such file is written to a temporary name beside it and renamed over the target only once it
is complete (``os.replace`` is atomic on POSIX within one file system); on an error the temporary file is removed.

A process killed with SIGKILL removes nothing: its temporary file stays. The temporary name says which host and
process wrote it, so :func:`remove_stale` can take away those of processes that are no longer alive, and two
writers (a generation's pool workers, a worker left running by a killed generation) never share one.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def _marker() -> str:
    return f".tmp-{socket.gethostname()}-"


def tmp_name(path: PathLike) -> Path:
    """Where this process writes ``path`` before renaming it: ``.NAME.tmp-HOST-PID`` beside it. The leading dot
    and the suffix keep the readers' directory walks from taking it for data."""
    path = Path(path)
    return path.parent / f".{path.name}{_marker()}{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path (:func:`tmp_name`) to write ``path`` to; renamed to ``path`` when the block ends without
    an exception, removed otherwise."""
    path = Path(path)
    # Not tempfile.mkstemp: its files are private (0600), and the rename would keep that mode.
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, all or nothing (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale(directory: PathLike) -> list[Path]:
    """Remove the temporary files in ``directory`` that processes of this host, no longer alive, left there
    (killed writers); returns them. Other hosts' files and live processes' files are left alone."""
    marker, removed = _marker(), []
    for tmp in Path(directory).glob(f".*{marker}*"):
        try:
            os.kill(int(tmp.name.rsplit(marker, 1)[1]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except (ValueError, PermissionError):  # not one of ours, or a live process of another user
            pass
    return removed
