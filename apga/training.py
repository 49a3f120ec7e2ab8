"""Run one configuration: build oracle, time model, protocol and runtime; log, evaluate,
checkpoint and resume. ``apga train`` and the Python API (apga.train / apga.resume) both land here.

Outputs in the run directory:
  config.yaml      the resolved config (every default filled in)
  metrics.csv      one row per model update (row 0 = the initial point, before any update)
  tb/              TensorBoard events with the same scalars (tb/time/: eval return by simulated ms)
  checkpoint.pkl   state at the last checkpointed update (exact resume)
  summary.json     final figures (written at the end, and at every checkpoint with status running;
                   status failed + error when the run stopped on an error)
  returns.png      return against time
  .lock            held (flock) by the process writing the run

What is atomic, how resume works and what is deterministic: docs/guarantees.md.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import socket
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np
import yaml

from apga import config as cfgmod
from apga.config import Config
from apga.errors import ApgaError, ConfigError
from apga.files import AppendLog, atomic_pickle, atomic_write_text, write_whole
from apga.protocol.algorithms import make_algorithm

COLUMNS = ["time", "iteration", "trajectories", "trajectories_computed", "env_steps", "vector_comms",
           "train_return", "eval_return", "grad_norm", "rejected"]
RUN_FILES = ("config.yaml", "metrics.csv", "checkpoint.pkl", "summary.json", "returns.png", "tb", ".lock")
CHECKPOINT_VERSION = 2
# Stop (instead of spinning) when this many updates in a row had no finite gradient, or when the
# first STALL_FIRST updates of a run had none at all.
STALL_LIMIT = 100
STALL_FIRST = 10


def build_oracle(cfg: Config):
    """The gradient oracle of cfg.env; bad env settings raise ConfigError (before any write)."""
    if cfg.env.id == "synthetic":
        from apga.oracle.synthetic import SyntheticOracle
        return SyntheticOracle.from_kwargs(cfg.workers.n, cfg.seed, cfg.env.kwargs)
    try:
        from apga.oracle.rl import RLOracle
    except ModuleNotFoundError as exc:
        raise ApgaError(f"env.id {cfg.env.id!r}: the Gymnasium oracle cannot be loaded (missing module "
                        f"{exc.name!r}); reinstall apga, or use env.id: synthetic") from None
    from apga.guards import env_construction
    with env_construction(cfg.env.id):  # any failure to build the environments: one line, exit 2
        if cfg.runtime.name == "sim" and cfg.runtime.processes != 1:
            # Rollouts on every core (0 = one process per core); bit-identical to one process.
            from apga.oracle.parallel import make_oracle
            return make_oracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed, cfg.runtime.processes)
        return RLOracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed)


def build_times(cfg: Config, oracle):
    """The simulator's time model (also used by Ray for delays); bad time specs raise ConfigError."""
    from apga.runtime.timing import TimeModel
    w = cfg.workers
    return TimeModel(w.compute_time, w.comm_time, w.allreduce_time, w.n, oracle.dim, cfg.seed)


def build_runtime(cfg: Config, oracle):
    """The protocol for cfg.algorithm on the runtime of cfg.runtime."""
    a = cfg.algorithm
    times = build_times(cfg, oracle)
    alg = make_algorithm(a.name, cfg.workers.n, oracle.initial_point(), a.step_size, a.momentum,
                         a.batch_size, a.init_batch_size, a.step_schedule)
    if cfg.runtime.name == "sim":
        from apga.runtime.simulator import Simulator
        return Simulator(alg, oracle, times, a.aggregation, a.cancel, cfg.runtime.streams)
    if cfg.runtime.address:  # Ray starts lazily; a cluster that does not answer is refused now
        from apga.runtime.ray_session import check_address
        check_address(cfg.runtime.address)
    try:
        from apga.runtime.ray_runtime import RayRuntime  # noqa: WPS433 (optional dependency)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == "ray" or exc.name.startswith("ray.") or exc.name.startswith("apga.runtime")):
            raise ConfigError(f"runtime.name: ray is not available here (no module {exc.name!r}); "
                              "pip install 'apga[ray]', or use runtime.name: sim") from None
        raise
    return RayRuntime(cfg, alg, oracle, times)


