"""The Ray runtime: any protocol, with workers as Ray actors on a real clock.

The driver (this object) holds the protocol (apga/protocol/base.py) and asks it everything a
method decides; it never names a method. Worker actors (apga.runtime.ray_worker.WorkerActor)
only compute trajectories and keep their local sums. An actor hosts one worker, or several when
the workers share cores (:func:`host_groups`): then its workers' trajectories are rolled out
together, one wide batch in one process per core instead of many narrow ones competing for it.

Round protocols (schedule "rounds"), one :meth:`step` = one round:

1. server aggregation: the round's point is put in the object store once and every worker gets
   the reference; AllReduce aggregation: nothing is sent, every worker takes the round's point
   from its actor's copy of the protocol;
2. workers compute trajectories at that point (in batches up to their round targets, up to the
   protocol's quota; in real time a worker then waits at its target, see ray_worker), job
   indices continuing their own counters (kept by the driver); the
   traffic is a long poll per actor reporting, for each worker it hosts, the finish times of
   its gradients and its horizon (no earlier finish is still unreported), and in real time with
   server aggregation its sum so far; the driver merges them and applies the protocol's
   consumption rule (``RoundTally``: finishing order, ties at the stop included), the same code
   the simulator runs;
3. once the stop is certain, the workers that compute or may still start a job are halted (the
   trajectory in flight is cancelled within one env step, or finishes and is discarded with
   ``cancel: false``; with AllReduce in real time the AllReduce call itself halts) and the
   round consumes, of each worker, its first b_i gradients;
4. one reduction, while the halts travel: each worker with b_i > 0 contributes its sum (from a
   report, or by an upload call) and the driver calls ``finish_round`` (server), or the actors
   run one gloo AllReduce among themselves (one rank each) and each finishes the round on its
   own protocol copy; the driver takes the same step on its copy from rank 0's reduced numbers
   and checks that every rank holds the same bits (AllReduce). In real time the next round
   begins without waiting for the halts' replies (with injected delays it waits, so that its
   job counters are exact).

Per-gradient protocols (schedule "per_gradient"), one :meth:`step` = one gradient: each worker
always has one job in flight at the point it was handed; the first to arrive is applied at once
and the sender gets the new point back.

Faults: actors restart (``runtime.max_restarts``); a restarted worker rejoins the current round with a
fresh local sum (what it held but had not reduced is lost; nothing already aggregated is). A round
that can stop without it (the protocol's ``can_finish``) goes on; one that cannot waits for it
and fails with ApgaError after ``runtime.worker_timeout`` seconds.

``clock`` = wall seconds since the workers were up (continued across a resume), sampled at each
update. With ``runtime.inject_delays`` every trajectory is padded to the time model's compute
time (and transfers to comm_time / allreduce_time), and the round's consumption is decided on
the time model's nominal finish times, so rounds consume what the simulator's would.
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import ray  # noqa: F401  (missing Ray fails here: build_runtime turns that into a ConfigError)

from apga.errors import ApgaError
from apga.protocol.base import RoundTally, Update
from apga.runtime import link
from apga.runtime.ray_worker import INF, WorkerActor, digest, reduction_of
from apga.runtime.base import Event, Runtime, Totals

log = logging.getLogger(__name__)

POLL = 2.0  # seconds a progress long-poll waits at most before reporting anyway
WAKE = 0.5  # seconds the driver waits at most between checks of lost workers
ACTOR_CONCURRENCY = 8  # call threads per actor (progress, halt, reduce, ... run concurrently)
START_TIMEOUT = 300.0  # seconds for all actors to come up
INLINE_BYTES = 64 * 1024  # points up to this size go inline with the calls (Ray inlines < 100 KiB)
MIXED_POLL = 0.005  # seconds between checks of Ray calls while link calls are waited for too


@dataclass
class RayEvent(Event):
    """An update as the Ray runtime saw it (times in runtime seconds)."""

    restarts: int = 0  # worker restarts seen during this update
    first_jobs: list[int] | None = None  # rounds: each worker's first job index in the round
    worker: int | None = None  # per gradient: the sender


class _Lost(Exception):
    def __init__(self, workers):
        super().__init__(f"lost workers {workers}")
        self.workers = workers


def _first_line(exc) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def apportion(total: int, shares: list[float]) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainders, ties to the lower index)."""
    weight = sum(shares)
    if total <= 0 or weight <= 0:
        return [0] * len(shares)
    exact = [total * s / weight for s in shares]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda w: (-(exact[w] - out[w]), w))
    for w in order[: total - sum(out)]:
        out[w] += 1
    return out


