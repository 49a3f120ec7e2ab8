"""The numbers of a comparison: evaluation rows per run, thresholds, times to threshold and
their statistics (apga.stats), and the pick of the best grid point."""
from __future__ import annotations

import math

import numpy as np

from apga.compare.execute import run_state
from apga.compare.plan import Plan

GRID_POINTS = 400  # points of the common time grid that curves are averaged on


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

def _eval_rows(out_dir: str) -> dict:
    from apga.run import read_metrics
    m = read_metrics(out_dir)
    ok = ~np.isnan(m["eval_return"])
    return {k: m[k][ok] for k in ("time", "trajectories", "vector_comms", "eval_return")}


def collect(plan: Plan) -> dict:
    """{(setting, variant): [(seed, eval rows)]} for every finished run of the FULL plan whose config matches."""
    out = {}
    for run in plan.runs:
        state, _ = run_state(run)
        if state != "finished":
            continue
        rows = _eval_rows(run.out_dir)
        if len(rows["eval_return"]) == 0:
            continue
        out.setdefault((run.setting, run.variant), []).append((run.seed, rows))
    return out


def step_hold(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The last value at or before each grid point (the first value before the first x)."""
    idx = np.searchsorted(xs, grid, side="right") - 1
    return ys[np.clip(idx, 0, len(ys) - 1)]


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


ROBUSTNESS_FRACTIONS = (0.5, 0.75)  # summary.md also times these fractions of the way


def _median_time(values: list) -> float | None:
    """Median over all seeds with "never reached" counted as infinitely late (None if that is)."""
    if not values:
        return None
    m = float(np.median([math.inf if t is None else t for t in values]))
    return None if math.isinf(m) else m


def _first_hits(results_sv: list, threshold: float, keys=("time",)) -> dict:
    """{key: per seed, the value of ``key`` at the first evaluation at or above ``threshold``
    (None if no evaluation reached it)}."""
    out = {key: [] for key in keys}
    for _, rows in results_sv:
        hit = np.nonzero(rows["eval_return"] >= threshold)[0]
        for key in keys:
            out[key].append(float(rows[key][hit[0]]) if len(hit) else None)
    return out


def summarise(plan: Plan, results: dict) -> dict:
    """The numbers of summary.md / summary.json, per setting and variant."""
    out = {"config": plan.path, "title": plan.title, "seeds": plan.seeds, "baselines": plan.baselines,
           "settings": {}}
    for s in plan.settings:
        present = [v for v in plan.variants if (s, v) in results]
        if not present:
            continue
        runs = [rows for v in present for _, rows in results[(s, v)]]
        initial = float(np.mean([rows["eval_return"][0] for rows in runs]))
        t_common = float(min(rows["time"][-1] for rows in runs))
        stats = {}
        for v in present:
            finals = np.array([rows["eval_return"][-1] for _, rows in results[(s, v)]])
            aucs = []
            for _, rows in results[(s, v)]:
                if t_common > 0:
                    g = np.linspace(0.0, t_common, GRID_POINTS + 1)
                    aucs.append(float(np.mean(step_hold(rows["time"], rows["eval_return"], g))))
                else:
                    aucs.append(float(rows["eval_return"][0]))
            stats[v] = {"seeds": [k for k, _ in results[(s, v)]],
                        "final": {"mean": float(finals.mean()), "std": float(finals.std()),
                                  "p20": float(np.percentile(finals, 20)), "p80": float(np.percentile(finals, 80)),
                                  "values": [float(x) for x in finals]},
                        "auc": {"mean": float(np.mean(aucs)), "values": aucs}}
        best_v = max(present, key=lambda v: stats[v]["final"]["mean"])
        best = stats[best_v]["final"]["mean"]
        kind, x = plan.thresholds[s]
        threshold = initial + x * (best - initial) if kind == "fraction" else x
        for v in present:
            reach = _first_hits(results[(s, v)], threshold, ("time", "trajectories", "vector_comms"))
            stats[v]["to_threshold"] = {
                "reached": sum(t is not None for t in reach["time"]), "n": len(reach["time"]),
                **{key: {"mean": _mean_or_none(vals), "values": vals} for key, vals in reach.items()}}
            stats[v]["to_threshold"]["time"]["median"] = _median_time(reach["time"])
            if kind == "fraction":  # the same timing a little lower on the curve: robustness
                stats[v]["robustness"] = {}
                for f in sorted(set(ROBUSTNESS_FRACTIONS) | {x}):
                    ts = _first_hits(results[(s, v)], initial + f * (best - initial))["time"]
                    stats[v]["robustness"][repr(f)] = {
                        "threshold": initial + f * (best - initial), "values": ts, "mean": _mean_or_none(ts),
                        "median": _median_time(ts), "reached": sum(t is not None for t in ts)}
            stats[v]["end_time"] = float(min(rows["time"][-1] for _, rows in results[(s, v)]))
        for v in present:
            sp = {}
            mine = stats[v]["to_threshold"]["time"]["mean"]
            for b in plan.baselines:
                if b not in stats:
                    continue
                theirs = stats[b]["to_threshold"]["time"]["mean"]
                if mine is None or mine <= 0:
                    sp[b] = {"ratio": None, "bound": None}
                elif theirs is None:
                    sp[b] = {"ratio": None, "bound": stats[b]["end_time"] / mine}  # speed-up > bound
                else:
                    sp[b] = {"ratio": theirs / mine, "bound": None}
            stats[v]["speedup"] = sp
        # medians, IQMs and paired speed-ups with bootstrap intervals (apga.stats)
        from apga.stats import setting_statistics
        hits = {v: {k: (t, float(rows["time"][-1])) for (k, rows), t in
                    zip(results[(s, v)], stats[v]["to_threshold"]["time"]["values"])} for v in present}
        st_all = setting_statistics(hits, [b for b in plan.baselines if b in stats])
        for v in present:
            stats[v]["time_stats"], stats[v]["paired"] = st_all["time"][v], st_all["paired"][v]
        out["settings"][s] = {"threshold": threshold, "threshold_rule": {kind: x}, "initial_return": initial,
                              "best_variant": best_v, "best_final_mean": best, "auc_horizon": t_common,
                              "verdict": st_all["verdict"], "variants": stats}
    return out


def pick(plan: Plan, summary: dict, metric: str) -> dict:
    """Per setting and family: the grid point with the best mean final (or AUC) eval return."""
    key = "final" if metric == "final" else "auc"
    chosen, scores = {}, {}
    for s, st in summary["settings"].items():
        for fam in dict.fromkeys(plan.families.values()):
            cands = [v for v in plan.variants if plan.families[v] == fam and v in st["variants"]]
            if not cands:
                continue
            best = max(cands, key=lambda v: st["variants"][v][key]["mean"])
            chosen.setdefault(s, {})[fam] = best
            scores.setdefault(s, {})[fam] = {v: st["variants"][v][key]["mean"] for v in cands}
    return {"metric": metric, "chosen": chosen, "scores": scores}
