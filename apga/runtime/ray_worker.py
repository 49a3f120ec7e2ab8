"""The body of one Ray actor: hosts apga workers, computes their trajectories, keeps each one's
round sum, reduces.

One actor process *hosts* one apga worker, or several when the workers share cores (more workers
than CPUs, real time: apga.runtime.ray_runtime.host_groups): each hosted worker keeps its own
state (a :class:`Slot`: round, counters, finish times, sums), and the driver addresses every
call about a worker to its actor, with the worker's index (polls and halts name several
workers; one reply reports them all). Per-gradient protocols: each hosted worker has one job
in flight, at its own point, and the actor rolls these jobs out together. It is a *threaded*
actor: one background compute thread rolls out the trajectories of all its workers, while the
driver's calls (begin a round, wait for progress, halt, upload, AllReduce, ...) are served by
Ray's call threads. It never names a method: what it computes and how it reduces come from the
protocol (apga/protocol/base.py).

Batches (real time, no injected delays): a round's begin carries a *target*, the number of
gradients the driver expects of this worker in the round (its share of the smallest total that
closes the round; apga.runtime.ray_runtime.round_targets).
The worker rolls its next jobs out together, up to the target (at most ``policy.rollout_batch``
at a time, never past the protocol's quota), as one oracle call: one vectorised rollout and one
GPOMDP pass, a fraction of the per-step overhead of k single rollouts (every trajectory is
bit-identical to its one-job rollout; the batch's sum is the oracle's chunk sum). The batch's
gradients are ready together, so they share one finish time, and the consumption rule takes
all or none of them (a tie): a round consumes whole batches. An actor that hosts several workers
rolls the jobs of all of them that compute at the round's point out as one such call (a wider
batch: per env step the Python overhead is shared by more simulations); each worker's sum is its
own part of the call.

At its target the worker waits (real time, ``hold``), until the round stops or the driver
extends its target (:meth:`extend`: when every worker is waiting and the round still needs
gradients, e.g. after a worker was lost). The targets split the round's gradients so that, at
the speeds of the last round, everyone reaches theirs at about the same time: a job past the
target would finish after the stop and be thrown away, or, on shared cores, take the core from
a worker that still owes its share. A worker with a core of its own that reached its target at
round time d and still waits at ``RELEASE * d`` (another worker straggles) goes on one job at a
time, as the simulator's workers do: the round consumes by finishing order, so its extra gradients
replace the straggler's, and the next round's targets follow these counts. With injected delays
every job is one trajectory with its own nominal duration, as in the simulator, and no worker
waits.

During a round, :meth:`progress` is a long poll (one per actor, naming its workers) that
returns, per worker, the finish times of the round's gradients so far and a *horizon*: every
gradient of this worker that finishes before the horizon has been reported (in real time with
server aggregation, the first report after a finished batch also carries the worker's sum so
far, see :meth:`Slot.report`). The driver merges the workers' finish times and
applies the protocol's consumption rule (``RoundTally``) in finishing order, exactly as the
simulator does. Finish times are round-relative: with ``runtime.inject_delays`` they are the
time model's nominal times (begin + sum of the durations, as in the simulator), otherwise wall
seconds since the round began. At the stop the driver says how many gradients b_w of this worker
the round consumes (the first b_w in job order), and the worker either uploads its contribution
(server aggregation), or the actor takes part in one gloo AllReduce with the other actors (one
rank per actor, carrying the sum of its workers' contributions) and finishes the round on its own
copy of the protocol (AllReduce aggregation).

Cancellation (``algorithm.cancel``): a halted round abandons its in-flight trajectory within one
environment step (true) or lets it finish and discards it (false): the oracle's ``should_stop``
check runs before every environment step (synthetic oracle: before every gradient), and the
injected-delay sleep is cut short too.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import os
import socket
import threading
import uuid
import time
from fractions import Fraction

import numpy as np

from apga.oracle.base import Cancelled, WorkerBatch
from apga.protocol.base import Reduction
from apga.rng import round_sample

INF = float("inf")
GATHER = 0.02  # seconds a hosted worker's per-gradient job waits at most for the others' (to batch)
# A worker with a core of its own that reached its target at round time d waits until
# RELEASE * d, then goes on one job at a time while the round is still open (see the docstring).
RELEASE = 2.0


def digest(x: np.ndarray) -> str:
    """A short fingerprint of a float64 vector's exact bits."""
    return hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float64).tobytes(), digest_size=8).hexdigest()


