"""The protocol interface: everything a method decides, from counts and versions alone.

A *protocol* is one asynchronous method (Rennala NIGT, AFedPG, a user's own class). It never sees
a clock, a process or torch: a runtime (the event-heap simulator, or Ray) reports which workers
finished gradients and hands over per-worker sums; the protocol answers. Both runtimes drive any
protocol through this interface and never name a method. See docs/algorithms.md.

A protocol belongs to one of two *schedule families* (class attribute ``schedule``):

``"rounds"`` (:class:`RoundProtocol`: Rennala, Malenia, synchronous)
    An update is a round. Every worker receives the round's point (``round_point``) and computes
    gradients there, one after another, up to its ``quota`` for the round. Finished gradients
    are offered to a :class:`RoundTally` in finishing order; the round stops at the first moment
    ``round_done(counts)`` holds, and gradients finishing at that very instant count too (the
    consumption rule, the same in both runtimes). Work still in flight is cancelled (or finishes
    and is discarded). One reduction follows: every worker with b_i > 0 sends
    ``contribution(batch)``; the sum of the contributions goes to ``finish_reduction``, which
    takes the step. With ``supports_allreduce`` the reduction may be one AllReduce among the
    workers, each of which then runs ``finish_reduction`` on its own copy of the protocol.

``"per_gradient"`` (:class:`PerGradientProtocol`: AFedPG)
    Every worker always computes one gradient at the point it was last given
    (``current_point``); each gradient is uploaded on its own and applied at once on arrival
    (``apply(batch, version)``, the version telling how stale it is), and only the sender gets
    the new point back. No reduction, no AllReduce.

A protocol object is plain data (numbers, arrays, small dataclasses): a checkpoint stores it and
an AllReduce worker holds a copy of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from apga.oracle.base import WorkerBatch


@dataclass
class Update:
    """What one model update did (for logging)."""

    used: int  # gradients aggregated (accepted, finite)
    rejected: int  # gradients dropped as non-finite (per trajectory or whole aggregate)
    stepped: bool  # False if the update was rejected or the step was skipped (zero direction)
    grad_norm: float  # norm of the aggregated gradient (nan if rejected)
    returns: np.ndarray  # undiscounted returns of the aggregated trajectories
    env_steps: int


@dataclass
class Reduction:
    """The numbers one round's reduction produces: ``total`` = sum of the contributing workers'
    ``contribution`` vectors (None if nobody contributed), ``count`` = sum_i b_i of accepted
    gradients, ``live`` = workers with b_i > 0; the rest is bookkeeping for the log."""

    total: np.ndarray | None
    count: int
    live: int
    rejected: int = 0
    returns: np.ndarray = field(default_factory=lambda: np.zeros(0))
    env_steps: int = 0


def rejected_update(reduction: Reduction) -> Update:
    """A round whose aggregate cannot be used (no finite gradient): nothing moves."""
    return Update(0, reduction.count + reduction.rejected, False, math.nan, np.zeros(0), reduction.env_steps)


class Protocol:
    """Base of every method. Subclass :class:`RoundProtocol` or :class:`PerGradientProtocol`.

    Construction: ``Cls(n, theta0, step_size=..., momentum=..., batch_size=..., init_batch_size=...,
    step_schedule=..., **options)``, the hyper-parameters of the ``algorithm`` config section;
    ``options`` are the class's own (``algorithm.options``), declared in ``OPTIONS`` as
    ``{name: default}`` and checked by :meth:`check_options` before anything is built.
    """

    schedule: ClassVar[str] = ""
    supports_allreduce: ClassVar[bool] = False
    OPTIONS: ClassVar[dict] = {}

    def __init__(self, n: int, theta0: np.ndarray, step_size: float, momentum: float = 1.0,
                 batch_size: int = 1, init_batch_size: int | None = None, step_schedule: str = "constant",
                 **options):
        assert n >= 1 and step_size > 0 and 0 < momentum <= 1 and batch_size >= 1  # validated by the config
        self.n = n
        self.alpha, self.eta = step_size, momentum
        self.batch_size = batch_size
        self.init_batch_size = init_batch_size or batch_size
        self.step_schedule = step_schedule
        self.options = self.check_options(options)
        self.version = 0  # model updates made so far

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict:
        """Validate ``algorithm.options`` for this class; returns them with defaults filled.
        Raises ValueError whose message names the key (the config turns it into one line)."""
        out = dict(cls.OPTIONS)
        for key, value in (options or {}).items():
            if key not in cls.OPTIONS:
                known = ", ".join(cls.OPTIONS) or "none"
                raise ValueError(f"algorithm.options.{key}: {cls.__name__} has no option {key!r} (its options: {known})")
            default = cls.OPTIONS[key]
            if default is not None and not _same_kind(value, default):
                raise ValueError(f"algorithm.options.{key}: expected {type(default).__name__}, got {value!r}")
            out[key] = value
        return out

    @property
    def theta(self) -> np.ndarray:
        """The current iterate (what evaluation reports)."""
        raise NotImplementedError

    # -- state (checkpoints, AllReduce copies) --------------------------------------------------
    def get_state(self) -> dict:
        """Everything that changes during a run, as plain data."""
        return dict(self.__dict__)

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)


def _same_kind(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


class RoundProtocol(Protocol):
    """Round-based methods: one point per round, a stop rule over counts, one reduction.

    A subclass defines ``round_done`` (the stop rule), and may override ``quota`` (how many
    gradients a worker may compute in a round), ``contribution``/``combine`` (what travels in the
    reduction and how the aggregate is formed from it), ``round_point`` and ``step`` (the update).
    """

    schedule = "rounds"
    supports_allreduce = True

    # -- the round ----------------------------------------------------------------------------
    def round_point(self) -> np.ndarray:
        """The point where this round's gradients are sampled."""
        raise NotImplementedError

    def round_batch(self) -> int:
        """The batch size M of the current round."""
        raise NotImplementedError

    def quota(self, worker: int) -> int | None:
        """How many gradients ``worker`` may compute in this round (None: until the stop)."""
        return None

    def round_done(self, counts: Sequence[int]) -> bool:
        """The stop rule: True at the first moment the counts b_i (gradients finished this round,
        per worker, in finishing order) are enough."""
        raise NotImplementedError

    def can_finish(self, available: Sequence[bool]) -> bool:
        """Could the round stop if only the ``available`` workers computed (each as many
        gradients as it may)? A runtime that lost workers waits for them when this is False."""
        m = self.round_batch()
        return self.round_done([(self.quota(w) or m) if ok else 0 for w, ok in enumerate(available)])

    # -- the reduction -------------------------------------------------------------------------
    def contribution(self, batch: WorkerBatch) -> np.ndarray:
        """What one worker with b_i = batch.count > 0 sends to the reduction (default: its sum)."""
        return batch.grad_sum

    def combine(self, reduction: Reduction) -> np.ndarray:
        """The aggregate gradient from the reduction (default: the mean of all gradients)."""
        return reduction.total / reduction.count

    def step(self, g: np.ndarray) -> bool:
        """Apply the aggregate ``g`` (finite); returns whether the parameters moved."""
        raise NotImplementedError

    def finish_reduction(self, reduction: Reduction) -> Update:
        """End the round with its reduced numbers: aggregate, guard, step. Every AllReduce
        participant calls this on its own copy with the same numbers, so all take the same step."""
        self.version += 1
        if reduction.count == 0 or reduction.total is None:
            return rejected_update(reduction)
        g = self.combine(reduction)
        if not np.all(np.isfinite(g)):
            return rejected_update(reduction)
        stepped = self.step(g)
        return Update(reduction.count, reduction.rejected, stepped, float(np.linalg.norm(g)),
                      reduction.returns, reduction.env_steps)

    def finish_round(self, batches: Mapping[int, WorkerBatch]) -> Update:
        """Server aggregation: reduce the per-worker batches and finish.

        Workers whose every gradient was rejected as non-finite send nothing (they are not
        ``live``); if nobody is left, nothing moves."""
        return self.finish_reduction(reduce_batches(self, batches))

    def round_dispatch(self, worker: int) -> tuple[int, np.ndarray]:
        return self.version, self.round_point()


