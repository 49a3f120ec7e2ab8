"""A synthetic oracle: noisy gradients of known smooth non-convex functions.

Worker i maximises J_i(theta) = -sum_k phi(theta_k - c_ik) with phi(x) = x^2 / (1 + x^2)
(smooth, bounded, non-convex; L = 2). Its stochastic gradient is grad J_i + N(0, noise^2 I),
the noise of job j drawn from stream (seed, worker i, job j). With ``shift`` > 0 the centres
c_i differ per worker (heterogeneous objectives); the global objective is the average of J_i.
``nan_prob`` makes a gradient non-finite with that probability (to test the guards).

Used by the tests and theory checks; it plugs into every runtime exactly like the RL oracle.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from apga import rng
from apga.config import did_you_mean
from apga.errors import ConfigError
from apga.oracle.base import Cancelled, Job, Oracle, WorkerBatch

OPTIONS = {"dim": 10, "noise": 1.0, "shift": 0.0, "init_scale": 2.0, "nan_prob": 0.0}


class SyntheticOracle(Oracle):
    def __init__(self, n_workers: int, seed: int, dim: int = 10, noise: float = 1.0, shift: float = 0.0,
                 init_scale: float = 2.0, nan_prob: float = 0.0):
        for key, value in (("dim", dim), ("noise", noise), ("shift", shift), ("init_scale", init_scale),
                           ("nan_prob", nan_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"env.kwargs.{key}: expected a number, got {value!r}")
        if int(dim) != dim or dim < 1:
            raise ConfigError(f"env.kwargs.dim: the synthetic problem needs an integer dim >= 1, got {dim!r}")
        for key, value in (("noise", noise), ("shift", shift), ("init_scale", init_scale)):
            if not np.isfinite(value) or value < 0:
                raise ConfigError(f"env.kwargs.{key}: must be a finite number >= 0, got {value!r}")
        if not 0 <= nan_prob <= 1:
            raise ConfigError(f"env.kwargs.nan_prob: must be a probability in [0, 1], got {nan_prob!r}")
        self.dim, self.n_workers, self.seed = int(dim), n_workers, seed
        self.noise, self.init_scale, self.nan_prob = noise, init_scale, nan_prob
        self.centres = np.stack([rng.stream(seed, rng.INIT, w + 1).normal(size=self.dim) * shift
                                 for w in range(n_workers)])

    @classmethod
    def from_kwargs(cls, n_workers: int, seed: int, kwargs: dict) -> "SyntheticOracle":
        check_options(kwargs)  # already checked with the config; kept for direct callers
        return cls(n_workers, seed, **{**OPTIONS, **kwargs})

    def initial_point(self) -> np.ndarray:
        return rng.stream(self.seed, rng.INIT, 0).normal(size=self.dim) * self.init_scale

    def objective(self, theta: np.ndarray, worker: int) -> float:
        x = theta - self.centres[worker]
        return float(-np.sum(x**2 / (1 + x**2)))

    def true_gradient(self, theta: np.ndarray, worker: int) -> np.ndarray:
        x = theta - self.centres[worker]
        return -2 * x / (1 + x**2) ** 2

    def gradients(self, point: np.ndarray, jobs: Sequence[Job],
                  should_stop: Callable[[], bool] | None = None) -> dict[int, WorkerBatch]:
        out: dict[int, WorkerBatch] = {}
        for worker, job in jobs:
            if should_stop is not None and should_stop():
                raise Cancelled()
            g = rng.stream(self.seed, rng.SYNTHETIC_NOISE, worker, job)
            grad = self.true_gradient(point, worker) + self.noise * g.normal(size=self.dim)
            if self.nan_prob and g.random() < self.nan_prob:
                grad[0] = np.nan
            ret = np.array([self.objective(point, worker)])
            if np.all(np.isfinite(grad)):
                one = WorkerBatch(grad, 1, ret, np.ones(1, dtype=np.int64), 1, 0)
            else:
                one = WorkerBatch(np.zeros(self.dim), 0, np.zeros(0), np.zeros(0, dtype=np.int64), 1, 1)
            out[worker] = out[worker].merge(one) if worker in out else one
        return out

    def evaluate(self, point: np.ndarray, episodes: int, key: int, deterministic: bool = True) -> float:
        return float(np.mean([self.objective(point, w) for w in range(self.n_workers)]))


def check_options(kwargs: dict) -> None:
    """env.kwargs of env.id: synthetic: only the known options (one line naming the key)."""
    for key in kwargs:
        if key not in OPTIONS:
            raise ConfigError(f"env.kwargs: unknown synthetic option {key!r}{did_you_mean(str(key), OPTIONS)}; "
                              f"known: {', '.join(OPTIONS)}")
