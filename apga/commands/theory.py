"""`apga theory`: predicted times of every method from the bounds of docs/algorithms.md, the theory, plus the exact
round times (§5) that the simulator must reproduce for the same worker times."""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from apga import theory
from apga.errors import ApgaError
from apga.shapes import SHAPES, resolve_times

DESCRIPTION = """\
Predict how long each method needs to reach an eps-stationary point (E||grad J|| <= eps), from
the complexity bounds of the paper (up to absolute constants: compare rows, not absolute
numbers), and print the exact duration of one round for a given batch size with constant
worker times and cancellation of in-flight gradients (the simulator reproduces these
exactly). Instant; nothing is trained. Times are in seconds (any unit works if used
consistently); predicted totals come out in the same unit.

Constants: K = L_J*Delta/eps^2 updates; the variance term counts sigma_J^2*L_J*Delta/eps^4
gradients for PG and sigma_J^2*L_J*Delta/eps^(7/2) for NIGT, with L_J = L*H^2,
sigma_J^2 = sigma2*H^3 and H = 1/(1-gamma). Details: docstring of apga.theory.complexity_table.
"""

SHAPE_HELP = ", ".join(SHAPES)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "theory",
        help="predicted total times per method and exact round times (instant)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, default=10, metavar="N", help="number of workers n (default: 10)")
    p.add_argument(
        "--compute-time", default="sqrt", metavar="SPEC",
        help=f"seconds per stochastic gradient (one trajectory) of each worker: a shape ({SHAPE_HELP}), "
        "one number for all, or N comma-separated numbers (default: sqrt, i.e. h_i = sqrt(i))",
    )
    p.add_argument(
        "--comm-time", default="0", metavar="SPEC",
        help="seconds to upload or download one d-vector, per worker: same forms as --compute-time; "
        "sqrt_d means sqrt(i)*d^(1/4) with d from --dim (default: 0)",
    )
    p.add_argument(
        "--allreduce-time", type=float, default=None, metavar="SECONDS",
        help="seconds per AllReduce of one d-vector among all workers (default: the largest --comm-time)",
    )
    p.add_argument(
        "--dim", type=int, default=theory.HUMANOID_POLICY_DIM, metavar="D",
        help="policy parameter count d, used by the sqrt_d shape (default: %(default)s, the paper's "
        "Humanoid-v5 policy: obs 348, act 17, two tanh layers of 64, mean and softplus-std heads)",
    )
    p.add_argument("--eps", type=float, default=0.1, help="target gradient norm epsilon > 0 (default: 0.1)")
    p.add_argument("--sigma2", type=float, default=1.0,
                   help="variance scale sigma^2 of one stochastic gradient, >= 0 (default: 1)")
    p.add_argument("--L", type=float, default=1.0, dest="L", help="smoothness constant L > 0 (default: 1)")
    p.add_argument("--delta", type=float, default=1.0,
                   help="initial gap Delta = J* - J(theta_0) > 0, in return units (default: 1)")
    p.add_argument(
        "--gamma", type=float, default=0.0,
        help="discount in [0, 1); the horizon factor H = 1/(1-gamma) scales L by H^2 and sigma2 by H^3 "
        "(default: 0, i.e. H = 1: L and sigma2 are taken as the constants of J itself)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="M",
        help="batch size M for the exact round-time table (default: the theory's NIGT batch "
        "ceil(sigma_J^2/eps^1.5))",
    )
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (default) for reading, json for scripts")
    p.set_defaults(run=run)


# Beyond this many workers the command would no longer answer in about a second.
MAX_WORKERS = 100_000


def _check(args) -> tuple[list[float], list[float], float, float]:
    """Validate the arguments; return compute times, comm times, allreduce time, horizon."""
    if args.workers < 1:
        raise ApgaError(f"--workers: need at least 1 worker, got {args.workers}")
    if args.workers > MAX_WORKERS:
        raise ApgaError(f"--workers: at most {MAX_WORKERS} workers, got {args.workers}")
    if args.dim < 1:
        raise ApgaError(f"--dim: the parameter count must be a positive integer, got {args.dim}")
    h = resolve_times(args.compute_time, args.workers, option="--compute-time", d=args.dim, allow_zero=False)
    kappa = resolve_times(args.comm_time, args.workers, option="--comm-time", d=args.dim)
    k_ar = max(kappa) if args.allreduce_time is None else args.allreduce_time
    if not (math.isfinite(k_ar) and k_ar >= 0):
        raise ApgaError(f"--allreduce-time: must be a non-negative number of seconds, got {k_ar:g}")
    for opt, v in (("--eps", args.eps), ("--L", args.L), ("--delta", args.delta)):
        if not (math.isfinite(v) and v > 0):
            raise ApgaError(f"{opt}: must be a positive number, got {v:g}")
    if not (math.isfinite(args.sigma2) and args.sigma2 >= 0):
        raise ApgaError(f"--sigma2: must be a non-negative number, got {args.sigma2:g}")
    if not (0.0 <= args.gamma < 1.0):
        raise ApgaError(f"--gamma: the discount must be in [0, 1), got {args.gamma:g}")
    if args.batch_size is not None and not 1 <= args.batch_size <= theory.MAX_BATCH:
        raise ApgaError(f"--batch-size: M must be an integer in [1, 2^50], got {args.batch_size}")
    return h, kappa, float(k_ar), 1.0 / (1.0 - args.gamma)


