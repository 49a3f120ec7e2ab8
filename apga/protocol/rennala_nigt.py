"""Rennala NIGT (homogeneous workers): NIGT whose gradients come from Rennala rounds.

A round: every worker gets the extrapolated point theta~_t and computes gradients there, one
after another, keeping a local sum g_i and count b_i. The round stops at the first moment

    sum_i b_i >= M

(gradients finishing at that instant count too; the rest is cancelled). One reduction of the
sums (server upload of each non-empty g_i, or one AllReduce) gives the plain mean of all
gradients,

    g = (sum_i g_i) / (sum_i b_i),

and NIGT steps with it (apga/protocol/nigt.py). Fast workers contribute more gradients, which
is what makes the round short; the mean is unbiased because every worker samples the same MDP.
"""
from __future__ import annotations

from typing import Sequence

from apga.protocol.base import RoundProtocol
from apga.protocol.nigt import NIGTUpdate


def rennala_stop(counts: Sequence[int], batch: int) -> bool:
    """Rennala's stop rule: sum_i b_i >= M."""
    return sum(counts) >= batch


class RennalaNIGT(NIGTUpdate, RoundProtocol):
    """Sum of counts reaches M; the aggregate is the mean of all the round's gradients (the
    defaults of RoundProtocol: each worker contributes its sum, divided by sum_i b_i)."""

    def round_done(self, counts: Sequence[int]) -> bool:
        return rennala_stop(counts, self.round_batch())