# --- TensorBoard event files ------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventLog:
    """A TensorBoard event file (TFRecord of Event protos), written without torch or TensorFlow.

    Records are buffered and written in one write(2) at ``flush()`` (every checkpoint), so the
    file only holds whole records. ``purge_step`` (on resume) starts the file with a SessionLog
    START: TensorBoard then drops the earlier events with step >= purge_step, i.e. whatever the
    killed process logged after its last checkpoint. File names carry a timestamp forced to grow
    from file to file, so TensorBoard reads a resumed run's files in order.
    """

    def __init__(self, folder: str, purge_step: int | None = None):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        os.makedirs(folder, exist_ok=True)
        stamp = int(time.time())
        for name in os.listdir(folder):
            parts = name.split(".")
            if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
                stamp = max(stamp, int(parts[3]) + 1)
        self.path = os.path.join(folder, f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.buf: list[bytes] = []
        self._add(self._event(wall_time=time.time(), step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step is not None:
            log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add(self._event(wall_time=time.time(), step=purge_step, session_log=log))
        self.flush()

    def _add(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.buf.append(header + struct.pack("<I", _masked_crc32c(header)) + data
                        + struct.pack("<I", _masked_crc32c(data)))
        if len(self.buf) >= 4096:
            self.flush()

    def scalars(self, step: int, values: dict) -> None:
        """One event holding several scalars (tag -> float) at ``step``."""
        if values:
            summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
            self._add(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        if self.buf and self.fd is not None:
            data = b"".join(self.buf)
            self.buf = []
            write_whole(self.fd, data)  # whole records or none, even on a full disk

    def close(self) -> None:
        if self.fd is not None:
            self.flush()
            os.close(self.fd)
            self.fd = None


def budget_progress(budget, time: float, trajectories: float, iterations: float) -> float:
    """Fraction of the budget used: the largest of the set limits' fractions (1.0 = stop)."""
    parts = []
    if budget.time is not None:
        parts.append(time / budget.time)
    if budget.trajectories is not None:
        parts.append(trajectories / budget.trajectories)
    if budget.iterations is not None:
        parts.append(iterations / budget.iterations)
    return max(parts) if parts else 0.0


def budget_fraction(cfg: Config, totals, clock: float) -> float:
    return budget_progress(cfg.budget, clock, totals.trajectories, totals.iteration)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""  # not logged (a rejected update's grad_norm, no evaluation...): never nan / inf
    if isinstance(v, float):
        return repr(v)
    return str(v)


class Progress:
    """A tqdm bar on a terminal; otherwise a plain line every 5 % of the budget."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label = enabled, label
        self.bar, self.next_mark = None, 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=1000, desc=label, unit="‰", leave=True, file=sys.stderr)

    def update(self, fraction: float, iteration: int, ret) -> None:
        if not self.enabled:
            return
        fraction = min(fraction, 1.0)
        ret_s = "" if ret is None else f"{ret:.2f}"
        if self.bar is not None:
            self.bar.n = int(fraction * 1000)
            self.bar.set_postfix_str(f"it={iteration} return={ret_s}", refresh=True)
        elif fraction >= self.next_mark:
            sys.stderr.write(f"{self.label}: {fraction:6.1%}  iteration {iteration}  return {ret_s}\n")
            sys.stderr.flush()
            self.next_mark = math.floor(fraction * 20 + 1e-9) / 20 + 0.05

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunResult:
    out_dir: str
    summary: dict


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


LOCK_FILE = ".lock"


def _lock(out_dir: str) -> int:
    """Take the run directory's lock (flock on DIR/.lock, released by the kernel when the process
    ends, even by SIGKILL): two processes never write one run. Returns the fd to close."""
    import fcntl
    try:
        fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only file system or directory: refused before anything is written
        raise ApgaError(f"{out_dir!r}: cannot write in the run directory ({exc.strerror}); "
                        "choose a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ApgaError(f"{out_dir!r} is in use by another apga process; wait for it to end "
                        "(or stop it) and then resume") from None
    return fd


def _prepare_dir(out_dir: str, force: bool) -> int:
    """Create ``out_dir``, or empty it of apga run files with ``force``; nothing else is deleted.
    Returns the fd of the directory's lock (see ``_lock``)."""
    entries: list[str] = []
    if os.path.exists(out_dir) or os.path.islink(out_dir):
        if not os.path.isdir(out_dir):
            raise ApgaError(f"--out {out_dir!r} exists and is not a directory: choose another --out")
        try:
            entries = sorted(n for n in os.listdir(out_dir) if n != LOCK_FILE)
        except OSError as exc:
            raise ApgaError(f"--out {out_dir!r}: cannot list it ({exc.strerror})") from None
        if entries and not force:
            hint = "resume it with `apga train --resume DIR`" if "config.yaml" in entries else "choose a new --out"
            raise ApgaError(f"--out {out_dir!r} exists and is not empty: {hint}, or pass --force to overwrite it")
        foreign = [name for name in entries if name not in RUN_FILES and not name.startswith(".tmp-")]
        if foreign:  # checked before deleting anything
            raise ApgaError(f"--out {out_dir!r} holds {foreign[0]!r}, which is not an apga run file; "
                            "refusing to delete it even with --force: choose another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ApgaError(f"--out {out_dir!r}: cannot create it ({exc.strerror})") from None
    lock = _lock(out_dir)
    for name in entries:
        _remove(os.path.join(out_dir, name))
    return lock


def _clean_temp_files(out_dir: str) -> None:
    """Remove temp files of atomic writes that a killed process left behind."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-"):
            try:
                _remove(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass


class Trainer:
    def __init__(self, cfg: Config, out_dir: str, progress: bool = True):
        self.cfg, self.out_dir = cfg, out_dir
        self.progress_enabled = progress
        self.metrics_path = os.path.join(out_dir, "metrics.csv")
        self.ckpt_path = os.path.join(out_dir, "checkpoint.pkl")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, force: bool = False) -> RunResult:
        cfg = self.cfg
        # Everything that can fail on bad input (memory, oracle, environments, time model,
        # runtime) is checked or built before the run directory is touched.
        from apga.guards import check_memory
        check_memory(cfg)
        oracle = build_oracle(cfg)
        lock = None
        try:
            runtime = build_runtime(cfg, oracle)
            lock = _prepare_dir(self.out_dir, force)
            resolved = cfgmod.to_dict(cfg)
            atomic_write_text(os.path.join(self.out_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
            log = AppendLog(self.metrics_path, truncate_to=0)
            log.write_line(",".join(COLUMNS))
            self.state = {"runtime": runtime, "resolved": resolved, "last_eval": None, "wall_offset": 0.0,
                          "final_eval": None, "best_eval": None, "stalled": 0, "time_step": -1,
                          "trace_sha256": runtime.times.compute.trace_sha256}  # resume refuses a changed trace
            return self._loop(runtime, log, resumed=False)
        finally:
            oracle.close()
            if lock is not None:
                os.close(lock)

    @staticmethod
    def resume(out_dir: str, progress: bool = True) -> RunResult:
        cfg_path = os.path.join(out_dir, "config.yaml")
        if not os.path.isdir(out_dir):
            raise ApgaError(f"--resume {out_dir!r}: no such run directory")
        if not os.path.isfile(cfg_path):
            raise ApgaError(f"--resume {out_dir!r}: not an apga run directory (no config.yaml); "
                            "start a run with `apga train CONFIG --out DIR`")
        cfg = cfgmod.from_dict(cfgmod.read_yaml(cfg_path))
        trainer = Trainer(cfg, out_dir, progress)
        if not os.path.exists(trainer.ckpt_path):
            from apga.guards import check_restartable
            check_restartable(out_dir)  # a run past its first checkpoint must not be silently re-run
            # Killed before the first checkpoint (written right after row 0): start again.
            return trainer.start(force=True)
        state = trainer._read_checkpoint()  # read-only checks first: a refused resume writes nothing
        lock = _lock(out_dir)
        try:
            oracle = build_oracle(cfg)
            try:
                runtime = state["runtime"]
                times = build_times(cfg, oracle)
                from apga.guards import check_same_trace
                check_same_trace(state, times)
                runtime.attach(oracle, times)
                _clean_temp_files(out_dir)
                log = AppendLog(trainer.metrics_path, truncate_to=state["csv_bytes"])
                trainer.state = state
                return trainer._loop(runtime, log, resumed=True)
            finally:
                oracle.close()
        finally:
            os.close(lock)

    def _read_checkpoint(self) -> dict:
        out_dir = self.out_dir
        try:
            with open(self.ckpt_path, "rb") as f:
                state = pickle.load(f)
        except Exception as exc:  # a checkpoint is written atomically, so this is not a torn write
            raise ApgaError(f"--resume {out_dir!r}: cannot read checkpoint.pkl ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ApgaError(f"--resume {out_dir!r}: checkpoint.pkl was written by another apga version; "
                            "start a new run")
        # compared as YAML text, so that a NaN somewhere (e.g. in env.kwargs) equals itself
        try:
            started_with = cfgmod.with_defaults(state["resolved"])
        except ConfigError:
            started_with = state["resolved"]
        if yaml.safe_dump(started_with) != yaml.safe_dump(cfgmod.to_dict(self.cfg)):
            raise ConfigError(f"--resume {out_dir!r}: config.yaml was edited after the run started; "
                              "restore it, or start a new run with the new config")
        size = os.path.getsize(self.metrics_path) if os.path.isfile(self.metrics_path) else -1
        if size < state["csv_bytes"]:
            raise ApgaError(f"--resume {out_dir!r}: metrics.csv is missing or shorter than at the last "
                            "checkpoint (was it edited?); start a new run")
        return state

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self, runtime, log: AppendLog, resumed: bool) -> RunResult:
        cfg = self.cfg
        tb_dir = os.path.join(self.out_dir, "tb")
        # By iteration (tb/) and, for eval_return_vs_time, by simulated milliseconds (tb/time/):
        # two TensorBoard runs, because a purge applies to every tag of a run alike.
        self.tb = EventLog(tb_dir, purge_step=runtime.totals.iteration + 1 if resumed else None)
        self.tb_time = EventLog(os.path.join(tb_dir, "time"),
                                purge_step=self.state["time_step"] + 1 if resumed else None)
        self.wall_start = time.perf_counter() - self.state["wall_offset"]
        label = f"{cfg.algorithm.name} {cfg.env.id}"
        progress = Progress(self.progress_enabled, label)
        try:
            if not resumed:
                self._log_row(log, runtime, None, initial=True)
                self._checkpoint(log)
            while budget_fraction(cfg, runtime.totals, runtime.clock) < 1.0:
                event = runtime.step()
                self._check_progress(runtime, event)
                ret = self._log_row(log, runtime, event)
                progress.update(budget_fraction(cfg, runtime.totals, runtime.clock), runtime.totals.iteration, ret)
                if runtime.totals.iteration % cfg.checkpoint.every == 0:
                    self._checkpoint(log)
            self._checkpoint(log, final=True)
        except ApgaError as exc:
            self._summary(runtime, "failed", error=str(exc))
            raise
        except OSError as exc:  # disk full, quota, I/O error: one line, status failed, files whole
            from apga.guards import write_failure
            raise write_failure(self, runtime, exc) from None
        finally:
            progress.close()
            for closing in (self.tb.close, self.tb_time.close, log.close):
                try:
                    closing()
                except OSError:  # flushing to a full disk: the file stays whole (write_whole)
                    pass
            runtime.close()
        from apga.guards import write_failure
        try:
            summary = self._summary(runtime, "finished")
            self._plot()
        except OSError as exc:
            raise write_failure(self, runtime, exc) from None
        return RunResult(self.out_dir, summary)

    def _check_progress(self, runtime, event) -> None:
        """Stop with a clear error when gradients keep coming back non-finite (instead of spinning)."""
        t, u = runtime.totals, event.update
        self.state["stalled"] = self.state["stalled"] + 1 if (u.used == 0 and u.rejected > 0) else 0
        stalled = self.state["stalled"]
        if stalled >= STALL_LIMIT or (stalled >= STALL_FIRST and t.trajectories == 0):
            raise ApgaError(f"no finite gradient in the last {stalled} updates ({t.rejected} non-finite gradients "
                            "rejected so far): check the environment's rewards and observations (env.id, env.kwargs), "
                            "or lower algorithm.step_size")

    def _log_row(self, log: AppendLog, runtime, event, initial: bool = False):
        cfg, t = self.cfg, runtime.totals
        train_ret = None
        grad_norm = None
        if event is not None:
            u = event.update
            grad_norm = u.grad_norm
            if len(u.returns):
                train_ret = float(np.mean(u.returns))
        eval_ret = None
        final = budget_fraction(cfg, t, runtime.clock) >= 1.0
        if cfg.eval.every and (t.iteration % cfg.eval.every == 0 or final):
            eval_ret = runtime.oracle.evaluate(runtime.alg.theta, cfg.eval.episodes, t.iteration,
                                               cfg.eval.deterministic)
            self.state["last_eval"] = eval_ret
            if eval_ret is not None and math.isfinite(eval_ret):
                self.state["final_eval"] = eval_ret
                best = self.state["best_eval"]
                self.state["best_eval"] = eval_ret if best is None else max(best, eval_ret)
        values = {"time": float(runtime.clock), "iteration": t.iteration, "trajectories": t.trajectories,
                  "trajectories_computed": t.trajectories_computed, "env_steps": t.env_steps,
                  "vector_comms": t.vector_comms, "train_return": train_ret, "eval_return": eval_ret,
                  "grad_norm": grad_norm, "rejected": t.rejected}
        # Only deterministic values go into the CSV (wall time lives in summary.json), so the
        # same config and seed give a byte-identical file.
        log.write_line(",".join(_fmt(values[c]) for c in COLUMNS))
        if not initial:
            scalars = {k: values[k] for k in ("train_return", "eval_return", "grad_norm")
                       if values[k] is not None and math.isfinite(values[k])}
            scalars.update({f"counters/{k}": values[k] for k in ("time", "trajectories", "env_steps",
                                                                 "vector_comms", "rejected")})
            self.tb.scalars(t.iteration, scalars)
            if eval_ret is not None and math.isfinite(eval_ret):
                # Steps must grow for TensorBoard's purge on resume: simulated ms, made strictly increasing.
                step = max(int(runtime.clock * 1000), self.state["time_step"] + 1)
                self.state["time_step"] = step
                self.tb_time.scalars(step, {"eval_return_vs_time": eval_ret})
        return train_ret if train_ret is not None else self.state["last_eval"]

    def _checkpoint(self, log: AppendLog, final: bool = False) -> None:
        # Order matters: the CSV lines and TensorBoard events up to this update are on disk
        # before the checkpoint that refers to them is renamed into place.
        self.tb.flush()
        self.tb_time.flush()
        self.state["csv_bytes"] = log.sync()
        self.state["version"] = CHECKPOINT_VERSION
        self.state["wall_offset"] = time.perf_counter() - self.wall_start
        atomic_pickle(self.ckpt_path, self.state)
        self._summary(self.state["runtime"], "finished" if final else "running")

    def _summary(self, runtime, status: str, error: str | None = None) -> dict:
        cfg, t = self.cfg, runtime.totals
        summary = {
            "status": status, "algorithm": cfg.algorithm.name, "env": cfg.env.id, "seed": cfg.seed,
            "workers": cfg.workers.n, "runtime": cfg.runtime.name,
            "time": runtime.clock, "iterations": t.iteration, "trajectories": t.trajectories,
            "trajectories_computed": t.trajectories_computed, "env_steps": t.env_steps,
            "vector_comms": t.vector_comms, "rejected": t.rejected,
            "wall_seconds": round(time.perf_counter() - self.wall_start, 3),
            "final_eval_return": self.state["final_eval"],
            "best_eval_return": self.state["best_eval"],
        }
        if error is not None:
            summary["error"] = error
        # While the run goes on, summary.json is informational (a resume rewrites it): atomic but
        # not fsynced; the final one is durable.
        atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n",
                          durable=status != "running")
        return summary

    def _plot(self) -> None:
        from apga.guards import matplotlib_config_dir
        matplotlib_config_dir()  # its cache goes to a private temp folder, not under $HOME
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        m = read_metrics(self.out_dir)
        fig, ax = plt.subplots(figsize=(6, 4))
        ok = ~np.isnan(m["train_return"])
        ax.plot(m["time"][ok], m["train_return"][ok], lw=0.8, alpha=0.6, label="train (round mean)")
        ok = ~np.isnan(m["eval_return"])
        ax.plot(m["time"][ok], m["eval_return"][ok], "o-", ms=3, label="evaluation")
        ax.set_xlabel("simulated seconds" if self.cfg.runtime.name == "sim" else "wall seconds")
        ax.set_ylabel("return")
        ax.set_title(f"{self.cfg.algorithm.name} on {self.cfg.env.id}, seed {self.cfg.seed}")
        ax.legend()
        fig.tight_layout()
        tmp = os.path.join(self.out_dir, ".tmp-returns.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, os.path.join(self.out_dir, "returns.png"))


def read_metrics(out_dir: str) -> dict[str, np.ndarray]:
    """metrics.csv as a dict of float arrays (empty cells -> nan). A last line without its
    newline (a run killed in the middle of writing it) is ignored."""
    path = os.path.join(out_dir, "metrics.csv")
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    lines = text.splitlines()
    header = lines[0].split(",") if lines else list(COLUMNS)
    rows = list(csv.reader(lines[1:]))
    return {c: np.array([float(r[k]) if r[k] != "" else math.nan for r in rows], dtype=float)
            for k, c in enumerate(header) if c}


def train(cfg: Config, out_dir: str, force: bool = False, progress: bool = True) -> RunResult:
    """Run ``cfg`` into ``out_dir`` (refuses a non-empty dir unless ``force``)."""
    return Trainer(cfg, out_dir, progress).start(force)


def resume(out_dir: str, progress: bool = True) -> RunResult:
    """Continue the run in ``out_dir`` from its last checkpoint; the result equals an uninterrupted run."""
    return Trainer.resume(out_dir, progress)
