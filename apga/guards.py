"""Checks that turn hostile or absurd input into one-line errors before a run writes anything
(docs/guarantees.md): environments that cannot be built, runs that cannot fit in memory."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

from apga.config import short_repr
from apga.errors import ApgaError, ConfigError


@contextmanager
def env_construction(env_id: str):
    """Around building a run's environments: any exception becomes one ConfigError naming
    ``env.id`` (Gymnasium ids of removed versions such as Hopper-v3 or Pusher-v4 on MuJoCo 3 raise
    ImportError, ``phys2d/...`` needs jax, ``module:Id`` imports a module that may be missing).
    Warnings raised meanwhile (Gymnasium's "out of date" notes) are shown only if the build
    succeeds, so a refusal stays one line."""
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        except ApgaError:
            raise
        except Exception as exc:
            text = str(exc).strip().splitlines()
            first = short_repr(text[0], 200)[1:-1] if text else ""
            what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            raise ConfigError(f"env.id: {short_repr(env_id)} could not be created ({what}); check the id and its "
                              "version suffix (e.g. Hopper-v5) and that the packages it needs are installed") from None
    shown = set()
    for w in caught:  # one of each: every worker's environment repeats the same note
        key = (str(w.message), w.category)
        if key not in shown:
            shown.add(key)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
