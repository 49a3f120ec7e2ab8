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
trajectories per wall second on Ray (n workers) and on the simulator runtime (one process, each
round one batched rollout of exactly the M consumed trajectories).

``--equal-cores``: the throughput of part 2 at equal cores instead, for a matrix of settings
(Reacher-v5 H = 50 and Hopper-v5 H = 1000; n = 2 and 10; Rennala NIGT with server and with
AllReduce aggregation, and AFedPG): the simulator with ``runtime.processes`` = cores against Ray
with the same number of CPUs, side by side, with the trajectories each computed and used.
``--ray-calls-too`` adds, to every pair, a third run: Ray with ``runtime.direct_calls: false``
(every call a Ray actor call, as before the direct links), so that the links' effect is paired
too; ``--matrix-env`` keeps one env of the matrix.

A script, not a test: it takes minutes. It starts one local (loopback) Ray instance and removes it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np

from apga.config import load_config, to_dict
from apga.runtime import ray_session
from apga.stats import bootstrap_interval
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
            counts.append(list(getattr(ev, "counts", None) or (seen_jobs[-1] if seen_jobs else [])))
        return {"durations": durations, "wall": wall, "env_steps": steps, "startup": startup,
                "computed": rt.totals.trajectories_computed, "used": rt.totals.trajectories, "counts": counts,
                "to_stop": to_stop, "reduce": reduce}
    finally:
        rt.close()
        oracle.close()


MATRIX_ENVS = (("Reacher-v5", 50), ("Hopper-v5", 1000))  # env, H (the untrained Hopper falls within ~30 steps)
MATRIX_METHODS = (("rennala_nigt", "server"), ("rennala_nigt", "allreduce"), ("afedpg", "server"))


def matrix_cfg(env: str, horizon: int, n: int, method: str, aggregation: str, runtime: str, updates: int,
               cores: int, args, direct_calls: bool = True):
    alg = {"name": method, "step_size": args.step_size}
    if method == "rennala_nigt":
        alg.update(batch_size=args.batch, aggregation=aggregation, momentum=0.1)
    return load_config({
        "seed": args.seed,
        "env": {"id": env, "horizon": horizon},
        "workers": {"n": n, "compute_time": {"shape": "sqrt", "scale": args.scale}, "comm_time": 0.0},
        "algorithm": alg,
        "runtime": {"name": runtime, "inject_delays": False, "processes": cores if runtime == "sim" else 1,
                    "direct_calls": direct_calls},
        "budget": {"iterations": updates},
        "eval": {"every": 0},
    })


def quiet(limit: float = 0.1, most: float = 30.0) -> None:
    """Wait until this session's Ray processes (killed actors exiting, idle workers starting)
    use less than ``limit`` of a core, so that they do not slow the simulator run that follows."""
    import psutil
    deadline = time.monotonic() + most
    while time.monotonic() < deadline:
        procs = ray_session.ray_processes()
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(0.5)
        busy = 0.0
        for p in procs:
            try:
                busy += p.cpu_percent(None) / 100.0
            except psutil.Error:
                pass
        if busy < limit:
            return


def steps_per_s(result: dict) -> float:
    return result["env_steps"] / result["wall"]


