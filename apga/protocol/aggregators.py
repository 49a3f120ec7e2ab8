"""When a round stops and how its per-worker sums are combined (DESIGN 3 and 4).

Every rule sees only counts b_i (integers), never vectors or times, so the same rule serves the
simulator and Ray. Aggregation sees the per-worker sums g_i (the only vectors that travel).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Malenia's harmonic-mean test is evaluated in floating point; this relative slack makes the exact
# boundary case (harmonic mean == M/n) count as reached despite rounding in sum(1/b_i).
MALENIA_RTOL = 1e-12


def rennala_stop(counts: Sequence[int], batch: int) -> bool:
    """Rennala: stop at the first moment sum_i b_i >= M."""
    return sum(counts) >= batch


def malenia_stop(counts: Sequence[int], batch: int) -> bool:
    """Malenia: every b_i >= 1 and (1/n sum_i 1/b_i)^-1 >= M/n, i.e. M sum_i 1/b_i <= n^2."""
    n = len(counts)
    if n == 0 or min(counts) < 1:
        return False
    return batch * math.fsum(1.0 / b for b in counts) <= n * n * (1.0 + MALENIA_RTOL)


def sync_quota(n: int, batch: int) -> int:
    """Synchronous: every worker computes ceil(M/n) gradients."""
    return -(-batch // n)


def sync_stop(counts: Sequence[int], batch: int) -> bool:
    quota = sync_quota(len(counts), batch)
    return all(b >= quota for b in counts)


def contribution(rule: str, grad_sum: np.ndarray, count: int) -> np.ndarray:
    """What one worker adds to the round's single reduction (server upload or AllReduce):
    its sum g_i (Rennala, sync) or its mean g_i / b_i (Malenia)."""
    return grad_sum / count if rule == "malenia" else grad_sum


def combine(rule: str, total: np.ndarray, count: int, live: int) -> np.ndarray:
    """The aggregate from the reduced contributions: total / sum_i b_i (Rennala, sync) or
    total / (number of contributing workers) (Malenia)."""
    return total / (live if rule == "malenia" else count)


def rennala_aggregate(sums: Sequence[np.ndarray], counts: Sequence[int]) -> np.ndarray:
    """g = (sum_i g_i) / (sum_i b_i): the plain mean of all gradients (biased to fast workers
    when workers' objectives differ)."""
    return combine("rennala", np.sum(sums, axis=0), sum(counts), len(counts))


def malenia_aggregate(sums: Sequence[np.ndarray], counts: Sequence[int]) -> np.ndarray:
    """g = (1/n) sum_i g_i / b_i: unbiased for the average of the workers' gradients."""
    total = np.sum([contribution("malenia", s, b) for s, b in zip(sums, counts)], axis=0)
    return combine("malenia", total, sum(counts), len(counts))
