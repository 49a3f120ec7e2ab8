"""Hardening of runs against hostile or absurd input and a hostile system (docs/guarantees.md):
environments that cannot be built and runs that cannot fit in memory are refused in one line
before anything is written; matplotlib's cache stays out of $HOME; --resume refuses a changed
trace or a lost checkpoint; a failed write (disk full) ends in one line with status failed; pool
workers die with their parent."""
from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager

from apga.config import short_repr
from apga.errors import ApgaError, ConfigError


@contextmanager
def env_construction(env_id: str):
    """Around building a run's environments: any exception becomes one ConfigError naming
    ``env.id`` (Gymnasium ids of removed versions such as Hopper-v3 or Pusher-v4 on MuJoCo 3 raise
    ImportError, ``phys2d/...`` needs jax, ``module:Id`` imports a module that may be missing).
    Warnings raised meanwhile (Gymnasium's "out of date" notes) are shown only if the build
    succeeds, so a refusal stays one line."""
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        except ApgaError:
            raise
        except Exception as exc:
            text = str(exc).strip().splitlines()
            first = short_repr(text[0], 200)[1:-1] if text else ""
            what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            raise ConfigError(f"env.id: {short_repr(env_id)} could not be created ({what}); check the id and its "
                              "version suffix (e.g. Hopper-v5) and that the packages it needs are installed") from None
    shown = set()
    for w in caught:  # one of each: every worker's environment repeats the same note
        key = (str(w.message), w.category)
        if key not in shown:
            shown.add(key)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


# --- memory -----------------------------------------------------------------------------------
# Lower bounds of what a run holds, per unit (bytes). They only catch absurd sizes: a run the
# check lets through may still need more, but a refused one could never have fitted.
BASE_BYTES = 64 << 20  # the interpreter with numpy and yaml loaded (measured: 78 MB for a small run)
PER_WORKER_BYTES = 400  # counters, job keys and heap entries of one worker (measured: ~470)
PER_JOB_BYTES = 100  # one (worker, job) entry of a round's list of jobs to compute
PER_PROCESS_BYTES = 50 << 20  # one rollout process (runtime.processes): an interpreter with numpy, gym
VECTORS_PER_WORKER = 1  # each worker holds at least one d-vector (its gradient sum)
VECTORS_SHARED = 3  # parameters, momentum, the aggregate


def parameter_lower_bound(cfg) -> int:
    """At least how many parameters the policy has (obs and action sizes are >= 1; the env is
    not built yet). The synthetic problem has exactly env.kwargs.dim."""
    if cfg.env.id == "synthetic":
        dim = cfg.env.kwargs.get("dim", 10) if isinstance(cfg.env.kwargs, dict) else 10
        return int(dim) if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else 1
    sizes = [1, *cfg.policy.hidden]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) + 2 * (sizes[-1] + 1)


def memory_limit() -> tuple[int, str]:
    """The memory this process may use: the smallest of physical memory, the cgroup's limit and
    the address-space rlimit, with where it comes from."""
    import resource
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    limits.append((int(line.split()[1]) * 1024, "physical memory"))
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text.isdigit():
            limits.append((int(text), "the cgroup memory limit"))
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "the address-space limit (ulimit -v)"))
    return min(limits) if limits else (1 << 62, "no known limit")


def memory_estimate(cfg) -> int:
    """A lower bound of the bytes a run holds."""
    d = parameter_lower_bound(cfg)
    n, a, p = cfg.workers.n, cfg.algorithm, cfg.policy
    batch = max(a.batch_size, a.init_batch_size or 0)
    horizon = 0 if cfg.env.id == "synthetic" else cfg.env.horizon
    return (BASE_BYTES
            + n * PER_WORKER_BYTES
            + (n * VECTORS_PER_WORKER + VECTORS_SHARED) * 8 * d
            + batch * PER_JOB_BYTES
            + horizon * 8 * (1 + 2 * p.rollout_batch)  # discount powers; one rollout batch of obs, reward
            + (cfg.runtime.processes if cfg.runtime.name == "sim" and cfg.runtime.processes > 1 else 0)
            * PER_PROCESS_BYTES * (0 if cfg.env.id == "synthetic" else 1))


# The keys a memory refusal can blame, with how to put each back to its default.
_SIZE_KEYS = {
    "workers.n": lambda c, d: setattr(c.workers, "n", d.workers.n),
    "algorithm.batch_size": lambda c, d: (setattr(c.algorithm, "batch_size", d.algorithm.batch_size),
                                          setattr(c.algorithm, "init_batch_size", None)),
    "env.horizon": lambda c, d: setattr(c.env, "horizon", d.env.horizon),
    "policy.hidden": lambda c, d: setattr(c.policy, "hidden", d.policy.hidden),
    "policy.rollout_batch": lambda c, d: setattr(c.policy, "rollout_batch", d.policy.rollout_batch),
    "env.kwargs.dim": lambda c, d: setattr(c.env, "kwargs", {**c.env.kwargs, "dim": 10}),
    "runtime.processes": lambda c, d: setattr(c.runtime, "processes", d.runtime.processes),
}


def _gb(x: float) -> str:
    return f"{x / 2**30:.3g} GB"


