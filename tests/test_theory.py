"""apga.theory, apga.shapes and `apga theory`: exact round times against brute force, bounds, CLI."""
from __future__ import annotations

import bisect
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from apga import theory
from apga.cli import main
from apga.errors import ConfigError
from apga.shapes import resolve_times, shape_values


# --------------------------------------------------------------------------- brute force helpers


def random_times(rng: random.Random) -> list[float]:
    """A mix that exercises ties (small integers, sqrt(i)) and rounding (multiples of 0.1)."""
    n = rng.randint(1, 7)
    kind = rng.choice(["uniform", "int", "tenths", "sqrt"])
    if kind == "uniform":
        return [rng.uniform(0.05, 5.0) for _ in range(n)]
    if kind == "int":
        return [float(rng.randint(1, 4)) for _ in range(n)]
    if kind == "tenths":
        return [rng.randint(1, 9) * 0.1 for _ in range(n)]
    return [math.sqrt(rng.randint(1, 10)) for _ in range(n)]


def brute_stop(h, M, stop, start=None, t_limit=None):
    """Walk every float completion time start_i + k*h_i up to t_limit in order; count by enumeration.

    The default limit, max_i start_i + ceil(M/n)*h_i, is a time by which both predicates hold.
    """
    n = len(h)
    start = [0.0] * n if start is None else list(start)
    q = math.ceil(M / n)
    t_limit = max(s + q * x for s, x in zip(start, h)) if t_limit is None else t_limit
    events = []
    for s, x in zip(start, h):
        ev, k = [], 1
        while s + k * x <= t_limit:
            ev.append(s + k * x)
            k += 1
        events.append(ev)
    for t in sorted(e for ev in events for e in ev):
        counts = [bisect.bisect_right(ev, t) for ev in events]  # ev is sorted: k*h grows with k
        if stop(counts, M):
            return t, counts
    raise AssertionError("the stop predicate never held")


# --------------------------------------------------------------------------- exact round times


def test_rennala_round_time_is_the_exact_mth_completion():
    """Zero communication: the M-th smallest k*h_i in exact rationals, rounded once, is the answer."""
    rng = random.Random(1)
    for _ in range(300):
        h, M = random_times(rng), rng.randint(1, 60)
        exact = sorted(Fraction(x) * k for x in h for k in range(1, M + 1))[M - 1]
        got = theory.rennala_round_time(h, M)
        assert got == float(exact)
        assert any(got == k * x for x in h for k in range(1, M + 1))  # literally some k*h_i
        assert got == brute_stop(h, M, theory.rennala_stop)[0]


def test_malenia_round_time_matches_brute_force():
    rng = random.Random(2)
    for _ in range(300):
        h, M = random_times(rng), rng.randint(1, 60)
        got = theory.malenia_round_time(h, M)
        t, counts = brute_stop(h, M, theory.malenia_stop)
        assert got == t
        assert all(b >= 1 for b in counts)
        assert any(got == k * x for x in h for k in range(1, counts[h.index(x)] + 1))


def test_sync_round_time():
    rng = random.Random(3)
    for _ in range(100):
        h, M = random_times(rng), rng.randint(1, 60)
        q = math.ceil(M / len(h))
        assert theory.sync_round_time(h, M) == max(q * x for x in h)
    assert theory.sync_quota(10, 32) == 4 and theory.sync_quota(10, 30) == 3


def test_stop_predicates():
    assert theory.rennala_stop([1, 0, 2], 3) and not theory.rennala_stop([1, 0, 1], 3)
    assert not theory.malenia_stop([0, 5], 1)  # every worker must contribute
    assert theory.malenia_stop([2, 2], 4)  # harmonic mean exactly M/n counts as reached
    assert not theory.malenia_stop([3, 1], 4)  # harmonic mean 1.5 < 2
    assert theory.malenia_stop(np.array([3, 3, 3]), 9) == theory.malenia_stop([3, 3, 3], 9)


def test_round_times_with_communication_by_hand():
    h, kap = [1.0, 2.0], [0.5, 0.25]
    # Rennala server: completions 1.5, 2.5, ... and 2.25, 4.25; the 3rd is at 2.5, counts (2, 1).
    assert theory.round_timing("rennala", h, 3, kap).counts == (2, 1)
    assert theory.round_time("rennala", h, 3, kap) == 2.5 + 0.5
    # AllReduce: start at 0, the 3rd completion is at 2 (counts 2, 1), then one AllReduce of 1.
    assert theory.round_time("rennala_nigt", h, 3, kap, 1.0, "allreduce") == 3.0
    # Sync server: quota 2; worker 2 needs 0.25 + 4 + 0.25.
    assert theory.round_time("sync", h, 3, kap) == 4.5
    assert theory.round_time("sync_nigt", h, 3, kap, 1.0, "allreduce") == 5.0
    # Malenia server, M = 3, n = 2: needs sum(1/b) <= 4/3: first at (3, 1) at t = 3.5.
    assert theory.round_time("malenia", h, 3, kap) == 3.5 + 0.5
    # Zero communication: server mode equals the plain round time exactly.
    assert theory.round_time("rennala", [1.0, math.sqrt(2)], 7) == theory.rennala_round_time([1.0, math.sqrt(2)], 7)