def _interface_of(ip: str) -> str | None:
    import psutil
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


class JobRequest:
    """A per-gradient job waiting in a hosting actor: worker, point, job index; then its result."""

    def __init__(self, w: int, point: np.ndarray, job: int):
        self.w, self.point, self.job, self.since = w, point, job, time.monotonic()
        self.done = threading.Event()
        self.result: tuple | None = None  # (gradient, timings), None if never computed
        self.error = ""


class Slot:
    """One hosted worker's state (every field guarded by its actor's ``cv``)."""

    def __init__(self, worker: int, host: "WorkerActor"):
        self.w, self.host = worker, host
        self.comm = host.times.comm[worker] if host.inject else 0.0
        self.cancel = host.cancel
        self.target = 0  # gradients the driver expects of this worker in the round (batches up to it)
        self.round = -1  # current round id
        self.halted = -1  # the last round halted
        self.active = False  # computing for the current round
        self.point: np.ndarray | None = None
        self.point_digest = ""
        self.limit: int | None = None  # jobs to start in the round at most (the protocol's quota)
        self.started = 0  # jobs started in the current round
        self.sample_round: int | None = None  # runtime.streams: round -> keys of this round's trajectories
        self.next_job = 0  # the next job index of this worker (the driver sets it at begin)
        self.first_job = 0  # the job index of the round's first job
        self.not_before = 0.0  # injected download: the round's first job starts then (epoch s)
        self.origin = time.time()  # epoch of the run clock (for time models that depend on it)
        self.round_wall = time.time()  # epoch at which the current round began (the driver's)
        self.results: list[WorkerBatch] = []  # finished batches of the round (one or more gradients each), in job order
        self.finishes: list[float] = []  # their round-relative finish times
        self.nominal_begin = 0.0  # injected delays: nominal start of the round's first job
        self.elapsed = Fraction(0)  # injected delays: exact sum of the round's job durations so far
        self.inflight_finish: float | None = None  # nominal finish of the job in flight (inject)
        self.busy_until = 0.0  # epoch at which the job in flight ends at the earliest (inject)
        self.stamp = 0  # bumped on every change a progress poll reports
        self.begin_stamp = 0  # the stamp the current round's begin set
        # Reports carry running totals, not news since the last report: a reply the driver
        # drops (a waiting worker's long poll at the stop) then loses nothing.
        self.completed = 0  # trajectories completed (used or discarded) by this actor incarnation
        self.timings: list = []  # (kind, seconds) measured (timings.csv), from index timings_base on
        self.timings_base = 0  # rows before it the driver has confirmed (and were dropped here)
        self.job_stop: threading.Event | None = None  # set -> abandon the trajectory in flight
        self.sent = 0  # finished batches whose sum a report has carried (eager upload)
        self.release_at: float | None = None  # epoch at which a worker waiting at its target goes on
        self.total: WorkerBatch | None = None  # the sum of ``results`` (merged in job order)

    def computing(self) -> bool:
        return (self.active and (self.limit is None or self.started < self.limit)
                and (not self.host.hold or self.started < self.target
                     or (self.release_at is not None and time.time() >= self.release_at)))

    def batch_size(self, room: int) -> int:
        """Jobs this worker's part of the next rollout takes: one with injected delays (each has
        its own nominal duration) or past the round's target; else up to the target, the quota
        and ``room``."""
        if self.host.inject:
            return 1
        left = self.target - self.started
        if self.limit is not None:
            left = min(left, self.limit - self.started)
        return max(1, min(left, room))

    def take(self, k: int) -> tuple[list[int], list[int]]:
        """The next ``k`` job indices and the keys of their trajectories (started now)."""
        jobs, samples = [], []
        for _ in range(k):
            jobs.append(self.next_job)
            samples.append(self.next_job if self.sample_round is None
                           else round_sample(self.sample_round, self.started))
            self.next_job += 1
            self.started += 1
        return jobs, samples

    def horizon(self) -> float:
        """Every gradient of this round that finishes before the horizon has been reported."""
        if not self.active or (self.job_stop is None and not self.computing()):
            if self.active and self.release_at is not None and (self.limit is None or self.started < self.limit):
                return self.release_at - self.round_wall  # waiting: nothing finishes before it goes on
            return INF  # halted, quota reached or waiting with nothing in flight: no more finishes
        if not self.host.inject:
            return time.time() - self.round_wall  # anything still running finishes later
        if self.inflight_finish is not None and self.job_stop is not None:
            return self.inflight_finish
        return self.nominal_begin + float(self.elapsed)  # between jobs: the next one ends later

    def report(self, r: int, seen: tuple | None) -> dict:
        """The worker's state for a poll about round ``r``; ``seen``: (incarnation, rows) of
        the timing rows the driver has (those of this incarnation are dropped here; the reply
        carries the rest, numbered from ``timings_base``)."""
        if self.host.error:
            raise RuntimeError(self.host.error)
        current = self.round == r
        token, rows = seen or (None, 0)
        if token == self.host.incarnation and rows > self.timings_base:
            del self.timings[:rows - self.timings_base]
            self.timings_base = rows
        busy = current and (self.job_stop is not None or self.computing())
        # holding at its target (hold), nothing in flight, its quota not reached: extend() resumes it
        waiting = (current and self.host.hold and self.active and not busy
                   and (self.limit is None or self.started < self.limit))
        # The first report after a batch finished carries the sum of the round's gradients so far
        # (server aggregation in real time): the driver uses it if the round consumes exactly
        # these, else (or if this reply is lost) calls upload.
        upload = None
        if current and self.host.eager and len(self.results) > self.sent:
            upload, self.sent = (self.total, self.point_digest), len(self.results)
        return {"round": self.round, "finishes": list(self.finishes) if current else [],
                "horizon": self.horizon() if current else INF, "stamp": self.stamp,
                "next_job": self.next_job, "first_job": self.first_job, "busy": busy, "waiting": waiting,
                "completed": self.completed,
                "incarnation": self.host.incarnation,
                "timings": (self.timings_base, list(self.timings)), "upload": upload}

    def first(self, r: int, b: int) -> WorkerBatch | None:
        """The sum of the round's first ``b`` gradients: whole batches (a batch's gradients share
        a finish time, so the consumption rule takes all of them or none)."""
        parts, total = [], 0
        for part in self.results if self.round == r else []:
            if total >= b:
                break
            parts.append(part)
            total += part.trajectories
        if self.round != r or total != b:
            raise RuntimeError(f"worker {self.w}: round {r} has no first {b} gradients in whole batches "
                               f"({len(self.finishes)} gradients, actor round {self.round})")
        return merged(parts) if parts else None


