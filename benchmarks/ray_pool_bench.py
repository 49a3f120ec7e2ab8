"""When does `runtime.pool: ray` pay? One process against this process plus Ray actors, by the
length of a unit of work (``policy.rollout_batch`` trajectories of H steps).

    python benchmarks/ray_pool_bench.py [--processes 2] [--rounds 5]

Starts a private loopback Ray instance with ``--processes`` CPUs, builds the oracle one process
uses (RLOracle) and the pooled one (ParallelOracle with pool="ray": this process and
processes - 1 actors), and times rounds of M = 32 trajectories of Pendulum-v1 (every episode
lasts exactly H steps) at the same point on both, interleaved so that a load change hits both
alike. Prints, per (H, rollout_batch), the env steps per unit, the median seconds per round of
each and their ratio (one / pooled: above 1 the pool pays), and checks that both return the
same gradients bit for bit. A script, not a test: about a minute.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2, help="this process plus processes - 1 Ray actors")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per oracle and setting (median)")
    ap.add_argument("--batch-size", type=int, default=32, help="trajectories per round (M)")
    args = ap.parse_args()

    from apga.config import EnvConfig, PolicyConfig
    from apga.oracle.parallel import ParallelOracle
    from apga.oracle.rl import RLOracle
    from apga.runtime import ray_session

    session = ray_session.start_local(args.processes)
    rows = []
    try:
        for horizon in (20, 100, 500):
            for batch in (1, 4, 16):
                env = EnvConfig(id="Pendulum-v1", horizon=horizon)
                policy = PolicyConfig(hidden=[64, 64], rollout_batch=batch)
                one = RLOracle(env, policy, 1, 0)
                pooled = ParallelOracle(env, policy, 1, 0, args.processes, pool="ray")
                try:
                    pooled.wait_ready()
                    point = one.initial_point()
                    jobs = [(0, i) for i in range(args.batch_size)]
                    a, b = one.gradients(point, jobs), pooled.gradients(point, jobs)  # warm-up, and the check
                    identical = bool(np.array_equal(a[0].grad_sum, b[0].grad_sum))
                    times = {"one": [], "pooled": []}
                    for r in range(args.rounds):
                        jobs = [(0, args.batch_size * (r + 1) + i) for i in range(args.batch_size)]
                        for name, oracle in (("one", one), ("pooled", pooled)):
                            start = time.perf_counter()
                            oracle.gradients(point, jobs)
                            times[name].append(time.perf_counter() - start)
                    one_s, pool_s = statistics.median(times["one"]), statistics.median(times["pooled"])
                    row = {"horizon": horizon, "rollout_batch": batch, "steps_per_unit": horizon * batch,
                           "one_s": round(one_s, 4), "pooled_s": round(pool_s, 4),
                           "speedup": round(one_s / pool_s, 3), "identical": identical}
                    rows.append(row)
                    print(f"H={horizon:4d} rollout_batch={batch:3d} ({horizon * batch:5d} env steps a unit): "
                          f"one {one_s:.4f} s, pooled {pool_s:.4f} s a round: x{one_s / pool_s:.2f}"
                          f"{'' if identical else '  NOT IDENTICAL'}", flush=True)
                finally:
                    pooled.close()
                    one.close()
    finally:
        session.close()
    print(json.dumps({"processes": args.processes, "batch_size": args.batch_size, "rows": rows}))


if __name__ == "__main__":
    main()
