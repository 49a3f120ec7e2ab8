"""What a comparison writes: comparison.csv, the figures, summary.md/summary.json and
picked.yaml."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re

import numpy as np
import yaml

from apga.errors import ApgaError
from apga.stats import EXPLANATION as STATS_EXPLANATION, fmt_interval
from apga.compare.plan import DEFAULT_SETTING, Plan
from apga.compare.summary import GRID_POINTS, collect, pick, step_hold, summarise


AXES = (("time", "simulated seconds", "comparison.png"),
        ("trajectories", "trajectories used", "comparison_trajectories.png"),
        ("vector_comms", "vector communications", "comparison_comms.png"))
CSV_COLUMNS = ["setting", "variant", "seed", "time", "trajectories", "vector_comms", "eval_return"]

def _num(x, fmt=".4g") -> str:
    return "—" if x is None else format(x, fmt)


def write_csv(plan: Plan, results: dict, path: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in plan.settings:
        for v in plan.variants:
            for seed, rows in results.get((s, v), []):
                for i in range(len(rows["eval_return"])):
                    w.writerow([s, v, seed, repr(float(rows["time"][i])), int(rows["trajectories"][i]),
                                int(rows["vector_comms"][i]), repr(float(rows["eval_return"][i]))])
    from apga.files import atomic_write_text
    atomic_write_text(path, buf.getvalue())


def wrap_title(title: str, width: int) -> str:
    """Wrap a title only after ', ' or '; ', so a formula such as h_i = sqrt(i) stays on one line."""
    parts = re.split(r"(?<=[,;]) ", title)
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += " " + part
        else:
            lines.append(part)
    return "\n".join(lines)


def plot(plan: Plan, results: dict, out: str, thresholds: dict | None = None, per_seed: bool = False) -> list:
    """One panel per setting: per method the mean over seeds and the 20-80 % band (legend says so),
    the threshold as a dashed line, and with ``per_seed`` every seed's curve as a thin line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from apga.files import atomic_write_bytes

    settings = [s for s in plan.settings if any((s, v) in results for v in plan.variants)]
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(plan.variants)}
    paths = []
    for axis, label, fname in AXES:
        ncol = min(3, max(1, len(settings)))
        nrow = math.ceil(len(settings) / ncol) if settings else 1
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
        for ax in axes.flat[len(settings):]:
            ax.set_visible(False)
        for ax, s in zip(axes.flat, settings):
            present = [v for v in plan.variants if (s, v) in results]
            xmax = max(float(rows[axis][-1]) for v in present for _, rows in results[(s, v)])
            grid = np.linspace(0.0, xmax if xmax > 0 else 1.0, GRID_POINTS + 1)
            for v in present:
                seeds = results[(s, v)]
                end = max(float(rows[axis][-1]) for _, rows in seeds)
                xs = np.union1d(grid[grid < end], [end])  # the method's own end point: its final evaluations
                curves = np.stack([step_hold(rows[axis], rows["eval_return"], xs) for _, rows in seeds])
                mean = curves.mean(axis=0)
                lo, hi = np.percentile(curves, 20, axis=0), np.percentile(curves, 80, axis=0)
                if per_seed:
                    for c in curves:
                        ax.plot(xs, c, color=colours[v], lw=0.5, alpha=0.35)
                ax.plot(xs, mean, color=colours[v], lw=1.6, label=f"{v}: mean of {len(seeds)} seeds")
                ax.fill_between(xs, lo, hi, color=colours[v], alpha=0.2, lw=0)
            ax.fill_between([], [], [], color="grey", alpha=0.3, lw=0, label="band: 20-80 % of seeds")
            if thresholds and s in thresholds:
                ax.axhline(thresholds[s], color="black", ls="--", lw=0.9, label=f"threshold {thresholds[s]:.4g}")
            ax.set_title(s if len(plan.settings) > 1 or s != DEFAULT_SETTING else wrap_title(plan.title, 57),
                         fontsize=10)
            ax.set_xlabel(label)
            ax.set_ylabel("eval return")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if len(plan.settings) > 1 or plan.settings[0] != DEFAULT_SETTING:
            # about 11 characters per inch of figure width at this font size: wrap, never cut
            fig.suptitle(wrap_title(f"{plan.title}; mean and 20-80 % band over seeds", int(11 * 5.2 * ncol)),
                         fontsize=11)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        path = os.path.join(out, fname)
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def write_summary_md(plan: Plan, summary: dict, picked: dict | None, path: str, missing: list) -> None:
    L = [f"# {plan.title}", "",
         f"Compare config `{plan.path}`; seeds {', '.join(map(str, plan.seeds))}; "
         f"runs in `<setting>/<variant>/seed<k>/`.", "",
         "- **final return**: the last evaluation of each run; mean over seeds and the 20 % / 80 % percentiles.",
         *STATS_EXPLANATION,
         "- **AUC**: the mean eval return over [0, T] (step-wise hold), T = the shortest run of the setting.", "",
         "Figures: [comparison.png](comparison.png) (against time), "
         "[comparison_trajectories.png](comparison_trajectories.png), "
         "[comparison_comms.png](comparison_comms.png); every evaluation: [comparison.csv](comparison.csv).", ""]
    for s, st in summary["settings"].items():
        rule = st["threshold_rule"]
        if "fraction" in rule:
            why = (f"{rule['fraction']:.0%} of the way from the mean initial return {st['initial_return']:.4g} "
                   f"to the best final mean {st['best_final_mean']:.4g} ({st['best_variant']})")
        else:
            why = "set in the config"
        L += [f"## {s}", "", f"Threshold: **{st['threshold']:.4g}** ({why}).", ""]
        if st.get("verdict"):
            L += [f"**{st['verdict']}**", ""]
        bls = [b for b in plan.baselines if b in st["variants"]]
        head = ["method", "seeds", "final mean", "20 %", "80 %", "AUC", "reached", "median time (90 % CI)",
                "IQM time (90 % CI)"]
        head += [f"paired speed-up vs {b} (90 % CI), first/tie/later" for b in bls]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v, vs in st["variants"].items():
            tt, ts = vs["to_threshold"], vs["time_stats"]
            row = [f"`{v}`", str(len(vs["seeds"])), _num(vs["final"]["mean"]), _num(vs["final"]["p20"]),
                   _num(vs["final"]["p80"]), _num(vs["auc"]["mean"]), f"{tt['reached']}/{tt['n']}",
                   ("≥ " if ts["median"]["censored"] else "") + fmt_interval(ts["median"]), fmt_interval(ts["iqm"])]
            for b in bls:
                sp = vs["paired"].get(b)
                row.append("—" if sp is None else
                           f"{fmt_interval(sp, '.3g')}, {sp['first']}/{sp['tied']}/{sp['later']}")
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        rob = {v: vs["robustness"] for v, vs in st["variants"].items() if "robustness" in vs}
        if rob:
            first = next(iter(rob.values()))
            fracs = list(first)
            L += ["Time to other fractions of the way (robustness of the timing): mean over the seeds "
                  "that reached it (reached) / median over all seeds.", "",
                  "| method | " + " | ".join(f"{float(f) * 100:g} % ({first[f]['threshold']:.4g})" for f in fracs) + " |",
                  "|---|" + "---|" * len(fracs)]
            for v, r in rob.items():
                L.append(f"| `{v}` | " + " | ".join(
                    f"{_num(r[f]['mean'])} ({r[f]['reached']}/{len(r[f]['values'])}) / {_num(r[f]['median'])}"
                    for f in fracs) + " |")
            L.append("")
        if picked and s in picked["chosen"]:
            L += [f"Tuning ({picked['metric']} eval return, mean over seeds; **picked** in bold):", "",
                  "| method | candidate | score |", "|---|---|---|"]
            for fam, cands in picked["scores"][s].items():
                for v, score in cands.items():
                    mark = f"**{v}**" if picked["chosen"][s][fam] == v else v
                    L.append(f"| `{fam}` | {mark} | {_num(score)} |")
            L.append("")
    if missing:
        L += ["## Not included", "", "Runs not finished (not run yet, failed, or filtered with --only):", ""]
        L += [f"- `{m}`" for m in missing]
        L.append("")
    from apga.files import atomic_write_text
    atomic_write_text(path, "\n".join(L))


