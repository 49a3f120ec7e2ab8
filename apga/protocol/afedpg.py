"""AFedPG (Lan et al., ICLR 2025), as reconstructed for apga: fully asynchronous NIGT.

Every worker always computes one gradient at the point it was last handed. As soon as it
finishes, it uploads the gradient; the server applies it at once with the NIGT momentum step

    d <- (1 - eta) d + eta g,    theta <- theta + alpha_k d / |d|

and sends the new extrapolated point back to that worker only (one upload and one download of a
d-vector per gradient; no AllReduce). The gradient may have been computed many updates ago: its
delay is the number of updates made since its point was handed out.

Step schedule (``algorithm.step_schedule``): ``constant`` (alpha_k = alpha) or ``delay``
(alpha_k = alpha / sqrt(1 + delay)).
"""
from __future__ import annotations

import math

import numpy as np

from apga.oracle.base import WorkerBatch
from apga.protocol.base import PerGradientProtocol, Update
from apga.protocol.nigt import NIGTState, extrapolated_point, nigt_step


class AFedPG(PerGradientProtocol):

    def __init__(self, n, theta0, step_size, **hyper):
        super().__init__(n, theta0, step_size, **hyper)
        assert self.step_schedule in ("constant", "delay")  # validated by the config
        self.state = NIGTState.initial(theta0)

    @property
    def theta(self) -> np.ndarray:
        return self.state.theta

    def current_point(self) -> tuple[int, np.ndarray]:
        return self.version, extrapolated_point(self.state, self.eta)

    def apply(self, batch: WorkerBatch, point_version: int) -> Update:
        if batch.count == 0 or not np.all(np.isfinite(batch.grad_sum)):
            update = Update(0, batch.count + batch.rejected, False, math.nan, np.zeros(0), batch.env_steps)
        else:
            g = batch.grad_sum / batch.count
            delay = self.version - point_version
            alpha = self.alpha if self.step_schedule == "constant" else self.alpha / math.sqrt(1.0 + delay)
            self.state, stepped = nigt_step(self.state, g, alpha, self.eta)
            update = Update(batch.count, batch.rejected, stepped, float(np.linalg.norm(g)),
                            batch.returns, batch.env_steps)
        self.version += 1
        return update