def check_memory(cfg) -> None:
    """Refuse, before anything is allocated or written, a run that cannot fit in memory. The
    error names the key whose default would shrink the estimate most."""
    import copy

    from apga.config import Config
    need = memory_estimate(cfg)
    limit, source = memory_limit()
    if need <= limit:
        return
    default = Config()

    def without(key: str) -> int:
        c = copy.deepcopy(cfg)
        _SIZE_KEYS[key](c, default)
        return memory_estimate(c)

    if cfg.env.id == "synthetic":  # the keys that size this kind of run
        keys = ["workers.n", "algorithm.batch_size"] + (["env.kwargs.dim"] if isinstance(cfg.env.kwargs, dict) else [])
    else:
        keys = [k for k in _SIZE_KEYS if k != "env.kwargs.dim"]
    key = min(keys, key=without)
    raise ConfigError(f"{key}: the run needs at least {_gb(need)} of memory (workers.n={cfg.workers.n}, "
                      f"algorithm.batch_size={cfg.algorithm.batch_size}, env.horizon={cfg.env.horizon}, "
                      f"at least {parameter_lower_bound(cfg)} parameters), more than the {_gb(limit)} of "
                      f"{source}; lower {key}")


# --- matplotlib's cache -------------------------------------------------------------------------

def matplotlib_config_dir() -> str | None:
    """Point matplotlib's config and cache dir (MPLCONFIGDIR) away from $HOME, unless the user
    chose one or matplotlib is already loaded: a per-user folder in the temp dir, created 0700.
    A folder of that name that is not ours, or open to others, is not used (another user could
    plant a matplotlibrc there, whose backend setting imports a module): then a fresh private
    temp folder is made instead. Returns the folder chosen, or None."""
    import stat
    import sys
    if "MPLCONFIGDIR" in os.environ or "matplotlib" in sys.modules:
        return None
    path = os.path.join(tempfile.gettempdir(), f"apga-matplotlib-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        path = None
    if path is not None:
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            path = None
    if path is None:
        try:
            path = tempfile.mkdtemp(prefix="apga-matplotlib-")
        except OSError:  # no writable temp dir: leave matplotlib to its own default
            return None
    os.environ["MPLCONFIGDIR"] = path
    return path


# --- resume -----------------------------------------------------------------------------------

def check_same_trace(state: dict, times) -> None:
    """--resume of a run with ``workers.compute_time: {trace: FILE}``: the config stores only the
    path, so the file's sha256 recorded at the start must match, or the resumed run would
    silently differ from an uninterrupted one."""
    recorded = state.get("trace_sha256")
    now = times.compute.trace_sha256
    if recorded is not None and recorded != now:
        path = state["resolved"]["workers"]["compute_time"].get("trace")
        raise ApgaError(f"workers.compute_time.trace: {short_repr(path)} changed since the run started "
                        f"(sha256 {recorded[:12]}... then, {str(now)[:12]}... now); restore the file, or start a "
                        "new run")


def check_restartable(out_dir: str) -> None:
    """--resume without a checkpoint restarts the run from its config.yaml, which is right only
    when the run was killed before its first checkpoint (written right after row 0). If the run
    got further (summary.json exists, or metrics.csv has more than row 0), the checkpoint was
    removed: refuse rather than delete the results and run again (a Ray run cannot be redone)."""
    summary = os.path.join(out_dir, "summary.json")
    metrics = os.path.join(out_dir, "metrics.csv")
    rows = 0
    try:
        with open(metrics, "rb") as f:
            rows = f.read(1 << 16).count(b"\n") - 1  # the header does not count
    except OSError:
        pass
    if os.path.exists(summary) or rows > 1:
        raise ApgaError(f"--resume {out_dir!r}: checkpoint.npz is missing, but the run got past its first "
                        "checkpoint; nothing was changed. Restore checkpoint.npz to resume, or start a new run "
                        "(--force to overwrite)")


# --- write failures (disk full) ---------------------------------------------------------------

def write_failure(trainer, runtime, exc: OSError) -> ApgaError:
    """The one-line error for a run that could not write (ENOSPC, EDQUOT, EIO...). metrics.csv
    and the TensorBoard files were already cut back to whole lines and records (files.write_whole),
    and the checkpoint is the last complete one (atomic). summary.json is set to failed, best
    effort: on a full disk even that small write may fail, and then it is tried in place."""
    where = exc.filename or trainer.out_dir
    message = (f"{where}: cannot write ({exc.strerror or exc}); the run stopped at its last checkpoint and can "
               f"be resumed with `apga train --resume {trainer.out_dir}` once there is room")
    try:
        trainer._summary(runtime, "failed", error=message)
    except OSError:
        _summary_in_place(trainer.out_dir, message)
    return ApgaError(message)


def _summary_in_place(out_dir: str, message: str) -> None:
    """Last resort when even a temp file cannot be made: overwrite summary.json's status in place
    (its old blocks are reused, so a full disk does not stop it)."""
    import json
    path = os.path.join(out_dir, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
        summary.update(status="failed", error=message)
        data = (json.dumps(summary, indent=2) + "\n").encode()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, data)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        pass


# --- orphans ----------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` (default SIGTERM) to this process when its parent dies, so a
    pool worker never outlives a parent killed with SIGKILL or SIGHUP (it would hold run locks and
    ~300 MB forever). Linux only; returns whether it is in place. If the parent already died
    before the request, exit now."""
    import ctypes
    import multiprocessing
    import signal
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig or signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # orphaned before the request
        os._exit(1)
    return True
