"""Crash-safe file writes: a reader or a resumed run never sees a half-written file."""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync it, rename it over ``path``, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_pickle(path: str, obj: Any) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class AppendLog:
    """An append-only text file written one whole line per write(2) call.

    A single write of a line to a regular file is not torn by SIGKILL, so the file never holds a
    partial line; ``sync()`` makes the lines durable and returns the byte size a checkpoint records.
    """

    def __init__(self, path: str, truncate_to: int | None = None):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if truncate_to is not None:
            os.ftruncate(self.fd, truncate_to)

    def write_line(self, line: str) -> None:
        os.write(self.fd, (line.rstrip("\n") + "\n").encode())

    def sync(self) -> int:
        os.fsync(self.fd)
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