def reduction_of(buf: np.ndarray) -> Reduction:
    """The round's numbers from an AllReduce buffer [contribution, accepted count, rejected
    count, live workers, env steps] (what every rank and the driver finish the round with)."""
    dim = buf.shape[0] - 4
    total, rejected, live, env_steps = (int(round(x)) for x in buf[dim:])
    return Reduction(buf[:dim] if total else None, total, live, rejected, np.zeros(0), env_steps)


def merged(parts: list[WorkerBatch]) -> WorkerBatch:
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)  # job order, as the oracle accumulates a worker's jobs
    return out


class WorkerActor:
    """Ray actor body (the runtime wraps it with ``ray.remote``): hosts ``workers``; ``spec`` is a
    plain dict. Every call about one worker takes its index ``w`` first."""

    def __init__(self, workers: list[int], spec: dict):
        import torch
        torch.set_num_threads(1)
        self.n = spec["n"]
        self.times, self.inject, self.cancel = spec["times"], spec["inject"], spec["cancel"]
        self.oracle = spec["oracle_factory"]()
        self.batch_max = max(1, int(spec.get("batch", 1)))  # jobs rolled out together at most
        self.hold = not self.inject  # real time: wait at the target (see the module docstring)
        self.release = self.hold and bool(spec.get("release", False))  # ... and go on after a while
        self.eager = not self.inject and spec.get("aggregation") == "server"  # reports carry sums (Slot.report)
        self.cv = threading.Condition()
        self.incarnation = uuid.uuid4().hex  # reports' running totals count from 0 in each incarnation
        self.slots = {w: Slot(w, self) for w in sorted(workers)}
        self.requests: list[JobRequest] = []  # per-gradient jobs of hosted workers, waiting to roll out
        self.closing = False
        self.error = ""  # a failed job (reported to the driver by the next call)
        self.protocol = None  # AllReduce mode: this actor's copy of the protocol
        self.pending: tuple | None = None  # (round, protocol after its reduction) until the next begin
        self.pg = None  # gloo process group (AllReduce mode)
        self.group_epoch = -1
        self._listen: socket.socket | None = None
        self.link = None  # the driver's direct link (apga.runtime.link), when it asks for one
        if spec.get("authkey"):
            import ray
            from apga.runtime.link import LinkServer
            self.link = LinkServer(self, ray.util.get_node_ip_address(), spec["authkey"],
                                   threads=spec.get("link_threads", 8))
        name = f"apga-worker-{min(self.slots)}" + (f"-{max(self.slots)}" if len(self.slots) > 1 else "")
        self.thread = threading.Thread(target=self._compute_loop, name=name, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ small calls
    def info(self, w: int) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"worker": w, "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "ip": ray.util.get_node_ip_address(), "incarnation": self.incarnation,
                "link": self.link.address if self.link is not None else None,
                "restarted": ctx.was_current_actor_reconstructed}

    def set_protocol(self, protocol) -> str:
        """AllReduce mode: (re)load this actor's copy of the protocol (at start, after a restart,
        on resync)."""
        with self.cv:
            self.protocol, self.pending = protocol, None
        return digest(protocol.theta) if protocol is not None else ""

    # ------------------------------------------------------------------ rounds
    def begin_all(self, begins: list[tuple], since: dict | None = None, timeout: float = 0.0,
                  seen: dict | None = None) -> dict | None:
        """Begin a round for several workers (one argument tuple of :meth:`_begin` each) at
        once: the compute thread sees all of them together, so their first jobs form one
        rollout. With ``since``, the call goes on as the round's first :meth:`progress` poll (one
        message instead of two)."""
        fetched: dict = {}

        def value(point):
            """A large point comes through the object store (Ray calls): one fetch per reference."""
            if point is None or isinstance(point, np.ndarray):
                return point
            if point not in fetched:
                import ray
                fetched[point] = ray.get(point)
            return fetched[point]

        begins = [b[:2] + (value(b[2]),) + b[3:] for b in begins]
        with self.cv:
            running = [(s, s.round, s.job_stop) for s in self.slots.values() if s.job_stop is not None]
            for args in begins:
                self._begin(*args)
            # A rollout of an earlier round still running (its halt not here yet: real time does
            # not wait for it) is cancelled once all its workers moved on; cancel: false lets it
            # finish, as a halt would.
            stale: dict[int, list] = {}
            for s, rnd, stop in running:
                entry = stale.setdefault(id(stop), [stop, True])
                entry[1] = entry[1] and (s.round > rnd or not s.active) and s.cancel
            for stop, cancel in stale.values():
                if cancel:
                    stop.set()
            self.cv.notify_all()
        if since is not None:
            return self.progress(begins[0][1], since, timeout, seen or {})
        return None

    def _begin(self, w: int, r: int, point, first_job: int, limit: int | None, origin: float, cancel: bool,
               sample_round: int | None, round_wall: float, late: bool = False, target: int = 0) -> None:
        """Worker ``w`` starts round ``r`` at ``point`` (None: this actor's protocol copy's round
        point) with job indices first_job, first_job + 1, ...; at most ``limit`` jobs; ``cancel``:
        what its halt does. ``sample_round`` (runtime.streams: round): trajectories are keyed by
        (sample_round, index in the round) instead of by job index. ``round_wall``: the driver's
        epoch of the round's start; ``late``: joining a round under way (after a restart);
        ``target``: the gradients expected of this worker in the round (see the module docstring)."""
        s = self.slots[w]
        if r <= s.round:
            return  # stale or repeated
        s.cancel = cancel
        if self.pending is not None and self.pending[0] == r - 1:
            self.protocol = self.pending[1]  # the previous round's AllReduce step, now committed
            self.pending = None
        download, sent = 0.0, point is not None
        if point is None:  # AllReduce mode: no download, the point is this actor's own
            point = self.protocol.round_point()
        else:
            download = s.comm
        s.round, s.point, s.point_digest = r, np.asarray(point), digest(point)
        # never below its own counter: in real time the driver may not have the last halt's reply
        # (an index whose trajectory was never reported), and an index is never used twice
        s.results, s.finishes, s.started, s.sent, s.total = [], [], 0, 0, None
        s.next_job = s.first_job = max(first_job, s.next_job)
        s.release_at = None
        s.sample_round, s.round_wall, s.target = sample_round, round_wall, int(target)
        # A halt of this round may overtake its begin (call threads run concurrently).
        s.limit, s.origin, s.active = limit, origin, r > s.halted
        now = time.time()
        s.not_before = now + download
        if sent:  # the point's download: from the driver's round start to when it is here
            s.timings.append(("download", s.not_before - round_wall))
        # Nominal start of the round's first job: after the download, or when a discarded
        # job of the last round (cancel: false) or a late join lets the worker start. A job
        # cancelled by its halt (its stop set) or by this begin (cancel: true, begin_all) holds
        # nothing up, even while the compute thread has not yet noticed.
        s.nominal_begin = download
        finishing = s.job_stop is not None and not cancel and not s.job_stop.is_set()
        if late or finishing:
            s.nominal_begin = max(download, (now if late else s.busy_until) - round_wall)
        s.elapsed = Fraction(0)
        s.inflight_finish = None  # the last round's job in flight (if any) finishes nothing of this one
        s.stamp += 1
        s.begin_stamp = s.stamp

    def resume(self, w: int, r: int) -> None:
        """Worker ``w`` continues round ``r`` after a halt (a reduction failed because another
        worker died)."""
        with self.cv:
            s = self.slots[w]
            if s.round == r:
                s.active, s.halted = True, r - 1
                s.stamp += 1
                self.cv.notify_all()

    def progress(self, r: int, since: dict, timeout: float, seen: dict) -> dict:
        """Long poll about round ``r`` and the workers ``since`` names: return once one of them
        has news since the stamp given for it (a gradient finished, a job started with injected
        delays, the round halted or ended), or after ``timeout`` seconds, with every named
        worker's report (``seen``: see :meth:`Slot.report`). One call per actor, not per worker:
        the workers it hosts finish a rollout together and report in one reply. A stamp None
        means since the begin of round ``r`` (the driver's first poll of a round then answers
        with the first news rather than with the begin itself, or at once if one of the named
        workers has nothing to compute)."""
        deadline = time.monotonic() + timeout
        with self.cv:
            # A poll may overtake the begin of its round (call threads run concurrently): wait for it.
            while not self.error and not any(self._news(w, r, stamp) for w, stamp in since.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(left)
            return {w: self.slots[w].report(r, seen.get(w)) for w in since}

    def _news(self, w: int, r: int, stamp: int | None) -> bool:
        s = self.slots[w]
        if s.round != r:
            return s.round > r  # a later round began (a poll that overtook its begin waits)
        if s.stamp > (s.begin_stamp if stamp is None else stamp):
            return True
        # waiting from the start (target 0) or halted: no news will come
        return stamp is None and s.job_stop is None and not s.computing()

    def halt(self, r: int, workers: list[int], seen: dict) -> dict:
        """``workers`` stop computing for round ``r``; their trajectories in flight are cancelled
        (or let finish and discarded); their reports. A rollout shared by hosted workers is
        cancelled for all of them: the driver halts every computing worker of a round at once."""
        with self.cv:
            for w in workers:
                s = self.slots[w]
                s.halted = max(s.halted, r)
                if s.round == r and s.active:
                    s.active = False
                    # cancel: abandon the job in flight; cancel: false lets it finish, but a job
                    # still waiting for the round's download never starts (as in the simulator)
                    if s.job_stop is not None and (s.cancel or time.time() < s.not_before):
                        s.job_stop.set()
                    s.stamp += 1
            self.cv.notify_all()
            return {w: self.slots[w].report(r, seen.get(w)) for w in workers}

    def extend(self, w: int, r: int, extra: int) -> None:
        """Round ``r`` needs more: raise worker ``w``'s target by ``extra`` gradients."""
        with self.cv:
            s = self.slots[w]
            if s.round == r and s.active:
                s.target = max(s.target, s.started) + int(extra)
                s.release_at = None  # set anew when it reaches the new target
                s.stamp += 1
                self.cv.notify_all()

    def upload(self, w: int, r: int, b: int) -> tuple[WorkerBatch | None, str]:
        """Server aggregation: the sum of worker ``w``'s first ``b`` gradients of round ``r``."""
        with self.cv:
            s = self.slots[w]
            batch, point_digest, comm = s.first(r, b), s.point_digest, s.comm
        if self.inject and comm > 0:
            time.sleep(comm)
        return batch, point_digest

    # ------------------------------------------------------------------ AllReduce (gloo)
    def open_store(self, epoch: int) -> tuple[str, int]:
        """Rank 0: bind the rendezvous socket on this node's IP (port chosen by the OS)."""
        import ray
        ip = ray.util.get_node_ip_address()
        self._close_listen()
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        s.bind((ip, 0))
        s.listen(256)
        self._listen = s
        return ip, s.getsockname()[1]

    def _close_listen(self):
        if self._listen is not None:
            self._listen.close()
            self._listen = None

    def join_group(self, epoch: int, rank: int, world: int, ip: str, port: int, timeout: float) -> int:
        """(Re)build the gloo process group of this epoch: ``world`` live actors, this one as ``rank``.

        The rendezvous is a c10d TCPStore on ``ip:port`` (rank 0 hosts it on the socket bound by
        :meth:`open_store`, i.e. on its node IP only, never on all interfaces); gloo's own
        connections use the network interface that carries this node's IP.
        """
        import ray
        import torch.distributed as dist
        self.leave_group()
        my_ip = ray.util.get_node_ip_address()
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            iface = _interface_of(my_ip)
            if iface:
                os.environ["GLOO_SOCKET_IFNAME"] = iface
        td = datetime.timedelta(seconds=timeout)
        if rank == 0:
            fd = self._listen.detach()
            self._listen = None
            store = dist.TCPStore(ip, port, world, True, td, master_listen_fd=fd, use_libuv=False)
        else:
            store = dist.TCPStore(ip, port, world, False, td)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=td)
        self.pg, self.store, self.rank, self.group_epoch = dist.group.WORLD, store, rank, epoch
        return epoch

    def leave_group(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group (a peer died): nothing left to release cleanly
                pass
        self.pg, self.store = None, None

    def allreduce(self, r: int, counts: dict, epoch: int, halt: bool = False) -> dict:
        """AllReduce aggregation of round ``r`` with the first ``counts[w]`` gradients of each
        hosted worker ``w`` (``halt``: halt them first, as :meth:`halt` does).

        One AllReduce of [contribution, accepted count, rejected count, live workers, env steps],
        summed over this actor's workers, the contribution being the protocol's (e.g. the sum
        g_w, or the mean g_w / b_w). Every actor then finishes the round on its own copy of the
        protocol with the same numbers; the step is committed when the next round begins. The
        reply carries the reduced numbers (rank 0), so that the driver takes the same step on its
        copy, and a digest of the new parameters (every rank), so that it sees any disagreement.
        """
        if halt:
            self.halt(r, list(counts), {})
        import torch
        import torch.distributed as dist
        if epoch != self.group_epoch or self.pg is None:
            raise RuntimeError(f"workers {list(self.slots)}: process group epoch {self.group_epoch}, "
                               f"driver expects {epoch}")
        dim = self.protocol.theta.shape[0]
        buf, returns, digests = np.zeros(dim + 4), [], {}
        with self.cv:
            for w in sorted(counts):
                s = self.slots[w]
                if s.round == r:
                    digests[w] = s.point_digest
                batch = s.first(r, counts[w]) if counts[w] else None
                count = batch.count if batch else 0
                part = np.concatenate([self.protocol.contribution(batch) if count else np.zeros(dim),
                                       [count, batch.rejected if batch else 0, 1.0 if count > 0 else 0.0,
                                        batch.env_steps if batch else 0]])
                buf = part if len(returns) == 0 else buf + part  # one worker: its buffer as it is
                returns.append(batch.returns if batch else np.zeros(0))
        t0 = time.time()
        tensor = torch.from_numpy(buf)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.pg)
        if self.inject and self.times.allreduce > 0:
            time.sleep(max(0.0, self.times.allreduce - (time.time() - t0)))
        seconds = time.time() - t0
        after = copy.deepcopy(self.protocol)
        after.finish_reduction(reduction_of(buf))
        with self.cv:
            self.pending = (r, after)
        return {"digest": digest(after.theta), "reduced": buf if self.rank == 0 else None,
                "point_digests": digests, "seconds": seconds,
                "returns": np.concatenate(returns) if returns else np.zeros(0)}

    # ------------------------------------------------------------------ per gradient
    def gradient_job(self, w: int, point: np.ndarray, job: int, origin: float) -> tuple[WorkerBatch, list] | None:
        """One gradient of worker ``w`` at ``point`` (after the injected download, before the
        injected upload), with the measured (kind, seconds) of its download, computation and
        upload. An actor hosting several workers rolls their jobs out together, each at its own
        point (:meth:`_serve_jobs`)."""
        if len(self.slots) > 1:
            job_request = JobRequest(w, np.asarray(point), job)
            with self.cv:
                if self.closing:
                    return None
                self.requests.append(job_request)
                self.cv.notify_all()
            job_request.done.wait()
            if job_request.error:
                raise RuntimeError(job_request.error)
            return job_request.result
        stop = threading.Event()
        with self.cv:
            s = self.slots[w]
            s.origin, s.job_stop = origin, stop
        try:
            t0 = time.time()
            if self.inject and s.comm > 0 and stop.wait(s.comm):
                return None
            start = time.time()
            duration = self.times.compute(w, job, start - s.origin) if self.inject else 0.0
            out = self._run_jobs(np.asarray(point), [(w, job)], stop, start + duration)
            done = time.time()
            if out is None or (self.inject and s.comm > 0 and stop.wait(s.comm)):
                return None
            return out[w], [("download", start - t0), ("compute", done - start), ("upload", time.time() - done)]
        finally:
            with self.cv:
                s.job_stop = None

    # ------------------------------------------------------------------ compute
    def _plan(self) -> list[tuple[Slot, list[int], list[int]]]:
        """(worker, jobs, keys) of the next rollout, taken now: the first computing worker's
        jobs, then those of the other workers computing at the same round and point, up to
        ``batch_max`` jobs in all (with injected delays one job of one worker: each has its own
        nominal duration)."""
        lead = next(s for s in self.slots.values() if s.computing())
        plan, room = [], self.batch_max
        for s in self.slots.values():
            if room <= 0 or (self.inject and plan):
                break
            if s.computing() and s.round == lead.round and s.point_digest == lead.point_digest:
                k = s.batch_size(room)
                plan.append((s, *s.take(k)))
                room -= k
        return plan

    def _sleep(self) -> float | None:
        """How long the idle compute thread may sleep: until per-gradient jobs are due to roll
        out, or until a waiting worker goes on past its target (None: until notified)."""
        now, out = time.time(), []
        if self.requests:
            out.append(GATHER)
        out.extend(s.release_at - now for s in self.slots.values()
                   if s.active and s.release_at is not None and s.release_at > now)
        return min(out) if out else None

    def _jobs_due(self) -> bool:
        """Per-gradient jobs to roll out: one of every hosted worker (each has one in flight), or
        whatever has waited ``GATHER`` seconds for the others."""
        return bool(self.requests) and (len(self.requests) >= len(self.slots)
                                        or time.monotonic() - self.requests[0].since >= GATHER)

    def _serve_jobs(self) -> None:
        """Roll the waiting per-gradient jobs out together (one oracle call, each job at its own
        point: bit-identical to one call each) and hand every caller its gradient."""
        with self.cv:
            batch, self.requests = self.requests, []
        start = time.time()
        try:
            outs = self.oracle.gradients_many([(q.point, [(q.w, q.job)]) for q in batch])
            seconds = time.time() - start  # each job took its worker the whole rollout
            for q, out in zip(batch, outs):
                q.result = (out[q.w], [("compute", seconds)])
        except Exception as exc:  # a bug or a broken env: every caller reports it
            for q in batch:
                q.error = f"job ({q.w}, {q.job}) failed: {type(exc).__name__}: {exc}"
        for q in batch:
            q.done.set()

    def _compute_loop(self) -> None:
        while True:
            with self.cv:
                while (not self.closing and not self._jobs_due()
                       and not any(s.computing() for s in self.slots.values())):
                    self.cv.wait(self._sleep())
                if self.closing:
                    for q in self.requests:  # not computed: the runtime is closing
                        q.done.set()
                    return
                serve = self._jobs_due()
                if not serve:
                    plan = self._plan()
                    lead = plan[0][0]
                    rounds = [s.round for s, _, _ in plan]
                    stop = threading.Event()
                    for s, _, _ in plan:
                        s.job_stop = stop
                    start_wall = max(time.time(), max(s.not_before for s, _, _ in plan))
                    target = start_wall
                    if self.inject:
                        # Nominal times as in the simulator: begin + exact sum of the durations.
                        duration = self.times.compute(lead.w, plan[0][1][0], start_wall - lead.origin)
                        lead.elapsed += Fraction(duration)
                        lead.inflight_finish = lead.nominal_begin + float(lead.elapsed)
                        target = start_wall + duration
                        lead.busy_until = target
                        lead.stamp += 1
                        self.cv.notify_all()
                    wait = max(s.not_before for s, _, _ in plan) - time.time()
                    point = lead.point
                    jobs = [(s.w, key) for s, _, keys in plan for key in keys]
            if serve:
                self._serve_jobs()
                continue
            out = None
            try:
                if wait <= 0 or not stop.wait(wait):  # injected download of the round's point
                    out = self._run_jobs(point, jobs, stop, target)
            except Exception as exc:  # a bug or a broken env: reported to the driver, which stops
                import traceback
                with self.cv:
                    self.error = (f"job ({lead.w}, {plan[0][1][0]}) failed: {type(exc).__name__}: {exc}\n"
                                  f"{traceback.format_exc()}")
                    for s, _, _ in plan:
                        s.active = False
            with self.cv:
                now = time.time()  # one finish time for the whole rollout (its gradients tie)
                for (s, own, _), r in zip(plan, rounds):
                    s.job_stop = None
                    finished = s.inflight_finish if self.inject else now - s.round_wall
                    if not self.inject and s.finishes and s.round == r:  # in job order, even if the clock steps back
                        finished = max(finished, s.finishes[-1])
                    s.inflight_finish = None
                    if out is not None:
                        s.completed += len(own)
                        # one row per trajectory (timings.csv replays them): the rollout took the
                        # worker this long for its own trajectories, shared among them
                        s.timings.extend([("compute", (now - start_wall) / len(own))] * len(own))
                        if s.round == r and s.active:
                            s.results.append(out[s.w])
                            s.total = out[s.w] if s.total is None else s.total.merge(out[s.w])
                            s.finishes.extend([finished] * len(own))
                            if self.release and s.release_at is None and s.started >= s.target:
                                s.release_at = s.round_wall + RELEASE * max(0.0, now - s.round_wall)
                    s.stamp += 1
                self.cv.notify_all()

    def _run_jobs(self, point: np.ndarray, jobs: list[tuple[int, int]], stop: threading.Event,
                  target: float) -> dict[int, WorkerBatch] | None:
        """The gradients at ``point`` of ``jobs`` ((worker, key) pairs), rolled out together and
        summed per worker (one oracle call); padded to the epoch ``target`` when delays are
        injected; None if ``stop`` was set before they finished."""
        try:  # the oracle checks ``stop`` before every env step: cancellation within one step
            out = self.oracle.gradients(point, jobs, should_stop=stop.is_set)
        except Cancelled:
            return None
        if out is None or stop.is_set():
            return None
        left = target - time.time()
        if left > 0 and stop.wait(left):
            return None
        return out

    def shutdown(self) -> None:
        with self.cv:
            self.closing = True
            for s in self.slots.values():
                s.active = False
                if s.job_stop is not None:
                    s.job_stop.set()
            self.cv.notify_all()
        self.leave_group()
        self._close_listen()
        if self.link is not None:
            self.link.close()
