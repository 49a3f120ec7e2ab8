"""Rollout throughput of two or more checkouts of apga, paired round by round (used in
benchmarks/README.md).

usage: python benchmarks/paired_trees.py [--env Hopper-v5] [--horizon 1000] [--rounds 8]
                                         [--cores 2] NAME=PATH [NAME=PATH ...]

Each NAME=PATH is a checkout (PATH/apga). One child process per checkout builds an RLOracle
(terminate_when_unhealthy off, policy.rollout_batch 16, 10 workers, `--cores` threads or
processes' worth of runtime.processes) and computes the gradients of M = 32 trajectories at one
point per round (`RLOracle.gradients`: rollout and torch passes), after a warm-up. The children
take turns, one round at a time and never two at once, in a rotating order, so a change in the
machine's speed hits every checkout alike. Prints each checkout's median env steps per second
and its per-round ratio to the first checkout (median, min, max).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(path: str, env_id: str, horizon: int, cores: int) -> None:
    sys.path.insert(0, path)
    from apga.config import EnvConfig, PolicyConfig
    from apga.oracle.rl import RLOracle

    kwargs = {"terminate_when_unhealthy": False} if env_id.split("-")[0] in ("Hopper", "Walker2d", "Ant", "Humanoid") else {}
    oracle = RLOracle(EnvConfig(id=env_id, horizon=horizon, kwargs=kwargs), PolicyConfig(rollout_batch=16), 10, 0,
                      threads=cores)
    point = oracle.initial_point()
    oracle.gradients(point, [(w % 10, 10**6 + w) for w in range(32)])  # warm-up
    print("ready", flush=True)
    for r, _ in enumerate(sys.stdin):
        t0 = time.perf_counter()
        result = oracle.gradients(point, [(w % 10, 32 * r + w) for w in range(32)])
        wall = time.perf_counter() - t0
        print(json.dumps([wall, sum(b.env_steps for b in result.values())]), flush=True)
    oracle.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--horizon", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("trees", nargs="*", metavar="NAME=PATH")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.env, args.horizon, args.cores)
    if not args.trees:
        ap.error("give at least one NAME=PATH")
    procs = {}
    for spec in args.trees:
        name, _, path = spec.partition("=")
        if not os.path.isdir(os.path.join(path, "apga")):
            ap.error(f"{spec}: {path}/apga is not a directory")
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--child", os.path.abspath(path), "--env", args.env,
             "--horizon", str(args.horizon), "--cores", str(args.cores)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for p in procs.values():
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("a checkout failed to start (its error is above)")
        names = list(procs)
        rates = {k: [] for k in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                wall, steps = json.loads(procs[name].stdout.readline())
                rates[name].append(steps / wall)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()),
                  file=sys.stderr, flush=True)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    first = names[0]
    for name in names:
        ratios = [a / b for a, b in zip(rates[name], rates[first])]
        print(f"{args.env} H={args.horizon} {name}: median {statistics.median(rates[name]):,.0f} env steps/s; "
              f"per round / {first}: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
