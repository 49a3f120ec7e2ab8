"""`apga predict RUN_DIR`: replay a Ray run's measured durations in the simulator for every method."""
from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  apga train configs/quickstart.yaml --out runs/ray --set runtime.name=ray --set runtime.inject_delays=true
  apga predict runs/ray
  apga predict runs/ray --methods rennala_nigt,afedpg --json

A Ray run writes timings.csv: every job's measured compute seconds per worker and every measured
download, upload and AllReduce. apga predict reads it as the simulator's time model (the same
file works as workers.compute_time / comm_time / allreduce_time: {trace: timings.csv}) and
prints, per method, the predicted seconds per update and to the end of the run's budget, next
to what the Ray run measured for its own method. Instant for small runs: the replay uses the
synthetic oracle (round schedules never depend on gradient values).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="replay a Ray run's measured timings in the simulator, for every method",
                       description="Predict per-update and total wall times of every method from the "
                       "durations a Ray run measured.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a Ray run directory (runtime.name: ray) with timings.csv")
    p.add_argument("--methods", help="comma-separated algorithm names (default: the run's own, then every built-in)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from apga.predict import predict
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    result = predict(args.run_dir, methods)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"replay of {args.run_dir} (its method: {result['algorithm']}); seconds per update and to the end of the budget")
    print(f"{'method':16s} {'aggregation':11s} {'updates':>7s} {'predicted/upd':>13s} {'predicted':>10s} "
          f"{'measured/upd':>12s} {'measured':>9s} {'ratio':>6s}")
    for r in result["methods"]:
        m = r.get("measured_per_update")
        per = r["predicted_per_update"]
        ratio = f"{m / per:6.3f}" if m and per else ""
        print(f"{r['method']:16s} {r['aggregation']:11s} {r['updates']:7d} {per or 0:13.4f} {r['predicted_total']:10.3f} "
              f"{m if m is not None else float('nan'):12.4f} {r.get('measured_total', float('nan')):9.3f} {ratio}")
    return 0
