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
                 in env steps/s per core (one process alone), times the cores apga uses.
  physics_all_cores  the same physics on all cores at once: a mujoco.batch.Batch of the env's
                 model, 32 simulations on one thread per core (what the cores give together:
                 shared caches, other load); apga / it is ratio_all_cores.
  gym_single     one Gymnasium env in one process, env.step with pre-drawn numpy random
                 actions (not action_space.sample), reset when an episode ends.
  apga           `apga train` with Rennala NIGT, M = 32, 10 workers with h_i = sqrt(i), on all
                 cores (runtime.processes, default one per core: threads of MuJoCo batches, or
                 rollout processes for an env the batch does not cover), evaluation off: env
                 steps of the consumed trajectories per wall second, after one warm-up round.
  sb3_a2c        Stable-Baselines3 A2C, 8 envs (DummyVecEnv, SB3's default), 64x64 policy and
                 value nets, CPU, torch with 1 thread (its fastest setting here): env steps
                 per wall second of model.learn.
  round cost     wall seconds of one Rennala round (same M) with n = 10, 100, 1000 workers,
                 rounds interleaved across n so that load changes hit all alike (median).

All envs run with horizon H (default 1000) and, where the env has it,
terminate_when_unhealthy off, so every trajectory has H steps. The last line printed is one
JSON object with every number (physics_limit, gym_single, apga, sb3_a2c, ratio_limit =
apga / physics_limit, ratio_sb3 = apga / sb3_a2c, round_cost_ratio_1000_10, ...).
Targets: ratio_limit >= 0.85, ratio_sb3 >= 5, round_cost_ratio_1000_10 <= 1.5.

Each throughput is measured in slices of about 1 s (at least 3; apga's slice is one whole
round or more), interleaved with the others, so that the machine's speed changes, which on a
shared VM come and go within seconds, hit all alike. Timings are only comparable when nothing else runs on the machine: the JSON records the
load average before and after; compare ratios, which are measured side by side.
"""

EPILOG = """\
examples:
  apga bench                     full run (about 3 minutes with the default --seconds 15)
  apga bench --quick             a fast smoke run (short horizon, short measurements)
  apga bench --seconds 30 --processes 2

needs the bench extra for the peer measurement: pip install 'apga[bench]'
"""

ROUND_WORKERS = (10, 100, 1000)
SLICES = 3  # each throughput is measured in at least this many slices, interleaved with the others
SLICE_SECONDS = 1.0  # ... and in slices of about this long (a VM's speed drifts within seconds)
UNHEALTHY_KWARG = "terminate_when_unhealthy"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="training throughput vs the MuJoCo physics limit and Stable-Baselines3",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="wall seconds per throughput measurement, taken in slices of about 1 s (at least "
                   "3) interleaved with the other measurements (default: 15; with --quick: 1, one slice)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: horizon 100, one timed round per worker count, --seconds 1 unless given")
    p.add_argument("--processes", type=int, default=0, metavar="P",
                   help="cores for apga (runtime.processes; default 0 = all): threads of MuJoCo batches, or "
                   "rollout processes for an env it does not cover; the physics limit is per core times P")
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


class Meter:
    """A throughput measured in slices: ``run(seconds)`` adds env steps and seconds."""

    name = ""

    def __init__(self):
        self.steps, self.elapsed = 0, 0.0

    @property
    def rate(self) -> float:
        return self.steps / self.elapsed if self.elapsed > 0 else 0.0


class PhysicsMeter(Meter):
    """Bare ``mj_step(model, data, nstep=frame_skip)`` on the env's own model, one core, with
    uniform random controls; episodes of H steps, resets not timed."""

    name = "physics limit"

    def __init__(self, env, horizon: int, seed: int):
        super().__init__()
        import mujoco
        u = env.unwrapped
        self.env, self.horizon, self.seed = env, horizon, seed
        self.model, self.data, self.nstep = u.model, u.data, int(u.frame_skip)
        self.acts = _actions(env, horizon, seed)
        self.mj_step = mujoco.mj_step
        self.t, self.episode = horizon, 0

    def run(self, seconds: float) -> None:
        model, data, nstep, step, acts, ctrl = self.model, self.data, self.nstep, self.mj_step, self.acts, self.data.ctrl
        busy = 0.0
        while busy < seconds:
            if self.t >= self.horizon:
                self.env.reset(seed=self.seed + self.episode)
                self.episode += 1
                self.t = 0
            n = min(self.horizon - self.t, 100)
            t0 = time.perf_counter()
            for i in range(self.t, self.t + n):
                ctrl[:] = acts[i]
                step(model, data, nstep=nstep)
            busy += time.perf_counter() - t0
            self.t += n
            self.steps += n
        self.elapsed += busy


class AllCoresPhysicsMeter(Meter):
    """The physics of PhysicsMeter on all cores at once: a ``mujoco.batch.Batch`` of the env's
    model, NSIM simulations on one thread per core, uniform random controls, episodes of H steps
    (each simulation starts from an ``env.reset``; resets not timed)."""

    name = "physics on all cores at once"
    NSIM = 32

    def __init__(self, env, horizon: int, seed: int, cores: int):
        super().__init__()
        import mujoco
        import numpy as np
        from mujoco.batch import Batch
        u = env.unwrapped
        self.env, self.horizon, self.seed, self.nstep = env, horizon, seed, int(u.frame_skip)
        self.batch = Batch(u.model, nsim=self.NSIM, nthread=cores)
        self.ctrl, self.model, self.data = self.batch.bind("ctrl"), u.model, u.data
        self.spec = int(mujoco.mjtState.mjSTATE_INTEGRATION)
        low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
        self.acts = np.random.default_rng(seed + 2).uniform(low, high, size=(horizon, self.NSIM) + low.shape)
        self.t, self.episode = horizon, 0

    def run(self, seconds: float) -> None:
        import mujoco
        busy = 0.0
        while busy < seconds:
            if self.t >= self.horizon:
                for k in range(self.NSIM):
                    self.env.reset(seed=self.seed + 10_000 + self.episode * self.NSIM + k)
                    mujoco.mj_getState(self.model, self.data, self.batch.state[k], self.spec)
                self.episode += 1
                self.t = 0
            n = min(self.horizon - self.t, 50)
            t0 = time.perf_counter()
            for i in range(self.t, self.t + n):
                self.ctrl[:] = self.acts[i]
                self.batch.step(nstep=self.nstep)
            busy += time.perf_counter() - t0
            self.t += n
            self.steps += n * self.NSIM
        self.elapsed += busy

    def close(self) -> None:
        self.env.close()


class GymMeter(Meter):
    """One Gymnasium env, ``env.step`` with pre-drawn numpy random actions, resets included."""

    name = "gymnasium env.step"

    def __init__(self, env, horizon: int, seed: int):
        super().__init__()
        self.env, self.horizon, self.seed = env, horizon, seed
        self.acts = _actions(env, horizon, seed + 1)
        self.t, self.episode = horizon, 0

    def run(self, seconds: float) -> None:
        env, acts = self.env, self.acts
        t0 = time.perf_counter()
        while True:
            if self.t >= self.horizon:
                env.reset(seed=self.seed + self.episode)
                self.episode += 1
                self.t = 0
            for _ in range(100):
                _, _, term, trunc, _ = env.step(acts[self.t])
                self.t += 1
                self.steps += 1
                if term or trunc:
                    self.t = self.horizon
                    break
            if time.perf_counter() - t0 >= seconds:
                break
        self.elapsed += time.perf_counter() - t0


class SB3Meter(Meter):
    """Stable-Baselines3 A2C's ``learn``: 8 envs (DummyVecEnv), 64x64 policy and value nets, CPU,
    torch with one thread (its fastest setting for nets this small: with more threads OpenMP
    spins, and on a machine with any other load A2C drops to a few percent of its speed)."""

    name = "Stable-Baselines3 A2C"

    def __init__(self, env_id: str, kwargs: dict, horizon: int, seed: int, threads: int):
        super().__init__()
        from stable_baselines3 import A2C
        from stable_baselines3.common.env_util import make_vec_env
        self.threads = threads
        self.venv = make_vec_env(env_id, n_envs=8, seed=seed, env_kwargs={**kwargs, "max_episode_steps": horizon})
        self.model = A2C("MlpPolicy", self.venv, policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}},
                         seed=seed, device="cpu", verbose=0)
        with self._threads():
            self.model.learn(total_timesteps=8 * 5 * 4)  # warm-up: first updates, lazy inits

    def _threads(self):
        import contextlib
        import torch

        @contextlib.contextmanager
        def scope():
            saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(saved)
        return scope()

    def run(self, seconds: float) -> None:
        from stable_baselines3.common.callbacks import BaseCallback

        class Deadline(BaseCallback):
            def __init__(self, until: float):
                super().__init__()
                self.until = until

            def _on_step(self) -> bool:
                return time.perf_counter() < self.until

        with self._threads():
            before = self.model.num_timesteps
            t0 = time.perf_counter()
            self.model.learn(total_timesteps=10**12, callback=Deadline(t0 + seconds), reset_num_timesteps=False)
            self.elapsed += time.perf_counter() - t0
            self.steps += self.model.num_timesteps - before

    def close(self) -> None:
        self.venv.close()


class ApgaMeter(Meter):
    """``apga train``'s simulator with Rennala NIGT: env steps of consumed trajectories per wall
    second, whole rounds (at least one per slice), after one warm-up round."""

    name = "apga Rennala NIGT"

    def __init__(self, sim):
        super().__init__()
        self.sim = sim
        self.rounds = 0
        sim.step()  # warm-up round

    def run(self, seconds: float) -> None:
        sim = self.sim
        steps0 = sim.totals.env_steps
        t0 = time.perf_counter()
        while True:
            sim.step()
            self.rounds += 1
            if time.perf_counter() - t0 >= seconds:
                break
        self.elapsed += time.perf_counter() - t0
        self.steps += sim.totals.env_steps - steps0


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


def measure_round_cost(oracle, env_id, kwargs, horizon, processes, rollout_batch, rounds, seed) -> dict:
    """Median wall seconds of one Rennala round per worker count, rounds interleaved across n."""
    from apga.run.build import build_runtime
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


def _busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other programs keep busy right now (from /proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v) - idle, sum(v)
    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1), 2)


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
    from apga.run.build import build_oracle, build_runtime

    seconds, horizon, seed = opts["seconds"], opts["horizon"], args.seed
    cores = resolve_processes(args.processes)
    load_before, busy_before = _load(), _busy_cores()
    say = (lambda m: sys.stderr.write(m + "\n")) if not opts["quick"] else (lambda m: None)

    env, kwargs = _make_env(args.env, horizon)
    gym_env = _make_env(args.env, horizon)[0]
    frame_skip = int(env.unwrapped.frame_skip)
    # One oracle (and process pool) for every apga measurement: a simulation with n workers
    # only uses workers 0..n-1, whose results do not depend on the oracle's worker count.
    # The pool starts first: its processes load in the background (--quick builds the other
    # meters meanwhile; a full run waits, so that nothing else runs while it measures).
    say(f"bench: building apga's oracle on {cores} core(s)")
    big = _config(args.env, kwargs, horizon, max(ROUND_WORKERS), args.processes, args.rollout_batch, seed)
    oracle = sb3 = all_cores = None
    try:
        oracle = build_oracle(big)
        if not opts["quick"] and hasattr(oracle, "wait_ready"):
            oracle.wait_ready()
        physics, gym_single = PhysicsMeter(env, horizon, seed), GymMeter(gym_env, horizon, seed)
        say("bench: building Stable-Baselines3 A2C")
        sb3 = SB3Meter(args.env, kwargs, horizon, seed, threads=1)
        if hasattr(oracle, "wait_ready"):
            oracle.wait_ready()
        apga = ApgaMeter(build_runtime(_config(args.env, kwargs, horizon, 10, args.processes, args.rollout_batch,
                                               seed), oracle))
        all_cores = AllCoresPhysicsMeter(_make_env(args.env, horizon)[0], horizon, seed, cores)
        # Interleaved slices: a load change during the run hits every measurement alike.
        slices = 1 if opts["quick"] else max(SLICES, round(seconds / SLICE_SECONDS))
        for k in range(slices):
            for meter in (physics, all_cores, gym_single, sb3, apga):
                say(f"bench: slice {k + 1}/{slices}: {meter.name} ({seconds / slices:.3g} s)")
                meter.run(seconds / slices)
        say(f"bench: round cost for n = {', '.join(map(str, ROUND_WORKERS))} ({opts['rounds']} round(s) each)")
        cost = measure_round_cost(oracle, args.env, kwargs, horizon, args.processes, args.rollout_batch,
                                  opts["rounds"], seed)
    finally:
        env.close()
        gym_env.close()
        if sb3 is not None:
            sb3.close()
        if oracle is not None:
            oracle.close()
        if all_cores is not None:
            all_cores.close()
    per_core, gym_single, sb3, apga_rounds, apga = (physics.rate, gym_single.rate, sb3.rate, apga.rounds,
                                                    apga.rate)
    physics_all = all_cores.rate

    physics = per_core * cores
    result = {
        "env": args.env, "horizon": horizon, "env_kwargs": kwargs, "frame_skip": frame_skip,
        "cores": cores, "rollout_batch": args.rollout_batch, "seconds": seconds, "quick": opts["quick"],
        "physics_per_core": round(per_core, 1),
        "physics_limit": round(physics, 1),
        "physics_all_cores": round(physics_all, 1),
        "gym_single": round(gym_single, 1),
        "apga": round(apga, 1),
        "apga_rounds": apga_rounds,
        "sb3_a2c": round(sb3, 1),
        "ratio_limit": round(apga / physics, 4),
        "ratio_all_cores": round(apga / physics_all, 4),
        "ratio_gym": round(apga / gym_single, 4),
        "ratio_sb3": round(apga / sb3, 4),
        "round_cost": {str(n): round(c, 4) for n, c in cost.items()},
        "round_cost_ratio_100_10": round(cost[100] / cost[10], 4),
        "round_cost_ratio_1000_10": round(cost[1000] / cost[10], 4),
        "load_before": load_before, "load_after": _load(), "busy_cores_before": busy_before,
    }
    rows = [
        ["measurement", "env steps/s", "notes"],
        ["physics limit", f"{physics:,.0f}", f"{per_core:,.0f}/core x {cores} core(s); mj_step nstep={frame_skip}"],
        ["physics, all cores", f"{physics_all:,.0f}", f"mujoco.batch.Batch, {AllCoresPhysicsMeter.NSIM} simulations "
                                                      f"on {cores} thread(s)"],
        ["gymnasium single", f"{gym_single:,.0f}", "1 process, env.step, numpy random actions"],
        ["apga (Rennala NIGT)", f"{apga:,.0f}", f"M=32, n=10, h_i=sqrt(i), {cores} core(s), rollout_batch "
                                                f"{args.rollout_batch}, {apga_rounds} timed round(s)"],
        ["SB3 A2C", f"{sb3:,.0f}", "8 envs (DummyVecEnv), 64x64, CPU, 1 torch thread"],
    ]
    print(f"{args.env}, H = {horizon}, {kwargs or 'default kwargs'}; load average {load_before} -> {result['load_after']}")
    print(_table(rows))
    print(f"ratios: apga/physics_limit {result['ratio_limit']:.3f} (target >= 0.85), apga/physics_all_cores "
          f"{result['ratio_all_cores']:.3f}, apga/gym_single {result['ratio_gym']:.2f}, apga/sb3_a2c "
          f"{result['ratio_sb3']:.2f} (target >= 5)")
    print("round cost (s, median): " + ", ".join(f"n={n}: {c:.3f}" for n, c in cost.items())
          + f"; n=1000 / n=10 = {result['round_cost_ratio_1000_10']:.3f} (target <= 1.5)")
    if busy_before is not None and busy_before > 0.25:
        print(f"warning: other programs kept {busy_before} core(s) busy when the bench started; "
              "re-run when the machine is idle")
    print(json.dumps(result))
    return 0
