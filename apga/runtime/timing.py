"""The simulator's clock model (docs/algorithms.md, the time model): seconds per gradient and per vector transfer.

Compute time of job j of worker i is a pure function of (seed, i, j, start time), so a
simulation can be replayed or resumed from counters alone.

``workers.compute_time`` accepts
  - a number (every worker), a list of n numbers, or a shape name: equal | sqrt | linear | decreasing
  - {shape: NAME, scale: S}                      shape values times S
  - {dist: exponential|uniform|gamma|lognormal, mean: <any form above>, spread: CV}
        random per call around each worker's mean; spread is the coefficient of variation
        (uniform: half-width / mean, at most 1; exponential ignores it: CV = 1)
  - {schedule: [{until: T1, times: <form>}, ..., {times: <form>}]}
        time-varying: a job uses the segment in force when it starts
  - {trace: PATH}    CSV with columns worker,seconds; worker i's j-th job takes its j-th listed
        duration, cycling when the trace runs out (workers numbered from 0)
``workers.comm_time``: a number, list, shape (also sqrt_d = sqrt(i) d^(1/4)) or {shape, scale}.
``workers.allreduce_time``: a number, {bandwidth, latency, bytes_per_param} (ring:
  2(n-1)/n d bytes_per_param / bandwidth + latency), or null = the slowest comm_time.
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Any

from apga import rng
from apga.config import short_repr
from apga.errors import ConfigError
from apga.shapes import resolve_times

DISTRIBUTIONS = ("exponential", "uniform", "gamma", "lognormal")


def _one_time(value: Any, key: str, allow_zero: bool) -> float:
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{key}: expected one number, got {value!r}")
    return resolve_times(value, 1, option=key, allow_zero=allow_zero)[0]


def per_worker_values(spec: Any, n: int, key: str, dim: int | None = None,
                      allow_zero: bool = False) -> list[float]:
    """Resolve a number / list / shape name / {shape, scale} into n per-worker seconds; for
    transfers also {trace: FILE}: each worker's mean upload and download time in a timings.csv."""
    if isinstance(spec, dict) and "trace" in spec and allow_zero:
        if set(spec) != {"trace"}:
            raise ConfigError(f"{key}: a trace mapping takes only trace, got keys {sorted(spec)}")
        return [sum(t) / len(t) for t in load_trace(spec["trace"], n, f"{key}.trace", kinds=("upload", "download"))]
    if isinstance(spec, dict):
        if "shape" not in spec or set(spec) - {"shape", "scale"}:
            raise ConfigError(f"{key}: a mapping here takes shape and scale, got keys {sorted(spec)}")
        scale = _one_time(spec.get("scale", 1.0), f"{key}.scale", allow_zero)
        return [scale * v for v in per_worker_values(spec["shape"], n, key, dim, allow_zero)]
    if isinstance(spec, (list, tuple)) and len(spec) != n:
        raise ConfigError(f"{key}: the list has {len(spec)} entries but workers.n is {n}; give one per worker")
    if isinstance(spec, str) and "," in spec:
        raise ConfigError(f"{key}: write several times as a YAML list [a, b, ...], not {spec!r}")
    return resolve_times(spec, n, option=key, d=dim, allow_zero=allow_zero)


