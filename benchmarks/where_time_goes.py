"""Where apga's MuJoCo time goes, against `apga bench`'s physics limit (used in benchmarks/README.md).

usage: python benchmarks/where_time_goes.py [--env Hopper-v5] [--cycles 6] [--horizon 1000]

`apga bench`'s ratio_limit divides apga's env steps per wall second on all cores by the physics
limit: ONE core alone stepping uniform random controls, times the cores. This script splits that
ratio into three factors whose product it is:

  cores_at_once  physics_all_cores / physics_limit: the same random-control physics on all cores
                 at once, against one core alone times the cores (shared caches and memory).
  trajectories   physics CPU per env step of that all-cores run / the physics CPU per env step
                 inside apga's rounds (its own trajectories: the policy's actions, and for
                 Ant / Humanoid the cfrc_ext pass), timed around every batch step call.
  apga_share     apga's physics CPU / (wall time x cores): the share of the cores' time that is
                 physics; the rest is apga's own work (policy forwards, observations, the torch
                 passes) and waiting.

It also splits the cores' time inside apga's rounds (`cores_time`, shares summing to 1):
physics; the step loop's own work (policy forwards, observations, bookkeeping: the loop's CPU
time less the physics'); the gradient passes (torch); and the rest, mostly waiting: a thread
whose block of trajectories ended waits for the other blocks (blocks of equal size still differ
in physics cost: their trajectories' states, their cores' speed), plus resets, noise draws and
the update.
`block_end_gap` is the mean, over rounds, of the time between the first and the last block's
end, as a share of the round's wall time.

The setting is `apga bench`'s (Rennala NIGT, M = 32, n = 10, h_i = sqrt(i), H steps without
termination, all cores). The three meters run in interleaved cycles (one apga round, then
`--seconds` of each physics meter), so that the machine's speed changes hit all alike; the
factors are computed from the totals. Timing the batch's step calls adds two clock reads per
call (about 1 us against 1-10 ms of physics).
"""
import argparse
import collections
import json
import time

from apga.commands import bench
from apga.oracle import fast_mujoco
from apga.run.build import build_oracle, build_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--horizon", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds of each physics meter per cycle")
    ap.add_argument("--cores", type=int, default=0, help="runtime.processes (0 = all)")
    args = ap.parse_args()

    from apga.oracle.parallel import resolve_processes
    cores = resolve_processes(args.cores)
    env, kwargs = bench._make_env(args.env, args.horizon)
    cfg = bench._config(args.env, kwargs, args.horizon, 10, args.cores, 16, 0)
    oracle = build_oracle(cfg)
    physics_cpu = collections.Counter()
    timed = fast_mujoco.BatchStepper._physics

    def physics(self, rows):  # the batch's step call, with its thread's CPU time
        t0 = time.thread_time()
        out = timed(self, rows)
        physics_cpu["seconds"] += time.thread_time() - t0
        physics_cpu["steps"] += self.nsim if rows is None else len(rows)
        return out

    oracle_cls = type(oracle)
    steps_timed, grad_timed = oracle_cls._steps, oracle_cls._partial_sum
    block_ends: list[float] = []
    other_cpu = collections.Counter()

    def steps(self, *a, **k):  # one block's step loop: its thread's CPU time and its end
        t0 = time.thread_time()
        out = steps_timed(self, *a, **k)
        other_cpu["step_loop"] += time.thread_time() - t0
        block_ends.append(time.perf_counter())
        return out

    def partial_sum(self, *a, **k):  # one worker's gradient pass
        t0 = time.thread_time()
        out = grad_timed(self, *a, **k)
        other_cpu["gradients"] += time.thread_time() - t0
        return out

    fast_mujoco.BatchStepper._physics = physics
    oracle_cls._steps, oracle_cls._partial_sum = steps, partial_sum
    gaps = []
    try:
        if not oracle.batched():
            raise SystemExit(f"{args.env} is not on the MuJoCo batch path; nothing to split")
        apga = bench.ApgaMeter(build_runtime(cfg, oracle))
        limit = bench.PhysicsMeter(env, args.horizon, 0)
        all_cores = bench.AllCoresPhysicsMeter(bench._make_env(args.env, args.horizon)[0], args.horizon, 0, cores)
        physics_cpu.clear()  # the warm-up round is not counted
        other_cpu.clear()
        for c in range(args.cycles):
            block_ends.clear()
            start = time.perf_counter()
            apga.run(0.0)  # one round
            gaps.append((max(block_ends) - min(block_ends)) / (time.perf_counter() - start))
            limit.run(args.seconds)
            all_cores.run(args.seconds)
            print(f"cycle {c + 1}/{args.cycles}: apga {apga.rate:,.0f} steps/s, limit {limit.rate * cores:,.0f}, "
                  f"all cores {all_cores.rate:,.0f} (running totals)", flush=True)
    finally:
        fast_mujoco.BatchStepper._physics = timed
        oracle_cls._steps, oracle_cls._partial_sum = steps_timed, grad_timed
        oracle.close()
        env.close()
    limit_rate = limit.rate * cores
    apga_physics_per_step = physics_cpu["seconds"] / physics_cpu["steps"]
    result = {
        "env": args.env, "horizon": args.horizon, "cores": cores, "cycles": args.cycles,
        "apga": round(apga.rate, 1), "physics_limit": round(limit_rate, 1), "physics_all_cores": round(all_cores.rate, 1),
        "ratio_limit": round(apga.rate / limit_rate, 4),
        "cores_at_once": round(all_cores.rate / limit_rate, 4),
        "trajectories": round((cores / all_cores.rate) / apga_physics_per_step, 4),
        "apga_share": round(physics_cpu["seconds"] / (apga.elapsed * cores), 4),
        "cores_time": {k: round(v / (apga.elapsed * cores), 4) for k, v in {
            "physics": physics_cpu["seconds"],
            "step_loop_own_work": other_cpu["step_loop"] - physics_cpu["seconds"],
            "gradients": other_cpu["gradients"],
            "rest_mostly_waiting": apga.elapsed * cores - other_cpu["step_loop"] - other_cpu["gradients"]}.items()},
        "block_end_gap": round(sum(gaps) / len(gaps), 4),
        "us_per_step": {"limit_one_core": round(1e6 / limit.rate, 1),
                        "all_cores_per_core": round(1e6 * cores / all_cores.rate, 1),
                        "apga_physics_cpu": round(1e6 * apga_physics_per_step, 1)},
    }
    print(f"ratio_limit {result['ratio_limit']:.3f} = cores_at_once {result['cores_at_once']:.3f} "
          f"x trajectories {result['trajectories']:.3f} x apga_share {result['apga_share']:.3f}")
    print("cores' time in apga's rounds: " + ", ".join(f"{k} {v:.3f}" for k, v in result["cores_time"].items())
          + f"; block_end_gap {result['block_end_gap']:.3f} of a round")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