def compute(args) -> dict:
    """Everything the command prints, as plain data (also the --format json output). Inputs so
    extreme that a figure would overflow float64 or not be countable exactly end in one
    ApgaError, never a hang or a traceback."""
    h, kappa, k_ar, horizon = _check(args)
    try:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # infinities are caught below
            data = _compute(args, h, kappa, k_ar, horizon)
    except (ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ApgaError(f"these inputs are out of float64's range: {exc}; use less extreme --eps, --gamma, "
                        "--sigma2, --L, --delta, --batch-size or worker times") from None
    if not _all_finite(data):
        raise ApgaError("a predicted time overflows float64 (it would print as inf); use less extreme --eps, "
                        "--gamma, --sigma2, --L, --delta or worker times")
    return data


def _all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _compute(args, h, kappa, k_ar, horizon) -> dict:
    rows = theory.complexity_table(
        h, kappa, k_ar, eps=args.eps, L=args.L, delta=args.delta, sigma2=args.sigma2, horizon=horizon
    )
    fastest = min(rows, key=lambda r: r.total)
    fastest_het = min((r for r in rows if r.heterogeneous), key=lambda r: r.total)
    m_nigt = theory.best_batch_size(args.eps, args.sigma2, horizon, "nigt")
    m_pg = theory.best_batch_size(args.eps, args.sigma2, horizon, "pg")
    M = args.batch_size if args.batch_size is not None else m_nigt
    if M > theory.MAX_BATCH:
        raise ValueError(f"the theory's batch size ceil(sigma_J^2/eps^1.5) = {M:.3g} is beyond 2^50; "
                         "give --batch-size")

    rounds = {}
    for key in ("sync_nigt", "rennala_nigt", "malenia_nigt"):
        rounds[key] = {
            mode: theory.round_time(key, h, M, kappa, k_ar, mode) for mode in ("server", "allreduce")
        }
    rennala_server = rounds["rennala_nigt"]["server"]
    return {
        "inputs": {
            "workers": args.workers, "compute_time": h, "comm_time": kappa, "allreduce_time": k_ar,
            "dim": args.dim, "eps": args.eps, "L": args.L, "delta": args.delta, "sigma2": args.sigma2,
            "gamma": args.gamma, "horizon_factor": horizon,
        },
        "methods": [
            {k: getattr(r, k) for k in ("key", "name", "computation", "communication", "total", "allreduce",
                                        "heterogeneous", "workers_used", "batch_size", "comm_mode", "notes")}
            for r in rows
        ],
        "best_batch_size": {"nigt": m_nigt, "pg": m_pg},
        "fastest": fastest.key,
        "fastest_heterogeneous": fastest_het.key,
        "round_times": {
            "batch_size": M,
            "methods": rounds,
            # AFedPG has no rounds; this is how many updates it makes in one Rennala server round.
            "afedpg_updates_in_rennala_server_round": theory.afedpg_updates_by(h, rennala_server, kappa),
        },
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _describe(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return _fmt(lo) if lo == hi else f"{_fmt(lo)} .. {_fmt(hi)}"


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(data: dict, args) -> str:
    inp = data["inputs"]
    names = {m["key"]: m["name"] for m in data["methods"]}
    out = [
        f"workers {inp['workers']}   compute h_i {args.compute_time} ({_describe(inp['compute_time'])} s/gradient)"
        f"   comm kappa_i {args.comm_time} ({_describe(inp['comm_time'])} s)"
        f"   allreduce {_fmt(inp['allreduce_time'])} s   d {inp['dim']}",
        f"eps {_fmt(inp['eps'])}   L {_fmt(inp['L'])}   Delta {_fmt(inp['delta'])}   sigma2 {_fmt(inp['sigma2'])}"
        f"   horizon 1/(1-gamma) {_fmt(inp['horizon_factor'])}",
        "",
        "Predicted time to an eps-stationary point (bounds up to absolute constants; compare rows)",
    ]
    best_total = min(m["total"] for m in data["methods"])
    body = []
    for m in data["methods"]:
        body.append([
            m["name"], _fmt(m["computation"]), _fmt(m["communication"]), _fmt(m["total"]),
            f"{m['total'] / best_total:.2f}x",
            f"yes ({m['comm_mode']})" if m["allreduce"] else "no",
            "yes" if m["heterogeneous"] else "no",
            str(m["workers_used"]), "1/update" if m["batch_size"] is None else str(m["batch_size"]),
        ])
    out.append(_table(["method", "computation", "communication", "total", "vs best", "AllReduce",
                       "het. envs", "workers used", "batch M"], body))
    bb = data["best_batch_size"]
    out += [
        "",
        f"best batch size: M = {bb['nigt']} for NIGT (ceil(sigma_J^2/eps^1.5)), {bb['pg']} for PG (ceil(sigma_J^2/eps^2))",
        f"fastest: {names[data['fastest']]}; fastest with heterogeneous environments: "
        f"{names[data['fastest_heterogeneous']]}",
        "",
    ]
    rt = data["round_times"]
    out.append(f"Exact duration of one round, batch M = {rt['batch_size']}, constant times, cancellation "
               "(the simulator reproduces these)")
    body = [[names[k], _fmt(v["server"]), _fmt(v["allreduce"])] for k, v in rt["methods"].items()]
    out.append(_table(["method", "server", "allreduce"], body))
    out.append(f"AFedPG makes {rt['afedpg_updates_in_rennala_server_round']} updates in one Rennala NIGT "
               "server round")
    return "\n".join(out)


def run(args) -> int:
    data = compute(args)
    if args.format == "json":
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(data, args))
    return 0
