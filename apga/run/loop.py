"""The training loop: step the runtime until the budget is spent, evaluate, log, checkpoint.
``apga train`` and the Python API (apga.train / apga.resume) both land here.

Outputs in the run directory:
  config.yaml      the resolved config (every default filled in)
  metrics.csv      one row per model update (row 0 = the initial point, before any update)
  tb/              TensorBoard events with the same scalars (tb/time/: eval return by runtime ms)
  checkpoint.npz   state at the last checkpointed update (exact resume; apga/checkpoint.py)
  policy_final.safetensors, policy_best.safetensors   the policy (apga/policy_file.py)
  timings.csv      Ray runs: the measured durations of jobs and transfers (apga predict)
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

from apga import checkpoint as ckptfile
from apga import config as cfgmod
from apga import guards
from apga.config import Config
from apga.errors import ApgaError, ConfigError
from apga.files import atomic_write_text
from apga.policy_file import PolicyWriter
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
        self.resume_point: bytes | None = None  # the last checkpoint taken before a final row

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, force: bool = False) -> RunResult:
        cfg = self.cfg
        # Everything that can fail on bad input (the config's checks, memory included, ran when
        # it was read; then the oracle, environments and runtime) is built before the run
        # directory is touched.
        oracle = build_oracle(cfg)
        lock = None
        try:
            runtime = build_runtime(cfg, oracle)
            lock = rundir.prepare(self.out_dir, force)
            resolved = cfgmod.to_dict(cfg)
            atomic_write_text(os.path.join(self.out_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
            self.state = {"runtime": runtime, "resolved": resolved, "last_eval": None, "wall_offset": 0.0,
                          "final_eval": None, "best_eval": None, "stalled": 0, "time_step": -1,
                          "trace_sha256": runtime.times.compute.trace_sha256}  # resume refuses a changed trace
            return self._loop(runtime, oracle, resume_from=None)
        finally:
            oracle.close()
            if lock is not None:
                os.close(lock)

    @staticmethod
    def resume(out_dir: str, progress: bool = True, budget: list[str] | None = None) -> RunResult:
        """Continue the run in ``out_dir``; ``budget`` (["budget.iterations=N", ...]) extends or
        changes its budget: the result equals a run started with that budget."""
        cfg_path = os.path.join(out_dir, "config.yaml")
        if not os.path.isdir(out_dir):
            raise ApgaError(f"--resume {out_dir!r}: no such run directory")
        if not os.path.isfile(cfg_path):
            raise ApgaError(f"--resume {out_dir!r}: not an apga run directory (no config.yaml); "
                            "start a run with `apga train CONFIG --out DIR`")
        cfg = cfgmod.from_dict(cfgmod.read_yaml(cfg_path))
        new_budget = None
        if budget:  # only budget.* keys may change on a resume
            for item in budget:
                if not item.strip().startswith("budget."):
                    raise ConfigError(f"--resume with --set {item!r}: only budget.* keys (budget.iterations, "
                                      "budget.time, budget.trajectories) can change when a run continues")
            cfg = cfgmod.load_config(cfgmod.to_dict(cfg), budget)
            new_budget = cfg.budget
        trainer = Trainer(cfg, out_dir, progress)
        ckptfile.refuse_legacy(out_dir)
        if not os.path.exists(ckptfile.path(out_dir)):
            guards.check_restartable(out_dir)  # a run past its first checkpoint must not be silently re-run
            # Killed before the first checkpoint (written right after row 0): start again.
            return trainer.start(force=True)
        state = trainer._read_checkpoint()  # read-only checks first: a refused resume writes nothing
        lock = rundir.lock(out_dir)
        try:
            if new_budget is not None:
                atomic_write_text(cfg_path, yaml.safe_dump(cfgmod.to_dict(cfg), sort_keys=False))
            state["resolved"] = cfgmod.to_dict(cfg)
            oracle = build_oracle(cfg)
            try:
                runtime = state["runtime"]
                times = build_times(cfg, oracle)
                guards.check_same_trace(state, times)
                runtime.attach(oracle, times)
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
        state, data, embedded = ckptfile.read(out_dir, self.cfg)
        # compared as YAML text, so that a NaN somewhere (e.g. in env.kwargs) equals itself; the
        # budget may differ (a run continued with a larger budget)
        try:
            started_with = cfgmod.with_defaults(state["resolved"])
        except ConfigError:
            started_with = state["resolved"]
        now = cfgmod.to_dict(self.cfg)
        if yaml.safe_dump({**started_with, "budget": None}) != yaml.safe_dump({**now, "budget": None}):
            raise ConfigError(f"--resume {out_dir!r}: config.yaml was edited after the run started; "
                              "restore it, or start a new run with the new config")
        # A checkpoint taken after the run's last row (its budget used up) carries the last
        # checkpoint taken before that row, which was written as the last one (with an
        # evaluation): a longer run restarts from there, so that its metrics.csv equals a run
        # started with the longer budget.
        old_budget = cfgmod.from_dict(started_with).budget
        changed = yaml.safe_dump(started_with["budget"]) != yaml.safe_dump(now["budget"])
        self.resume_point = embedded if _progress(old_budget, state) >= 1.0 else data
        if changed:
            if _progress(old_budget, state) >= 1.0 and _progress(self.cfg.budget, state) < 1.0:
                if embedded is None:
                    raise ApgaError(f"--resume {out_dir!r}: this run cannot be extended (its checkpoint keeps "
                                    "no earlier state); start a new run with the larger budget")
                state = ckptfile.load_bytes(out_dir, embedded)
            if _progress(self.cfg.budget, state) >= 1.0:
                raise ConfigError(f"--resume {out_dir!r}: the new budget is already reached (the run has "
                                  f"{state['runtime'].totals.iteration} updates); give a larger budget")
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
        self.policies = PolicyWriter.for_config(cfg)  # policy_final / policy_best; None for synthetic
        if resume_from is not None:
            self._write_best_policy()  # the checkpoint's best: a later one of a killed run is undone
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
        except OSError as exc:  # disk full, quota, I/O error: one line, status failed, files whole
            raise guards.write_failure(self, runtime, exc) from None
        finally:
            try:
                self.log.close()
            except OSError:  # flushing to a full disk: the files stay whole (files.write_whole)
                pass
            runtime.close()
        try:
            summary = self._summary(runtime, "finished")
            self._plot()
        except OSError as exc:
            raise guards.write_failure(self, runtime, exc) from None
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
            self.state["eval_iteration"] = t.iteration
            if eval_ret is not None and math.isfinite(eval_ret):
                self.state["final_eval"] = eval_ret
                best = self.state["best_eval"]
                self.state["best_eval"] = eval_ret if best is None else max(best, eval_ret)
                if best is None or eval_ret > best:  # a new best policy
                    self.state["best_policy"] = {"theta": np.array(runtime.alg.theta, dtype=np.float64),
                                                 "iteration": t.iteration, "eval_return": eval_ret}
                    self._write_best_policy()
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
        self.state["version"] = ckptfile.VERSION
        self.state["wall_offset"] = time.perf_counter() - self.wall_start
        self._write_final_policy()
        # A final checkpoint keeps the last one taken before the final row (apga/checkpoint.py);
        # any other checkpoint taken before the budget ran out becomes it.
        runtime = self.state["runtime"]
        ended = budget_fraction(self.cfg, runtime) >= 1.0
        data = ckptfile.write(self.out_dir, self.state, self.resume_point if ended else None, self.cfg)
        if not ended:
            self.resume_point = data
        self._summary(runtime, "finished" if final else "running")

    # -- policy files (apga/policy_file.py) ------------------------------------------------------
    def _write_final_policy(self) -> None:
        if self.policies is not None:
            runtime = self.state["runtime"]
            it = runtime.totals.iteration
            ret = self.state["last_eval"] if self.state.get("eval_iteration") == it else None
            self.policies.write(self.out_dir, "final", runtime.alg.theta, it, ret)

    def _write_best_policy(self) -> None:
        if self.policies is not None:
            best = self.state.get("best_policy")
            if best is None:
                self.policies.remove(self.out_dir, "best")
            else:
                self.policies.write(self.out_dir, "best", best["theta"], best["iteration"], best["eval_return"])

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
        guards.matplotlib_config_dir()  # its cache goes to a private temp folder, not under $HOME
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


def _progress(budget, state: dict) -> float:
    """Budget fraction used at a checkpoint's state (resume with another budget)."""
    runtime = state["runtime"]
    return budget_progress(budget, runtime.clock, runtime.totals.trajectories, runtime.totals.iteration)


def train(cfg: Config, out_dir: str, force: bool = False, progress: bool = True) -> RunResult:
    """Run ``cfg`` into ``out_dir`` (refuses a non-empty dir unless ``force``)."""
    return Trainer(cfg, out_dir, progress).start(force)


def resume(out_dir: str, progress: bool = True, budget: list[str] | None = None) -> RunResult:
    """Continue the run in ``out_dir`` from its last checkpoint; the result equals an uninterrupted run.
    ``budget``: ["budget.iterations=N", ...] continues a (finished) run up to a new budget."""
    return Trainer.resume(out_dir, progress, budget)
