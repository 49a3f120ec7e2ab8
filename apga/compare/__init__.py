"""``apga compare``: methods over seeds (and settings), run in parallel, aggregated and plotted.

One module each: the plan language (``plan``: a compare config expanded into validated runs),
the executor (``execute``), the numbers (``summary``, with ``apga.stats``) and what is written
(``report``: CSV, figures, summary.md/json, picked.yaml). The config format is documented in
apga/compare/plan.py.
"""
from __future__ import annotations

import os

from apga.compare.execute import execute, run_state
from apga.compare.plan import PICK_METRICS, Plan, Run, load_plan
from apga.compare.report import CSV_COLUMNS, report, wrap_title, write_picked
from apga.compare.summary import pick, step_hold, summarise
from apga.errors import ApgaError

__all__ = ["compare", "load_plan", "Plan", "Run", "execute", "run_state", "report", "summarise", "pick",
           "write_picked", "step_hold", "wrap_title", "CSV_COLUMNS", "PICK_METRICS"]


def compare(path: str, out: str, seeds: int | None = None, jobs: int | None = None, overrides: list | None = None,
            only: list | None = None, force: bool = False, pick_metric: str | None = None,
            progress: bool = True, address: str | None = None, cpus_per_run: float = 1.0) -> tuple[dict, dict]:
    """Python API of `apga compare`: validate, run, aggregate. Returns (run report, output paths)."""
    if pick_metric is not None and pick_metric not in PICK_METRICS:
        raise ApgaError(f"--pick {pick_metric!r}: choose one of {', '.join(PICK_METRICS)}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ApgaError(f"--out {out!r} exists and is not a directory")
    plan = load_plan(path, out, overrides, seeds, only)
    run_report = execute(plan, jobs, force, progress, address, cpus_per_run)
    paths = report(load_plan(path, out, overrides, seeds), pick_metric)
    return run_report, paths
