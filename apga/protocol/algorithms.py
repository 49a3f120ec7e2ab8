"""The four algorithms as protocols: what to compute where, when a round ends, how to update.

No clock, no processes, no torch: a runtime (simulator or Ray) reports finished gradients as
counts and hands over per-worker sums; the protocol answers with stop decisions and updates.

- ``RoundAlgorithm``: Rennala NIGT, Malenia NIGT, synchronous NIGT. One round = one point
  (theta~_t), workers compute until the stop rule holds, one reduction, one NIGT step.
- ``AFedPG``: one gradient -> one immediate server step; the worker gets the new point back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from apga.oracle.base import WorkerBatch
from apga.protocol import aggregators as agg
from apga.protocol.nigt import NIGTState, extrapolated_point, nigt_step


@dataclass
class Update:
    """What one model update did (for logging)."""

    used: int  # gradients aggregated (accepted, finite)
    rejected: int  # gradients dropped as non-finite (per trajectory or whole aggregate)
    stepped: bool  # False if the update was rejected or the momentum norm was 0
    grad_norm: float  # norm of the aggregated gradient (nan if rejected)
    returns: np.ndarray  # undiscounted returns of the aggregated trajectories
    env_steps: int


def _reject(batches: Sequence[WorkerBatch]) -> Update:
    n = sum(b.count + b.rejected for b in batches)
    return Update(0, n, False, math.nan, np.zeros(0), sum(b.env_steps for b in batches))


class RoundAlgorithm:
    """Rennala / Malenia / synchronous NIGT over n workers (rule = rennala | malenia | sync)."""

    STOP = {"rennala": agg.rennala_stop, "malenia": agg.malenia_stop, "sync": agg.sync_stop}

    def __init__(self, rule: str, n: int, theta0: np.ndarray, step_size: float, momentum: float,
                 batch_size: int, init_batch_size: int | None = None):
        if rule not in self.STOP:
            raise ValueError(f"unknown round rule {rule!r}")
        self.rule, self.n = rule, n
        self.alpha, self.eta = step_size, momentum
        self.batch_size = batch_size
        self.init_batch_size = init_batch_size or batch_size
        self.state = NIGTState.initial(theta0)
        self.version = 0  # rounds finished; gradients are only valid for the current version

    @property
    def theta(self) -> np.ndarray:
        return self.state.theta

    def round_batch(self) -> int:
        return self.init_batch_size if self.state.d is None else self.batch_size

    def round_point(self) -> np.ndarray:
        return extrapolated_point(self.state, self.eta)

    def keeps_working(self, counts: Sequence[int], worker: int) -> bool:
        """Should ``worker`` start another gradient in this round? (sync: only up to its quota)."""
        if self.rule == "sync":
            return counts[worker] < agg.sync_quota(self.n, self.round_batch())
        return True

    def round_done(self, counts: Sequence[int]) -> bool:
        return self.STOP[self.rule](counts, self.round_batch())

    def finish_round(self, batches: Mapping[int, WorkerBatch]) -> Update:
        """Aggregate the round's per-worker sums (all computed at round_point()) and step.

        Workers whose every gradient was rejected as non-finite are left out of the average
        (Malenia then averages over the remaining workers); if none is left, nothing moves.
        """
        live = [b for b in batches.values() if b.count > 0]
        total = np.sum([agg.contribution(self.rule, b.grad_sum, b.count) for b in live], axis=0) if live else None
        all_ = list(batches.values())
        self.state, update = reduced_step(
            self.state, self.rule, total, sum(b.count for b in live), len(live), self.alpha, self.eta,
            rejected=sum(b.rejected for b in all_), returns=np.concatenate([b.returns for b in all_]),
            env_steps=sum(b.env_steps for b in all_))
        self.version += 1
        return update

    def adopt(self, state: NIGTState) -> None:
        """End the round with the state the workers computed themselves (AllReduce mode: every
        participant ran ``reduced_step`` on the same reduction)."""
        self.state = state
        self.version += 1


def reduced_step(state: NIGTState, rule: str, total: np.ndarray | None, count: int, live: int,
                 alpha: float, eta: float, rejected: int, returns: np.ndarray, env_steps: int
                 ) -> tuple[NIGTState, Update]:
    """The NIGT step from one round's reduction: ``total`` = sum of the workers' contributions
    (aggregators.contribution), ``count`` = sum_i b_i, ``live`` = workers with b_i > 0.

    Pure, so the server (RoundAlgorithm.finish_round) and every AllReduce participant (Ray
    workers) take the identical step from the identical reduced numbers.
    """
    if count == 0 or total is None:
        return state, Update(0, count + rejected, False, math.nan, np.zeros(0), env_steps)
    g = agg.combine(rule, total, count, live)
    if not np.all(np.isfinite(g)):
        return state, Update(0, count + rejected, False, math.nan, np.zeros(0), env_steps)
    state, stepped = nigt_step(state, g, alpha, eta)
    return state, Update(count, rejected, stepped, float(np.linalg.norm(g)), returns, env_steps)


class AFedPG:
    """AFedPG (Lan et al. 2025), reconstructed (DESIGN 4): every arriving gradient is applied at
    once with the NIGT momentum step; the sender gets the new extrapolated point back.

    step_schedule: ``constant`` (alpha_k = alpha) or ``delay`` (alpha_k = alpha / sqrt(1 + delay),
    delay = updates made since the gradient's point was handed out).
    """

    def __init__(self, n: int, theta0: np.ndarray, step_size: float, momentum: float,
                 step_schedule: str = "constant"):
        if step_schedule not in ("constant", "delay"):
            raise ValueError(f"unknown step schedule {step_schedule!r}")
        self.n = n
        self.alpha, self.eta, self.schedule = step_size, momentum, step_schedule
        self.state = NIGTState.initial(theta0)
        self.version = 0  # updates applied

    @property
    def theta(self) -> np.ndarray:
        return self.state.theta

    def current_point(self) -> tuple[int, np.ndarray]:
        """(version, point) to hand to a worker that is ready for new work."""
        return self.version, extrapolated_point(self.state, self.eta)

    def apply(self, batch: WorkerBatch, point_version: int) -> Update:
        """Apply one worker's gradient computed at the point of ``point_version``."""
        if batch.count == 0 or not np.all(np.isfinite(batch.grad_sum)):
            update = _reject([batch])
        else:
            g = batch.grad_sum / batch.count
            delay = self.version - point_version
            alpha = self.alpha if self.schedule == "constant" else self.alpha / math.sqrt(1.0 + delay)
            self.state, stepped = nigt_step(self.state, g, alpha, self.eta)
            update = Update(batch.count, batch.rejected, stepped, float(np.linalg.norm(g)),
                            batch.returns, batch.env_steps)
        self.version += 1
        return update


def make_algorithm(name: str, n: int, theta0: np.ndarray, step_size: float, momentum: float,
                   batch_size: int, init_batch_size: int | None = None,
                   step_schedule: str = "constant"):
    """Build a protocol from its config name (rennala_nigt | malenia_nigt | sync_nigt | afedpg)."""
    if name == "afedpg":
        return AFedPG(n, theta0, step_size, momentum, step_schedule)
    rule = {"rennala_nigt": "rennala", "malenia_nigt": "malenia", "sync_nigt": "sync"}[name]
    return RoundAlgorithm(rule, n, theta0, step_size, momentum, batch_size, init_batch_size)
