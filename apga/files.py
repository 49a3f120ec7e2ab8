"""Crash-safe file writes: a reader or a resumed run never sees a half-written file.

Test hook: with the environment variable ``APGA_TEST_SLOW_WRITES=SECONDS`` every atomic write
sleeps that long after writing the first half of its temp file (before the rest, the fsync and
the rename), so that a test's SIGKILL can land in the middle of a checkpoint write. Never set it
outside tests.
"""
from __future__ import annotations

import os
import tempfile
import time

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write to a temp file in the same folder, fsync it, rename it over ``path``, fsync the folder.

    A reader (or a killed process's successor) sees the old file or the new one, never a mix.
    ``durable=False`` skips both fsyncs: still atomic against a killed process, but after a power
    loss the old version may come back (for files rewritten often that nothing depends on)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            slow = os.environ.get("APGA_TEST_SLOW_WRITES")
            if slow:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                time.sleep(float(slow))
                data = data[half:]
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _fsync_dir(folder)


def atomic_write_text(path: str, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), durable)


def write_whole(fd: int, data: bytes) -> None:
    """Append ``data`` to the end of ``fd`` (opened O_APPEND) whole or not at all.

    One write(2) in practice; a short write is continued. If a write fails (disk full: ENOSPC,
    EDQUOT, EIO...), the file is cut back to its size before the call, so it never ends with a
    torn line or record, and the OSError is raised."""
    start = os.fstat(fd).st_size
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        try:
            os.ftruncate(fd, start)  # frees the blocks of the partial write: never fails for lack of space
        except OSError:
            pass
        raise


class AppendLog:
    """An append-only text file written one whole line per write(2) call.

    A line is handed to the kernel in one write(2), so a killed process leaves whole lines (Linux
    could only cut a line that straddles a page boundary if the kill lands between the two page
    copies of that one call; readers drop a last line without its newline). ``sync()`` makes the
    lines durable and returns the byte size a checkpoint records; ``truncate_to`` cuts the file
    back to such a size when a run resumes.
    """

    def __init__(self, path: str, truncate_to: int | None = None):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if truncate_to is not None:
            size = os.fstat(self.fd).st_size
            if truncate_to > size:
                os.close(self.fd)
                raise ValueError(f"{path} has {size} bytes, fewer than the {truncate_to} to keep")
            os.ftruncate(self.fd, truncate_to)

    def write_line(self, line: str) -> None:
        write_whole(self.fd, (line.rstrip("\n") + "\n").encode())

    def sync(self) -> int:
        os.fsync(self.fd)
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NotARegularFile(OSError):
    """The path names a FIFO, a device, a socket or a directory: never read (it may not end)."""


class FileTooLarge(OSError):
    """The file is over the size cap of its kind."""


def read_regular_file(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Opened with O_NONBLOCK, so that a FIFO does not block the open; then anything but a regular
    file (FIFO, /dev/zero, /dev/urandom, a directory) is refused before a byte is read, and at
    most ``limit + 1`` bytes are ever read. Raises OSError (FileNotFoundError, NotARegularFile,
    FileTooLarge, ...)."""
    import stat
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory", path)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(0, "not a regular file (a FIFO, device or socket)", path)
        if st.st_size > limit:
            raise FileTooLarge(0, f"larger than {limit} bytes", path)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while read
            raise FileTooLarge(0, f"larger than {limit} bytes", path)
        return b"".join(chunks)
    finally:
        os.close(fd)
