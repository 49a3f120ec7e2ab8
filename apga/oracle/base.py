"""The gradient-oracle seam: (parameters, worker, job keys) -> summed gradients and episode stats.

An oracle never sees a clock or a process. Every random number it draws for job ``j`` of
worker ``i`` comes from a stream derived from ``(seed, worker=i, job=j)`` (see ``apga.rng``), so
the same job always yields the same trajectory, whichever batch or process computes it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


@dataclass
class WorkerBatch:
    """Sum of one worker's stochastic gradients at one point, plus episode statistics.

    ``count`` counts the accepted (finite) gradients in ``grad_sum``; ``rejected`` counts the
    trajectories dropped because their reward, observation or gradient was not finite.
    """

    grad_sum: np.ndarray  # float64, shape (dim,)
    count: int
    returns: np.ndarray = field(default_factory=lambda: np.zeros(0))  # undiscounted, per trajectory
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    env_steps: int = 0
    rejected: int = 0

    @staticmethod
    def empty(dim: int) -> "WorkerBatch":
        return WorkerBatch(np.zeros(dim), 0)

    @property
    def trajectories(self) -> int:
        """The trajectories this batch stands for: accepted and rejected gradients."""
        return self.count + self.rejected

    def merge(self, other: "WorkerBatch") -> "WorkerBatch":
        """Concatenate two batches of the same worker (sums add; order of stats is kept)."""
        return WorkerBatch(
            self.grad_sum + other.grad_sum,
            self.count + other.count,
            np.concatenate([self.returns, other.returns]),
            np.concatenate([self.lengths, other.lengths]),
            self.env_steps + other.env_steps,
            self.rejected + other.rejected,
        )


class Cancelled(Exception):
    """Raised by ``Oracle.gradients`` when its ``should_stop`` check says the work is no longer
    wanted (a real runtime abandoning a trajectory when its round ends)."""


# (worker, job key): by default the job index (each worker's started jobs counted from 0); under
# runtime.streams: round, rng.round_sample(round, index in the round). The oracle only keys streams.
Job = tuple[int, int]


class Oracle(ABC):
    """Computes stochastic policy gradients (ascent direction of the return)."""

    dim: int
    n_workers: int

    @abstractmethod
    def initial_point(self) -> np.ndarray:
        """theta_0 as a float64 vector; depends only on the oracle's seed."""

    @abstractmethod
    def gradients(self, point: np.ndarray, jobs: Sequence[Job],
                  should_stop: Callable[[], bool] | None = None) -> dict[int, WorkerBatch]:
        """Gradients of every job in ``jobs``, all at ``point``, summed per worker.

        ``should_stop`` (optional) is checked before every environment step (synthetic: before
        every gradient); when it returns True the call raises :class:`Cancelled`. It may be
        called from several threads at once (a MuJoCo rollout on several threads), so it must
        be a thread-safe read such as ``threading.Event.is_set``.

        Implementations batch all jobs that share an environment into one vectorised rollout.
        The result has one entry per worker that appears in ``jobs``; the per-worker sum is
        accumulated in job order so that the result does not depend on how jobs are batched.
        """

    def gradients_many(
        self, requests: Sequence[tuple[np.ndarray, Sequence[Job]]]
    ) -> list[dict[int, WorkerBatch]]:
        """Several independent (point, jobs) requests; a fast oracle may run them together."""
        return [self.gradients(p, jobs) for p, jobs in requests]

    @abstractmethod
    def evaluate(self, point: np.ndarray, episodes: int, key: int, deterministic: bool = True) -> float:
        """Mean evaluation return of the policy at ``point`` (averaged over workers' tasks).

        ``key`` (e.g. the iteration) selects the evaluation random stream; ``deterministic``
        acts with the mean (greedy) action.
        """

    def close(self) -> None:  # release environments / processes
        pass