def round_targets(protocol, live: list[bool], last: list[int] | None, cap: int = 1 << 20,
                  base: list[int] | None = None) -> list[int] | None:
    """What the driver expects of each worker in a round: the smallest total that closes the
    round (the protocol's ``round_done``) split among the ``live`` workers in proportion to what
    each contributed to the last round, at least 1 (equally in the first, so a worker that
    contributed nothing gets another chance); with ``base`` (the counts so far), the smallest
    addition to them that closes it. None if no total up to ``cap`` closes it without the other
    workers. Only a hint for the workers' batch sizes (apga.runtime.ray_worker); which gradients
    a round consumes is decided by finish times alone."""
    base = base or [0] * len(live)
    shares = [max(float(c), 1.0) if ok else 0.0 for c, ok in zip(last or [1] * len(live), live)]
    if sum(shares) <= 0:
        return None

    def closes(total: int) -> bool:
        return bool(protocol.round_done([b + a for b, a in zip(base, apportion(total, shares))]))

    high = 1
    while not closes(high):
        if high >= cap:
            return None
        high *= 2
    low = high // 2  # closes(low) is false (or low = 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if closes(mid) else (mid, high)
    return apportion(high, shares)


def host_groups(n: int, cpus: float, share: bool) -> list[list[int]]:
    """The workers each actor hosts: one each, or, with ``share`` (real time) and more workers
    than whole CPUs, one actor per CPU hosting a contiguous block of workers
    (sizes differ by at most one, the larger first)."""
    actors = max(1, int(cpus))
    if not share or n <= actors:
        return [[w] for w in range(n)]
    size, extra = divmod(n, actors)
    groups, w = [], 0
    for a in range(actors):
        k = size + (a < extra)
        groups.append(list(range(w, w + k)))
        w += k
    return groups


def _default_oracle(cfg):
    from apga.oracle.factory import build_oracle
    return build_oracle(cfg)


def _ray():
    from apga.runtime import ray_session
    return ray_session._import_ray()