class ComputeTime:
    """Seconds that job ``job`` of ``worker`` takes when started at ``start``."""

    def __init__(self, spec: Any, n: int, seed: int, key: str = "workers.compute_time"):
        self.n, self.seed = n, seed
        self.kind = "constant"
        self.dist, self.spread, self.segments, self.trace = None, 0.0, [], None
        self.trace_sha256 = None
        if isinstance(spec, dict) and "dist" in spec:
            extra = set(spec) - {"dist", "mean", "spread"}
            if extra:
                raise ConfigError(f"{key}: unknown key(s) {sorted(extra)}; a random model takes dist, mean, spread")
            if spec["dist"] not in DISTRIBUTIONS:
                raise ConfigError(f"{key}.dist: {spec['dist']!r} is not one of {', '.join(DISTRIBUTIONS)}")
            self.kind, self.dist = "random", spec["dist"]
            self.means = per_worker_values(spec.get("mean", 1.0), n, f"{key}.mean")
            self.spread = _one_time(spec.get("spread", 0.5), f"{key}.spread", True)
            if self.dist == "uniform" and self.spread > 1:
                raise ConfigError(f"{key}.spread: a uniform model needs spread <= 1 (times must stay >= 0)")
        elif isinstance(spec, dict) and "schedule" in spec:
            segs = spec["schedule"]
            if set(spec) != {"schedule"} or not isinstance(segs, list) or not segs:
                raise ConfigError(f"{key}.schedule: expected a non-empty list of {{until, times}} segments")
            last = -math.inf
            for k, seg in enumerate(segs):
                if not isinstance(seg, dict) or "times" not in seg or set(seg) - {"until", "times"}:
                    raise ConfigError(f"{key}.schedule[{k}]: expected {{until: SECONDS, times: ...}}")
                until = seg.get("until", math.inf) if k < len(segs) - 1 else math.inf
                if isinstance(until, bool) or not isinstance(until, (int, float)) or math.isnan(until):
                    raise ConfigError(f"{key}.schedule[{k}].until: expected a number of seconds, got {until!r}")
                if until <= last:
                    raise ConfigError(f"{key}.schedule[{k}].until must increase from segment to segment")
                last = until
                self.segments.append((float(until), per_worker_values(seg["times"], n, f"{key}.schedule[{k}].times")))
            self.kind = "schedule"
        elif isinstance(spec, dict) and "trace" in spec:
            extra = set(spec) - {"trace"}
            if extra:  # e.g. scale: it would be silently ignored
                raise ConfigError(f"{key}: unknown key(s) {sorted(map(str, extra))} beside trace; a trace takes "
                                  "only its path (scale the seconds in the file itself)")
            self.kind = "trace"
            self.trace, self.trace_sha256 = load_trace(spec["trace"], n, f"{key}.trace", kinds=("compute",),
                                                            with_hash=True)
        else:
            self.means = per_worker_values(spec, n, key)

    def __call__(self, worker: int, job: int, start: float) -> float:
        if self.kind == "constant":
            return self.means[worker]
        if self.kind == "schedule":
            for until, times in self.segments:
                if start < until:
                    return times[worker]
        if self.kind == "trace":
            t = self.trace[worker]
            return t[job % len(t)]
        return self._draw(worker, job)

    def _draw(self, worker: int, job: int) -> float:
        mean, cv = self.means[worker], self.spread
        g = rng.stream(self.seed, rng.COMPUTE_TIME, worker, job)
        if self.dist == "exponential":
            return float(g.exponential(mean))
        if self.dist == "uniform":
            return float(g.uniform(mean * (1 - cv), mean * (1 + cv)))
        if cv == 0:
            return mean
        if self.dist == "gamma":
            k = 1.0 / cv**2
            return float(g.gamma(k, mean / k))
        # lognormal with the given mean and coefficient of variation
        s2 = math.log1p(cv**2)
        return float(g.lognormal(math.log(mean) - s2 / 2, math.sqrt(s2)))


MAX_TRACE_BYTES = 64 << 20  # about 3 million rows


