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

Processes: plain ``python -c`` subprocesses (fresh interpreters: no forked torch / MuJoCo state,
and unlike multiprocessing's spawn they never re-run the caller's ``__main__`` and need no
resource-tracker helper), each connected by a socket pair; the work counter is a locked
temporary file.

Lifetime: :meth:`ParallelOracle.close` stops the processes (stop message, then terminate / kill
after a short grace); a finalizer does the same if close is never called. The processes ignore
SIGINT (the parent handles Ctrl-C and closes the pool) and exit on their own when the parent
disappears (their socket closes).
"""
from __future__ import annotations

import fcntl
import math
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Callable, Sequence

import numpy as np

from apga.errors import ApgaError
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


# ----------------------------------------------------------------------------- shared counter
# The claim counter lives in an unlinked temporary file shared by all processes: (request id,
# next unit, number of units) as three int64, guarded by a POSIX record lock (fcntl.lockf locks
# belong to processes, so they exclude each other even through one inherited descriptor). No
# multiprocessing semaphore, hence no resource-tracker helper process.
_COUNTER = struct.Struct("<qqq")


def _set_request(fd: int, request: int, total: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        os.pwrite(fd, _COUNTER.pack(request, 0, total), 0)
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _end_request(fd: int, request: int) -> None:
    """No more claims for ``request`` (the others finish what they hold)."""
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        rid, _, total = _COUNTER.unpack(os.pread(fd, _COUNTER.size, 0))
        if rid == request:
            os.pwrite(fd, _COUNTER.pack(rid, total, total), 0)
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _claim(fd: int, request: int):
    """Next unit index of ``request``, or None when none is left (or the request is over)."""
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        rid, nxt, total = _COUNTER.unpack(os.pread(fd, _COUNTER.size, 0))
        if rid != request or nxt >= total:
            return None
        os.pwrite(fd, _COUNTER.pack(rid, nxt + 1, total), 0)
        return nxt
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- child process
CHILD_CODE = "import sys; sys.path[:0] = {path!r}; from apga.oracle.parallel import _child_entry; _child_entry()"


def _child_entry() -> None:
    """Main of a rollout process: ``python -c CHILD_CODE CONN_FD COUNTER_FD``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(int(sys.argv[1]))
    counter = int(sys.argv[2])
    parent = os.getppid()
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
    oracle = None
    try:
        init_args = conn.recv()
        from apga.oracle.rl import RLOracle

        oracle = RLOracle(*init_args)
    except BaseException:
        outbox.put(("init_error", traceback.format_exc()))
        thread.join(5.0)
        os._exit(1)
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
            while os.getppid() == parent:  # stop claiming if the parent died meanwhile
                i = _claim(counter, request)
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
class PoolError(ApgaError):
    """A rollout process died or could not start (the pool is then unusable)."""


class RolloutError(RuntimeError):
    """An exception inside a rollout process; the message carries its traceback."""


def _shutdown(procs, conns, counter, ready, state) -> None:
    """Stop the processes: no new claims, stop message, grace, then terminate / kill.
    A process still starting up (not in ``ready``), or any after an abandoned request (it may
    be mid-unit for seconds), holds nothing worth a grace: terminated at once."""
    try:
        _set_request(counter, -1, 0)
    except OSError:
        pass
    for k, (p, c) in enumerate(zip(procs, conns)):
        try:
            if k in ready and not state.get("abandoned") and p.poll() is None:
                c.send(("stop",))
            else:
                p.terminate()
        except Exception:
            pass
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        for stop in (p.terminate, p.kill):
            if p.poll() is None:
                stop()
                try:
                    p.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
    for c in conns:
        try:
            c.close()
        except Exception:
            pass
    try:
        os.close(counter)
    except OSError:
        pass


