"""`apga compare CONFIG.yaml --out DIR [--seeds N] [--jobs J] [--set ...] [--only NAME ...] [--pick final|auc]`."""
from __future__ import annotations

import argparse
import os
import sys

from apga.errors import ApgaError

EPILOG = """\
examples:
  apga compare configs/compare_quick.yaml --out runs/compare_quick    # 30 CartPole runs: ~2 min on 2 cores
  apga compare configs/paper/reacher.yaml --out runs/paper/reacher --only sqrt   # 9 Reacher runs: ~4 min
  apga compare configs/paper/sqrt.yaml --out runs/paper/sqrt --dry-run          # Humanoid: what it costs
  apga compare configs/tune_reacher.yaml --out runs/tune_reacher --pick final   # step-size search: ~4 min

A compare config (see apga/compare/plan.py and docs/results.md) has base: or base_file:, variants:
(name -> overrides), and optionally settings: (name -> overrides; one panel each), seeds:,
threshold:, baselines:, grid:, title:. Every run is one `apga train` run in
DIR/<setting>/<variant>/seed<k>/, with runtime.streams: round (paired seeds) unless the config
sets it. Re-running the same command skips finished runs and resumes unfinished ones. --dry-run
estimates the unfinished runs' cost from their budgets (trajectories, env steps, core-hours, wall
time). Outputs in DIR: comparison.png (+ _trajectories, _comms; mean and 20-80 % band, threshold
dashed), comparison.csv, summary.md and summary.json (median and IQM time to threshold and paired
speed-ups with 90 % bootstrap intervals, one sentence per setting), picked.yaml (with --pick),
logs/ (each run's stderr).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="run methods x seeds (x settings) in parallel and compare them",
                       description="Run every setting x variant x seed of a compare config as separate "
                       "`apga train` runs in parallel processes, then plot and summarise them.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="compare config YAML")
    p.add_argument("--out", metavar="DIR", help="output directory (re-use it to skip finished runs)")
    p.add_argument("--seeds", type=int, metavar="N", help="use seeds 0..N-1 (overrides seeds: of the config)")
    p.add_argument("--jobs", type=int, metavar="J", help=f"parallel processes (default: cores = {os.cpu_count()})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one train-config key in every run (applied after variants and settings)")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run only these variants (a grid family name selects all its points) and/or "
                   "settings; the outputs still include every finished run")
    p.add_argument("--pick", metavar="METRIC", choices=["final", "auc", "best"],
                   help="after the runs, choose per setting and method the best grid point by mean final "
                   "eval return (final, alias best) or area under the curve (auc); writes DIR/picked.yaml")
    p.add_argument("--force", action="store_true",
                   help="rerun runs whose directory holds a different config (otherwise an error)")
    p.add_argument("--per-seed", action="store_true",
                   help="also draw every seed's curve as a thin line in the comparison plots")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and list the runs with their state, estimate what the unfinished ones cost; "
                   "run nothing")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="run every run as a Ray task on this cluster (`ray start --head`; auto = the one "
                   "recorded on this machine); --out must be on a filesystem every node sees")
    p.add_argument("--cpus-per-run", type=float, default=1.0, metavar="C",
                   help="with --address: CPUs reserved per run (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(run=run)


def run(args) -> int:
    from apga import compare as cmp

    if not args.out:
        raise ApgaError("--out DIR is required: where the runs and the comparison go")
    if args.seeds is not None and args.seeds < 1:
        raise ApgaError(f"--seeds: must be >= 1, got {args.seeds}")
    if args.jobs is not None and args.jobs < 1:
        raise ApgaError(f"--jobs: must be >= 1, got {args.jobs}")
    if not (args.cpus_per_run > 0 and args.cpus_per_run < 1e6):
        raise ApgaError(f"--cpus-per-run: must be a number of CPUs > 0, got {args.cpus_per_run}")
    if args.address is not None and args.jobs is not None:
        raise ApgaError("--jobs sets local processes; with --address the cluster's CPUs and --cpus-per-run decide")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ApgaError(f"--out {args.out!r} exists and is not a directory")
    metric = {"best": "final"}.get(args.pick, args.pick)
    plan = cmp.load_plan(args.config, args.out, args.overrides, args.seeds, args.only)

    if args.dry_run:
        for r in plan.runs:
            state, detail = cmp.run_state(r)
            print(f"{state:9s} {r.out_dir}" + (f"  ({detail})" if detail else ""))
        print(f"{len(plan.runs)} runs: {len(plan.settings)} setting(s) x {len(plan.variants)} variant(s) x "
              f"{len(plan.seeds)} seed(s)" + (" (filtered by --only)" if args.only else ""))
        todo = [r for r in plan.runs if cmp.run_state(r)[0] != "finished"]
        if todo:  # what the unfinished runs will cost (apga.estimate)
            from apga.estimate import describe, estimate_plan
            jobs = max(1, min(args.jobs or os.cpu_count() or 1, len(todo)))
            unfinished = cmp.Plan(plan.path, plan.out, plan.title, plan.seeds, plan.settings, plan.variants,
                                  plan.families, plan.grid_points, plan.thresholds, plan.baselines, todo)
            for line in describe(estimate_plan(unfinished, jobs), jobs):
                print(line)
        return 0

    try:
        rep = cmp.execute(plan, args.jobs, args.force, progress=not args.quiet, address=args.address,
                          cpus_per_run=args.cpus_per_run)
    except KeyboardInterrupt:
        sys.stderr.write("apga: interrupted; run the same `apga compare` command again to resume\n")
        return 130
    for r, msg in rep["failed"]:
        sys.stderr.write(f"apga: error: run {r.out_dir} failed: {msg} "
                         f"(log: {os.path.join(args.out, 'logs', r.setting, r.variant, f'seed{r.seed}.log')})\n")
    print(f"runs: {rep['ran']} run, {rep['skipped']} already finished, {len(rep['failed'])} failed")
    full = cmp.load_plan(args.config, args.out, args.overrides, args.seeds)
    try:
        paths = cmp.report(full, metric, per_seed=args.per_seed)
    except ApgaError:
        if rep["failed"]:
            return 1
        raise
    print(f"plot: {paths['plot']} (also {paths['plot_trajectories']}, {paths['plot_comms']})")
    print(f"summary: {paths['summary']}")
    print(f"table: {paths['csv']}")
    if "picked" in paths:
        print(f"picked: {paths['picked']}")
    return 1 if rep["failed"] else 0
