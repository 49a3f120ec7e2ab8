"""Synchronous PG (the paper's Table 1, first row): the synchronous aggregator of
apga/protocol/sync_nigt.py (every worker computes ceil(M/n) gradients at theta_t, the round
waits for the slowest, one reduction gives their mean g) with plain minibatch gradient ascent
theta <- theta + alpha g (apga/protocol/pg.py): no normalisation, no momentum.
"""
from __future__ import annotations

from typing import Sequence

from apga.protocol.base import RoundProtocol
from apga.protocol.pg import PGUpdate
from apga.protocol.sync_nigt import sync_quota, sync_stop


class SyncPG(PGUpdate, RoundProtocol):

    def quota(self, worker: int) -> int:
        return sync_quota(self.n, self.round_batch())

    def round_done(self, counts: Sequence[int]) -> bool:
        return sync_stop(counts, self.round_batch())