class ProcessPool:
    """``children`` rollout processes (fresh interpreters), each holding an RLOracle built from
    ``init_args``; :meth:`run` executes a list of units on them and on ``local_oracle``."""

    def __init__(self, children: int, init_args: tuple, local_oracle):
        self.local = local_oracle
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.ready: set[int] = set()
        self.request = 0
        self.broken: str | None = None
        self.units_local = self.units_remote = 0  # units computed here / by the children
        with tempfile.TemporaryFile() as f:  # unlinked at once: nothing is left on disk
            self.counter = os.dup(f.fileno())
        os.pwrite(self.counter, _COUNTER.pack(0, 0, 0), 0)
        code = CHILD_CODE.format(path=[p for p in sys.path if p])
        try:
            for _ in range(children):
                mine, theirs = socket.socketpair()
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", code, str(theirs.fileno()), str(self.counter)],
                        pass_fds=(theirs.fileno(), self.counter), stdin=subprocess.DEVNULL, close_fds=True)
                finally:
                    theirs.close()
                self.procs.append(proc)
                conn = Connection(mine.detach())
                self.conns.append(conn)
                conn.send(init_args)
        except BaseException:
            _shutdown(self.procs, self.conns, self.counter, set(), {})
            raise
        self._state = {"abandoned": False}
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns, self.counter, self.ready,
                                           self._state)

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
        _set_request(self.counter, request, len(units))
        results: list = [None] * len(units)
        done = [False] * len(units)
        pending = len(units)
        try:
            msg = ("work", request, units)
            for k, c in enumerate(self.conns):
                try:
                    c.send(msg)
                except OSError:
                    self._dead(k)
            while True:
                i = _claim(self.counter, request)
                if i is None:
                    break
                results[i], done[i] = _run_unit(self.local, units[i]), True
                self.units_local += 1
                pending -= 1
                pending -= self._drain(request, results, done, timeout=0.0)
            while pending:
                pending -= self._drain(request, results, done, timeout=None)
            self._drain(request, results, done, timeout=0.0)  # a dead process is reported now
        except BaseException:
            _end_request(self.counter, request)  # the others stop claiming units of this request
            # Interrupted (Ctrl-C, an error): the others may be mid-unit for a while; a close()
            # now need not wait for them (they hold nothing to save).
            self._state["abandoned"] = True
            raise
        return results

    def _drain(self, request: int, results: list, done: list, timeout) -> int:
        """Receive what the children sent; returns how many units of ``request`` completed."""
        got = 0
        for conn in wait(self.conns, timeout):
            k = self.conns.index(conn)
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._dead(k)
            if msg[0] == "ready":
                self.ready.add(k)
            got += self._handle(msg, request, results, done)
        return got

    def _dead(self, k: int) -> None:
        """Child k is gone (its socket closed): report its error message if it sent one."""
        p, conn = self.procs[k], self.conns[k]
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] in ("init_error", "error"):
                    self._handle(msg, msg[1] if msg[0] == "error" else self.request, [], [])
        except (EOFError, OSError):
            pass
        try:
            p.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        self.broken = (f"rollout process {k + 1} (pid {p.pid}) exited unexpectedly (exit code {p.poll()}); "
                       "was it killed (out of memory?)? runtime.processes: 1 runs without a pool")
        raise PoolError(self.broken)

    def _handle(self, msg, request: int, results: list, done: list) -> int:
        kind = msg[0]
        if kind == "ready" or kind == "bye":
            return 0
        if kind == "init_error":
            last = msg[1].strip().splitlines()[-1] if msg[1].strip() else "unknown error"
            self.broken = f"a rollout process could not build its oracle ({last}); runtime.processes: 1 runs without a pool"
            raise PoolError(self.broken)
        _, rid, i, payload = msg
        if rid != request:
            return 0  # a late message of an abandoned request
        if kind == "error":
            raise RolloutError(f"a rollout process failed on unit {i}:\n{payload}")
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

    def __init__(self, env, policy, n_workers: int, seed: int, processes: int = 0, local=None):
        from apga.oracle.rl import RLOracle

        # ``local``: this process's RLOracle of the same configs, if the caller has built it
        self.local = local if local is not None else RLOracle(env, policy, n_workers, seed)
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

    def gradients(self, point: np.ndarray, jobs: Sequence[Job],
                  should_stop: Callable[[], bool] | None = None) -> dict[int, WorkerBatch]:
        if should_stop is not None:  # a runtime that cancels steps runs its own processes
            return self.local.gradients(point, jobs, should_stop)
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
    """The oracle for runtime.processes = ``processes`` cores (0 = all), bit-identical for any count.

    MuJoCo envs that :mod:`apga.oracle.fast_mujoco` covers run in this process, their physics on
    a ``mujoco.batch.Batch`` with one thread per core; every other env gets a ParallelOracle
    (one process per core) when more than one core is asked for.
    """
    from apga.oracle.rl import RLOracle

    cores = resolve_processes(processes)
    local = RLOracle(env, policy, n_workers, seed, threads=cores)
    if cores == 1 or all(local.batched(w) for w in range(local.n_workers)):
        return local
    try:
        return ParallelOracle(env, policy, n_workers, seed, cores, local=local)
    except BaseException:
        local.close()
        raise
