"""Rennala PG (the paper's Table 1, second row): Rennala rounds (apga/protocol/rennala_nigt.py:
all workers compute at theta_t until sum_i b_i >= M, one reduction gives the mean g of all the
round's gradients) with plain minibatch gradient ascent theta <- theta + alpha g
(apga/protocol/pg.py): no normalisation, no momentum, no extrapolation.
"""
from __future__ import annotations

from typing import Sequence

from apga.protocol.base import RoundProtocol
from apga.protocol.pg import PGUpdate
from apga.protocol.rennala_nigt import rennala_stop


class RennalaPG(PGUpdate, RoundProtocol):

    def round_done(self, counts: Sequence[int]) -> bool:
        return rennala_stop(counts, self.round_batch())
