"""Ray runtime benchmark: real round times against the simulator's prediction, and throughput.

    /work/venv/bin/python benchmarks/ray_bench.py [--env Hopper-v5] [--workers 10] [--scale 0.5]
        [--batch 20] [--rounds 12] [--aggregation server] [--json out.json]

Part 1 (timing): Rennala NIGT with injected compute times h_i = sqrt(i) * scale (i = 1..n, no
communication time). The same config runs on the simulator, whose round durations are the
prediction (with constant times exactly min{t : sum_i floor(t / h_i) >= M}); the table gives
measured / predicted per round. Real overheads (messages, the driver's bookkeeping, the
reduction, and trajectories whose real compute time exceeds h_i on a busy machine) push the
ratio above 1.

Part 2 (throughput): the same run without injected delays; env steps of the consumed
trajectories per wall second on Ray (n actors) and on the simulator runtime (one process, each
round one batched rollout of exactly the M consumed trajectories).

A script, not a test: it takes minutes. It starts one local (loopback) Ray instance and removes it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

from apga.config import load_config, to_dict
from apga.runtime import ray_session
from apga.run.build import build_oracle, build_runtime


def make_cfg(args, runtime: str, inject: bool):
    return load_config({
        "seed": args.seed,
        "env": {"id": args.env, "horizon": args.horizon},
        "workers": {"n": args.workers, "compute_time": {"shape": "sqrt", "scale": args.scale}, "comm_time": 0.0},
        "algorithm": {"name": "rennala_nigt", "batch_size": args.batch, "aggregation": args.aggregation,
                      "step_size": args.step_size, "momentum": 0.1},
        "runtime": {"name": runtime, "inject_delays": inject},
        "budget": {"iterations": args.rounds},
        "eval": {"every": 0},
    })


def run(cfg, rounds: int, warmup: int = 1):
    """Step ``rounds`` updates; per-round durations (runtime seconds), env steps and wall time
    of the rounds after ``warmup``."""
    oracle = build_oracle(cfg)
    rt = build_runtime(cfg, oracle)
    try:
        seen_jobs = []  # simulator: the jobs each round consumed (from its one oracle call per round)
        if not hasattr(rt, "start"):
            gradients = oracle.gradients

            def recording(point, jobs):
                c = [0] * cfg.workers.n
                for w, _ in jobs:
                    c[w] += 1
                seen_jobs.append(c)
                return gradients(point, jobs)

            oracle.gradients = recording
        t0 = time.perf_counter()
        if hasattr(rt, "start"):
            rt.start()
        startup = time.perf_counter() - t0
        durations, steps, counts, to_stop, reduce = [], 0, [], [], []
        wall = 0.0
        for k in range(rounds):
            before = rt.clock
            w0 = time.perf_counter()
            env0 = rt.totals.env_steps
            ev = rt.step()
            if k >= warmup:
                wall += time.perf_counter() - w0
                steps += rt.totals.env_steps - env0
            durations.append(ev.time - before)
            to_stop.append(ev.stop - before)  # round start .. the stop was detected
            reduce.append(ev.time - ev.stop)  # the stop .. the update (halt, uploads, step)
            counts.append(list(getattr(ev, "counts", None) or seen_jobs[-1]))
        return {"durations": durations, "wall": wall, "env_steps": steps, "startup": startup,
                "computed": rt.totals.trajectories_computed, "used": rt.totals.trajectories, "counts": counts,
                "to_stop": to_stop, "reduce": reduce}
    finally:
        rt.close()
        oracle.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--horizon", type=int, default=1000)
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.5, help="h_i = sqrt(i) * scale seconds")
    p.add_argument("--batch", type=int, default=20, help="M")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--aggregation", default="server", choices=("server", "allreduce"))
    p.add_argument("--step-size", type=float, default=2**-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    h = [math.sqrt(i) * args.scale for i in range(1, args.workers + 1)]
    print(f"Rennala NIGT on {args.env}, n={args.workers}, M={args.batch}, h_i = sqrt(i) x {args.scale} s "
          f"({h[0]:.2f} .. {h[-1]:.2f} s), aggregation={args.aggregation}, {args.rounds} rounds")

    sim = run(make_cfg(args, "sim", False), args.rounds, warmup=0)
    session = ray_session.start_local()
    try:
        timed = run(make_cfg(args, "ray", True), args.rounds, warmup=0)
        raw = run(make_cfg(args, "ray", False), args.rounds + 1, warmup=1)
    finally:
        session.close()
    sim_raw = run(make_cfg(args, "sim", False), args.rounds + 1, warmup=1)

    print("\n1) round time, injected delays: measured (Ray) vs predicted (simulator)")
    print(" round  predicted[s]  measured[s]  ratio  counts per worker (Ray)")
    ratios = []
    for k, (pred, meas) in enumerate(zip(sim["durations"], timed["durations"])):
        ratios.append(meas / pred)
        print(f" {k:5d}  {pred:12.3f}  {meas:11.3f}  {meas / pred:5.3f}  {timed['counts'][k]}")
    tail = ratios[1:] or ratios
    print(f" ratio: first round {ratios[0]:.3f} (actor start-up, {timed['startup']:.1f} s, not counted), "
          f"median of the others {statistics.median(tail):.3f}, "
          f"max {max(tail):.3f}; mean overhead {statistics.mean(m - q for m, q in zip(timed['durations'][1:], sim['durations'][1:])) * 1000:.0f} ms/round")

    lag = statistics.mean(a - q for a, q in zip(timed["to_stop"][1:], sim["durations"][1:]))
    red = statistics.mean(timed["reduce"][1:])
    print(f" overhead split: stop detected {lag * 1000:.0f} ms after the predicted stop; "
          f"stop -> update (halt, uploads/AllReduce, NIGT step) {red * 1000:.0f} ms")
    same = sum(c == s for c, s in zip(timed["counts"], sim["counts"]))
    print(f" rounds whose per-worker counts equal the simulator's: {same}/{len(sim['counts'])}")
    try:
        load = os.getloadavg()
        print(f" machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    except OSError:
        pass

    ray_sps = raw["env_steps"] / raw["wall"]
    sim_sps = sim_raw["env_steps"] / sim_raw["wall"]
    print("\n2) throughput without injected delays (env steps of used trajectories per wall second)")
    print(f" Ray ({args.workers} actors): {ray_sps:9.0f} steps/s  ({raw['env_steps']} steps in {raw['wall']:.2f} s; "
          f"{raw['computed']} trajectories computed for {raw['used']} used)")
    print(f" simulator runtime:  {sim_sps:9.0f} steps/s  ({sim_raw['env_steps']} steps in {sim_raw['wall']:.2f} s)")
    print(f" Ray / simulator: {ray_sps / sim_sps:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "predicted": sim["durations"], "measured": timed["durations"],
                       "ratios": ratios, "ray_steps_per_s": ray_sps, "sim_steps_per_s": sim_sps,
                       "ray_startup_s": timed["startup"], "config": to_dict(make_cfg(args, "ray", True))},
                      f, indent=2)


if __name__ == "__main__":
    main()