class RayRuntime(Runtime):
    """``RayRuntime(cfg, algorithm, oracle, times)``: ``oracle`` serves evaluation on the driver;
    every actor builds its own with ``oracle_factory`` (default: from ``cfg`` as the Trainer does).

    Ray starts lazily, at the first :meth:`step` (or :meth:`start`), so building a runtime costs
    nothing and a checkpointed runtime can be loaded and :meth:`attach`-ed without a cluster.
    """

    def __init__(self, cfg, algorithm, oracle, times, oracle_factory=None):
        a = cfg.algorithm
        assert a.aggregation == "server" or algorithm.supports_allreduce  # validated by the config
        self.cfg, self.alg, self.n = cfg, algorithm, algorithm.n
        self.aggregation, self.cancel = a.aggregation, a.cancel
        self.address, self.inject = cfg.runtime.address, cfg.runtime.inject_delays
        self.worker_timeout = float(cfg.runtime.worker_timeout)
        self.clock = 0.0
        self.next_job = [0] * self.n  # job counter per worker: keys the random streams
        self.totals = Totals()
        self.timings: list = []  # measured (kind, worker, update, seconds) not yet logged (timings.csv)
        self.restarts = 0  # worker restarts seen
        self.resyncs = 0  # AllReduce: times the ranks disagreed and were reset to rank 0's state
        self._round_id = -1
        self._last_counts: list[int] | None = None  # the last round's consumed counts (batch hints)
        self.oracle_factory = oracle_factory
        self.attach(oracle, times)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, oracle, times) -> None:
        """(Re)connect the parts that are not run state, e.g. after loading a checkpoint. Ray (re)starts at
        the next step; per-gradient jobs in flight at the checkpoint are not restored."""
        self.oracle, self.times = oracle, times
        if self.oracle_factory is None:
            self.oracle_factory = functools.partial(_default_oracle, self.cfg)
        self._session = None
        self._actors = None  # the actor handles, one per group of hosted workers
        self._links: list = []  # actor -> its direct link (apga.runtime.link), or None: Ray calls
        self._authkey: bytes | None = None  # the links' secret, made at each start
        self._host_of: list[int] = []  # worker -> index of the actor that hosts it
        self._groups: list[list[int]] = []  # actor -> the workers it hosts
        self._alive: set[int] = set()
        self._gone: set[int] = set()  # dead for good (restarts exhausted)
        self._dead_since: dict[int, float] = {}
        self._calls: dict = {}  # ObjectRef -> (kind, worker, extra)
        self._ready_at: dict = {}  # worker -> when its last gathered result arrived
        self._group: list[int] | None = None
        self._epoch = -1
        self._origin = 0.0
        self.worker_info: list[dict] = []

    def __getstate__(self):
        """Plain data only (protocol, counters, clock): no Ray handles, no oracle. A custom
        oracle_factory is dropped (attach restores the default one built from the config)."""
        state = self.__dict__.copy()
        for key in ("oracle", "times", "_session", "_actors"):
            state[key] = None
        state["_links"], state["_authkey"] = [], None  # a run's secret never goes into a checkpoint
        state.pop("status", None)
        state["_calls"] = {}
        if not isinstance(self.oracle_factory, functools.partial):
            state["oracle_factory"] = None
        return state

    def start(self) -> None:
        """Start or join Ray and bring the worker actors up (idempotent)."""
        if self._actors is not None:
            return
        from apga.runtime import ray_session
        ray = _ray()
        t0 = time.monotonic()
        if not ray.is_initialized():
            self.say(f"ray: joining the cluster at {self.address}" if self.address else
                     "ray: starting a local Ray instance (loopback only, private temp dir)")
        self._session = ray_session.open_session(self.address)
        if self._session is not None:
            atexit.register(self._session.close)
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            # Workers that share cores share actors (real time: their trajectories roll out as
            # one batch). In real time every worker waits at its round's target; one with a core
            # of its own goes on past it after a while if the round is still open (ray_worker).
            shared = self.n > cpus
            self._groups = host_groups(self.n, cpus, not self.inject)
            self._host_of = [a for a, group in enumerate(self._groups) for _ in group]
            per_actor = math.floor(min(1.0, cpus / len(self._groups)) * 1e4) / 1e4  # Ray's resource granularity
            # A fresh secret per start: only this driver can open the actors' links. The links'
            # messages are not encrypted: where Ray's TLS is on, every call stays on Ray.
            tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
            authkey = os.urandom(32) if self.cfg.runtime.direct_calls and not tls else None
            spec = {"n": self.n, "times": self.times, "inject": self.inject, "cancel": self.cancel,
                    "oracle_factory": self.oracle_factory, "batch": self.cfg.policy.rollout_batch,
                    "release": not shared, "aggregation": self.aggregation, "authkey": authkey,
                    "link_threads": ACTOR_CONCURRENCY * max(map(len, self._groups))}
            if self._session is not None:
                self.say(f"ray: up in {time.monotonic() - t0:.1f} s ({cpus:g} CPUs)")
            actors = len(self._groups)
            self.say(f"ray: starting {actors} worker actors" + (f" for {self.n} workers" if actors < self.n else ""))
            actor_cls = ray.remote(WorkerActor)
            self._actors = [
                actor_cls.options(num_cpus=per_actor, max_restarts=self.cfg.runtime.max_restarts, max_task_retries=0,
                                  max_concurrency=ACTOR_CONCURRENCY * len(group),
                                  scheduling_strategy="SPREAD").remote(group, spec)
                for group in self._groups
            ]
            try:
                self.worker_info = ray.get([self._host(w).info.remote(w) for w in range(self.n)],
                                           timeout=START_TIMEOUT)
            except ray.exceptions.GetTimeoutError:
                raise ApgaError(f"runtime: the {actors} worker actors did not start within {START_TIMEOUT:.0f} s; "
                                "check `ray status` (CPUs, memory) and that apga is installed on every node") from None
            except ray.exceptions.RayActorError as exc:
                raise ApgaError(f"runtime: a worker actor failed to start: {str(exc).splitlines()[0]}") from None
            self._authkey = authkey
            self._links = [None] * actors
            for a, group in enumerate(self._groups):
                self._connect(a, self.worker_info[group[0]])
            self._alive = set(range(self.n))
            # what each worker's reports have brought so far, per actor incarnation
            self._incarnation: list[str | None] = [None] * self.n
            self._completed_seen, self._timings_seen = [0] * self.n, [0] * self.n
            if self.aggregation == "allreduce":
                ray.get([a.set_protocol.remote(self.alg) for a in self._actors])
            self._origin = time.time() - self.clock
            nodes = len({info["node_id"] for info in self.worker_info})
            self.say(f"ray: {actors} actors up on {nodes} node(s) after {time.monotonic() - t0:.1f} s; "
                     "first round running")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the worker actors; shut down (and delete) the Ray instance if this runtime started it."""
        actors, self._actors = self._actors, None
        self._calls = {}
        links, self._links = self._links, []
        for ln in links:
            if ln is not None:
                ln.close()
        if actors:
            ray = _ray()
            for a in actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # already gone
                    pass
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            finally:
                atexit.unregister(session.close)

    def _host(self, w: int):
        """The handle of the actor that hosts worker ``w`` (calls about ``w`` take it first)."""
        return self._actors[self._host_of[w]]

    def _connect(self, a: int, info: dict) -> None:
        """Open (or reopen, for a new incarnation) actor ``a``'s direct link; without one (the
        link is off, or cannot connect, e.g. a firewall between nodes) its calls go through Ray."""
        old = self._links[a]
        if info.get("link") is None or (old is not None and not old.lost and old.incarnation == info["incarnation"]):
            return
        if old is not None:
            old.close()
        try:
            self._links[a] = link.Link(info["link"], self._authkey, incarnation=info["incarnation"])
        except OSError as exc:
            self._links[a] = None
            log.warning("no direct link to the actor of workers %s at %s (%s): its calls go through Ray",
                        self._groups[a], info["link"], exc)

    def _send(self, a: int, method: str, *args, reply: bool = True):
        """Call ``method`` of actor ``a``: over its link if it has one, else as a Ray call. The
        handle it returns (a link Call or a Ray ref) is what :meth:`_wait` / :meth:`_gather` take.
        ``reply=False``: nobody waits for the answer, so the link sends none."""
        ln = self._links[a]
        if ln is not None:
            return ln.call(method, *args, reply=reply)
        return getattr(self._actors[a], method).remote(*args)

    def _first_ready(self, handles: list, timeout: float):
        """The first of ``handles`` (link calls and Ray refs) to finish within ``timeout``, or None."""
        ray = _ray()
        calls = [h for h in handles if isinstance(h, link.Call)]
        refs = [h for h in handles if not isinstance(h, link.Call)]
        if not calls:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            return ready[0] if ready else None
        if not refs:
            done = link.wait(calls, timeout)
            return done[0] if done else None
        deadline = time.monotonic() + timeout
        while True:  # both kinds (a restarted actor's probe while a round runs): alternate
            done = link.wait(calls, min(MIXED_POLL, max(0.0, deadline - time.monotonic())))
            if done:
                return done[0]
            ready, _ = ray.wait(refs, num_returns=1, timeout=0)
            if ready:
                return ready[0]
            if time.monotonic() >= deadline:
                return None

    @staticmethod
    def _result(handle):
        return handle.result() if isinstance(handle, link.Call) else _ray().get(handle)

    def _tally_reported(self, w: int, out: dict, version: int) -> None:
        """Take a report's running totals (completed trajectories, timing rows) into the run's:
        only what no earlier reply brought, whatever order replies arrive in. Totals count from
        0 in every actor incarnation (a restart: a new token)."""
        if out["incarnation"] != self._incarnation[w]:
            self._incarnation[w], self._completed_seen[w], self._timings_seen[w] = out["incarnation"], 0, 0
        done, (base, rows) = out["completed"], out["timings"]
        self.totals.trajectories_computed += max(0, done - self._completed_seen[w])
        self._completed_seen[w] = max(self._completed_seen[w], done)
        self._measured(w, rows[max(0, self._timings_seen[w] - base):], version)
        self._timings_seen[w] = max(self._timings_seen[w], base + len(rows))

    def _seen(self, workers) -> dict:
        """What the driver has of each worker's timing rows, for the actor to drop: (incarnation, rows)."""
        return {w: (self._incarnation[w], self._timings_seen[w]) for w in workers}

    def _measured(self, w: int, timings, version: int | None = None) -> None:
        version = self.alg.version if version is None else version
        self.timings.extend((kind, w, version, seconds) for kind, seconds in timings)

    def drain_timings(self) -> list:
        out, self.timings = self.timings, []
        return out

    def worker_pids(self) -> list[int]:
        """Current process id of every live worker actor (for fault-injection tests)."""
        ray = _ray()
        return [ray.get(self._host(w).info.remote(w))["pid"] if w in self._alive else None for w in range(self.n)]

    def _now(self) -> float:
        return time.time() - self._origin

    # ------------------------------------------------------------------ stepping
    def step(self) -> RayEvent:
        """Run until the next model update and perform it."""
        self.start()
        if self.alg.schedule == "per_gradient":
            return self._gradient_step()
        return self._round_step()

    # --- calls and faults ------------------------------------------------------------------
    def _call(self, kind: str, w: int | None, ref, extra=None) -> None:
        """Track a call about worker ``w``, or about all the workers of actor ``extra`` (w None)."""
        self._calls[ref] = (kind, w, extra)

    def _wait(self, timeout: float = WAKE, kinds: tuple | None = None):
        """Next finished call (of the given kinds): (kind, w, extra, result, error) or None after
        ``timeout``. ``error`` is set when the actor died (RayActorError)."""
        ray = _ray()
        refs = [ref for ref, c in self._calls.items() if kinds is None or c[0] in kinds]
        if not refs:
            time.sleep(timeout)
            return None
        ref = self._first_ready(refs, timeout)
        if ref is None:
            return None
        kind, w, extra = self._calls.pop(ref)
        try:
            return kind, w, extra, self._result(ref), None
        except (ray.exceptions.RayActorError, link.LinkLost) as exc:
            self._lost(w if w is not None else self._groups[extra][0], kind, exc)
            return kind, w, extra, None, exc
        except (ray.exceptions.RayTaskError, link.RemoteError) as exc:
            who = f"worker {w}" if w is not None else f"the actor of workers {self._groups[extra]}"
            raise ApgaError(f"{who} failed in {kind}: {_first_line(exc)}") from exc

    def _lost(self, w: int, kind: str, exc) -> None:
        """A call about worker w failed because its actor died: every worker that actor hosts is
        lost. Mark them lost and probe each: a probe (an ``info`` call) is served once Ray has
        restarted the actor, or fails for good."""
        ray = _ray()
        if kind == "ready" and isinstance(exc, ray.exceptions.ActorDiedError):
            self._gone.add(w)
            log.warning("worker %d is dead for good (restarts exhausted or node gone)", w)
            return
        if kind == "ready":
            # Only the probe failed: sent before Ray knew of the death (a link sees it first),
            # it met the dead process. Probe again; the actor's other workers may be back already.
            if w not in self._alive and w not in self._gone:
                self._call("ready", w, self._host(w).info.remote(w))
            return
        actor = self._host_of[w]
        for v in self._groups[actor]:
            if v in self._alive:
                log.warning("worker %d lost (%s); waiting for its restart", v, type(exc).__name__)
                self._alive.discard(v)
                self._dead_since[v] = time.monotonic()
                self._group = None  # the process group must be rebuilt
            if v not in self._gone and not any(k == "ready" and u == v for k, u, _ in self._calls.values()):
                self._call("ready", v, self._host(v).info.remote(v))
        for ref, (k, v, a) in list(self._calls.items()):  # its calls, but the probes just made
            if k != "ready" and (v in self._groups[actor] or (v is None and a == actor)):
                del self._calls[ref]

    def _back(self, w: int, info: dict) -> None:
        self._alive.add(w)
        self._dead_since.pop(w, None)
        self._group = None
        self.restarts += 1
        if len(self.worker_info) == self.n:
            self.worker_info[w] = info
        self._connect(self._host_of[w], info)
        if self.aggregation == "allreduce":
            _ray().get(self._host(w).set_protocol.remote(self.alg))
            self.totals.vector_comms += 1

    def _check_needed(self, needed_fn) -> None:
        """Fail if a worker the update cannot do without is gone, or lost for longer than the timeout."""
        if not self._dead_since and not self._gone and self._alive:
            return
        if needed_fn():
            return
        now = time.monotonic()
        missing = sorted(set(range(self.n)) - self._alive)
        gone = [w for w in missing if w in self._gone]
        if gone:
            raise ApgaError(f"runtime: worker(s) {gone} died and cannot restart (runtime.max_restarts={self.cfg.runtime.max_restarts}); "
                            f"{self.cfg.algorithm.name} cannot continue without them")
        late = [w for w in missing if now - self._dead_since.get(w, now) > self.worker_timeout]
        if late:
            raise ApgaError(f"runtime: worker(s) {late} did not come back within runtime.worker_timeout="
                            f"{self.worker_timeout:g} s and {self.cfg.algorithm.name} cannot continue without them")

    # --- rounds ----------------------------------------------------------------------------
    def _round_step(self) -> RayEvent:
        ray = _ray()
        alg, n = self.alg, self.n
        server = self.aggregation == "server"
        self._round_id += 1
        r = self._round_id
        point = alg.round_point()
        point_digest = digest(point)
        point_ref = None  # a large point in the object store, put once (for Ray calls only)

        def point_for(a: int):
            """The point as actor ``a``'s begin carries it: None with AllReduce (every worker takes
            it from its actor's protocol copy); by value over a link or when small; else one
            object-store reference for the round (the actor resolves it)."""
            nonlocal point_ref
            if not server:
                return None
            if point.nbytes <= INLINE_BYTES or self._links[a] is not None:
                return point
            if point_ref is None:
                point_ref = ray.put(point)
            return point_ref
        quotas = [alg.quota(w) for w in range(n)]
        last = getattr(self, "_last_counts", None)
        # Expect the lost workers back if the round cannot close without them (a late begin
        # brings a restarted worker its share).
        targets = (round_targets(alg, [w in self._alive for w in range(n)], last)
                   or round_targets(alg, [True] * n, last) or [0] * n)
        # runtime.streams: round keys trajectories by (update, index in round), as the simulator
        sample_round = alg.version if self.cfg.runtime.streams == "round" else None
        version = alg.version  # the update the round's measured rows belong to
        t_start, restarts0, round_wall = self._now(), self.restarts, time.time()
        finishes: list[list[float]] = [[] for _ in range(n)]  # reported finish times, job order
        horizon = [-INF] * n  # every finish before it is reported (per worker)
        stamps = [-1] * n  # the newest report seen per worker
        waiting = [False] * n  # the newest report says: holding at its target, nothing in flight
        busy = [True] * n  # the newest report says: computing or a job in flight
        first_jobs = list(self.next_job)  # each worker's first job index in the round (its reports)
        uploads: dict[int, tuple] = {}  # worker -> (sum of its gradients so far, point digest) sent eagerly
        self._calls = {ref: c for ref, c in self._calls.items() if c[0] == "ready"}

        def poll(a: int, kind: str = "progress", begins: list[tuple] | None = None) -> None:
            """Poll actor ``a`` about its live workers; with ``begins``, begin their round first
            (one call)."""
            timeout = POLL if kind == "progress" else 0.0  # "report": answer at once
            fresh = {b[0] for b in begins or ()}
            # The first poll of a round: in real time, wait for the first news (a finished batch:
            # the begin itself says nothing); with injected delays answer at once, since the
            # worker's horizon (the nominal finish of its job in flight) lets the round stop.
            since = {w: None if w in fresh and not self.inject else stamps[w]
                     for w in self._groups[a] if w in self._alive}
            seen = self._seen(since)
            if begins:
                ref = self._send(a, "begin_all", begins, since, timeout, seen)
            elif since:
                ref = self._send(a, "progress", r, since, timeout, seen)
            else:
                return
            self._call(kind, None, ref, a)

        def begin(workers: list[int], late: bool = False) -> None:
            """Begin the round on ``workers``: one call per actor, so that the workers it hosts
            start together (their first jobs form one rollout)."""
            by_actor: dict[int, list[tuple]] = {}
            for w in workers:
                finishes[w], horizon[w], stamps[w], waiting[w], busy[w] = [], -INF, -1, False, True
                uploads.pop(w, None)
                by_actor.setdefault(self._host_of[w], []).append(
                    (w, r, point_for(self._host_of[w]), self.next_job[w], quotas[w], self._origin, self.cancel, sample_round,
                     round_wall, late, targets[w]))
                if server:
                    self.totals.vector_comms += 1  # the download of the point
            for a, begins in by_actor.items():
                poll(a, begins=begins)

        def decide() -> tuple[RoundTally, float]:
            """The consumption rule over every finish that is certain (before all horizons)."""
            live = sorted(self._alive)
            h = min((horizon[w] for w in live), default=INF)
            tally = RoundTally(alg)
            for t, w in sorted((t, w) for w in live for t in finishes[w] if t < h):
                if not tally.offer(t, w):
                    break
            return tally, h

        def handle(item) -> None:
            kind, w, a, out, err = item
            if err is not None:
                for v in [w] if w is not None else self._groups[a]:
                    finishes[v] = []  # lost with its actor
                return
            if kind == "ready":
                self._back(w, out)
                begin([w], late=True)
                return
            if kind not in ("progress", "report", "halt"):
                return
            again = False
            for v, report in out.items():
                again |= take(v, report) and kind == "progress"
            if again:
                repoll.add(a)  # once the round is known not to stop on this news (see below)

        def take(w: int, out: dict) -> bool:
            """One worker's report; True if its actor should stay polled for it."""
            self.next_job[w] = max(self.next_job[w], out["next_job"])
            self._tally_reported(w, out, version)
            if out["round"] < r:
                return True  # answered before the round's begin reached the worker: ask again
            if out["round"] != r or w not in self._alive:
                return False
            first_jobs[w] = out["first_job"]
            sent = out.get("upload")
            if sent is not None and (w not in uploads or sent[0].trajectories > uploads[w][0].trajectories):
                uploads[w] = sent  # a later sum holds more gradients (replies may overtake each other)
            if out["stamp"] > stamps[w]:
                finishes[w], horizon[w], stamps[w] = out["finishes"], out["horizon"], out["stamp"]
                waiting[w], busy[w] = out.get("waiting", False), out["busy"]
            elif out["stamp"] == stamps[w]:
                horizon[w] = max(horizon[w], out["horizon"])
            # Keep one long poll on an actor with a worker whose newest known state is busy or
            # waiting (so that its death is noticed); never a second one.
            return busy[w] or waiting[w]

        def keep_polling(a: int) -> None:
            if not any(k == "progress" and v is None and x == a for k, v, x in self._calls.values()):
                poll(a)

        def ask_laggards(h: float) -> None:
            """Without injected delays horizons are wall times: a worker busy with a long
            trajectory reports nothing, so ask the actors of those that hold back a finish
            already known."""
            pending = [t for w in self._alive for t in finishes[w] if t >= h]
            if self.inject or not pending:
                return
            asked = {x for k, v, x in self._calls.values() if k == "report"}
            for a in sorted({self._host_of[w] for w in self._alive if horizon[w] <= min(pending)} - asked):
                poll(a, "report")

        def extend(tally: RoundTally) -> None:
            """No live worker computes, some wait at their targets, and the round still needs
            gradients (a worker was lost, or a share came out short): raise the waiting workers'
            targets by what closes the round."""
            live = sorted(self._alive)
            if any(busy[w] for w in live) or not any(waiting[w] for w in live):
                return
            reported = [len(finishes[w]) if w in self._alive else 0 for w in range(n)]
            if alg.round_done(reported):
                return  # enough is reported: the horizons will settle which (ask_laggards)
            extra = round_targets(alg, [w in self._alive and waiting[w] for w in range(n)], None,
                                  base=reported)
            if extra is None:  # it cannot close without a lost worker: wait for its restart
                return
            now = time.time() - round_wall
            for w in live:
                if waiting[w] and extra[w] > 0:
                    self._send(self._host_of[w], "extend", w, r, extra[w], reply=False)
                    # its next finishes come after this moment; nothing earlier is unreported, and
                    # a report from before the extension (its stamp) must not raise the horizon;
                    # the long poll it has answers with the extension
                    horizon[w], waiting[w], busy[w] = now, False, True
                    stamps[w] += 0.5
                    keep_polling(self._host_of[w])

        def resume() -> None:
            """After a worker was lost while stopping: the others continue the same round."""
            for w in sorted(self._alive):
                self._send(self._host_of[w], "resume", w, r, reply=False)
                horizon[w], busy[w], waiting[w] = -INF, True, False
            for a in sorted({self._host_of[w] for w in self._alive}):
                keep_polling(a)

        def take_halts() -> None:
            while any(k == "halt" for k, _, _ in self._calls.values()):
                item = self._wait(POLL + 1.0, kinds=("halt",))
                if item is not None:
                    handle(item)

        repoll: set[int] = set()  # actors whose long poll answered and should stay polled
        begin(sorted(self._alive))
        failures = 0
        while True:
            # -- computing: finish times only ----------------------------------------------
            while True:
                tally, h = decide()
                if tally.done:
                    break
                # Poll again only now: a poll renewed on the news that stops the round would be
                # dropped at once, a call and a reply for nothing on the round's critical path.
                for a in sorted(repoll):
                    keep_polling(a)
                repoll.clear()
                self._check_needed(lambda: alg.can_finish([w in self._alive for w in range(n)]))
                extend(tally)
                ask_laggards(h)
                item = self._wait()
                if item is not None:
                    handle(item)
            t_stop = self._now()
            # -- stop: halt the computing workers (restarted workers rejoin next round) ---
            halts: dict[int, list[int]] = {}
            for w in sorted(self._alive) if server or self.inject else ():  # else the AllReduce call halts
                # A waiting worker has nothing in flight, and starts nothing unless it may go on
                # past its target after a while (a finite horizon): halted, it stays idle while
                # the driver is busy between rounds (evaluation, checkpoints).
                if not waiting[w] or horizon[w] < INF:
                    halts.setdefault(self._host_of[w], []).append(w)
            for a, ws in halts.items():
                self._call("halt", None, self._send(a, "halt", r, ws, self._seen(ws)), a)
            # The halts' replies say all that is left to know (job counters final: a halted
            # worker starts nothing more), and are taken after the reduction, which needs none
            # of them (the consumed gradients are decided), so the two overlap. The polls still
            # open would only repeat it; reports carry running totals, so dropping them loses
            # nothing.
            for ref, (k, _, _) in list(self._calls.items()):
                if k in ("progress", "report"):
                    del self._calls[ref]
            # -- one reduction ---------------------------------------------------------------
            try:
                if server:
                    update = self._reduce_server(r, tally, point_digest, uploads)
                else:
                    update = self._reduce_allreduce(r, tally.counts, point_digest)
            except _Lost as lost:
                failures += 1
                if failures > 3 * self.n + 3:
                    raise ApgaError(f"runtime: the reduction of round {r} keeps failing ({lost})") from None
                for w in lost.workers:
                    finishes[w] = []
                take_halts()  # so that a poll after the resume waits for news past the halt
                if not decide()[0].done:
                    resume()
                continue
            break
        if self.inject:
            # The halts' replies bring the final job counters. In real time the next begin does not
            # wait for them: a worker never reuses a job index (ray_worker: the begin's first job
            # is at least its own counter), and the begin cancels a job of this round still running.
            take_halts()
        self.clock = self._now()
        self._last_counts = list(tally.counts)
        self.count(update)
        return RayEvent(self.clock, update, t_start, t_stop, counts=list(tally.counts),
                        restarts=self.restarts - restarts0, first_jobs=first_jobs)

    def _gather(self, calls: dict, timeout: float, per_actor: bool = False) -> tuple[dict, list[int]]:
        """Wait for ``calls`` (ref -> worker, or -> actor index with ``per_actor``); results by
        key, and the workers that died (all the workers of an actor that died)."""
        ray = _ray()
        results, lost = {}, []
        deadline = time.monotonic() + timeout
        pending = dict(calls)
        while pending:
            ready = self._first_ready(list(pending), max(0.0, deadline - time.monotonic()))
            if ready is None:  # hung (a peer died mid-collective and the error did not propagate)
                for ref, w in pending.items():
                    results[w] = TimeoutError(f"worker {w}: no answer within {timeout:g} s")
                break
            w = pending.pop(ready)
            if not per_actor:
                self._ready_at[w] = time.time()
            try:
                results[w] = self._result(ready)
            except (ray.exceptions.RayActorError, link.LinkLost) as exc:
                v = self._groups[w][0] if per_actor else w
                self._lost(v, "reduce", exc)
                lost.extend(u for u in self._groups[self._host_of[v]] if u not in lost)
            except (ray.exceptions.RayTaskError, link.RemoteError) as exc:
                if self.aggregation == "allreduce":  # gloo error: a peer of this collective died?
                    results[w] = exc
                else:
                    raise ApgaError(f"worker {w} failed: {_first_line(exc)}") from exc
        return results, lost

    def _reduce_server(self, r: int, tally: RoundTally, point_digest: str, sent_early: dict) -> Update:
        """Server aggregation: each worker's sum of its first b_w gradients, from the sum its
        reports carried when the round consumes exactly those, else by an upload call."""
        counts = tally.counts
        uploaders = tally.order  # workers in the order their first consumed gradient finished
        early = {w: sent_early[w] for w in uploaders
                 if w in sent_early and sent_early[w][0].trajectories == counts[w]}
        sent = time.time()
        calls = {self._host(w).upload.remote(w, r, counts[w]): w for w in uploaders if w not in early}
        results, lost = self._gather(calls, timeout=self.worker_timeout + POLL)
        if lost:
            raise _Lost(lost)
        for w in calls.values():
            self._measured(w, [("upload", self._ready_at[w] - sent)])
        results.update(early)
        for w, (batch, pdig) in results.items():
            if pdig != point_digest or batch.trajectories != counts[w]:
                raise ApgaError(f"runtime: internal error: worker {w} computed at another point or "
                                f"returned {batch.trajectories} gradients for {counts[w]}")
        self.totals.vector_comms += len(uploaders)
        # The simulator's order too, so that equal gradients give equal floating-point sums.
        return self.alg.finish_round({w: results[w][0] for w in uploaders})

    def _ensure_group(self) -> int:
        """The gloo process group over the actors hosting live workers, one rank each (rebuilt
        when membership changed)."""
        ray = _ray()
        members = sorted({self._host_of[w] for w in self._alive})
        if self._group == members:
            return self._epoch
        self._epoch += 1
        epoch, timeout = self._epoch, max(10.0, min(self.worker_timeout, 60.0))
        try:
            ip, port = ray.get(self._actors[members[0]].open_store.remote(epoch), timeout=timeout)
        except ray.exceptions.RayActorError as exc:
            self._lost(self._groups[members[0]][0], "reduce", exc)
            raise _Lost(self._groups[members[0]]) from None
        calls = {self._actors[a].join_group.remote(epoch, rank, len(members), ip, port, timeout): a
                 for rank, a in enumerate(members)}
        results, lost = self._gather(calls, timeout + POLL, per_actor=True)
        if lost:
            raise _Lost(lost)
        failed = {a: v for a, v in results.items() if isinstance(v, Exception)}
        if failed:
            a, exc = next(iter(failed.items()))
            raise _Lost([]) if len(failed) < len(members) else ApgaError(
                f"runtime: gloo process group setup failed on the actor of workers {self._groups[a]}: "
                f"{_first_line(exc)}")
        self._group = members
        return epoch

    def _reduce_allreduce(self, r: int, counts: list[int], point_digest: str) -> Update:
        ray = _ray()
        epoch = self._ensure_group()
        members = self._group  # actor indices, in rank order
        # in real time the call halts the round's workers too (no halt calls were sent)
        calls = {self._send(a, "allreduce", r, {w: counts[w] for w in self._groups[a]}, epoch, not self.inject): a
                 for a in members}
        results, lost = self._gather(calls, timeout=max(10.0, min(self.worker_timeout, 60.0)) + POLL,
                                     per_actor=True)
        failed = {a: v for a, v in results.items() if isinstance(v, Exception)}
        if lost or failed:
            self._group = None
            if not lost and len(failed) == len(members):
                a, exc = next(iter(failed.items()))
                log.warning("AllReduce of round %d failed on every actor (%s); retrying", r, _first_line(exc))
            raise _Lost(lost)  # survivors keep their sums; the round resumes or retries
        for a, out in results.items():
            for w, pdig in out["point_digests"].items():
                if pdig != point_digest:
                    raise ApgaError(f"runtime: internal error: worker {w} computed at another point than the driver's")
        for a in members:
            for w in self._groups[a]:
                self._measured(w, [("allreduce", results[a]["seconds"])])
        # The same step on the driver's copy, from rank 0's reduced numbers (a small reply, not
        # the protocol's state).
        update = self.alg.finish_reduction(reduction_of(results[members[0]]["reduced"]))
        mine = digest(self.alg.theta)
        apart = [a for a in members if results[a]["digest"] != mine]
        if apart:  # ranks disagree in the last bits (e.g. different CPUs): realign on the driver's
            self.resyncs += 1
            log.warning("AllReduce ranks hold different parameters after round %d; resetting them to the driver's", r)
            ray.get([self._actors[a].set_protocol.remote(self.alg) for a in apart])
        self.totals.vector_comms += 1
        if update.used > 0:
            update.returns = np.concatenate([results[a]["returns"] for a in members])
        return update

    # --- per gradient ------------------------------------------------------------------------
    def _dispatch(self, w: int) -> None:
        version, point = self.alg.current_point()
        job = self.next_job[w]
        self.next_job[w] += 1
        self._call("job", w, self._host(w).gradient_job.remote(w, point, job, self._origin), version)
        self.totals.vector_comms += 1  # the point, to this worker only

    def _gradient_step(self) -> RayEvent:
        if not any(k == "job" for k, _, _ in self._calls.values()):
            for w in sorted(self._alive):
                self._dispatch(w)
        restarts0 = self.restarts
        while True:
            self._check_needed(lambda: bool(self._alive))
            item = self._wait()
            if item is None:
                continue
            kind, w, version, out, err = item
            if err is not None:
                continue
            if kind == "ready":
                self._back(w, out)
                self._dispatch(w)
                continue
            if out is None:  # cancelled (only at close)
                continue
            batch, timings = out
            self._measured(w, timings)
            update = self.alg.apply(batch, version)
            self.clock = self._now()
            self.totals.vector_comms += 1  # the upload; the new point is counted by _dispatch
            self.totals.trajectories_computed += 1
            self._dispatch(w)
            self.count(update)
            return RayEvent(self.clock, update, self.clock, self.clock, counts=[int(i == w) for i in range(self.n)],
                            restarts=self.restarts - restarts0, worker=w)
