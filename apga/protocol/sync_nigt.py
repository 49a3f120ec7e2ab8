"""Synchronous NIGT (baseline): every worker computes ceil(M/n) gradients at the extrapolated
point theta~_t, the round waits for the slowest, one reduction (server or AllReduce) gives the
mean of all n ceil(M/n) gradients, and NIGT steps with it (apga/protocol/nigt.py).

A worker that met its quota stops computing (and, with server aggregation, uploads at once);
the round's length is therefore max_i ceil(M/n) h_i, set by the slowest worker.
"""
from __future__ import annotations

from typing import Sequence

from apga.protocol.base import RoundProtocol
from apga.protocol.nigt import NIGTUpdate


def sync_quota(n: int, batch: int) -> int:
    """Every worker computes ceil(M/n) gradients."""
    return -(-batch // n)


def sync_stop(counts: Sequence[int], batch: int) -> bool:
    quota = sync_quota(len(counts), batch)
    return all(b >= quota for b in counts)


class SyncNIGT(NIGTUpdate, RoundProtocol):

    def quota(self, worker: int) -> int:
        return sync_quota(self.n, self.round_batch())

    def round_done(self, counts: Sequence[int]) -> bool:
        return sync_stop(counts, self.round_batch())
