"""The exact discrete-event simulator: a heap of (finish time, worker, job) on a virtual clock.

It drives any protocol (apga/protocol/base.py) and never names a method: it executes the two
schedule families. Gradient *values* are asked from the oracle only for the jobs an update
consumes: a round's stop rule depends on counts alone, so the event loop first decides which jobs
finish in time, then one batched oracle call computes exactly those (cancelled or discarded jobs
cost only their simulated time).

Timelines (docs/algorithms.md, "The time model"):
- rounds, server aggregation: the new point reaches worker i after comm[i]; at the stop every
  worker with b_i > 0 uploads its contribution (from the moment it stopped computing), the update
  happens when the last upload arrives, and the next round starts then;
- rounds, allreduce: no download (every worker applies the same step itself); one AllReduce after
  the stop;
- per gradient: gradient done -> upload comm[i] -> server step on arrival -> new point after comm[i].

The whole object except oracle and time model is plain data, so its state is the checkpoint
(apga/statefile.py).
"""
from __future__ import annotations

import heapq
from fractions import Fraction

import numpy as np

from apga.errors import ApgaError
from apga.oracle.base import Oracle, WorkerBatch
from apga.protocol.base import RoundTally
from apga.rng import round_sample
from apga.runtime.base import Event, Runtime, Totals
from apga.runtime.timing import TimeModel


