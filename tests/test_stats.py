"""apga.stats: bootstrap intervals from scipy, censoring of seeds that never arrive, paired speed-ups
and the computed verdict sentence."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from apga import stats


def test_intervals_are_scipy_percentile_bootstrap_and_deterministic():
    x = np.array([3.0, 5.0, 4.0, 10.0, 7.0, 6.0, 2.0, 8.0])
    got = stats.bootstrap_interval(x, stats.iqm)
    ref = sps.bootstrap((x,), lambda a, axis: sps.trim_mean(a, 0.25, axis=axis), vectorized=True,
                        confidence_level=0.9, n_resamples=9999, method="percentile", rng=np.random.default_rng(0))
    assert got["estimate"] == sps.trim_mean(x, 0.25) == pytest.approx(np.mean([4, 5, 6, 7]))
    assert (got["low"], got["high"]) == (ref.confidence_interval.low, ref.confidence_interval.high)
    assert stats.bootstrap_interval(x, stats.iqm) == got  # same data, same interval
    assert got["low"] <= got["estimate"] <= got["high"]
    # degenerate inputs: the point itself
    assert stats.bootstrap_interval([4.0], np.median) == {"estimate": 4.0, "low": 4.0, "high": 4.0}
    assert stats.bootstrap_interval([2.0, 2.0, 2.0], np.median) == {"estimate": 2.0, "low": 2.0, "high": 2.0}
    with pytest.raises(ValueError):
        stats.bootstrap_interval([1.0, math.inf], np.median)


def test_seeds_that_never_arrive_count_at_their_last_evaluation():
    hits, ends = [10.0, None, 30.0, None], [100.0, 90.0, 100.0, 80.0]
    assert stats.censored_times(hits, ends).tolist() == [10.0, 90.0, 30.0, 80.0]
    ts = stats.time_summary(hits, ends)
    assert ts["n"] == 4 and ts["censored"] == 2
    assert ts["median"]["estimate"] == 55.0 and ts["median"]["censored"]  # half the seeds never arrived
    assert not stats.time_summary([1.0, 2.0, None], [5.0, 5.0, 5.0])["median"]["censored"]
    with pytest.raises(ValueError):
        stats.censored_times([1.0], [])


def test_paired_speedup_is_the_geometric_mean_of_per_seed_ratios():
    mine = {0: (10.0, 100.0), 1: (20.0, 100.0), 2: (None, 100.0), 3: (5.0, 100.0)}
    theirs = {0: (20.0, 100.0), 1: (20.0, 100.0), 2: (50.0, 100.0), 4: (1.0, 100.0)}  # seed 4 unpaired
    sp = stats.paired_speedup(mine, theirs)
    assert sp["seeds"] == [0, 1, 2]
    assert sp["per_seed"] == pytest.approx([2.0, 1.0, 0.5])
    assert sp["ratio"] == pytest.approx(1.0)  # (2 * 1 * 0.5)^(1/3)
    assert (sp["first"], sp["tied"], sp["later"]) == (1, 1, 1)
    assert (sp["censored_mine"], sp["censored_theirs"]) == (1, 0)
    assert sp["low"] < 1 < sp["high"]
    assert stats.paired_speedup(mine, {7: (1.0, 2.0)}) is None


def test_verdict_sentence_follows_the_interval():
    faster = {"seeds": [0, 1], "ratio": 1.5, "low": 1.2, "high": 1.9}
    slower = {"seeds": [0, 1], "ratio": 0.6, "low": 0.5, "high": 0.8}
    tie = {"seeds": [0, 1], "ratio": 1.1, "low": 0.9, "high": 1.3}
    lab = stats.label
    assert stats.verdict("rennala_nigt", "afedpg", faster, lab) == \
        "Rennala NIGT first against AFedPG: 1.50× (90 % CI 1.20–1.90, 2 paired seeds), CI excludes 1"
    assert stats.verdict("rennala_nigt", "afedpg", slower, lab).startswith("AFedPG first against Rennala NIGT")
    assert stats.verdict("rennala_nigt", "sync_nigt", tie, lab).startswith(
        "tie between Rennala NIGT and synchronous NIGT: 1.10×")
    assert "CI includes 1" in stats.verdict("a", "b", tie)
    censored = {**faster, "censored_theirs": 1}
    assert stats.verdict("rennala_nigt", "afedpg", censored, lab).endswith(
        "(90 % CI 1.20–1.90, 2 paired seeds; 1 of AFedPG's seeds never arrived), CI excludes 1")
    one = {"seeds": [0], "ratio": 2.0, "low": 2.0, "high": 2.0}
    assert stats.verdict("a", "b", one) == "a vs b: 2.00× on 1 paired seed, too few for an interval"


def test_setting_statistics_judges_each_pair_once():
    seeds = range(6)
    hits = {"rennala_nigt": {k: (10.0 + k, 50.0) for k in seeds},
            "afedpg": {k: (30.0 + k, 50.0) for k in seeds},
            "sync_nigt": {k: (10.0 + k, 50.0) for k in seeds}}
    out = stats.setting_statistics(hits, ["afedpg", "sync_nigt"])
    assert out["verdict"].count(";") == 1 and out["verdict"].endswith(".")
    assert out["verdict"].startswith("Rennala NIGT first against AFedPG")
    assert "tie between Rennala NIGT and synchronous NIGT: 1.00×" in out["verdict"]
    assert set(out["paired"]["afedpg"]) == {"sync_nigt"}
    # every variant a baseline: each unordered pair once
    both = stats.setting_statistics({"a": hits["afedpg"], "b": hits["sync_nigt"]}, ["a", "b"])
    assert both["verdict"].count("first against") + both["verdict"].count("tie between") == 1
