"""A run's checkpoint file: the Trainer's state as an explicit state file (apga/statefile.py).

``checkpoint.npz`` in the run directory is a zip of ``state.json`` and ``.npy`` arrays: the
protocol, clock, counters, jobs in flight, evaluation bookkeeping and the size of metrics.csv at
that point. Reading it never runs code from the file. An older checkpoint (``checkpoint.pkl``, a
pickle: checkpoint versions 1 and 2) is refused with one line and never unpickled.

The final checkpoint of a run also keeps, as the member ``resume_point.npz``, the last checkpoint
taken before the final row: the final row differs from the same row of a longer run (it has an
evaluation because it is the last), so continuing a finished run with a larger budget restarts
from there and the extended metrics.csv equals a run started with the larger budget.
"""
from __future__ import annotations

import os

from apga import statefile
from apga.errors import ApgaError, ConfigError
from apga.files import atomic_write_bytes

FILE = "checkpoint.npz"
LEGACY_FILES = ("checkpoint.pkl",)  # pickles of apga before checkpoint version 3: never read
VERSION = 3  # of the Trainer state inside (versions 1 and 2 were pickles)
RESUME_POINT = "resume_point.npz"


def path(out_dir: str) -> str:
    return os.path.join(out_dir, FILE)


def refuse_legacy(out_dir: str) -> None:
    """One line if the run directory holds an old pickle checkpoint (it is not opened)."""
    for name in LEGACY_FILES:
        if os.path.lexists(os.path.join(out_dir, name)) and not os.path.exists(path(out_dir)):
            raise ApgaError(f"--resume {out_dir!r}: {name} is a checkpoint of an older apga (pickle format, "
                            f"checkpoint version 1 or 2; this apga reads version {VERSION}); it is never "
                            "unpickled (a pickle can run code): start a new run")


def register_run_classes(cfg) -> None:
    """Make the run's own protocol class storable when the config names a user's class
    (``algorithm.name: package.module:ClassName``, imported as code named by the config anyway):
    it is registered under ``protocol:<algorithm.name>``. Built-in classes need nothing."""
    name = getattr(cfg.algorithm, "name", "") if cfg is not None else ""
    if ":" not in name:
        return
    try:
        from apga.protocol.registry import protocol_class
    except ImportError:  # an apga without user protocols
        return
    try:
        cls = protocol_class(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    statefile.register(cls, name=f"protocol:{name}")


def write(out_dir: str, state: dict, resume_point: bytes | None = None, cfg=None) -> bytes:
    """Write the checkpoint atomically; returns the bytes of the state alone (a resume point)."""
    register_run_classes(cfg)
    data = statefile.dumps(state)
    full = data if resume_point is None else statefile.dumps_with(state, {RESUME_POINT: resume_point})
    atomic_write_bytes(path(out_dir), full)
    return data


def read(out_dir: str, cfg=None) -> tuple[dict, bytes, bytes | None]:
    """(state, the bytes of the state alone, the embedded resume point or None); one line on any problem.
    ``cfg``: the run's config (see :func:`register_run_classes`)."""
    register_run_classes(cfg)
    p = path(out_dir)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ApgaError(f"--resume {out_dir!r}: cannot read {FILE} ({exc.strerror})") from None
    state = _load(out_dir, data)
    resume_point = statefile.read_member(data, RESUME_POINT)
    if resume_point is not None:
        _load(out_dir, resume_point)  # checked now: a refused resume writes nothing
    return state, data, resume_point


def load_bytes(out_dir: str, data: bytes) -> dict:
    return _load(out_dir, data)


def _load(out_dir: str, data: bytes) -> dict:
    try:
        state = statefile.loads(data)
    except ApgaError as exc:
        raise ApgaError(f"--resume {out_dir!r}: cannot read {FILE}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ApgaError(f"--resume {out_dir!r}: {FILE} holds checkpoint version {version!r}, this apga reads "
                        f"version {VERSION}; start a new run")
    return state
