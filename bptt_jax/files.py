"""Files written whole or not at all.

A run directory, a generated data set's cache and the relax CLI's output are read again later (by a resume, a
second run, the user). A file cut short by an error or a kill in the middle of writing it would be read as
complete, so every such file is written to a temporary name beside it and renamed over the target only once it
is complete (``os.replace`` is atomic on POSIX within one file system); on an error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A temporary path in ``path``'s directory to write to; renamed to ``path`` when the block ends without an
    exception, removed otherwise. The temporary name starts with a dot and ends with ``.tmp``, so the directory
    walks of the readers never take it for data."""
    path = Path(path)
    # Not tempfile.mkstemp: its files are private (0600), and the rename would keep that mode.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> None:
    """``Path(path).write_text(text)``, all or nothing (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
