"""Replay a Ray run's measured durations in the simulator: predicted time per update and to the
end of the budget for every method, next to what the Ray run measured (``apga predict``).

A Ray run writes ``timings.csv`` (apga/run/logger.py): every completed job's compute seconds per
worker, every download and upload of a vector, every AllReduce. The replay reads it back as the
time model, ``workers.compute_time: {trace: timings.csv}`` (each worker's compute times in the
order they were measured), ``workers.comm_time: {trace: ...}`` (each worker's mean transfer) and
``workers.allreduce_time: {trace: ...}`` (the mean AllReduce), and runs the simulator on the run's
own config. Round schedules depend on counts only, never on gradient values, so the replay
is apga.estimate's (a one-dimensional synthetic oracle): the times are those of the real run's
task, at a fraction of the cost.
"""
from __future__ import annotations

import os

import numpy as np

from apga import config as cfgmod
from apga.errors import ApgaError
from apga.estimate import replay

BUILTIN_ORDER = ("rennala_nigt", "malenia_nigt", "sync_nigt", "afedpg", "rennala_pg", "sync_pg")




def predict(run_dir: str, methods: list[str] | None = None) -> dict:
    """For each method: updates, predicted seconds per update and in total; for the run's own
    method also the measured ones. Raises ApgaError (one line) on a run it cannot replay."""
    cfg_path, timings = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "timings.csv")
    if not os.path.isfile(cfg_path):
        raise ApgaError(f"{run_dir!r} is not an apga run directory (no config.yaml)")
    cfg = cfgmod.from_dict(cfgmod.read_yaml(cfg_path))
    if cfg.runtime.name != "ray":
        raise ApgaError(f"{run_dir!r} is a simulator run: apga predict replays the measured durations of a "
                        "Ray run (runtime.name: ray)")
    if not os.path.isfile(timings):
        raise ApgaError(f"{run_dir!r} has no timings.csv (the run made no update yet, or an older apga wrote it)")
    from apga.run import read_metrics
    from apga.run.build import build_oracle
    with open(timings) as f:
        kinds = {line.split(",", 1)[0] for line in f.read().splitlines()[1:]}
    oracle = build_oracle(cfgmod.from_dict({**cfgmod.to_dict(cfg), "runtime": {"name": "sim"}}))
    dim = oracle.dim
    oracle.close()
    measured = read_metrics(run_dir)["time"]
    own = cfg.algorithm.name
    names = methods or ([own] + [m for m in BUILTIN_ORDER if m != own])
    rows = []
    for name in names:
        d = cfgmod.to_dict(cfg)
        d["runtime"] = {"name": "sim", "streams": cfg.runtime.streams}
        d["eval"]["every"] = 0
        a = d["algorithm"]
        if name != own:
            a["name"], a["options"] = name, {}
        w = d["workers"]
        w["compute_time"] = {"trace": timings}
        if "download" in kinds or "upload" in kinds:
            w["comm_time"] = {"trace": timings}
        if "allreduce" in kinds:
            w["allreduce_time"] = {"trace": timings}
        try:
            run_cfg = cfgmod.from_dict(d)
        except ApgaError as exc:
            if "AllReduce" not in str(exc):
                raise
            a["aggregation"] = "server"  # a per-gradient method: it has no AllReduce form
            run_cfg = cfgmod.from_dict(d)
        t = np.array([0.0] + [sim.clock for sim in replay(run_cfg, dim)])
        row = {"method": name, "aggregation": run_cfg.algorithm.aggregation, "updates": len(t) - 1,
               "predicted_per_update": float(np.mean(np.diff(t))) if len(t) > 1 else None,
               "predicted_total": float(t[-1])}
        if name == own and len(measured) > 1:
            row["measured_per_update"] = float(np.mean(np.diff(measured)))
            row["measured_total"] = float(measured[-1])
            row["measured_updates"] = len(measured) - 1
        rows.append(row)
    return {"run_dir": run_dir, "algorithm": own, "methods": rows}