def write_picked(plan: Plan, picked: dict, path: str) -> None:
    doc = {"settings": {}}
    for s, fams in picked["chosen"].items():
        doc["settings"][s] = {"variants": {fam: dict(plan.grid_points[v]) for fam, v in fams.items()}}
    head = (f"# Picked by `apga compare {plan.path} --pick {picked['metric']}`: per setting and method the grid\n"
            f"# point with the best mean {picked['metric']} eval return over seeds {plan.seeds}.\n"
            "# Paste each setting's `variants:` block under the same setting of a compare config\n"
            "# (settings.<name>.variants.<method>: the tuned overrides). Scores: summary.md.\n")
    from apga.files import atomic_write_text
    atomic_write_text(path, head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))


def report(plan: Plan, pick_metric: str | None = None, per_seed: bool = False) -> dict:
    """Aggregate the finished runs into the output files. Returns {name: path}."""
    results = collect(plan)
    if not results:
        raise ApgaError(f"no finished runs under {plan.out} to compare")
    summary = summarise(plan, results)
    picked = pick(plan, summary, pick_metric) if pick_metric else None
    missing = [f"{r.setting}/{r.variant}/seed{r.seed}" for r in plan.runs
               if not any(k == r.seed for k, _ in results.get((r.setting, r.variant), []))]
    from apga.files import atomic_write_text
    paths = {}
    paths["csv"] = os.path.join(plan.out, "comparison.csv")
    write_csv(plan, results, paths["csv"])
    figs = plot(plan, results, plan.out, {k: st["threshold"] for k, st in summary["settings"].items()}, per_seed)
    paths["plot"], paths["plot_trajectories"], paths["plot_comms"] = figs
    paths["summary"] = os.path.join(plan.out, "summary.md")
    write_summary_md(plan, summary, picked, paths["summary"], missing)
    if picked:
        summary["picked"] = picked
        paths["picked"] = os.path.join(plan.out, "picked.yaml")
        write_picked(plan, picked, paths["picked"])
    paths["summary_json"] = os.path.join(plan.out, "summary.json")
    atomic_write_text(paths["summary_json"], json.dumps(summary, indent=2) + "\n")
    return paths
