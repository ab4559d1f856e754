"""Writing a local file whole or not at all: the package's one durability rule.

A file is written to a temporary file in the same folder, flushed and fsynced, renamed over its target, and
then the folder is fsynced (making the rename itself durable): a crash, a kill or a full disk mid-write leaves
the previous version whole, or nothing where there was nothing. A full disk is said in one line
(errors.disk_full_said) naming the target and what to do again.

- write_atomic(data, path): bytes already in memory (a checkpoint, a small JSON or CSV file).
- atomic_file(path): a binary file object to stream into (a shard, a decompressed archive, a download).
- commit_file(f, temp, path): a temporary file the caller wrote itself, made `path` (a fetch that appends to
  NAME.part across runs, renamed once whole).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import AGAIN, disk_full_said


def write_atomic(data: bytes, path: str | Path, keep_previous: str | Path | None = None, again: str = AGAIN) -> None:
    """Write `data` as `path` or not at all. With `keep_previous`, the file it replaces is kept under that name."""
    with atomic_file(path, keep_previous=keep_previous, again=again) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: str | Path, temp: str | Path | None = None, keep_previous: str | Path | None = None,
                again: str = AGAIN):
    """A binary file to write `path` through: it becomes `path` when the block ends without an exception and is
    removed when one is raised. `temp`: the temporary file's name (default: .NAME.<random>.tmp beside `path`,
    which run folders and the mirror skip)."""
    path = Path(path)
    with disk_full_said(path, again):
        if temp is None:
            fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            f = os.fdopen(fd, "wb")
        else:
            f = open(temp, "wb")
        try:
            with f:
                yield f
                commit_file(f, temp, path, keep_previous)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def commit_file(f, temp: str | Path, path: str | Path, keep_previous: str | Path | None = None) -> None:
    """The temporary file `temp` (open as `f`, written whole) made `path`: flushed, fsynced, renamed over it, and
    the folder fsynced. With `keep_previous`, the file it replaces is kept under that name."""
    path = Path(path)
    f.flush()
    os.fsync(f.fileno())
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)  # a crash right here leaves keep_previous: one version older
    os.replace(temp, path)
    sync_folder(path.parent)


def sync_folder(folder: str | Path) -> None:
    """Make the renames in `folder` durable (its record of them may otherwise still be in memory only)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
