"""Run one configuration: build oracle, time model, protocol and runtime; log, evaluate,
checkpoint and resume. ``apga train`` and the Python API (apga.train / apga.resume) both land here.

Outputs in the run directory:
  config.yaml      the resolved config (every default filled in)
  metrics.csv      one row per model update (row 0 = the initial point, before any update)
  tb/              TensorBoard events with the same scalars
  checkpoint.pkl   state at the last checkpointed update (exact resume)
  summary.json     final figures (written at the end, and at every checkpoint with status running)
  returns.png      return against time
"""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import yaml

from apga import config as cfgmod
from apga.config import Config
from apga.errors import ApgaError, ConfigError
from apga.files import AppendLog, atomic_pickle, atomic_write_text
from apga.protocol.algorithms import make_algorithm

COLUMNS = ["time", "iteration", "trajectories", "trajectories_computed", "env_steps", "vector_comms",
           "train_return", "eval_return", "grad_norm", "rejected"]
RUN_FILES = ("config.yaml", "metrics.csv", "checkpoint.pkl", "summary.json", "returns.png", "tb")
CHECKPOINT_VERSION = 1


def build_oracle(cfg: Config):
    if cfg.env.id == "synthetic":
        from apga.oracle.synthetic import SyntheticOracle
        return SyntheticOracle.from_kwargs(cfg.workers.n, cfg.seed, cfg.env.kwargs)
    from apga.oracle.rl import RLOracle
    return RLOracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed)


def build_runtime(cfg: Config, oracle):
    """The protocol for cfg.algorithm on the runtime of cfg.runtime."""
    from apga.runtime.timing import TimeModel
    a = cfg.algorithm
    times = TimeModel(cfg.workers.compute_time, cfg.workers.comm_time, cfg.workers.allreduce_time,
                      cfg.workers.n, oracle.dim, cfg.seed)
    alg = make_algorithm(a.name, cfg.workers.n, oracle.initial_point(), a.step_size, a.momentum,
                         a.batch_size, a.init_batch_size, a.step_schedule)
    if cfg.runtime.name == "sim":
        from apga.runtime.simulator import Simulator
        return Simulator(alg, oracle, times, a.aggregation, a.cancel)
    from apga.runtime.ray_runtime import RayRuntime  # noqa: WPS433 (optional dependency)
    return RayRuntime(cfg, alg, oracle, times)


def budget_fraction(cfg: Config, totals, clock: float) -> float:
    b = cfg.budget
    parts = []
    if b.time is not None:
        parts.append(clock / b.time)
    if b.trajectories is not None:
        parts.append(totals.trajectories / b.trajectories)
    if b.iterations is not None:
        parts.append(totals.iteration / b.iterations)
    return max(parts)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
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


