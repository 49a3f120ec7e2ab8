"""NIGT in ascent form (docs/algorithms.md, the methods) as small pure functions over flat float64 vectors, and the
mixin that makes any round aggregator a NIGT method.

    theta_1     = theta_0 + alpha d_0/|d_0|,              d_0 = g(theta_0; M_init)
    theta~_t    = theta_t + ((1-eta)/eta) (theta_t - theta_{t-1})
    d_t         = (1-eta) d_{t-1} + eta g(theta~_t; M)
    theta_{t+1} = theta_t + alpha d_t/|d_t|

eta = 1 makes theta~_t = theta_t and d_t = g_t: plain normalised policy gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class NIGTState:
    theta: np.ndarray  # current iterate theta_t (what evaluation reports)
    theta_prev: np.ndarray  # theta_{t-1} (equal to theta before the first step)
    d: np.ndarray | None  # momentum d_{t-1}; None before the first gradient
    t: int = 0  # number of steps taken

    @staticmethod
    def initial(theta0: np.ndarray) -> "NIGTState":
        theta0 = np.asarray(theta0, dtype=np.float64)
        return NIGTState(theta0.copy(), theta0.copy(), None, 0)


def extrapolated_point(state: NIGTState, eta: float) -> np.ndarray:
    """The point theta~_t where the next gradients are sampled (theta_0 before the first step)."""
    if state.d is None or eta == 1.0:
        return state.theta
    return state.theta + ((1.0 - eta) / eta) * (state.theta - state.theta_prev)


def nigt_step(state: NIGTState, g: np.ndarray, alpha: float, eta: float) -> tuple[NIGTState, bool]:
    """One NIGT update with gradient estimate ``g``. Returns (new state, stepped).

    The first gradient initialises d_0 = g. A zero momentum leaves theta unchanged (the step is
    skipped, stepped = False) but the momentum is still updated; a non-finite momentum (the caller
    rejects non-finite ``g``, but d can still overflow) leaves the whole state unchanged.
    """
    d = g.copy() if state.d is None else (1.0 - eta) * state.d + eta * g
    if not np.all(np.isfinite(d)):
        return state, False  # keep the old momentum: a non-finite d would stall every later step
    scale = float(np.max(np.abs(d)))
    if scale == 0.0:
        return replace(state, d=d), False
    norm = scale * float(np.linalg.norm(d / scale))  # scaled so huge finite d cannot overflow
    theta = state.theta + alpha * (d / norm)
    return NIGTState(theta, state.theta, d, state.t + 1), True


class NIGTUpdate:
    """The NIGT half of a round method (mix in before RoundProtocol): the round's point is the
    extrapolated point theta~_t, the step is ``nigt_step``, and the first round uses M_init."""

    def __init__(self, n, theta0, step_size, **hyper):
        super().__init__(n, theta0, step_size, **hyper)
        self.state = NIGTState.initial(theta0)

    @property
    def theta(self) -> np.ndarray:
        return self.state.theta

    def round_batch(self) -> int:
        return self.init_batch_size if self.state.d is None else self.batch_size

    def round_point(self) -> np.ndarray:
        return extrapolated_point(self.state, self.eta)

    def step(self, g: np.ndarray) -> bool:
        self.state, stepped = nigt_step(self.state, g, self.alpha, self.eta)
        return stepped