class Simulator(Runtime):
    streams = "job"  # class default: checkpoints written before runtime.streams existed

    def __init__(self, algorithm, oracle: Oracle, times: TimeModel, aggregation: str = "server",
                 cancel: bool = True, streams: str = "job"):
        assert aggregation == "server" or algorithm.supports_allreduce  # validated by the config
        self.alg = algorithm
        self.n = algorithm.n
        self.aggregation, self.cancel = aggregation, cancel
        self.streams = streams  # job | round: what keys a round's trajectories (config.runtime.streams)
        self.clock = 0.0
        self.next_job = [0] * self.n  # job counter per worker: keys the random streams
        self.busy_until = [0.0] * self.n  # cancel: false -> a stale job occupies the worker
        self.totals = Totals()
        self.in_flight: list = []  # per gradient: heap of (arrival at server, worker, job, version, point)
        self.computed_ahead: dict = {}  # per gradient: in-flight gradients computed ahead, by (worker, job)
        # Optional record of every job: (version, worker, job, start, finish, status) with status
        # used | cancelled | discarded | unstarted (its download arrived after the stop). Off by default (it grows with the run); tests turn it on.
        self.trace: list | None = None
        self.attach(oracle, times)

    def attach(self, oracle: Oracle, times: TimeModel) -> None:
        """(Re)connect the parts that are not run state, e.g. after loading a checkpoint."""
        self.oracle, self.times = oracle, times

    def __getstate__(self):
        state = self.__dict__.copy()
        state["oracle"] = state["times"] = None
        state.pop("status", None)
        return state

    def _start_job(self, worker: int, start: float) -> tuple[float, int]:
        """Start the worker's next job at ``start``; returns (duration, job index)."""
        job = self.next_job[worker]
        self.next_job[worker] += 1
        if self.trace is not None:
            self._starts[(worker, job)] = start
        return self.times.compute(worker, job, start), job

    def _record(self, version: int, worker: int, job: int, finish: float, status: str) -> None:
        if self.trace is not None:
            self.trace.append((version, worker, job, self._starts.pop((worker, job)), finish, status))

    def enable_trace(self) -> None:
        self.trace, self._starts = [], {}

    def step(self) -> Event:
        """Advance the clock to the next model update and perform it."""
        if self.alg.schedule == "per_gradient":
            return self._gradient_step()
        return self._round_step()

    # --- rounds ------------------------------------------------------------------------------
    def _round_step(self) -> Event:
        alg, n, comm = self.alg, self.n, self.times.comm
        t0, server = self.clock, self.aggregation == "server"
        # A worker's back-to-back jobs finish at begin_i + (d_1 + ... + d_k), the sum taken exactly
        # (as a Fraction) so that k equal durations end at exactly begin_i + k*h_i, as in theory.
        begin = [max(t0 + (comm[i] if server else 0.0), self.busy_until[i]) for i in range(n)]
        first_job = list(self.next_job)  # a worker's jobs of this round are consecutive from here
        elapsed = [Fraction(0)] * n
        heap = []
        for i in range(n):
            duration, job = self._start_job(i, begin[i])
            elapsed[i] += Fraction(duration)
            heap.append((begin[i] + float(elapsed[i]), i, job, begin[i]))
        heapq.heapify(heap)
        tally = RoundTally(alg)
        used = []  # (worker, job) of every gradient this round consumes, in finishing order
        stopped_at = [t0] * n  # when each worker stopped computing for this round
        # Gradients in finishing order; the tally says which are consumed (ties at the stop too).
        while heap and tally.offer(heap[0][0], heap[0][1]):
            finish, i, job, _ = heapq.heappop(heap)
            self._record(alg.version, i, job, finish, "used")
            used.append((i, job))
            stopped_at[i] = finish
            if tally.keeps_working(i):
                duration, job = self._start_job(i, finish)
                elapsed[i] += Fraction(duration)
                heapq.heappush(heap, (begin[i] + float(elapsed[i]), i, job, finish))
        if not tally.done:
            raise ApgaError(f"{type(alg).__name__}: every worker reached its quota but round_done() still "
                            f"says no (counts {tally.counts}): the protocol's round can never stop")
        stop, counts = tally.stop, tally.counts
        # Jobs still in flight were started at this round's point: cancelled at the stop, or
        # (cancel: false) finished later and discarded, occupying their worker until then. A job
        # whose start (the download's arrival) is after the stop never starts at all; one that
        # starts at the very instant of the stop has started (events at one instant are handled
        # in worker order, as in the reference simulator of Tyurin & Richtárik).
        for finish, i, job, start in sorted(heap):
            started = start <= stop
            status = ("cancelled" if self.cancel else "discarded") if started else "unstarted"
            self._record(alg.version, i, job, finish, status)
            if started and not self.cancel:
                self.busy_until[i] = finish
                self.totals.trajectories_computed += 1
        if server:
            # A worker still computing at the stop uploads then; one that met its quota uploads
            # as soon as it is done.
            uploaders = [i for i in range(n) if counts[i]]
            done = max((stopped_at[i] if _met_quota(alg, counts, i) else stop) + comm[i] for i in uploaders)
            self.totals.vector_comms += n + len(uploaders)
        else:
            done = stop + self.times.allreduce
            self.totals.vector_comms += 1
        if self.streams == "round":
            used = [(i, round_sample(alg.version, job - first_job[i])) for i, job in used]
        batches = self.oracle.gradients(alg.round_point(), used)
        update = alg.finish_round(batches)
        self.clock = done
        self.count(update, computed=len(used))
        return Event(done, update, t0, stop, list(counts))

    # --- per gradient ------------------------------------------------------------------------
    def _dispatch(self, worker: int, ready: float) -> None:
        """Hand ``worker`` the current point at time ``ready`` (already downloaded)."""
        version, point = self.alg.current_point()
        duration, job = self._start_job(worker, ready)
        arrival = ready + duration + self.times.comm[worker]
        heapq.heappush(self.in_flight, (arrival, worker, job, version, point))

    def _gradient_step(self) -> Event:
        comm = self.times.comm
        if not self.in_flight and self.totals.iteration == 0:
            for i in range(self.n):
                self._dispatch(i, comm[i])
                self.totals.vector_comms += 1
        arrival, worker, job, version, point = heapq.heappop(self.in_flight)
        self._record(version, worker, job, arrival - comm[worker], "used")
        batch = self._gradient_of(worker, job, point)
        update = self.alg.apply(batch, version)
        self.clock = arrival
        self.totals.vector_comms += 2  # this upload and the download of the new point
        self._dispatch(worker, arrival + comm[worker])
        self.count(update, computed=1)
        return Event(arrival, update, arrival, arrival, [int(i == worker) for i in range(self.n)])

    def _gradient_of(self, worker: int, job: int, point: np.ndarray) -> WorkerBatch:
        """The gradient of job (worker, job) at ``point``, computed in a batch with every other
        in-flight job not computed yet (each at its own point, all already known), in one
        ``gradients_many`` call: a batched rollout, spread over the oracle's processes. Each
        result equals the one-by-one ``gradients(point, [(worker, job)])`` bit for bit; the
        others wait in ``computed_ahead`` (at most one per worker) until their arrival."""
        ready = self.computed_ahead
        if (worker, job) not in ready:
            todo = [(worker, job, point)] + [(w, j, p) for _, w, j, _, p in sorted(self.in_flight, key=lambda e: e[:3])
                                              if (w, j) not in ready]
            results = self.oracle.gradients_many([(p, [(w, j)]) for w, j, p in todo])
            for (w, j, _), res in zip(todo, results):
                ready[(w, j)] = res[w]
        return ready.pop((worker, job))


def _met_quota(protocol, counts, worker: int) -> bool:
    quota = protocol.quota(worker)
    return quota is not None and counts[worker] >= quota
