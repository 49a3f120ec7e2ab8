"""Plain minibatch policy-gradient ascent, the update of the paper's Table 1 rows "Synchronous
PG" and "Rennala PG": theta <- theta + alpha g. No normalisation, no momentum, no extrapolation;
the round's point is the current iterate. The first round uses M_init, the others M."""
from __future__ import annotations

import numpy as np


class PGUpdate:
    """The plain-gradient half of a round method (mix in before RoundProtocol)."""

    def __init__(self, n, theta0, step_size, **hyper):
        super().__init__(n, theta0, step_size, **hyper)
        self._theta = np.asarray(theta0, dtype=np.float64).copy()

    @property
    def theta(self) -> np.ndarray:
        return self._theta

    def round_batch(self) -> int:
        return self.init_batch_size if self.version == 0 else self.batch_size

    def round_point(self) -> np.ndarray:
        return self._theta

    def step(self, g: np.ndarray) -> bool:
        theta = self._theta + self.alpha * g
        if not np.all(np.isfinite(theta)):
            return False  # a finite g can still overflow theta: keep the last finite iterate
        self._theta = theta
        return True
