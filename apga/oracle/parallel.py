"""Use every core: an :class:`Oracle` that spreads whole chunks of rollouts over processes.

``ParallelOracle(env, policy, n_workers, seed, processes)`` behaves exactly like
``RLOracle(env, policy, n_workers, seed)`` (bit-identical gradients, returns and evaluations)
but runs the work of one call on ``processes`` processes: the calling process plus
``processes - 1`` spawned ones. Each spawned process builds its own RLOracle from the configs
once (an RLOracle holds environments and is not picklable) and then only ever receives WHOLE
units of work: a list of (point, chunk) tasks, or of evaluation tasks, never single steps.

How one call runs: the parent plans the chunks exactly as ``RLOracle.plan`` does (a function of
the config and the jobs only), groups consecutive chunks into units (the grouping never changes
a result: see ``RLOracle.run_tasks``), broadcasts the list of units to every process and then all
processes, the parent included, claim units one at a time from a shared counter until none is
left (dynamic balance). The parent puts the per-chunk results back in chunk order and combines
them with ``RLOracle.combine``: the sums are those of the single-process path, bit for bit.

A round can only be split into its chunks: with ``policy.rollout_batch`` = B a round of M
trajectories has ceil(M / B) chunks, so B should be at most M / processes for every process to
get work (rounds cannot be pipelined: the next point depends on this round's result).

Lifetime: :meth:`ParallelOracle.close` stops the processes (stop message, then terminate / kill
after a short grace); a finalizer does the same if close is never called, spawned processes are
daemons, ignore SIGINT (the parent handles Ctrl-C and closes the pool) and exit on their own
when the parent disappears (their pipe closes).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import traceback
import weakref
from multiprocessing.connection import wait
from typing import Sequence

import numpy as np

from apga.oracle.base import Job, Oracle, WorkerBatch

GRACE_SECONDS = 2.0  # close(): how long a process may take to stop before it is terminated


def resolve_processes(processes: int) -> int:
    """runtime.processes -> a process count (0 = one per core available to this process)."""
    processes = int(processes)
    if processes < 0:
        raise ValueError(f"processes must be >= 0 (0 = one per core), got {processes}")
    if processes == 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return processes


# ----------------------------------------------------------------------------- units of work
def _run_unit(oracle, unit):
    """Execute one unit on an RLOracle (in whichever process claimed it)."""
    kind = unit[0]
    if kind == "grad":
        return oracle.run_tasks(unit[1])
    if kind == "eval":
        _, point, tasks, key, deterministic = unit
        return [oracle.eval_task(point, t, key, deterministic) for t in tasks]
    raise ValueError(f"unknown unit kind {kind!r}")


def group_units(sizes: Sequence[int], processes: int, cap: int) -> list[list[int]]:
    """Consecutive groups of task indices: at most ``cap`` trajectories per group (a task larger
    than ``cap`` stays whole) and about total/processes per group, so that every process gets
    work. The grouping changes nothing in the results, only who computes what."""
    total = sum(sizes)
    target = max(1, min(cap, math.ceil(total / max(1, processes))))
    units, cur, size = [], [], 0
    for i, n in enumerate(sizes):
        if cur and size + n > target:
            units.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        units.append(cur)
    return units


# ----------------------------------------------------------------------------- child process
def _claim(lock, shared, request: int):
    """Next unit index of ``request``, or None when none is left (or the request is over)."""
    with lock:
        rid, nxt, total = shared[0], shared[1], shared[2]
        if rid != request or nxt >= total:
            return None
        shared[1] = nxt + 1
        return nxt


def _child_main(conn, lock, shared, init_args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    outbox: queue.Queue = queue.Queue()

    def sender():  # sends in the background: a large result never stalls the next claim
        while True:
            msg = outbox.get()
            try:
                conn.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                os._exit(0)  # the parent is gone
            if msg[0] in ("init_error", "bye"):
                return

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        from apga.oracle.rl import RLOracle

        oracle = RLOracle(*init_args)
    except BaseException:
        outbox.put(("init_error", traceback.format_exc()))
        thread.join(5.0)
        return
    outbox.put(("ready",))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            if msg[0] == "stop":
                break
            _, request, units = msg
            while True:
                i = _claim(lock, shared, request)
                if i is None:
                    break
                try:
                    res = _run_unit(oracle, units[i])
                except BaseException:
                    outbox.put(("error", request, i, traceback.format_exc()))
                    break
                outbox.put(("result", request, i, res))
    finally:
        oracle.close()
        outbox.put(("bye",))
        thread.join(5.0)
    # Nothing left to flush: skip the interpreter's teardown (torch, MuJoCo), which only makes
    # close() wait.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- the pool
class PoolError(RuntimeError):
    """A rollout process failed or died."""


def _start_without_main(proc) -> None:
    """Start a spawn process without re-running the parent's ``__main__`` in it.

    Spawn normally re-imports the main script in the child (so that objects defined there can
    be unpickled), which breaks scripts without an ``if __name__ == "__main__"`` guard. Only
    apga objects ever travel to the rollout processes, so the main module is hidden from
    multiprocessing while it prepares the child.
    """
    main = sys.modules.get("__main__")
    if main is None:
        proc.start()
        return
    missing = object()
    saved = {k: main.__dict__.get(k, missing) for k in ("__file__", "__spec__")}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is missing:
                main.__dict__.pop(k, None)
            else:
                main.__dict__[k] = v


def _shutdown(procs, conns, shared, lock, ready) -> None:
    """Stop the processes: no new claims, stop message, grace, then terminate / kill.
    A process still starting up (not in ``ready``) holds nothing worth a grace: terminated."""
    try:
        with lock:
            shared[0] = -1
    except Exception:
        pass
    for k, (p, c) in enumerate(zip(procs, conns)):
        try:
            if k in ready:
                c.send(("stop",))
            else:
                p.terminate()
        except Exception:
            pass
    for p in procs:
        p.join(GRACE_SECONDS)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for c in conns:
        try:
            c.close()
        except Exception:
            pass


class ProcessPool:
    """``children`` spawned processes, each holding an RLOracle built from ``init_args``;
    :meth:`run` executes a list of units on them and on the calling process's own oracle."""

    def __init__(self, children: int, init_args: tuple, local_oracle):
        self.local = local_oracle
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch / MuJoCo state
        self.lock = ctx.Lock()
        self.shared = ctx.RawArray("q", 3)  # request id, next unit, number of units
        self.procs, self.conns = [], []
        self.ready = set()
        self.request = 0
        self.broken: str | None = None
        self.units_local = self.units_remote = 0  # units computed here / by the children
        try:
            for k in range(children):
                parent_end, child_end = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_child_main, args=(child_end, self.lock, self.shared, init_args),
                                name=f"apga-rollout-{k + 1}", daemon=True)
                _start_without_main(p)
                child_end.close()
                self.procs.append(p)
                self.conns.append(parent_end)
        except BaseException:
            _shutdown(self.procs, self.conns, self.shared, self.lock, set())
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns, self.shared, self.lock,
                                           self.ready)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        if self._finalizer.alive:
            try:  # learn which processes are up (their "ready" may still sit in the pipe)
                for k, c in enumerate(self.conns):
                    while k not in self.ready and c.poll():
                        if c.recv()[0] == "ready":
                            self.ready.add(k)
            except (EOFError, OSError):
                pass
        self._finalizer()  # runs _shutdown once

    def wait_ready(self) -> None:
        """Block until every process has built its oracle (e.g. before timing anything)."""
        while len(self.ready) < len(self.conns):
            self._drain(-1, [], [], timeout=None)

    def run(self, units: list) -> list:
        """Results of ``units`` (in order), computed by all processes together."""
        if self.broken:
            raise PoolError(f"the rollout pool is unusable: {self.broken}")
        if not self._finalizer.alive:
            raise PoolError("the rollout pool is closed")
        self.request += 1
        request = self.request
        with self.lock:
            self.shared[0], self.shared[1], self.shared[2] = request, 0, len(units)
        msg = ("work", request, units)
        for p, c in zip(self.procs, self.conns):
            try:
                c.send(msg)
            except (BrokenPipeError, OSError):
                self._dead(p, c)
        results: list = [None] * len(units)
        done = [False] * len(units)
        pending = len(units)
        try:
            while True:
                i = _claim(self.lock, self.shared, request)
                if i is None:
                    break
                results[i], done[i] = _run_unit(self.local, units[i]), True
                self.units_local += 1
                pending -= 1
                pending -= self._drain(request, results, done, timeout=0.0)
            while pending:
                pending -= self._drain(request, results, done, timeout=None)
        except BaseException:
            with self.lock:  # stop the others from claiming more of this request
                if self.shared[0] == request:
                    self.shared[1] = self.shared[2]
            raise
        return results

    def _drain(self, request: int, results: list, done: list, timeout) -> int:
        """Receive what the children sent; returns how many units of ``request`` completed."""
        got = 0
        sentinels = {p.sentinel: p for p in self.procs}
        for obj in wait(self.conns + list(sentinels), timeout):
            if obj in sentinels:
                p = sentinels[obj]
                self._dead(p, self.conns[self.procs.index(p)])
            try:
                msg = obj.recv()
            except (EOFError, OSError):
                continue  # the sentinel will report the exit
            if msg[0] == "ready":
                self.ready.add(self.conns.index(obj))
            got += self._handle(msg, request, results, done)
        return got

    def _dead(self, p, conn) -> None:
        """A child is gone: report its own error message if it sent one, else its exit."""
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] in ("init_error", "error"):
                    self._handle(msg, msg[1] if msg[0] == "error" else self.request, [], [])
        except (EOFError, OSError):
            pass
        p.join(1.0)
        self.broken = f"rollout process {p.name} (pid {p.pid}) exited unexpectedly (exit code {p.exitcode})"
        raise PoolError(self.broken)

    def _handle(self, msg, request: int, results: list, done: list) -> int:
        kind = msg[0]
        if kind == "ready" or kind == "bye":
            return 0
        if kind == "init_error":
            self.broken = "a rollout process could not build its oracle:\n" + msg[1]
            raise PoolError(self.broken)
        _, rid, i, payload = msg
        if rid != request:
            return 0  # a late message of an abandoned request
        if kind == "error":
            raise PoolError(f"a rollout process failed on unit {i}:\n{payload}")
        if done[i]:
            return 0
        results[i], done[i] = payload, True
        self.units_remote += 1
        return 1