def test_simultaneous_completions_all_count():
    # Worker 1 finishes at 2 (start 0), worker 2 at 1 + 1 = 2: both are in the round and upload.
    timing = theory.round_timing("rennala", [2.0, 1.0], 1, [0.0, 1.0])
    assert timing.stop == 2.0 and timing.counts == (1, 1) and timing.end == 3.0


def test_server_round_times_match_brute_force():
    rng = random.Random(4)
    for _ in range(150):
        h, M = random_times(rng), rng.randint(1, 40)
        kap = [rng.choice([0.0, rng.uniform(0, 3), float(rng.randint(0, 2))]) for _ in h]
        for method, stop in (("rennala", theory.rennala_stop), ("malenia", theory.malenia_stop)):
            t, counts = brute_stop(h, M, stop, start=kap)
            want = max(t + k for k, b in zip(kap, counts) if b > 0)
            assert theory.round_time(method, h, M, kap) == want


def test_round_time_rejects_bad_input():
    with pytest.raises(ValueError):
        theory.round_time("afedpg", [1.0], 1)
    with pytest.raises(ValueError):
        theory.round_time("rennala", [1.0, -1.0], 1)
    with pytest.raises(ValueError):
        theory.rennala_round_time([1.0], 0)


def test_large_batch_is_fast_and_exact():
    h = [math.sqrt(i) for i in range(1, 101)]
    t = theory.rennala_round_time(h, 10**6)
    assert int(theory.counts_at(t, h).sum()) >= 10**6
    assert int(theory.counts_at(np.nextafter(t, 0), h).sum()) < 10**6


def test_afedpg_updates_by():
    rng = random.Random(5)
    for _ in range(100):
        h = [float(rng.randint(1, 5)) for _ in range(rng.randint(1, 5))]
        T = rng.uniform(0, 40)
        assert theory.afedpg_updates_by(h, T) == sum(math.floor(T / x) for x in h)
    # With communication, simulate the cycle download -> compute -> upload (integer times: exact).
    h, kap, T = [1.0, 2.0, 3.0], [1.0, 0.0, 2.0], 20.0
    for initial_download in (True, False):
        total = 0
        for hi, ki in zip(h, kap):
            t = ki if initial_download else 0.0
            while True:
                t += hi + ki  # compute, then upload: the server updates on arrival
                if t > T:
                    break
                total += 1
                t += ki  # the new point travels back
        assert theory.afedpg_updates_by(h, T, kap, initial_download) == total
    assert theory.afedpg_updates_by(h, T, kap) == 6 + 10 + 2


# --------------------------------------------------------------------------- bounds


def test_rennala_bound_brackets_the_exact_time():
    rng = random.Random(6)
    for _ in range(200):
        h, M = random_times(rng), rng.randint(1, 80)
        bound, m = theory.rennala_time_bound(h, M)
        assert 1 <= m <= len(h)
        assert bound / 2 * (1 - 1e-12) <= theory.rennala_round_time(h, M) <= bound * (1 + 1e-12)


def test_malenia_bound_brackets_the_exact_time():
    rng = random.Random(7)
    for _ in range(200):
        h, M = random_times(rng), rng.randint(1, 80)
        bound = theory.malenia_time_bound(h, M)
        assert bound * (1 - 1e-9) <= theory.malenia_round_time(h, M) <= 2 * bound * (1 + 1e-9)


def test_rennala_bound_ignores_very_slow_workers():
    _, m = theory.rennala_time_bound([1.0] + [1000.0] * 9, 10)
    assert m == 1


def rows(h, kappa=0.0, k_ar=None, **kw):
    kw.setdefault("eps", 0.1)
    return {r.key: r for r in theory.complexity_table(h, kappa, k_ar, **kw)}


def test_equal_times_rennala_matches_sync():
    r = rows([1.0] * 10)
    assert r["rennala_nigt"].total == pytest.approx(r["sync_nigt"].total, rel=1e-12)
    assert r["rennala_nigt"].workers_used == 10


def test_heterogeneous_times_rennala_beats_sync_and_afedpg():
    r = rows(shape_values("sqrt", 10))
    assert r["rennala_nigt"].total < r["sync_nigt"].total
    assert r["rennala_nigt"].total < r["afedpg"].total
    assert r["rennala_nigt"].total <= r["malenia_nigt"].total
    assert r["rennala_nigt"].batch_size == theory.best_batch_size(0.1) == 32
    assert not r["afedpg"].allreduce and r["rennala_nigt"].allreduce


