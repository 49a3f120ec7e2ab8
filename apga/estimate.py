"""What a run will cost before it runs: trajectories and environment steps from its budget, and
wall time from a short measurement on this machine (``apga compare --dry-run``).

- **Trajectories and updates** are exact for the simulator: the run's schedule (which worker
  finishes what, when; rounds, cancellations, AFedPG's arrivals) depends only on the time model
  and the counts, never on the gradients, so it is replayed with the real time model and a
  one-dimensional synthetic oracle until the budget stops it.
- **Environment steps** lie between two bounds: every episode as long as the initial policy's
  (measured) and every episode at the horizon H (a trained policy can last that long). Evaluation
  episodes (``eval.episodes`` every ``eval.every`` updates, plus the initial and final ones) count.
- **Wall time**: the steps at the rate measured (in CPU seconds, i.e. as on an idle core) by
  rolling out and differentiating trajectories of the run's own oracle at its initial point, as
  many at once as the run will (a round's batch; one for AFedPG), spread over the processes. Not counted: each run's start-up (a few seconds),
  and other jobs sharing the cores. Rates change during training (longer episodes batch better):
  an estimate, not a promise.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

MAX_EVENTS = 2_000_000  # a schedule longer than this is not replayed (the estimate says so)
MEASURE_TRAJECTORIES = 64


@dataclass
class Schedule:
    updates: int
    trajectories: int
    clock: float
    complete: bool  # False when MAX_EVENTS stopped the replay first


@dataclass
class Rate:
    steps_per_second: float  # one core, training (rollout + gradient) at the initial point
    initial_length: float  # mean episode length of the initial policy


def replay(cfg, dim: int, max_events: int = MAX_EVENTS):
    """The run's schedule on the simulator: its own time model (for a policy of ``dim``
    parameters) and protocol, with a one-dimensional synthetic oracle (a schedule depends on
    counts only, never on gradient values). Yields the simulator after each update until the
    budget stops it or ``max_events`` updates were made."""
    from apga.oracle.synthetic import SyntheticOracle
    from apga.run.build import build_protocol
    from apga.run.loop import budget_fraction
    from apga.runtime.simulator import Simulator
    from apga.runtime.timing import TimeModel

    w, a = cfg.workers, cfg.algorithm
    oracle = SyntheticOracle(w.n, cfg.seed, dim=1)
    times = TimeModel(w.compute_time, w.comm_time, w.allreduce_time, w.n, dim, cfg.seed)
    sim = Simulator(build_protocol(cfg, oracle.initial_point()), oracle, times, a.aggregation, a.cancel,
                    cfg.runtime.streams)
    while budget_fraction(cfg, sim) < 1.0 and sim.totals.iteration < max_events:
        sim.step()
        yield sim


def schedule(cfg, dim: int) -> Schedule:
    """Replay the run's schedule (simulator only) until its budget stops it."""
    sim = None
    for sim in replay(cfg, dim):
        pass
    if sim is None:
        return Schedule(0, 0, 0.0, True)
    return Schedule(sim.totals.iteration, sim.totals.trajectories, sim.clock, sim.totals.iteration < MAX_EVENTS)


def rollout_batch(cfg) -> int:
    """How many trajectories the run rolls out together: a round's batch (at most
    policy.rollout_batch) for the round methods, one for AFedPG (its jobs sit at different points)."""
    from apga.protocol.registry import protocol_class
    if protocol_class(cfg.algorithm.name).schedule == "per_gradient":
        return 1
    return max(1, min(cfg.algorithm.batch_size, cfg.policy.rollout_batch))