# ----------------------------------------------------------------------------- the oracle
class ParallelOracle(Oracle):
    """An RLOracle whose rollouts run on ``processes`` processes (this one included).

    Results are bit-identical to ``RLOracle(env, policy, n_workers, seed)``; see the module
    docstring. ``processes``: as runtime.processes (0 = one per core); 1 builds no pool.
    """

    def __init__(self, env, policy, n_workers: int, seed: int, processes: int = 0):
        from apga.oracle.rl import RLOracle

        self.local = RLOracle(env, policy, n_workers, seed)  # validates the configs first
        self.dim, self.n_workers = self.local.dim, self.local.n_workers
        self.processes = resolve_processes(processes)
        self.pool = None
        if self.processes > 1:
            try:
                self.pool = ProcessPool(self.processes - 1, (env, policy, int(n_workers), int(seed)), self.local)
            except BaseException:
                self.local.close()
                raise

    # ------------------------------------------------------------------ Oracle API
    def initial_point(self) -> np.ndarray:
        return self.local.initial_point()

    def gradients(self, point: np.ndarray, jobs: Sequence[Job]) -> dict[int, WorkerBatch]:
        return self.gradients_many([(point, jobs)])[0]

    def gradients_many(self, requests) -> list[dict[int, WorkerBatch]]:
        local = self.local
        tasks, owner = local.plan_many(requests)
        if self.pool is None or not tasks:
            return local.combine_many(requests, owner, local.run_tasks(tasks))
        groups = group_units([len(c) for _, c in tasks], self.processes, local.rollout_batch)
        out = self.pool.run([("grad", [tasks[i] for i in g]) for g in groups])
        results = [res for unit in out for res in unit]
        return local.combine_many(requests, owner, results)

    def evaluate(self, point: np.ndarray, episodes: int, key: int, deterministic: bool = True) -> float:
        local = self.local
        point = local._check_point(point)
        if self.pool is None:
            return local.evaluate(point, episodes, key, deterministic)
        # Episode returns do not depend on their batch: split so that every process gets some.
        batch = min(local.rollout_batch, max(1, math.ceil(episodes / self.processes)))
        tasks = local.eval_plan(episodes, batch)
        groups = group_units([e - s for _, s, e in tasks], self.processes, local.rollout_batch)
        out = self.pool.run([("eval", point, [tasks[i] for i in g], key, deterministic) for g in groups])
        return local.eval_combine(tasks, [t for unit in out for t in unit])

    def wait_ready(self) -> None:
        """Block until the rollout processes are up (they start in the background)."""
        if self.pool is not None:
            self.pool.wait_ready()

    def close(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
        finally:
            self.local.close()

    def __getattr__(self, name):  # spec, horizon, keys, ...: those of the local RLOracle
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)


def make_oracle(env, policy, n_workers: int, seed: int, processes: int = 1):
    """RLOracle for one process, ParallelOracle otherwise (runtime.processes semantics)."""
    if resolve_processes(processes) == 1:
        from apga.oracle.rl import RLOracle

        return RLOracle(env, policy, n_workers, seed)
    return ParallelOracle(env, policy, n_workers, seed, processes)
