"""Protocol classes by ``algorithm.name``: the built-in methods, or ``package.module:ClassName``
for a user's own class (imported like any Python code named in a config: trusted input)."""
from __future__ import annotations

import importlib

import numpy as np

from apga.protocol.base import PerGradientProtocol, Protocol, RoundProtocol

BUILTIN = {
    "rennala_nigt": "apga.protocol.rennala_nigt:RennalaNIGT",
    "malenia_nigt": "apga.protocol.malenia_nigt:MaleniaNIGT",
    "sync_nigt": "apga.protocol.sync_nigt:SyncNIGT",
    "afedpg": "apga.protocol.afedpg:AFedPG",
    "sync_pg": "apga.protocol.sync_pg:SyncPG",
    "rennala_pg": "apga.protocol.rennala_pg:RennalaPG",
}


def protocol_class(name: str) -> type:
    """The class for ``name``; ValueError (one line, naming algorithm.name) if it cannot be had."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ValueError(f"algorithm.name: unknown algorithm {name!r}; choose one of {', '.join(BUILTIN)}, "
                         "or give your own class as package.module:ClassName")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while importing the user's module
        raise ValueError(f"algorithm.name {name!r}: cannot import {module_name!r} "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, (RoundProtocol, PerGradientProtocol))):
        raise ValueError(f"algorithm.name {name!r}: {module_name} has no protocol class {attr!r} "
                         "(a subclass of apga.protocol.base.RoundProtocol or PerGradientProtocol)")
    return cls


def make_protocol(name: str, n: int, theta0: np.ndarray, step_size: float, momentum: float = 0.1,
                  batch_size: int = 32, init_batch_size: int | None = None, step_schedule: str = "constant",
                  options: dict | None = None) -> Protocol:
    """Build the protocol ``name`` (a built-in name or package.module:ClassName) for n workers."""
    cls = protocol_class(name)
    return cls(n, theta0, step_size, momentum=momentum, batch_size=batch_size, init_batch_size=init_batch_size,
               step_schedule=step_schedule, **(options or {}))