def measure(cfg) -> tuple[int, Rate]:
    """(policy dimension d, training rate on one core at the initial point) of the run's oracle,
    rolling out ``rollout_batch(cfg)`` trajectories per call as the run will."""
    import dataclasses

    from apga.run.build import build_oracle
    single = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, processes=1))
    oracle = build_oracle(single)
    try:
        x0 = oracle.initial_point()
        n = cfg.workers.n
        batch = rollout_batch(cfg)
        total = MEASURE_TRAJECTORIES if batch > 1 else MEASURE_TRAJECTORIES // 4
        jobs = [(i % n, i // n) for i in range(total)]
        oracle.gradients(x0, jobs[:batch])  # warm-up: first calls build environments and caches
        start = time.process_time()  # CPU time: the rate of one idle core, whatever else runs now
        outs = [oracle.gradients(x0, jobs[i:i + batch]) for i in range(0, total, batch)]
        seconds = time.process_time() - start
        steps = sum(b.env_steps for out in outs for b in out.values())
        episodes = sum(len(b.lengths) for out in outs for b in out.values()) or 1
        rate = Rate(steps / seconds if seconds > 0 else math.inf, steps / episodes)
        return oracle.dim, rate
    finally:
        close = getattr(oracle, "close", None)
        if close:
            close()


def run_cost(cfg, dim: int, rate: Rate | None) -> dict:
    """Trajectories, evaluation episodes, env-step bounds and core-seconds of one run."""
    s = schedule(cfg, dim)
    evals = (s.updates // cfg.eval.every + 2) * cfg.eval.episodes if cfg.eval.every else 0
    episodes = s.trajectories + evals
    horizon = cfg.env.horizon if cfg.env.id != "synthetic" else 0
    low = episodes * min(rate.initial_length, horizon) if rate else None
    high = episodes * horizon
    out = {"updates": s.updates, "trajectories": s.trajectories, "eval_episodes": evals,
           "steps_low": low, "steps_high": high, "complete": s.complete}
    if rate and rate.steps_per_second > 0 and horizon:
        out["core_seconds_low"] = low / rate.steps_per_second
        out["core_seconds_high"] = high / rate.steps_per_second
    return out


def estimate_plan(plan, jobs: int) -> dict:
    """Per (setting, variant) the cost of one seed, and the plan's total with ``jobs`` processes."""
    rates: dict = {}
    per: dict = {}
    total = {"runs": 0, "trajectories": 0, "steps_low": 0.0, "steps_high": 0.0,
             "core_seconds_low": 0.0, "core_seconds_high": 0.0}
    for run in plan.runs:
        key = (run.setting, run.variant)
        if key not in per:
            cfg = run.cfg
            env_key = (cfg.env.id, repr(cfg.env), repr(cfg.policy), cfg.workers.n, rollout_batch(cfg))
            if cfg.runtime.name != "sim":
                per[key] = None
            else:
                if env_key not in rates:
                    rates[env_key] = measure(cfg)
                dim, rate = rates[env_key]
                per[key] = run_cost(cfg, dim, None if cfg.env.id == "synthetic" else rate)
        cost = per[key]
        if cost is None:
            continue
        total["runs"] += 1
        for k in ("trajectories", "steps_low", "steps_high", "core_seconds_low", "core_seconds_high"):
            total[k] += cost.get(k) or 0
    total["jobs"] = jobs
    return {"per": per, "total": total}


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(est: dict, jobs: int) -> list:
    """The dry run's lines: one per (setting, variant), then the total."""
    lines = []
    for (s, v), c in est["per"].items():
        if c is None:
            lines.append(f"  {s}/{v}: Ray runs: wall time depends on the cluster (not estimated)")
            continue
        steps = (f"{c['steps_low']:.3g} .. {c['steps_high']:.3g} env steps" if c["steps_low"] is not None
                 else "no env steps (synthetic)")
        more = "" if c["complete"] else f" (schedule replay stopped at {MAX_EVENTS} events: at least this)"
        lines.append(f"  {s}/{v}, per seed: {c['updates']} updates, {c['trajectories']} trajectories "
                     f"+ {c['eval_episodes']} evaluation episodes, {steps}{more}")
    t = est["total"]
    if t["core_seconds_high"] > 0:
        lo, hi = t["core_seconds_low"], t["core_seconds_high"]
        lines.append(f"estimate: {t['runs']} runs, {t['trajectories']} trajectories, {t['steps_low']:.3g} .. "
                     f"{t['steps_high']:.3g} env steps: {lo / 3600:.2g} .. {hi / 3600:.2g} core-hours, "
                     f"{fmt_duration(lo / jobs)} .. {fmt_duration(hi / jobs)} wall with {jobs} processes "
                     f"(initial policy's episode length .. every episode at the horizon; at the rate "
                     f"measured now at the initial point on one idle core, start-up not counted)")
    elif t["runs"]:
        lines.append(f"estimate: {t['runs']} runs, {t['trajectories']} trajectories (synthetic: no env steps)")
    return lines
