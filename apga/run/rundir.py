"""The run directory: which files are apga's, its lock, creating or emptying it, and the summary
(the checkpoint file: apga/checkpoint.py; the policy files: apga/policy_file.py). What is atomic
and how resume works: docs/guarantees.md."""
from __future__ import annotations

import json
import os
import shutil

from apga import checkpoint
from apga.errors import ApgaError
from apga.files import atomic_write_text
from apga.policy_file import FILE_NAMES as POLICY_FILES

LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml", "metrics.csv", "timings.csv", checkpoint.FILE, *checkpoint.LEGACY_FILES, "summary.json",
             "returns.png", "tb", LOCK_FILE, *POLICY_FILES.values())


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def lock(out_dir: str) -> int:
    """Take the run directory's lock (flock on DIR/.lock, released by the kernel when the process
    ends, even by SIGKILL): two processes never write one run. Returns the fd to close."""
    import fcntl
    try:
        fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only file system or directory: refused before anything is written
        raise ApgaError(f"{out_dir!r}: cannot write in the run directory ({exc.strerror}); "
                        "choose a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ApgaError(f"{out_dir!r} is in use by another apga process; wait for it to end "
                        "(or stop it) and then resume") from None
    return fd


def prepare(out_dir: str, force: bool) -> int:
    """Create ``out_dir``, or empty it of apga run files with ``force``; nothing else is deleted.
    Returns the fd of the directory's lock (see ``_lock``)."""
    entries: list[str] = []
    if os.path.exists(out_dir) or os.path.islink(out_dir):
        if not os.path.isdir(out_dir):
            raise ApgaError(f"--out {out_dir!r} exists and is not a directory: choose another --out")
        try:
            entries = sorted(n for n in os.listdir(out_dir) if n != LOCK_FILE)
        except OSError as exc:
            raise ApgaError(f"--out {out_dir!r}: cannot list it ({exc.strerror})") from None
        if entries and not force:
            hint = "resume it with `apga train --resume DIR`" if "config.yaml" in entries else "choose a new --out"
            raise ApgaError(f"--out {out_dir!r} exists and is not empty: {hint}, or pass --force to overwrite it")
        foreign = [name for name in entries if name not in RUN_FILES and not name.startswith(".tmp-")]
        if foreign:  # checked before deleting anything
            raise ApgaError(f"--out {out_dir!r} holds {foreign[0]!r}, which is not an apga run file; "
                            "refusing to delete it even with --force: choose another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ApgaError(f"--out {out_dir!r}: cannot create it ({exc.strerror})") from None
    fd = lock(out_dir)
    for name in entries:
        remove(os.path.join(out_dir, name))
    return fd


def clean_temp_files(out_dir: str) -> None:
    """Remove temp files of atomic writes that a killed process left behind."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-"):
            try:
                remove(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass


def write_summary(out_dir: str, summary: dict) -> None:
    """summary.json; while the run goes on it is informational (a resume rewrites it): atomic but
    not fsynced; the final one is durable."""
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n",
                      durable=summary["status"] != "running")