def load_trace(path: Any, n: int, key: str, kinds: tuple = ("compute",), every_worker: bool = True,
               with_hash: bool = False):
    """Per-worker seconds from a CSV trace with columns worker,seconds, in file order. A trace
    with a ``kind`` column (timings.csv of a Ray run: compute | download | upload | allreduce)
    contributes only its rows of the given ``kinds``. With ``with_hash`` also the sha256 of the
    bytes read (a run records it, and --resume refuses a trace that changed since)."""
    if not isinstance(path, str):
        raise ConfigError(f"{key}: expected a file path, got {path!r}")
    from apga.files import read_regular_file
    try:
        data = read_regular_file(os.path.expanduser(path), MAX_TRACE_BYTES)
        text = data.decode()
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read trace file {short_repr(path)} ({exc.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {path!r} is not a CSV trace ({exc})") from None
    per_worker: list[list[float]] = [[] for _ in range(n)]
    for line, row in enumerate(rows, start=2):
        if row.get("kind") is not None and row["kind"] not in kinds:
            continue
        try:
            w, s = int(row["worker"]), float(row["seconds"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{key}: {path}:{line}: expected columns worker,seconds with an integer and a number") from None
        if not 0 <= w < n:
            raise ConfigError(f"{key}: {path}:{line}: worker {w} is outside 0..{n - 1}")
        if not math.isfinite(s) or s <= 0:
            raise ConfigError(f"{key}: {path}:{line}: seconds must be a finite number > 0, got {s}")
        per_worker[w].append(s)
    missing = [w for w in range(n) if not per_worker[w]]
    if missing and every_worker:
        raise ConfigError(f"{key}: trace {path!r} has no rows for worker(s) {missing[:5]}; give every worker at least one")
    if with_hash:
        import hashlib
        return per_worker, hashlib.sha256(data).hexdigest()
    return per_worker


# The longest time any one job, transfer or AllReduce may take (about 31,700 years). The clock
# adds such times up in float64; 1e308 would overflow to inf after the run directory exists.
MAX_SECONDS = 1e12


def _check_range(values, key: str) -> None:
    for v in values:
        if v > MAX_SECONDS:
            raise ConfigError(f"{key}: {v:g} seconds is more than the {MAX_SECONDS:g} s one step may take; "
                              "use a smaller time unit for every time in the config")


class TimeModel:
    """Compute times, per-worker vector transfer times and the AllReduce time of one run."""

    def __init__(self, compute_time: Any, comm_time: Any, allreduce_time: Any, n: int, dim: int, seed: int):
        self.n, self.dim = n, dim
        self.compute = ComputeTime(compute_time, n, seed)
        self.comm = per_worker_values(comm_time, n, "workers.comm_time", dim=dim, allow_zero=True)
        self.allreduce = self._allreduce(allreduce_time)
        key = "workers.compute_time"
        c = self.compute
        if c.kind == "schedule":
            for k, (_, times) in enumerate(c.segments):
                _check_range(times, f"{key}.schedule[{k}].times")
        elif c.kind == "trace":
            _check_range([max(t) for t in c.trace], f"{key}.trace")
        else:  # constant, or the means of a random model
            _check_range(c.means, key if c.kind == "constant" else f"{key}.mean")
        _check_range(self.comm, "workers.comm_time")
        _check_range([self.allreduce], "workers.allreduce_time")

    def _allreduce(self, spec: Any) -> float:
        key = "workers.allreduce_time"
        if spec is None:
            return max(self.comm)
        if isinstance(spec, dict) and set(spec) == {"trace"}:  # the mean AllReduce of a timings.csv
            rows = [s for t in load_trace(spec["trace"], self.n, f"{key}.trace", kinds=("allreduce",),
                                          every_worker=False) for s in t]
            if not rows:
                raise ConfigError(f"{key}.trace: {spec['trace']!r} has no allreduce rows")
            return sum(rows) / len(rows)
        if isinstance(spec, dict):
            extra = set(spec) - {"bandwidth", "latency", "bytes_per_param"}
            if extra or "bandwidth" not in spec:
                raise ConfigError(f"{key}: the ring model takes bandwidth (bytes/s), latency (s), bytes_per_param")
            bw = _one_time(spec["bandwidth"], f"{key}.bandwidth", False)
            lat = _one_time(spec.get("latency", 0.0), f"{key}.latency", True)
            bpp = _one_time(spec.get("bytes_per_param", 4), f"{key}.bytes_per_param", False)
            return 2 * (self.n - 1) / self.n * self.dim * bpp / bw + lat
        return _one_time(spec, key, True)
