"""Atomic file writes, shared by model checkpoints (m1model.checkpoint) and training checkpoints
(m1model.rl.checkpoint), and the one error both raise for a checkpoint that cannot be used.

A file is written atomically by writing a temporary file in the same
directory, fsync-ing it, renaming it over the target with os.replace (atomic
on POSIX) and fsync-ing the directory so that the rename itself survives a
power cut. Readers see the old file or the new one, never a mix; an exception
(or a crash) while writing leaves the old file in place.

    with atomic_path(path) as tmp:      # any writer that takes a path
        save_file(tensors, str(tmp))
    atomic_write_json(path, {"step": 3})
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged or missing files, or tensors that do not fit the model."""


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; write the file there.

    On normal exit the file is fsync-ed, renamed over `path` and the directory
    fsync-ed. On an exception the temporary file is removed and `path` is
    untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int = 1) -> None:
    """Strict JSON (NaN and infinities are errors), newline-terminated."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