def reduce_batches(protocol: RoundProtocol, batches: Mapping[int, WorkerBatch]) -> Reduction:
    """The reduction of a round's per-worker batches, as the server forms it. The sum runs in the
    mapping's order, which both runtimes make the order in which each worker's first consumed
    gradient finished (floating-point sums depend on the order; this one is reproducible)."""
    ordered = list(batches.values())
    live = [b for b in ordered if b.count > 0]
    total = np.sum([protocol.contribution(b) for b in live], axis=0) if live else None
    return Reduction(total, sum(b.count for b in live), len(live), rejected=sum(b.rejected for b in ordered),
                     returns=np.concatenate([b.returns for b in ordered]) if ordered else np.zeros(0),
                     env_steps=sum(b.env_steps for b in ordered))


class PerGradientProtocol(Protocol):
    """Per-gradient methods: each arriving gradient is applied alone; only its sender gets the
    new point. A subclass defines ``current_point`` and ``apply``."""

    schedule = "per_gradient"
    supports_allreduce = False

    def current_point(self) -> tuple[int, np.ndarray]:
        """(version, point) to hand to a worker that is ready for new work."""
        raise NotImplementedError

    def apply(self, batch: WorkerBatch, point_version: int) -> Update:
        """Apply one worker's gradient computed at the point handed out at ``point_version``."""
        raise NotImplementedError


class RoundTally:
    """The consumption rule of a round, shared by both runtimes.

    Offer the round's finished gradients in finishing order (time, then worker index, then job);
    the round stops at the first gradient after which ``round_done`` holds, and every gradient
    that finishes at exactly that time is consumed too. ``offer`` says whether a gradient is
    consumed; after the stop, later ones are not.
    """

    def __init__(self, protocol: RoundProtocol):
        self.protocol = protocol
        self.counts = [0] * protocol.n
        self.order: list[int] = []  # workers in the order their first consumed gradient finished
        self.stop: float | None = None  # finish time of the gradient that closed the round

    @property
    def done(self) -> bool:
        return self.stop is not None

    def offer(self, time: float, worker: int) -> bool:
        if self.stop is not None and time != self.stop:
            return False
        if self.counts[worker] == 0:
            self.order.append(worker)
        self.counts[worker] += 1
        if self.stop is None and self.protocol.round_done(self.counts):
            self.stop = time
        return True

    def keeps_working(self, worker: int) -> bool:
        """May ``worker`` start another gradient in this round (before the stop)?"""
        quota = self.protocol.quota(worker)
        return self.stop is None and (quota is None or self.counts[worker] < quota)
