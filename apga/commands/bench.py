"""`apga bench`: apga's training throughput against the MuJoCo physics limit and a peer library."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from apga.errors import ApgaError

DESCRIPTION = """\
Measure, in one run and on one machine, how many environment steps per wall second apga's
simulator turns into training, next to what the hardware and a peer library do:

  physics_limit  raw MuJoCo: mujoco.mj_step(model, data, nstep=frame_skip) on the env's own
                 model with uniform random controls, reset every H steps (resets not timed),
                 in env steps/s per core, times the cores apga uses. No learner can beat it.
  gym_single     one Gymnasium env in one process, env.step with pre-drawn numpy random
                 actions (not action_space.sample), reset when an episode ends.
  apga           `apga train` with Rennala NIGT, M = 32, 10 workers with h_i = sqrt(i), on all
                 cores (runtime.processes, default one per core), evaluation off: env steps of
                 the consumed trajectories per wall second, after one warm-up round.
  sb3_a2c        Stable-Baselines3 A2C, 8 envs (DummyVecEnv, SB3's default), 64x64 policy and
                 value nets, CPU: env steps per wall second of model.learn.
  round cost     wall seconds of one Rennala round (same M) with n = 10, 100, 1000 workers,
                 rounds interleaved across n so that load changes hit all alike (median).

All envs run with horizon H (default 1000) and, where the env has it,
terminate_when_unhealthy off, so every trajectory has H steps. The last line printed is one
JSON object with every number (physics_limit, gym_single, apga, sb3_a2c, ratio_limit =
apga / physics_limit, ratio_sb3 = apga / sb3_a2c, round_cost_ratio_1000_10, ...).
Targets: ratio_limit >= 0.60, ratio_sb3 >= 5, round_cost_ratio_1000_10 <= 1.5.

Timings are only comparable when nothing else runs on the machine: the JSON records the load
average before and after; compare ratios, which are measured side by side.
"""

EPILOG = """\
examples:
  apga bench                     full run (about 2 minutes with the default --seconds 15)
  apga bench --quick             a fast smoke run (short horizon, short measurements)
  apga bench --seconds 30 --processes 2

needs the bench extra for the peer measurement: pip install 'apga[bench]'
"""

ROUND_WORKERS = (10, 100, 1000)
UNHEALTHY_KWARG = "terminate_when_unhealthy"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="training throughput vs the MuJoCo physics limit and Stable-Baselines3",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="wall seconds per throughput measurement (default: 15; with --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: horizon 100, one timed round per worker count, --seconds 1 unless given")
    p.add_argument("--processes", type=int, default=0, metavar="P",
                   help="rollout processes for apga (runtime.processes; default 0 = one per core); the "
                   "physics limit is per core times P")
    p.add_argument("--env", default="Hopper-v5", metavar="ID",
                   help="a Gymnasium MuJoCo env id (default: Hopper-v5)")
    p.add_argument("--horizon", type=int, default=None, metavar="H",
                   help="trajectory length H (default: 1000; with --quick: 100)")
    p.add_argument("--rollout-batch", type=int, default=16, metavar="B",
                   help="policy.rollout_batch for apga: trajectories per chunk; a round of M = 32 has "
                   "ceil(32 / B) chunks to spread over the processes (default: 16)")
    p.add_argument("--rounds", type=int, default=None, metavar="K",
                   help="timed rounds per worker count for the round cost (default: 3; with --quick: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of every measurement (default: 0)")
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------- helpers
def _check_args(args) -> dict:
    quick = bool(args.quick)
    seconds = args.seconds if args.seconds is not None else (1.0 if quick else 15.0)
    horizon = args.horizon if args.horizon is not None else (100 if quick else 1000)
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ApgaError(f"--seconds: must be a positive number of seconds, got {seconds:g}")
    if horizon < 1:
        raise ApgaError(f"--horizon: H must be >= 1, got {horizon}")
    if rounds < 1:
        raise ApgaError(f"--rounds: must be >= 1, got {rounds}")
    if args.processes < 0:
        raise ApgaError(f"--processes: must be >= 0 (0 = one per core), got {args.processes}")
    if args.rollout_batch < 1:
        raise ApgaError(f"--rollout-batch: must be >= 1, got {args.rollout_batch}")
    if args.seed < 0:
        raise ApgaError(f"--seed: must be >= 0, got {args.seed}")
    return {"seconds": float(seconds), "horizon": int(horizon), "rounds": int(rounds), "quick": quick}


def _require_sb3():
    try:
        import stable_baselines3  # noqa: F401
    except ModuleNotFoundError:
        raise ApgaError("apga bench compares against Stable-Baselines3, which is not installed: "
                        "pip install 'apga[bench]' (or pip install stable-baselines3)") from None
    return stable_baselines3


def _make_env(env_id: str, horizon: int):
    """(env, kwargs): the env with H steps and terminate_when_unhealthy off where it exists."""
    import gymnasium as gym
    for kwargs in ({UNHEALTHY_KWARG: False}, {}):
        try:
            env = gym.make(env_id, max_episode_steps=horizon, **kwargs)
        except TypeError:
            continue  # the env has no such keyword
        except gym.error.Error as exc:
            raise ApgaError(f"--env: {env_id!r} cannot be created ({str(exc).splitlines()[0]}); "
                            "use a MuJoCo env id such as Hopper-v5") from None
        break
    try:
        import mujoco
    except ModuleNotFoundError:
        raise ApgaError("apga bench needs MuJoCo: pip install 'gymnasium[mujoco]'") from None
    if not isinstance(getattr(env.unwrapped, "model", None), mujoco.MjModel):
        env.close()
        raise ApgaError(f"--env: {env_id!r} is not a MuJoCo env; use e.g. Hopper-v5")
    return env, kwargs


def _actions(env, horizon: int, seed: int):
    import numpy as np
    space = env.action_space
    rng = np.random.default_rng(seed)
    return rng.uniform(space.low.astype(np.float64), space.high.astype(np.float64), size=(horizon,) + space.shape)


def measure_physics(env, horizon: int, seconds: float, seed: int) -> float:
    """Env steps per second of bare mj_step(nstep=frame_skip) on one core (resets not timed)."""
    import mujoco
    u = env.unwrapped
    model, data, nstep = u.model, u.data, int(u.frame_skip)
    acts = _actions(env, horizon, seed)
    ctrl, step = data.ctrl, mujoco.mj_step
    steps, busy, episode = 0, 0.0, 0
    while busy < seconds:
        env.reset(seed=seed + episode)
        episode += 1
        t0 = time.perf_counter()
        for i in range(horizon):
            ctrl[:] = acts[i]
            step(model, data, nstep=nstep)
        busy += time.perf_counter() - t0
        steps += horizon
    return steps / busy


def measure_gym(env, horizon: int, seconds: float, seed: int) -> float:
    """Env steps per second of a plain env.step loop with numpy random actions."""
    acts = _actions(env, horizon, seed + 1)
    steps, episode = 0, 0
    env.reset(seed=seed)
    t0 = time.perf_counter()
    while True:
        for i in range(horizon):
            _, _, term, trunc, _ = env.step(acts[i])
            steps += 1
            if term or trunc:
                break
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return steps / elapsed
        episode += 1
        env.reset(seed=seed + episode)


def measure_sb3(env_id: str, kwargs: dict, horizon: int, seconds: float, seed: int, threads: int) -> float:
    """Env steps per second of Stable-Baselines3 A2C's learn (8 envs, 64x64 nets, CPU)."""
    import torch
    from stable_baselines3 import A2C
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    class Deadline(BaseCallback):
        def __init__(self, until: float):
            super().__init__()
            self.until = until

        def _on_step(self) -> bool:
            return time.perf_counter() < self.until

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        venv = make_vec_env(env_id, n_envs=8, seed=seed, env_kwargs={**kwargs, "max_episode_steps": horizon})
        model = A2C("MlpPolicy", venv, policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}},
                    seed=seed, device="cpu", verbose=0)
        model.learn(total_timesteps=8 * 5 * 4)  # warm-up: first updates, lazy inits
        before = model.num_timesteps
        t0 = time.perf_counter()
        model.learn(total_timesteps=10**12, callback=Deadline(t0 + seconds), reset_num_timesteps=False)
        elapsed = time.perf_counter() - t0
        steps = model.num_timesteps - before
        venv.close()
    finally:
        torch.set_num_threads(saved)
    return steps / elapsed


