"""Statistics of a comparison: time to threshold over seeds, with bootstrap confidence intervals.

Every interval is a percentile bootstrap from ``scipy.stats.bootstrap`` (90 %, 9999 resamples,
a fixed generator, so the same runs give the same intervals). Two kinds of numbers:

- **per method**: the median and the interquartile mean (IQM: the mean of the middle 50 %,
  ``scipy.stats.trim_mean(x, 0.25)``) of the time to threshold over seeds;
- **paired speed-up** of a method M against a baseline B: per seed k (same initial point, and
  with ``runtime.streams: round`` the same trajectories wherever the schedules coincide) the
  ratio r_k = t_B,k / t_M,k; the estimate is their geometric mean exp(mean(log r_k)) and the
  interval is the bootstrap interval of mean(log r_k), exponentiated. Only seeds finished for
  both methods are paired.

**Censoring.** A seed that never reached the threshold is right-censored: its time is replaced
by the time of its last evaluation (the latest time at which it was known not to have arrived),
a LOWER bound on its true time. So a censored method's median and IQM are lower bounds; a
ratio t_B/t_M is a lower bound when only B's seed is censored, an upper bound when only M's is,
and compares the two budgets when both are. The counts of censored seeds are reported next to
every number and in the verdict sentence, and a median that is itself censored is marked.
"""
from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.90
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


def iqm(x, axis=-1):
    """Interquartile mean: the mean of the middle 50 % (25 % trimmed from each end)."""
    from scipy.stats import trim_mean
    return trim_mean(x, 0.25, axis=axis)


