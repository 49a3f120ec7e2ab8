"""The training loop: step the runtime until the budget is spent, evaluate, log, checkpoint.
``apga train`` and the Python API (apga.train / apga.resume) both land here.

Outputs in the run directory:
  config.yaml      the resolved config (every default filled in)
  metrics.csv      one row per model update (row 0 = the initial point, before any update)
  tb/              TensorBoard events with the same scalars (tb/time/: eval return by runtime ms)
  checkpoint.pkl   state at the last checkpointed update (exact resume)
  summary.json     final figures (written at the end, and at every checkpoint with status running;
                   status failed + error when the run stopped on an error)
  returns.png      return against time
  .lock            held (flock) by the process writing the run

What is atomic, how resume works and what is deterministic: docs/guarantees.md.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import yaml

from apga import config as cfgmod
from apga.config import Config
from apga.errors import ApgaError, ConfigError
from apga.files import atomic_write_text
from apga.run import rundir
from apga.run.build import build_oracle, build_runtime, build_times
from apga.run.logger import RunLogger, read_metrics
from apga.runtime.base import Runtime

# Stop (instead of spinning) when this many updates in a row had no finite gradient, or when the
# first STALL_FIRST updates of a run had none at all.
STALL_LIMIT = 100
STALL_FIRST = 10


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


def budget_fraction(cfg: Config, runtime: Runtime) -> float:
    return budget_progress(cfg.budget, runtime.clock, runtime.totals.trajectories, runtime.totals.iteration)


@dataclass
class RunResult:
    out_dir: str
    summary: dict


class Trainer:
    def __init__(self, cfg: Config, out_dir: str, progress: bool = True):
        self.cfg, self.out_dir = cfg, out_dir
        self.progress_enabled = progress

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, force: bool = False) -> RunResult:
        cfg = self.cfg
        # Everything that can fail on bad input (oracle, environments, time model, runtime) is
        # built before the run directory is touched.
        oracle = build_oracle(cfg)
        lock = None
        try:
            runtime = build_runtime(cfg, oracle)
            lock = rundir.prepare(self.out_dir, force)
            resolved = cfgmod.to_dict(cfg)
            atomic_write_text(os.path.join(self.out_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
            self.state = {"runtime": runtime, "resolved": resolved, "last_eval": None, "wall_offset": 0.0,
                          "final_eval": None, "best_eval": None, "stalled": 0, "time_step": -1}
            return self._loop(runtime, oracle, resume_from=None)
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
        if not os.path.exists(os.path.join(out_dir, rundir.CHECKPOINT)):
            # Killed before the first checkpoint (written right after row 0): start again.
            return trainer.start(force=True)
        state = trainer._read_checkpoint()  # read-only checks first: a refused resume writes nothing
        lock = rundir.lock(out_dir)
        try:
            oracle = build_oracle(cfg)
            try:
                runtime = state["runtime"]
                runtime.attach(oracle, build_times(cfg, oracle))
                rundir.clean_temp_files(out_dir)
                trainer.state = state
                return trainer._loop(runtime, oracle, resume_from={
                    "csv_bytes": state["csv_bytes"], "timings_bytes": state.get("timings_bytes", 0),
                    "iteration": runtime.totals.iteration, "time_step": state["time_step"]})
            finally:
                oracle.close()
        finally:
            os.close(lock)

    def _read_checkpoint(self) -> dict:
        out_dir = self.out_dir
        state = rundir.read_checkpoint(out_dir)
        # compared as YAML text, so that a NaN somewhere (e.g. in env.kwargs) equals itself
        try:
            started_with = cfgmod.with_defaults(state["resolved"])
        except ConfigError:
            started_with = state["resolved"]
        if yaml.safe_dump(started_with) != yaml.safe_dump(cfgmod.to_dict(self.cfg)):
            raise ConfigError(f"--resume {out_dir!r}: config.yaml was edited after the run started; "
                              "restore it, or start a new run with the new config")
        metrics = os.path.join(out_dir, "metrics.csv")
        size = os.path.getsize(metrics) if os.path.isfile(metrics) else -1
        if size < state["csv_bytes"]:
            raise ApgaError(f"--resume {out_dir!r}: metrics.csv is missing or shorter than at the last "
                            "checkpoint (was it edited?); start a new run")
        return state

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self, runtime: Runtime, oracle, resume_from: dict | None) -> RunResult:
        cfg = self.cfg
        self.oracle = oracle  # evaluation
        self.log = RunLogger(self.out_dir, f"{cfg.algorithm.name} {cfg.env.id}", self.progress_enabled, resume_from)
        self.wall_start = time.perf_counter() - self.state["wall_offset"]
        runtime.status = self.log.progress.note
        try:
            if resume_from is None:
                self._log_row(runtime, None, initial=True)
                self._checkpoint()
            while budget_fraction(cfg, runtime) < 1.0:
                event = runtime.step()
                self._check_progress(runtime, event)
                ret = self._log_row(runtime, event)
                self.log.progress.update(budget_fraction(cfg, runtime), runtime.totals.iteration, ret)
                if runtime.totals.iteration % cfg.checkpoint.every == 0:
                    self._checkpoint()
            self._checkpoint(final=True)
        except ApgaError as exc:
            self._summary(runtime, "failed", error=str(exc))
            raise
        finally:
            self.log.close()
            runtime.close()
        summary = self._summary(runtime, "finished")
        self._plot()
        return RunResult(self.out_dir, summary)

    def _check_progress(self, runtime: Runtime, event) -> None:
        """Stop with a clear error when gradients keep coming back non-finite (instead of spinning)."""
        t, u = runtime.totals, event.update
        self.state["stalled"] = self.state["stalled"] + 1 if (u.used == 0 and u.rejected > 0) else 0
        stalled = self.state["stalled"]
        if stalled >= STALL_LIMIT or (stalled >= STALL_FIRST and t.trajectories == 0):
            raise ApgaError(f"no finite gradient in the last {stalled} updates ({t.rejected} non-finite gradients "
                            "rejected so far): check the environment's rewards and observations (env.id, env.kwargs), "
                            "or lower algorithm.step_size")

    def _log_row(self, runtime: Runtime, event, initial: bool = False):
        cfg, t = self.cfg, runtime.totals
        train_ret = None
        grad_norm = None
        if event is not None:
            u = event.update
            grad_norm = u.grad_norm
            if len(u.returns):
                train_ret = float(np.mean(u.returns))
        eval_ret = None
        final = budget_fraction(cfg, runtime) >= 1.0
        if cfg.eval.every and (t.iteration % cfg.eval.every == 0 or final):
            eval_ret = self.oracle.evaluate(runtime.alg.theta, cfg.eval.episodes, t.iteration, cfg.eval.deterministic)
            self.state["last_eval"] = eval_ret
            if eval_ret is not None and math.isfinite(eval_ret):
                self.state["final_eval"] = eval_ret
                best = self.state["best_eval"]
                self.state["best_eval"] = eval_ret if best is None else max(best, eval_ret)
        values = {"time": float(runtime.clock), "iteration": t.iteration, "trajectories": t.trajectories,
                  "trajectories_computed": t.trajectories_computed, "env_steps": t.env_steps,
                  "vector_comms": t.vector_comms, "train_return": train_ret, "eval_return": eval_ret,
                  "grad_norm": grad_norm, "rejected": t.rejected}
        time_step = None
        if not initial and eval_ret is not None and math.isfinite(eval_ret):
            # Steps must grow for TensorBoard's purge on resume: runtime ms, made strictly increasing.
            time_step = max(int(runtime.clock * 1000), self.state["time_step"] + 1)
            self.state["time_step"] = time_step
        # Only deterministic values go into the CSV (wall time lives in summary.json), so the
        # same config and seed give a byte-identical file.
        self.log.row(values, initial, time_step)
        self.log.timings(runtime.drain_timings())
        return train_ret if train_ret is not None else self.state["last_eval"]

    def _checkpoint(self, final: bool = False) -> None:
        # Order matters: the CSV lines and TensorBoard events up to this update are on disk
        # before the checkpoint that refers to them is renamed into place.
        self.state.update(self.log.sync())
        self.state["wall_offset"] = time.perf_counter() - self.wall_start
        rundir.write_checkpoint(self.out_dir, self.state)
        self._summary(self.state["runtime"], "finished" if final else "running")

    def _summary(self, runtime: Runtime, status: str, error: str | None = None) -> dict:
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
        rundir.write_summary(self.out_dir, summary)
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


def train(cfg: Config, out_dir: str, force: bool = False, progress: bool = True) -> RunResult:
    """Run ``cfg`` into ``out_dir`` (refuses a non-empty dir unless ``force``)."""
    return Trainer(cfg, out_dir, progress).start(force)


def resume(out_dir: str, progress: bool = True) -> RunResult:
    """Continue the run in ``out_dir`` from its last checkpoint; the result equals an uninterrupted run."""
    return Trainer.resume(out_dir, progress)
