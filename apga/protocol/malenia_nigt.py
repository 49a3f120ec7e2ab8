"""Malenia NIGT (heterogeneous workers: worker i has its own MDP, the goal is the average
J = (1/n) sum_i J_i): NIGT whose gradients come from Malenia rounds.

A round: every worker gets the extrapolated point theta~_t and computes gradients there,
keeping a local sum g_i and count b_i. The round stops at the first moment when every worker has
at least one gradient and the harmonic mean of the counts reaches M/n:

    min_i b_i >= 1   and   (1/n sum_i 1/b_i)^-1 >= M/n,

(gradients finishing at that instant count too; the rest is cancelled). Each worker then sends
its own mean g_i / b_i (server upload or one AllReduce) and the aggregate averages them,

    g = (1/n) sum_i g_i / b_i,

which is unbiased for the average gradient (1/n) sum_i grad J_i however different the speeds
are: a fast worker's many gradients do not outweigh a slow worker's few. NIGT steps with g.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from apga.oracle.base import WorkerBatch
from apga.protocol.base import Reduction, RoundProtocol
from apga.protocol.nigt import NIGTUpdate

# The harmonic-mean test is evaluated in floating point; this relative slack makes the exact
# boundary case (harmonic mean == M/n) count as reached despite rounding in sum(1/b_i).
MALENIA_RTOL = 1e-12


def malenia_stop(counts: Sequence[int], batch: int) -> bool:
    """Malenia's stop rule: every b_i >= 1 and M sum_i 1/b_i <= n^2."""
    n = len(counts)
    if n == 0 or min(counts) < 1:
        return False
    return batch * math.fsum(1.0 / b for b in counts) <= n * n * (1.0 + MALENIA_RTOL)


class MaleniaNIGT(NIGTUpdate, RoundProtocol):

    def round_done(self, counts: Sequence[int]) -> bool:
        return malenia_stop(counts, self.round_batch())

    def contribution(self, batch: WorkerBatch) -> np.ndarray:
        return batch.grad_sum / batch.count  # the worker's own mean g_i / b_i

    def combine(self, reduction: Reduction) -> np.ndarray:
        # Workers whose every gradient was non-finite sent nothing: average over the others.
        return reduction.total / reduction.live
