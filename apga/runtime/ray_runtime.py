"""The Ray runtime: the same protocols as the simulator, with workers as Ray actors on a real clock.

The driver (this object) holds the protocol (apga.protocol.algorithms) and decides everything the
protocol decides: when a round stops, which gradients it consumes, the update. Worker actors
(apga.runtime.ray_worker.WorkerActor) only compute trajectories and keep their local sums.

Round algorithms (Rennala, Malenia, synchronous NIGT), one :meth:`step` = one round:

1. server aggregation: the round's point is put in the object store once and every worker gets
   the reference; AllReduce aggregation: nothing is sent, every worker extrapolates the point
   from its own copy of the NIGT state;
2. workers compute one trajectory after another at that point, job indices continuing their own
   counters (kept by the driver); the only traffic is a scalar count per finished gradient
   (a long-poll per worker), and the driver feeds the counts, one gradient at a time, to
   ``round_done`` / ``keeps_working``;
3. at the stop every worker halts (the trajectory in flight is cancelled within one env step, or
   finishes and is discarded with ``cancel: false``) and the round consumes, of each worker,
   exactly the gradients the driver counted;
4. one reduction: each worker with b_i > 0 uploads its sum and the driver calls
   ``finish_round`` (server), or the workers run one gloo AllReduce among themselves and each
   applies the identical NIGT step; the driver takes the new state from rank 0 and checks that
   every rank holds the same bits (AllReduce).

AFedPG, one :meth:`step` = one gradient: each worker always has one job in flight at the point it
was handed; the first to arrive is applied at once and the sender gets the new point back.

Faults: actors restart (``runtime.max_restarts``); a restarted worker rejoins the current round with a
fresh local sum (what it held but had not reduced is lost; nothing already aggregated is). Rounds
that can stop without it (Rennala) go on; rounds that need every worker (Malenia, synchronous)
wait for it and fail with ApgaError after ``runtime.worker_timeout`` seconds.

``clock`` = wall seconds since the workers were up (continued across a resume), sampled at each
update. With ``runtime.inject_delays`` every trajectory is padded to the time model's compute
time (and transfers to comm_time / allreduce_time), so rounds can be compared with the simulator.
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import ray  # noqa: F401  (missing Ray fails here: build_runtime turns that into a ConfigError)

from apga.errors import ApgaError
from apga.protocol.algorithms import AFedPG, Update
from apga.runtime.ray_worker import WorkerActor, digest
from apga.runtime.simulator import Event, Totals

log = logging.getLogger(__name__)

POLL = 2.0  # seconds a progress long-poll waits at most before reporting anyway
WAKE = 0.5  # seconds the driver waits at most between checks of lost workers
BIG = 10**9
ACTOR_CONCURRENCY = 8  # call threads per actor (progress, halt, reduce, ... run concurrently)
START_TIMEOUT = 300.0  # seconds for all actors to come up


@dataclass
class RayEvent(Event):
    """An update as the Ray runtime saw it (times in runtime seconds)."""

    counts: list = field(default_factory=list)  # round: gradients consumed per worker
    restarts: int = 0  # worker restarts seen during this update
    worker: int | None = None  # AFedPG: the sender


class _Lost(Exception):
    def __init__(self, workers):
        super().__init__(f"lost workers {workers}")
        self.workers = workers


def _first_line(exc) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def _default_oracle(cfg):
    from apga.training import build_oracle
    return build_oracle(cfg)


def _ray():
    from apga.runtime import ray_session
    return ray_session._import_ray()


class RayRuntime:
    """``RayRuntime(cfg, algorithm, oracle, times)``: ``oracle`` serves evaluation on the driver;
    every actor builds its own with ``oracle_factory`` (default: from ``cfg`` as the Trainer does).

    Ray starts lazily, at the first :meth:`step` (or :meth:`start`), so building a runtime costs
    nothing and a checkpointed runtime can be loaded and :meth:`attach`-ed without a cluster.
    """

    def __init__(self, cfg, algorithm, oracle, times, oracle_factory=None):
        a = cfg.algorithm
        if isinstance(algorithm, AFedPG) and a.aggregation != "server":
            raise ApgaError("algorithm.aggregation: AFedPG has no AllReduce form; use server")
        self.cfg, self.alg, self.n = cfg, algorithm, algorithm.n
        self.aggregation, self.cancel = a.aggregation, a.cancel
        self.address, self.inject = cfg.runtime.address, cfg.runtime.inject_delays
        self.worker_timeout = float(cfg.runtime.worker_timeout)
        self.clock = 0.0
        self.next_job = [0] * self.n  # job counter per worker: keys the random streams
        self.totals = Totals()
        self.restarts = 0  # worker restarts seen
        self.resyncs = 0  # AllReduce: times the ranks disagreed and were reset to rank 0's state
        self._round_id = -1
        self.oracle_factory = oracle_factory
        self.attach(oracle, times)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, oracle, times) -> None:
        """(Re)connect the non-picklable parts, e.g. after loading a checkpoint. Ray (re)starts at
        the next step; AFedPG gradients in flight at the checkpoint are not restored."""
        self.oracle, self.times = oracle, times
        if self.oracle_factory is None:
            self.oracle_factory = functools.partial(_default_oracle, self.cfg)
        self._session = None
        self._actors = None
        self._alive: set[int] = set()
        self._gone: set[int] = set()  # dead for good (restarts exhausted)
        self._dead_since: dict[int, float] = {}
        self._calls: dict = {}  # ObjectRef -> (kind, worker, extra)
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
        self._session = ray_session.open_session(self.address)
        if self._session is not None:
            atexit.register(self._session.close)
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            per_actor = math.floor(min(1.0, cpus / self.n) * 1e4) / 1e4  # Ray's resource granularity
            spec = {"n": self.n, "rule": getattr(self.alg, "rule", "afedpg"), "alpha": self.alg.alpha,
                    "eta": self.alg.eta, "times": self.times, "inject": self.inject, "cancel": self.cancel,
                    "oracle_factory": self.oracle_factory}
            actor_cls = ray.remote(WorkerActor)
            self._actors = [
                actor_cls.options(num_cpus=per_actor, max_restarts=self.cfg.runtime.max_restarts, max_task_retries=0,
                                  max_concurrency=ACTOR_CONCURRENCY, scheduling_strategy="SPREAD").remote(w, spec)
                for w in range(self.n)
            ]
            try:
                self.worker_info = ray.get([a.info.remote() for a in self._actors], timeout=START_TIMEOUT)
            except ray.exceptions.GetTimeoutError:
                raise ApgaError(f"runtime: the {self.n} worker actors did not start within {START_TIMEOUT:.0f} s; "
                                "check `ray status` (CPUs, memory) and that apga is installed on every node") from None
            except ray.exceptions.RayActorError as exc:
                raise ApgaError(f"runtime: a worker actor failed to start: {str(exc).splitlines()[0]}") from None
            self._alive = set(range(self.n))
            if self.aggregation == "allreduce":
                ray.get([a.set_state.remote(self.alg.state) for a in self._actors])
            self._origin = time.time() - self.clock
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the worker actors; shut down (and delete) the Ray instance if this runtime started it."""
        actors, self._actors = self._actors, None
        self._calls = {}
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

    def worker_pids(self) -> list[int]:
        """Current process id of every live worker actor (for fault-injection tests)."""
        ray = _ray()
        return [ray.get(self._actors[w].info.remote())["pid"] if w in self._alive else None for w in range(self.n)]

    def _now(self) -> float:
        return time.time() - self._origin

    # ------------------------------------------------------------------ stepping
    def step(self) -> RayEvent:
        """Run until the next model update and perform it."""
        self.start()
        if isinstance(self.alg, AFedPG):
            return self._afedpg_step()
        return self._round_step()

    def _limit(self, w: int) -> int | None:
        """Jobs worker w may start in a round: the first k >= 1 at which keeps_working says stop
        (synchronous NIGT: its quota); None if it never does up to the round's batch."""
        counts = [0] * self.n
        for k in range(1, self.alg.round_batch() + 2):
            counts[w] = k
            if not self.alg.keeps_working(counts, w):
                return k
        return None

    # --- calls and faults ------------------------------------------------------------------
    def _call(self, kind: str, w: int, ref, extra=None) -> None:
        self._calls[ref] = (kind, w, extra)

    def _wait(self, timeout: float = WAKE, kinds: tuple | None = None):
        """Next finished call (of the given kinds): (kind, w, extra, result, error) or None after
        ``timeout``. ``error`` is set when the actor died (RayActorError)."""
        ray = _ray()
        refs = [ref for ref, c in self._calls.items() if kinds is None or c[0] in kinds]
        if not refs:
            time.sleep(timeout)
            return None
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return None
        ref = ready[0]
        kind, w, extra = self._calls.pop(ref)
        try:
            return kind, w, extra, ray.get(ref), None
        except ray.exceptions.RayActorError as exc:
            self._lost(w, kind, exc)
            return kind, w, extra, None, exc
        except ray.exceptions.RayTaskError as exc:
            raise ApgaError(f"worker {w} failed in {kind}: {_first_line(exc)}") from exc

    def _lost(self, w: int, kind: str, exc) -> None:
        """A call to worker w failed because its actor died. Mark it lost and probe it: the probe
        (an ``info`` call) is served once Ray has restarted the actor, or fails for good."""
        ray = _ray()
        if kind == "ready" and isinstance(exc, ray.exceptions.ActorDiedError):
            self._gone.add(w)
            log.warning("worker %d is dead for good (restarts exhausted or node gone)", w)
            return
        if w in self._alive:
            log.warning("worker %d lost (%s); waiting for its restart", w, type(exc).__name__)
            self._alive.discard(w)
            self._dead_since[w] = time.monotonic()
            self._group = None  # the process group must be rebuilt
            for ref, (k, v, _) in list(self._calls.items()):
                if v == w:
                    del self._calls[ref]
        if w not in self._gone and not any(k == "ready" and v == w for k, v, _ in self._calls.values()):
            self._call("ready", w, self._actors[w].info.remote())

    def _back(self, w: int, info: dict) -> None:
        self._alive.add(w)
        self._dead_since.pop(w, None)
        self._group = None
        self.restarts += 1
        if len(self.worker_info) == self.n:
            self.worker_info[w] = info
        if self.aggregation == "allreduce" and not isinstance(self.alg, AFedPG):
            _ray().get(self._actors[w].set_state.remote(self.alg.state))
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
        point_arg = ray.put(point) if server else None  # once per round, every worker gets the ref
        limits = [self._limit(w) for w in range(n)]
        # runtime.streams: round keys trajectories by (update, index in round), as the simulator
        sample_round = alg.version if self.cfg.runtime.streams == "round" else None
        t_start, restarts0 = self._now(), self.restarts
        counts, seen = [0] * n, [0] * n
        self._calls = {ref: c for ref, c in self._calls.items() if c[0] == "ready"}

        def begin(w: int) -> None:
            self._call("begin", w, self._actors[w].begin.remote(r, point_arg, self.next_job[w], limits[w],
                                                                self._origin, self.cancel, sample_round))
            self._call("progress", w, self._actors[w].progress.remote(r, 0, POLL))
            if server:
                self.totals.vector_comms += 1  # the download of the point

        def can_finish() -> bool:
            return alg.round_done([BIG if w in self._alive else 0 for w in range(n)])

        def handle(item, done: bool) -> bool:
            """Process one finished call; returns whether the round is done."""
            kind, w, extra, out, err = item
            if err is not None:
                if kind != "ready":
                    counts[w] = seen[w] = 0
                return alg.round_done(counts)
            if kind == "ready":
                self._back(w, out)
                begin(w)
            elif kind in ("progress", "halt"):
                self.next_job[w] = max(self.next_job[w], out["next_job"])
                self.totals.trajectories_computed += out["completed"]
                if out["round"] == r and w in self._alive:
                    c = out["count"]
                    while not done and counts[w] < c:
                        counts[w] += 1  # one gradient at a time: stop at the first moment the rule holds
                        done = alg.round_done(counts)
                    seen[w] = max(seen[w], c)
                    if kind == "progress" and not done and not halting and out["busy"]:
                        self._call("progress", w, self._actors[w].progress.remote(r, seen[w], POLL))
            return done

        for w in sorted(self._alive):
            begin(w)
        done, halting, failures = False, False, 0
        while True:
            # -- computing: counts only -----------------------------------------------------
            while not done:
                self._check_needed(can_finish)
                item = self._wait()
                if item is not None:
                    done = handle(item, done)
            t_stop = self._now()
            # -- stop: halt everyone, drain the polls (restarted workers rejoin next round) ---
            halting = True
            for w in sorted(self._alive):
                self._call("halt", w, self._actors[w].halt.remote(r))
            while any(k != "ready" for k, _, _ in self._calls.values()):
                item = self._wait(POLL + 1.0, kinds=("halt", "progress", "begin"))
                if item is not None:
                    done = handle(item, done)
            halting = False
            if not alg.round_done(counts):  # a worker died while halting: the round goes on
                done = False
                self._resume(r, counts)
                continue
            # -- one reduction ---------------------------------------------------------------
            try:
                if server:
                    update = self._reduce_server(r, counts, point_digest)
                else:
                    update = self._reduce_allreduce(r, counts, point_digest)
            except _Lost as lost:
                failures += 1
                if failures > 3 * self.n + 3:
                    raise ApgaError(f"runtime: the reduction of round {r} keeps failing ({lost})") from None
                for w in lost.workers:
                    counts[w] = seen[w] = 0
                done = alg.round_done(counts)
                if not done:
                    self._resume(r, counts)
                continue
            break
        self.clock = self._now()
        self._count(update)
        return RayEvent(self.clock, update, t_start, t_stop, counts=list(counts),
                        restarts=self.restarts - restarts0)

    def _resume(self, r: int, counts: list[int]) -> None:
        """After a worker was lost while stopping: the others continue the same round."""
        for w in sorted(self._alive):
            self._actors[w].resume.remote(r)
            self._call("progress", w, self._actors[w].progress.remote(r, counts[w], POLL))

    def _gather(self, calls: dict, timeout: float) -> tuple[dict, list[int]]:
        """Wait for ``calls`` (ref -> worker); results by worker, and the workers that died."""
        ray = _ray()
        results, lost = {}, []
        deadline = time.monotonic() + timeout
        pending = dict(calls)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # hung (a peer died mid-collective and the error did not propagate)
                for ref, w in pending.items():
                    results[w] = TimeoutError(f"worker {w}: no answer within {timeout:g} s")
                break
            w = pending.pop(ready[0])
            try:
                results[w] = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                lost.append(w)
                self._lost(w, "reduce", exc)
            except ray.exceptions.RayTaskError as exc:
                if self.aggregation == "allreduce":  # gloo error: a peer of this collective died?
                    results[w] = exc
                else:
                    raise ApgaError(f"worker {w} failed: {_first_line(exc)}") from exc
        return results, lost

    def _reduce_server(self, r: int, counts: list[int], point_digest: str) -> Update:
        uploaders = [w for w in range(self.n) if counts[w] > 0]
        calls = {self._actors[w].upload.remote(r, counts[w]): w for w in uploaders}
        results, lost = self._gather(calls, timeout=self.worker_timeout + POLL)
        if lost:
            raise _Lost(lost)
        for w, (batch, pdig) in results.items():
            if pdig != point_digest or batch.count + batch.rejected != counts[w]:
                raise ApgaError(f"runtime: internal error: worker {w} computed at another point or "
                                f"returned {batch.count + batch.rejected} gradients for {counts[w]}")
        self.totals.vector_comms += len(uploaders)
        # Workers in index order: reproducible, and the simulator's order whenever its workers
        # first finish in index order (equal or increasing compute times).
        return self.alg.finish_round({w: results[w][0] for w in uploaders})

    def _ensure_group(self) -> int:
        """The gloo process group over the live workers (rebuilt when membership changed)."""
        ray = _ray()
        members = sorted(self._alive)
        if self._group == members:
            return self._epoch
        self._epoch += 1
        epoch, timeout = self._epoch, max(10.0, min(self.worker_timeout, 60.0))
        try:
            ip, port = ray.get(self._actors[members[0]].open_store.remote(epoch), timeout=timeout)
        except ray.exceptions.RayActorError as exc:
            self._lost(members[0], "reduce", exc)
            raise _Lost([members[0]]) from None
        calls = {self._actors[w].join_group.remote(epoch, rank, len(members), ip, port, timeout): w
                 for rank, w in enumerate(members)}
        results, lost = self._gather(calls, timeout + POLL)
        if lost:
            raise _Lost(lost)
        failed = {w: v for w, v in results.items() if isinstance(v, Exception)}
        if failed:
            w, exc = next(iter(failed.items()))
            raise _Lost([]) if len(failed) < len(members) else ApgaError(
                f"runtime: gloo process group setup failed on worker {w}: {_first_line(exc)}")
        self._group = members
        return epoch

    def _reduce_allreduce(self, r: int, counts: list[int], point_digest: str) -> Update:
        ray = _ray()
        epoch = self._ensure_group()
        members = self._group
        calls = {self._actors[w].allreduce.remote(r, counts[w], epoch): w for w in members}
        results, lost = self._gather(calls, timeout=max(10.0, min(self.worker_timeout, 60.0)) + POLL)
        failed = {w: v for w, v in results.items() if isinstance(v, Exception)}
        if lost or failed:
            self._group = None
            if not lost and len(failed) == len(members):
                w, exc = next(iter(failed.items()))
                log.warning("AllReduce of round %d failed on every worker (%s); retrying", r, _first_line(exc))
            raise _Lost(lost)  # survivors keep their sums; the round resumes or retries
        for w, out in results.items():
            if out["point_digest"] != point_digest:
                raise ApgaError(f"runtime: internal error: worker {w} computed at another point than the driver's")
        rank0 = results[members[0]]
        state = rank0["state"]
        digests = {out["digest"] for out in results.values()}
        if len(digests) > 1:  # ranks disagree in the last bits (e.g. different CPUs): realign on rank 0
            self.resyncs += 1
            log.warning("AllReduce ranks hold different parameters after round %d; resetting them to rank 0's", r)
            ray.get([self._actors[w].set_state.remote(state) for w in members])
        self.alg.adopt(state)
        self.totals.vector_comms += 1
        env_steps = rank0["env_steps"]
        if not rank0["ok"]:
            return Update(0, rank0["total"] + rank0["rejected"], False, math.nan, np.zeros(0), env_steps)
        returns = np.concatenate([results[w]["returns"] for w in members])
        return Update(rank0["total"], rank0["rejected"], rank0["stepped"], rank0["grad_norm"], returns, env_steps)

    # --- AFedPG ----------------------------------------------------------------------------
    def _dispatch(self, w: int) -> None:
        version, point = self.alg.current_point()
        job = self.next_job[w]
        self.next_job[w] += 1
        self._call("job", w, self._actors[w].afedpg_job.remote(point, job, self._origin), version)
        self.totals.vector_comms += 1  # the point, to this worker only

    def _afedpg_step(self) -> RayEvent:
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
            update = self.alg.apply(out, version)
            self.clock = self._now()
            self.totals.vector_comms += 1  # the upload; the new point is counted by _dispatch
            self.totals.trajectories_computed += 1
            self._dispatch(w)
            self._count(update)
            return RayEvent(self.clock, update, self.clock, self.clock, counts=[int(i == w) for i in range(self.n)],
                            restarts=self.restarts - restarts0, worker=w)

    def _count(self, update: Update) -> None:
        t = self.totals
        t.iteration += 1
        t.trajectories += update.used
        t.env_steps += update.env_steps
        t.rejected += update.rejected