def _config(env_id: str, kwargs: dict, horizon: int, n: int, processes: int, rollout_batch: int, seed: int):
    from apga import config as cfgmod
    return cfgmod.load_config({
        "seed": seed,
        "env": {"id": env_id, "horizon": horizon, "kwargs": dict(kwargs)},
        "policy": {"rollout_batch": rollout_batch},
        "algorithm": {"name": "rennala_nigt", "batch_size": 32},
        "workers": {"n": n, "compute_time": "sqrt", "comm_time": 0.0},
        "runtime": {"name": "sim", "processes": processes},
        "budget": {"iterations": 10**9},
        "eval": {"every": 0},
    })


def measure_apga(oracle, env_id, kwargs, horizon, processes, rollout_batch, seconds, seed):
    """(env steps per wall second of Rennala NIGT with 10 workers, rounds timed)."""
    from apga.train import build_runtime
    sim = build_runtime(_config(env_id, kwargs, horizon, 10, processes, rollout_batch, seed), oracle)
    sim.step()  # warm-up round
    steps0, rounds = sim.totals.env_steps, 0
    t0 = time.perf_counter()
    while True:
        sim.step()
        rounds += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return (sim.totals.env_steps - steps0) / elapsed, rounds


def measure_round_cost(oracle, env_id, kwargs, horizon, processes, rollout_batch, rounds, seed) -> dict:
    """Median wall seconds of one Rennala round per worker count, rounds interleaved across n."""
    from apga.train import build_runtime
    sims = {n: build_runtime(_config(env_id, kwargs, horizon, n, processes, rollout_batch, seed), oracle)
            for n in ROUND_WORKERS}
    for sim in sims.values():
        sim.step()  # warm-up round (also the M_init round)
    walls: dict[int, list] = {n: [] for n in ROUND_WORKERS}
    for _ in range(rounds):
        for n, sim in sims.items():
            t0 = time.perf_counter()
            sim.step()
            walls[n].append(time.perf_counter() - t0)
    return {n: statistics.median(w) for n, w in walls.items()}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _table(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i != 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command
def run(args) -> int:
    opts = _check_args(args)
    _require_sb3()
    from apga.oracle.parallel import resolve_processes
    from apga.train import build_oracle

    seconds, horizon, seed = opts["seconds"], opts["horizon"], args.seed
    cores = resolve_processes(args.processes)
    load_before = _load()
    say = (lambda m: sys.stderr.write(m + "\n")) if not opts["quick"] else (lambda m: None)

    env, kwargs = _make_env(args.env, horizon)
    # One oracle (and process pool) for every apga measurement: a simulation with n workers
    # only uses workers 0..n-1, whose results do not depend on the oracle's worker count.
    # The pool starts first: its processes load in the background (--quick measures meanwhile;
    # a full run waits, so that nothing else runs while it measures).
    say(f"bench: starting {cores} rollout process(es)")
    big = _config(args.env, kwargs, horizon, max(ROUND_WORKERS), args.processes, args.rollout_batch, seed)
    try:
        oracle = build_oracle(big)
    except BaseException:
        env.close()
        raise
    try:
        if not opts["quick"] and hasattr(oracle, "wait_ready"):
            oracle.wait_ready()
        try:
            frame_skip = int(env.unwrapped.frame_skip)
            say(f"bench: physics limit ({seconds:g} s)")
            per_core = measure_physics(env, horizon, seconds, seed)
            say(f"bench: gymnasium env.step ({seconds:g} s)")
            gym_single = measure_gym(env, horizon, seconds, seed)
        finally:
            env.close()
        say(f"bench: Stable-Baselines3 A2C ({seconds:g} s)")
        sb3 = measure_sb3(args.env, kwargs, horizon, seconds, seed, cores)
        if hasattr(oracle, "wait_ready"):
            oracle.wait_ready()
        say(f"bench: apga Rennala NIGT training ({seconds:g} s)")
        apga, apga_rounds = measure_apga(oracle, args.env, kwargs, horizon, args.processes, args.rollout_batch,
                                         seconds, seed)
        say(f"bench: round cost for n = {', '.join(map(str, ROUND_WORKERS))} ({opts['rounds']} round(s) each)")
        cost = measure_round_cost(oracle, args.env, kwargs, horizon, args.processes, args.rollout_batch,
                                  opts["rounds"], seed)
    finally:
        oracle.close()

    physics = per_core * cores
    result = {
        "env": args.env, "horizon": horizon, "env_kwargs": kwargs, "frame_skip": frame_skip,
        "cores": cores, "rollout_batch": args.rollout_batch, "seconds": seconds, "quick": opts["quick"],
        "physics_per_core": round(per_core, 1),
        "physics_limit": round(physics, 1),
        "gym_single": round(gym_single, 1),
        "apga": round(apga, 1),
        "apga_rounds": apga_rounds,
        "sb3_a2c": round(sb3, 1),
        "ratio_limit": round(apga / physics, 4),
        "ratio_gym": round(apga / gym_single, 4),
        "ratio_sb3": round(apga / sb3, 4),
        "round_cost": {str(n): round(c, 4) for n, c in cost.items()},
        "round_cost_ratio_100_10": round(cost[100] / cost[10], 4),
        "round_cost_ratio_1000_10": round(cost[1000] / cost[10], 4),
        "load_before": load_before, "load_after": _load(),
    }
    rows = [
        ["measurement", "env steps/s", "notes"],
        ["physics limit", f"{physics:,.0f}", f"{per_core:,.0f}/core x {cores} core(s); mj_step nstep={frame_skip}"],
        ["gymnasium single", f"{gym_single:,.0f}", "1 process, env.step, numpy random actions"],
        ["apga (Rennala NIGT)", f"{apga:,.0f}", f"M=32, n=10, h_i=sqrt(i), {cores} process(es), rollout_batch "
                                                f"{args.rollout_batch}, {apga_rounds} timed round(s)"],
        ["SB3 A2C", f"{sb3:,.0f}", "8 envs (DummyVecEnv), 64x64, CPU"],
    ]
    print(f"{args.env}, H = {horizon}, {kwargs or 'default kwargs'}; load average {load_before} -> {result['load_after']}")
    print(_table(rows))
    print(f"ratios: apga/physics_limit {result['ratio_limit']:.3f} (target >= 0.60), apga/gym_single "
          f"{result['ratio_gym']:.2f}, apga/sb3_a2c {result['ratio_sb3']:.2f} (target >= 5)")
    print("round cost (s, median): " + ", ".join(f"n={n}: {c:.3f}" for n, c in cost.items())
          + f"; n=1000 / n=10 = {result['round_cost_ratio_1000_10']:.3f} (target <= 1.5)")
    if load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine was busy (load average {load_before}); re-run when it is idle")
    print(json.dumps(result))
    return 0