def _median(x, axis=-1):
    return np.median(x, axis=axis)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def bootstrap_interval(values, statistic) -> dict:
    """{'estimate', 'low', 'high'}: ``statistic`` of ``values`` and its 90 % percentile bootstrap
    interval. With fewer than 2 values, or all values equal, the interval is the point itself."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"bootstrap_interval: expected a non-empty 1-d array of finite numbers, got {values!r}")
    est = float(statistic(x))
    if len(x) < 2 or np.all(x == x[0]):
        return {"estimate": est, "low": est, "high": est}
    from scipy.stats import bootstrap
    res = bootstrap((x,), statistic, vectorized=True, axis=-1, confidence_level=CONFIDENCE,
                    n_resamples=N_RESAMPLES, method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return {"estimate": est, "low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high)}


def censored_times(hits: list, ends: list) -> np.ndarray:
    """Per seed the time to threshold, a seed that never reached it (None) counting at its end."""
    if len(hits) != len(ends):
        raise ValueError("censored_times: one end time per seed")
    return np.array([e if t is None else t for t, e in zip(hits, ends)], dtype=float)


def time_summary(hits: list, ends: list) -> dict:
    """Median and IQM of the time to threshold over seeds, each with its bootstrap interval."""
    x = censored_times(hits, ends)
    censored = sum(t is None for t in hits)
    out = {"n": len(hits), "censored": censored}
    for name, fn in (("median", _median), ("iqm", iqm)):
        out[name] = bootstrap_interval(x, fn)
    # the median is itself a censored value when at least half the seeds never arrived
    out["median"]["censored"] = bool(censored * 2 >= len(hits))
    return out


def paired_speedup(mine: dict, theirs: dict) -> dict | None:
    """Paired speed-up of a method against a baseline. ``mine``/``theirs``: seed -> (hit or None, end).
    None when no seed is shared."""
    seeds = [k for k in mine if k in theirs]
    if not seeds:
        return None
    t_m = censored_times([mine[k][0] for k in seeds], [mine[k][1] for k in seeds])
    t_b = censored_times([theirs[k][0] for k in seeds], [theirs[k][1] for k in seeds])
    if np.any(t_m <= 0) or np.any(t_b <= 0):  # reached at time 0: no ratio exists
        return None
    log_r = np.log(t_b) - np.log(t_m)
    ci = bootstrap_interval(log_r, _mean)
    return {"seeds": seeds, "ratio": math.exp(ci["estimate"]), "low": math.exp(ci["low"]),
            "high": math.exp(ci["high"]), "per_seed": [float(r) for r in np.exp(log_r)],
            "first": int(np.sum(log_r > 0)), "tied": int(np.sum(log_r == 0)), "later": int(np.sum(log_r < 0)),
            "censored_mine": sum(mine[k][0] is None for k in seeds),
            "censored_theirs": sum(theirs[k][0] is None for k in seeds)}


def verdict(method: str, baseline: str, sp: dict | None, label=str) -> str:
    """One clause that says what a paired speed-up supports."""
    m, b = label(method), label(baseline)
    if sp is None:
        return f"{m} vs {b}: no paired seeds"
    if len(sp["seeds"]) < 2:
        return f"{m} vs {b}: {sp['ratio']:.2f}× on 1 paired seed, too few for an interval"
    censored = [f"{k} of {who}'s seeds never arrived" for k, who in
                ((sp.get("censored_mine", 0), m), (sp.get("censored_theirs", 0), b)) if k]
    ci = (f"{sp['ratio']:.2f}× (90 % CI {sp['low']:.2f}–{sp['high']:.2f}, {len(sp['seeds'])} paired seeds"
          + "".join(f"; {c}" for c in censored) + ")")
    if sp["low"] > 1:
        return f"{m} first against {b}: {ci}, CI excludes 1"
    if sp["high"] < 1:
        return f"{b} first against {m}: {m}'s speed-up {ci}, CI excludes 1"
    return f"tie between {m} and {b}: {ci}, CI includes 1"


LABELS = {"rennala_nigt": "Rennala NIGT", "malenia_nigt": "Malenia NIGT", "sync_nigt": "synchronous NIGT",
          "afedpg": "AFedPG", "rennala_pg": "Rennala PG", "sync_pg": "synchronous PG"}


def label(variant: str) -> str:
    """A readable method name for a variant (its own name when it is not a plain algorithm)."""
    return LABELS.get(variant, variant)


def setting_statistics(hits: dict, baselines: list) -> dict:
    """The statistics of one setting. ``hits``: variant -> {seed: (time to threshold or None, end time)}.

    Returns {'time': {variant: time_summary}, 'paired': {variant: {baseline: paired_speedup}},
    'verdict': one sentence over every (method, baseline) pair}. The methods are the variants that
    are not baselines (all of them if every variant is one); each unordered pair is judged once."""
    variants = list(hits)
    out = {"time": {}, "paired": {}, "verdict": ""}
    for v in variants:
        seeds = list(hits[v])
        out["time"][v] = time_summary([hits[v][k][0] for k in seeds], [hits[v][k][1] for k in seeds])
        out["paired"][v] = {b: paired_speedup(hits[v], hits[b]) for b in baselines if b in hits and b != v}
    methods = [v for v in variants if v not in baselines] or variants
    clauses, judged = [], set()
    for m in methods:
        for b in baselines:
            if b not in hits or b == m or frozenset((m, b)) in judged:
                continue
            judged.add(frozenset((m, b)))
            clauses.append(verdict(m, b, out["paired"][m][b], label))
    if clauses:
        out["verdict"] = "; ".join(clauses) + "."
    return out


def fmt_interval(d: dict | None, fmt: str = ".4g", unit: str = "") -> str:
    """'est (low–high)' for summary.md; — for a missing number."""
    if d is None:
        return "—"
    return f"{d['estimate'] if 'estimate' in d else d['ratio']:{fmt}}{unit} ({d['low']:{fmt}}–{d['high']:{fmt}})"


EXPLANATION = [
    "- **median / IQM time** (90 % CI): the time to threshold over seeds (the first simulated time at which "
    "an evaluation reached it), its median and interquartile mean (mean of the middle 50 %), each with a 90 % "
    "percentile bootstrap interval (`scipy.stats.bootstrap`, 9999 resamples). **reached**: seeds that reached "
    "the threshold. A seed that never reached it is *censored*: it counts at the time of its last evaluation, "
    "a lower bound on its true time, so a method with censored seeds is shown faster than it is (≥ marks a "
    "median that is itself censored).",
    "- **paired speed-up vs B** (90 % CI): per seed (same initial point; with `runtime.streams: round` the same "
    "trajectories where the schedules coincide) B's time / this method's time; the geometric mean over seeds "
    "and the bootstrap interval of the mean log ratio. > 1: this method first. `first/tie/later`: on how many "
    "seeds it arrived first, at the same time, later. A censored seed makes its ratio a bound (see above).",
]