def _prepare_dir(out_dir: str, force: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ApgaError(f"--out {out_dir!r} exists and is not a directory")
        entries = os.listdir(out_dir)
        if entries and not force:
            hint = "resume it with `apga train --resume DIR`" if "config.yaml" in entries else "choose a new --out"
            raise ApgaError(f"--out {out_dir!r} exists and is not empty: {hint}, or pass --force to overwrite it")
        for name in entries:
            path = os.path.join(out_dir, name)
            if name in RUN_FILES or name.startswith(".tmp-"):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            elif force:
                raise ApgaError(f"--out {out_dir!r} holds {name!r}, which is not an apga run file; "
                                "refusing to delete it even with --force: choose another --out")
    os.makedirs(out_dir, exist_ok=True)


class Trainer:
    def __init__(self, cfg: Config, out_dir: str, progress: bool = True):
        self.cfg, self.out_dir = cfg, out_dir
        self.progress_enabled = progress
        self.metrics_path = os.path.join(out_dir, "metrics.csv")
        self.ckpt_path = os.path.join(out_dir, "checkpoint.pkl")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, force: bool = False) -> RunResult:
        cfg = self.cfg
        oracle = build_oracle(cfg)  # everything that can fail on bad input fails before any write
        try:
            runtime = build_runtime(cfg, oracle)
            _prepare_dir(self.out_dir, force)
            resolved = cfgmod.to_dict(cfg)
            atomic_write_text(os.path.join(self.out_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
            log = AppendLog(self.metrics_path, truncate_to=0)
            log.write_line(",".join(COLUMNS))
            self.state = {"runtime": runtime, "resolved": resolved, "last_eval": None, "wall_offset": 0.0}
            return self._loop(runtime, log, tb_purge=None, initial_row=True)
        finally:
            oracle.close()

    @staticmethod
    def resume(out_dir: str, progress: bool = True) -> RunResult:
        cfg_path = os.path.join(out_dir, "config.yaml")
        if not os.path.isdir(out_dir) or not os.path.exists(cfg_path):
            raise ApgaError(f"--resume {out_dir!r}: not an apga run directory (no config.yaml)")
        data = cfgmod.read_yaml(cfg_path)
        cfg = cfgmod.from_dict(data)
        trainer = Trainer(cfg, out_dir, progress)
        if not os.path.exists(trainer.ckpt_path):
            return trainer.start(force=True)  # killed before the first checkpoint: start again
        try:
            with open(trainer.ckpt_path, "rb") as f:
                state = pickle.load(f)
        except Exception as exc:  # a checkpoint is written atomically, so this is not a torn write
            raise ApgaError(f"--resume {out_dir!r}: cannot read checkpoint.pkl ({exc})") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise ApgaError(f"--resume {out_dir!r}: checkpoint was written by another apga version")
        if state["resolved"] != cfgmod.to_dict(cfg):
            raise ConfigError(f"--resume {out_dir!r}: config.yaml was edited after the run started; "
                              "restore it, or start a new run with the new config")
        oracle = build_oracle(cfg)
        try:
            fresh = build_runtime(cfg, oracle)
            runtime = state["runtime"]
            runtime.attach(oracle, fresh.times)
            log = AppendLog(trainer.metrics_path, truncate_to=state["csv_bytes"])
            trainer.state = state
            return trainer._loop(runtime, log, tb_purge=runtime.totals.iteration + 1)
        finally:
            oracle.close()

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self, runtime, log: AppendLog, tb_purge, initial_row: bool = False) -> RunResult:
        cfg = self.cfg
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"), purge_step=tb_purge)
        self.wall_start = time.perf_counter() - self.state["wall_offset"]
        label = f"{cfg.algorithm.name} {cfg.env.id}"
        progress = Progress(self.progress_enabled, label)
        try:
            if initial_row:
                self._log_row(log, runtime, None, initial=True)
                self._checkpoint(log)
            while budget_fraction(cfg, runtime.totals, runtime.clock) < 1.0:
                event = runtime.step()
                self._check_progress(runtime)
                ret = self._log_row(log, runtime, event)
                progress.update(budget_fraction(cfg, runtime.totals, runtime.clock), runtime.totals.iteration, ret)
                if runtime.totals.iteration % cfg.checkpoint.every == 0:
                    self._checkpoint(log)
            self._checkpoint(log, final=True)
        finally:
            progress.close()
            self.tb.close()
            log.close()
            runtime.close()
        summary = self._summary(runtime, "finished")
        self._plot()
        return RunResult(self.out_dir, summary)

    def _check_progress(self, runtime) -> None:
        """Stop with a clear error if every gradient so far was non-finite (instead of spinning)."""
        t = runtime.totals
        if t.iteration >= 10 and t.trajectories == 0 and t.rejected > 0:
            raise ApgaError(f"every gradient so far was non-finite ({t.rejected} rejected in {t.iteration} "
                            "updates): check the environment's rewards and observations, or lower algorithm.step_size")

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
        values = {"time": float(runtime.clock), "iteration": t.iteration, "trajectories": t.trajectories,
                  "trajectories_computed": t.trajectories_computed, "env_steps": t.env_steps,
                  "vector_comms": t.vector_comms, "train_return": train_ret, "eval_return": eval_ret,
                  "grad_norm": grad_norm, "rejected": t.rejected}
        # Only deterministic values go into the CSV (wall time lives in summary.json), so the
        # same config and seed give a byte-identical file.
        log.write_line(",".join(_fmt(values[c]) for c in COLUMNS))
        if not initial:
            step = t.iteration
            for key in ("train_return", "eval_return", "grad_norm"):
                if values[key] is not None and math.isfinite(values[key]):
                    self.tb.add_scalar(key, values[key], step)
            for key in ("time", "trajectories", "env_steps", "vector_comms", "rejected"):
                self.tb.add_scalar(f"counters/{key}", values[key], step)
            if eval_ret is not None:
                self.tb.add_scalar("eval_return_vs_time", eval_ret, int(runtime.clock * 1000))
        return train_ret if train_ret is not None else self.state["last_eval"]

    def _checkpoint(self, log: AppendLog, final: bool = False) -> None:
        self.state["csv_bytes"] = log.sync()
        self.state["version"] = CHECKPOINT_VERSION
        self.state["wall_offset"] = time.perf_counter() - self.wall_start
        atomic_pickle(self.ckpt_path, self.state)
        self._summary(self.state["runtime"], "finished" if final else "running")

    def _summary(self, runtime, status: str) -> dict:
        cfg, t = self.cfg, runtime.totals
        rows = read_metrics(self.out_dir)
        evals = [r for r in rows["eval_return"] if not math.isnan(r)]
        summary = {
            "status": status, "algorithm": cfg.algorithm.name, "env": cfg.env.id, "seed": cfg.seed,
            "workers": cfg.workers.n, "runtime": cfg.runtime.name,
            "time": runtime.clock, "iterations": t.iteration, "trajectories": t.trajectories,
            "trajectories_computed": t.trajectories_computed, "env_steps": t.env_steps,
            "vector_comms": t.vector_comms, "rejected": t.rejected,
            "wall_seconds": round(time.perf_counter() - self.wall_start, 3),
            "final_eval_return": evals[-1] if evals else None,
            "best_eval_return": max(evals) if evals else None,
        }
        atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
        return summary

    def _plot(self) -> None:
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
    """metrics.csv as a dict of float arrays (empty cells -> nan)."""
    path = os.path.join(out_dir, "metrics.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        with open(path) as f:
            header = f.readline().strip().split(",")
        return {c: np.zeros(0) for c in header if c}
    return {c: np.array([float(r[c]) if r[c] != "" else math.nan for r in rows]) for c in rows[0]}


def train(cfg: Config, out_dir: str, force: bool = False, progress: bool = True) -> RunResult:
    """Run ``cfg`` into ``out_dir`` (refuses a non-empty dir unless ``force``)."""
    return Trainer(cfg, out_dir, progress).start(force)


def resume(out_dir: str, progress: bool = True) -> RunResult:
    """Continue the run in ``out_dir`` from its last checkpoint; the result equals an uninterrupted run."""
    return Trainer.resume(out_dir, progress)
