"""What a runtime is to the training loop: the one interface the simulator and Ray share.

A runtime executes a protocol (apga/protocol/base.py) on workers, on a clock: ``step()`` runs
until the next model update and returns its :class:`Event`. The training loop
(apga/run/loop.py) sees only this interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from apga.protocol.base import Protocol, Update


@dataclass
class Totals:
    """Running counters logged with every update."""

    iteration: int = 0  # model updates
    trajectories: int = 0  # gradients used by updates
    trajectories_computed: int = 0  # gradients completed, incl. discarded (cancelled ones excluded)
    env_steps: int = 0
    vector_comms: int = 0  # d-vector transfers; one AllReduce counts as one
    rejected: int = 0  # non-finite gradients dropped


@dataclass
class Event:
    """One model update as a runtime saw it (times on the runtime's clock)."""

    time: float
    update: Update
    round_start: float
    stop: float  # when the last consumed gradient finished (per gradient: arrival at the server)
    counts: list = field(default_factory=list)  # gradients consumed per worker


class Runtime(ABC):
    """``alg`` is the protocol being run, ``totals`` its counters, ``clock`` the runtime's time
    at the last update (simulated seconds, or wall seconds on Ray)."""

    alg: Protocol
    totals: Totals
    clock: float
    # Where a runtime reports what it is doing while no update comes (e.g. Ray's start-up
    # stages); the training loop points it at its progress display. Not run state.
    status: Callable[[str], None] | None = None

    @abstractmethod
    def step(self) -> Event:
        """Run until the next model update, perform it and return it."""

    @abstractmethod
    def attach(self, oracle, times) -> None:
        """(Re)connect the parts that are not run state (oracle, time model), e.g. after a
        checkpoint was loaded."""

    def close(self) -> None:
        """Release processes and connections (the oracle is closed by its owner)."""

    def drain_timings(self) -> list:
        """Measured durations since the last call, as (kind, worker, update, seconds) with kind
        compute | download | upload | allreduce (a real runtime's record; the simulator has none)."""
        return []

    def say(self, message: str) -> None:
        if self.status is not None:
            self.status(message)

    def count(self, update: Update, computed: int = 0) -> None:
        """Add one update to the counters."""
        t = self.totals
        t.iteration += 1
        t.trajectories += update.used
        t.trajectories_computed += computed
        t.env_steps += update.env_steps
        t.rejected += update.rejected
