"""Named shapes of per-worker times (docs/algorithms.md, the time model, §7), shared by `apga theory` and the runtimes.

A shape turns a worker count n into n positive numbers, worker i = 1..n:

    equal       1
    sqrt        sqrt(i)                  (the paper's heterogeneous compute times)
    linear      i
    decreasing  sqrt(n + 1 - i)          (sqrt reversed: worker 1 is the slowest)
    sqrt_d      sqrt(i) * d**(1/4)       (the paper's "increased communication"; needs d)

``resolve_times`` accepts the forms a user may write (a shape name, one number for every
worker, a list, or a comma-separated string) and raises a one-line ``ConfigError`` naming the
option when the value is unusable.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from apga.errors import ConfigError

SHAPES = ("equal", "sqrt", "linear", "decreasing", "sqrt_d")


def shape_values(shape: str, n: int, d: int | None = None) -> list[float]:
    """The n values of a named shape (see the module docstring); ``d`` is needed by ``sqrt_d``."""
    if n < 1:
        raise ValueError(f"shape {shape!r} needs n >= 1 workers, got {n}")
    idx = range(1, n + 1)
    if shape == "equal":
        return [1.0] * n
    if shape == "sqrt":
        return [math.sqrt(i) for i in idx]
    if shape == "linear":
        return [float(i) for i in idx]
    if shape == "decreasing":
        return [math.sqrt(n + 1 - i) for i in idx]
    if shape == "sqrt_d":
        if d is None or d < 1:
            raise ValueError("shape 'sqrt_d' needs the parameter count d >= 1")
        scale = float(d) ** 0.25
        return [math.sqrt(i) * scale for i in idx]
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def resolve_times(
    spec: Any,
    n: int,
    *,
    option: str,
    d: int | None = None,
    allow_zero: bool = True,
) -> list[float]:
    """Per-worker times from a user value; errors name ``option`` (e.g. ``--comm-time``).

    ``spec`` may be a shape name, a number (same for every worker), a sequence of n numbers,
    or a string holding one number or n comma-separated numbers. ``allow_zero=False`` is for
    compute times, where zero would mean infinitely many gradients per second.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text in SHAPES:
            if text == "sqrt_d" and (d is None or d < 1):
                raise ConfigError(f"{option}: shape 'sqrt_d' needs the parameter count d (a positive integer)")
            return shape_values(text, n, d)
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"{option}: {spec!r} is neither a shape ({', '.join(SHAPES)}) nor a number "
                "or comma-separated list of numbers"
            ) from None
    elif isinstance(spec, bool):  # bool is an int subclass; True is surely a mistake
        raise ConfigError(f"{option}: expected a number, list or shape name, got {spec!r}")
    elif isinstance(spec, (int, float)):
        values = [float(spec)]
    elif isinstance(spec, Sequence):
        try:
            values = [float(v) for v in spec]
        except (TypeError, ValueError):
            raise ConfigError(f"{option}: every entry of the list must be a number, got {list(spec)!r}") from None
    else:
        raise ConfigError(f"{option}: expected a number, list or shape name, got {spec!r}")

    if len(values) == 1:
        values = values * n  # one number = the same time for every worker
    elif len(values) != n:
        raise ConfigError(f"{option}: got {len(values)} values for {n} workers; give one value or exactly {n}")
    for v in values:
        if not math.isfinite(v):
            raise ConfigError(f"{option}: times must be finite numbers, got {v}")
        if v < 0 or (v == 0 and not allow_zero):
            need = "non-negative" if allow_zero else "positive"
            raise ConfigError(f"{option}: times must be {need} (seconds), got {v:g}")
    return values