def geomean(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of ``ratios`` and its 90 % bootstrap interval (apga.stats, over the logs)."""
    ci = bootstrap_interval(np.log(ratios), np.mean)
    return math.exp(ci["estimate"]), math.exp(ci["low"]), math.exp(ci["high"])


# the runs of a pair: runtime name and runtime.direct_calls
RUNS = {"ray": ("ray", True), "sim": ("sim", True), "ray_calls": ("ray", False)}


def equal_cores(args) -> list[dict]:
    """Env steps of used trajectories per wall second, simulator (processes = cores) vs Ray
    (a local instance with that many CPUs), for every setting of the matrix; ``--repeats`` pairs
    per setting, the pair's two runs back to back (Ray first in odd pairs, the simulator first
    in even ones), and the ratio of each pair. With ``--ray-calls-too`` a pair is three runs,
    Ray without direct links ("ray_calls") the third, their order rotating from pair to pair."""
    cores = args.cores
    rows = []
    session = ray_session.start_local(num_cpus=cores)
    try:  # each setting on Ray, then at once on the simulator: a change of machine speed hits both
        for env, horizon in [e for e in MATRIX_ENVS if args.matrix_env in (None, e[0])]:
            for n in (2, 10):
                for method, aggregation in MATRIX_METHODS:
                    # the same trajectories for every method: --rounds rounds of M, or M x --rounds updates
                    updates = args.rounds * (1 if method == "rennala_nigt" else args.batch)
                    row = {"env": env, "horizon": horizon, "n": n, "method": method, "aggregation": aggregation,
                           "updates": updates, "pairs": []}
                    for k in range(args.repeats):
                        pair = {}
                        kinds = ("ray", "sim", "ray_calls") if args.ray_calls_too else ("ray", "sim")
                        for kind in kinds[k % len(kinds):] + kinds[:k % len(kinds)]:
                            runtime, direct = RUNS[kind]
                            cfg = matrix_cfg(env, horizon, n, method, aggregation, runtime, updates + 1,
                                             cores, args, direct_calls=direct)
                            quiet()
                            pair[kind] = run(cfg, updates + 1, warmup=1)
                        row["pairs"].append(pair)
                        calls = (f", Ray without links {steps_per_s(pair['ray_calls']):.0f}"
                                 if "ray_calls" in pair else "")
                        print(f"  {env} n={n} {method}/{aggregation}: Ray {steps_per_s(pair['ray']):.0f}{calls}, "
                              f"simulator {steps_per_s(pair['sim']):.0f} steps/s", flush=True)
                    rows.append(row)
    finally:
        session.close()
    print(f"\nequal cores ({cores}): env steps of used trajectories per wall second "
          f"(first update not counted; {args.repeats} pair(s) per setting)\n"
          " Ray/sim: the pairs' median ratio, their min and max, and their geometric mean with its 90 % "
          "bootstrap interval (apga.stats)")
    print(f" {'env':<11} {'n':>3} {'method':<22} {'simulator':>10} {'Ray':>9} {'Ray/sim':>8} {'(min, max)':>13} "
          f"{'geo mean [90% CI]':>20} {'computed':>9} {'used':>6} {'wasted':>7} {'sim wasted':>11} "
          f"{'ms/update: sim':>14} {'Ray':>5} {'Ray stop->update':>16}")
    out = []
    for row in rows:
        pairs = row["pairs"]
        ratios = [steps_per_s(p["ray"]) / steps_per_s(p["sim"]) for p in pairs]
        sim_sps = statistics.median(steps_per_s(p["sim"]) for p in pairs)
        ray_sps = statistics.median(steps_per_s(p["ray"]) for p in pairs)
        computed, used = (sum(p["ray"][key] for p in pairs) for key in ("computed", "used"))
        sim_wasted = sum(p["sim"]["computed"] - p["sim"]["used"] for p in pairs)
        name = f"{row['method']}/{row['aggregation']}" if row["method"] == "rennala_nigt" else row["method"]
        spread = f"({min(ratios):.2f}, {max(ratios):.2f})" if len(ratios) > 1 else ""
        geo = dict(zip(("estimate", "low", "high"), geomean(ratios)))
        geo_text = f"{geo['estimate']:.2f} [{geo['low']:.2f}, {geo['high']:.2f}]"
        # where a Ray update's time goes: median wall ms per update, and of it the stop .. update
        # part (halts, uploads or the AllReduce, the step), over all pairs' updates after the first
        ms = {rt: 1000 * statistics.median(p[rt]["wall"] / row["updates"] for p in pairs) for rt in ("sim", "ray")}
        stop_ms = 1000 * statistics.median(x for p in pairs for x in p["ray"]["reduce"][1:])
        print(f" {row['env']:<11} {row['n']:>3} {name:<22} {sim_sps:>10.0f} {ray_sps:>9.0f} "
              f"{statistics.median(ratios):>8.2f} {spread:>13} {geo_text:>20} {computed:>9} {used:>6} "
              f"{computed - used:>7} {sim_wasted:>11} {ms['sim']:>14.1f} {ms['ray']:>5.1f} {stop_ms:>16.1f}")
        out.append({"env": row["env"], "horizon": row["horizon"], "n": row["n"], "method": row["method"],
                    "aggregation": row["aggregation"], "updates": row["updates"], "sim_steps_per_s": sim_sps,
                    "ray_steps_per_s": ray_sps, "ratio": statistics.median(ratios), "ratios": ratios,
                    "ratio_geomean": geo["estimate"], "ratio_geomean_ci90": [geo["low"], geo["high"]],
                    "ray_computed": computed, "ray_used": used, "ray_wasted": computed - used,
                    "sim_wasted": sim_wasted, "sim_ms_per_update": ms["sim"], "ray_ms_per_update": ms["ray"],
                    "ray_stop_to_update_ms": stop_ms})
        if "ray_calls" in pairs[0]:
            without = [steps_per_s(p["ray_calls"]) / steps_per_s(p["sim"]) for p in pairs]
            gain = [steps_per_s(p["ray"]) / steps_per_s(p["ray_calls"]) for p in pairs]
            g, low, high = geomean(gain)
            out[-1].update(ratio_ray_calls=statistics.median(without), ratios_ray_calls=without,
                           link_gain=statistics.median(gain), link_gains=gain,
                           link_gain_geomean=g, link_gain_geomean_ci90=[low, high],
                           ray_calls_ms_per_update=1000 * statistics.median(
                               p["ray_calls"]["wall"] / row["updates"] for p in pairs))
            print(f" {'':<11} {'':>3} {'  without links':<22} Ray/sim {statistics.median(without):.2f} "
                  f"({min(without):.2f}, {max(without):.2f}); with / without links "
                  f"{statistics.median(gain):.2f}, geo mean {g:.2f} [{low:.2f}, {high:.2f}]; "
                  f"ms/update {out[-1]['ray_calls_ms_per_update']:.1f}")
    try:
        load = os.getloadavg()
        print(f" machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    except OSError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--horizon", type=int, default=1000)
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.5, help="h_i = sqrt(i) * scale seconds")
    p.add_argument("--batch", type=int, default=20, help="M")
    p.add_argument("--rounds", type=int, default=12, help="rounds (--equal-cores: rounds of M per setting; try 40)")
    p.add_argument("--aggregation", default="server", choices=("server", "allreduce"))
    p.add_argument("--step-size", type=float, default=2**-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--equal-cores", action="store_true",
                   help="only the equal-core throughput matrix (simulator vs Ray, side by side)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="--equal-cores: simulator processes and Ray CPUs (default: this machine's cores)")
    p.add_argument("--repeats", type=int, default=1,
                   help="--equal-cores: pairs of runs per setting (the ratio is their median; try 3)")
    p.add_argument("--ray-calls-too", action="store_true",
                   help="--equal-cores: a third run per pair, Ray with runtime.direct_calls: false")
    p.add_argument("--matrix-env", default=None, choices=[e for e, _ in MATRIX_ENVS],
                   help="--equal-cores: only this env of the matrix")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.equal_cores:
        rows = equal_cores(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "equal_cores": rows}, f, indent=2)
        return

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
    print(f" Ray ({args.workers} workers): {ray_sps:9.0f} steps/s  ({raw['env_steps']} steps in {raw['wall']:.2f} s; "
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