def test_communication_grows_faster_for_afedpg():
    h = shape_values("sqrt", 10)
    small, large = rows(h, 1.0), rows(h, 10.0)
    growth = {k: large[k].communication - small[k].communication for k in small}
    assert growth["afedpg"] > growth["rennala_nigt"] > 0
    assert growth["sync_nigt"] > growth["rennala_nigt"]  # sync also pays per variance-round
    assert large["rennala_nigt"].total < large["afedpg"].total


def test_bounds_are_monotone():
    h = shape_values("sqrt", 10)
    loose, tight = rows(h, 1.0, eps=0.2), rows(h, 1.0, eps=0.05)
    noisy = rows(h, 1.0, sigma2=4.0)
    base = rows(h, 1.0)
    for k in base:
        assert tight[k].total > base[k].total > loose[k].total
        assert noisy[k].total >= base[k].total
    # A horizon factor only makes things harder.
    longer = rows(h, 1.0, horizon=2.0)
    assert all(longer[k].total > base[k].total for k in base)
    # Adding a worker never slows Rennala's computation bound (it may ignore the new one).
    assert rows(h + [100.0])["rennala_nigt"].computation <= rows(h)["rennala_nigt"].computation + 1e-9


def test_humanoid_dim():
    assert theory.gaussian_mlp_param_count(348, 17) == theory.HUMANOID_POLICY_DIM == 28706


# --------------------------------------------------------------------------- shapes


def test_shapes():
    assert shape_values("equal", 3) == [1.0, 1.0, 1.0]
    assert shape_values("sqrt", 4) == [1.0, math.sqrt(2), math.sqrt(3), 2.0]
    assert shape_values("linear", 3) == [1.0, 2.0, 3.0]
    assert shape_values("decreasing", 4) == shape_values("sqrt", 4)[::-1]
    assert shape_values("sqrt_d", 2, d=16) == [2.0, 2.0 * math.sqrt(2)]
    with pytest.raises(ValueError):
        shape_values("sqrt_d", 2)
    with pytest.raises(ValueError):
        shape_values("cubic", 2)


def test_resolve_times():
    assert resolve_times("0.5", 3, option="--x") == [0.5] * 3
    assert resolve_times("1,2,3", 3, option="--x") == [1.0, 2.0, 3.0]
    assert resolve_times([1, 2], 2, option="--x") == [1.0, 2.0]
    assert resolve_times(2, 2, option="--x") == [2.0, 2.0]
    for bad in ("1,2", "cubic", "-1", "nan", [1, "a"]):
        with pytest.raises(ConfigError, match="--x"):
            resolve_times(bad, 3, option="--x")
    with pytest.raises(ConfigError, match="positive"):
        resolve_times(0, 3, option="--x", allow_zero=False)


# --------------------------------------------------------------------------- CLI


def test_cli_table(capsys):
    assert main(["theory"]) == 0
    out = capsys.readouterr().out
    for text in ("Synchronous NIGT", "Rennala NIGT", "Malenia NIGT", "AFedPG", "fastest: Rennala NIGT",
                 "best batch size", "Exact duration of one round"):
        assert text in out


def test_cli_json(capsys):
    assert main(["theory", "--format", "json", "--comm-time", "sqrt_d", "--batch-size", "20"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["key"] for m in data["methods"]} == {
        "sync_pg", "rennala_pg", "afedpg", "sync_nigt", "rennala_nigt", "malenia_nigt"}
    assert data["fastest"] == "rennala_nigt"
    assert data["round_times"]["batch_size"] == 20
    h, kap = shape_values("sqrt", 10), shape_values("sqrt_d", 10, d=theory.HUMANOID_POLICY_DIM)
    assert data["round_times"]["methods"]["rennala_nigt"]["server"] == theory.round_time("rennala", h, 20, kap)
    assert data["inputs"]["allreduce_time"] == max(kap)


def test_cli_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["theory", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--workers", "--compute-time", "--comm-time", "--allreduce-time", "--dim", "--eps",
                "--sigma2", "--L", "--delta", "--gamma", "--batch-size", "--format", "seconds", "default"):
        assert opt in out


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--eps", "0"], "--eps"),
        (["--compute-time", "1,2"], "--compute-time"),
        (["--compute-time", "cubic"], "--compute-time"),
        (["--comm-time", "-1"], "--comm-time"),
        (["--workers", "0"], "--workers"),
        (["--gamma", "1"], "--gamma"),
        (["--batch-size", "0"], "--batch-size"),
        (["--sigma2", "-1"], "--sigma2"),
        (["--allreduce-time", "-2"], "--allreduce-time"),
        (["--workers", "x"], "--workers"),
        (["--format", "xml"], "--format"),
    ],
)
def test_cli_bad_options(capsys, argv, option):
    try:
        code = main(["theory", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and option in err and "Traceback" not in err
    assert captured.out == ""


def test_closed_stdout_ends_quietly():
    """`apga theory | head -0`: the reader has gone before the first line (closed while the child
    is still importing); no traceback, SIGPIPE's exit status."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "apga", "theory"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""
