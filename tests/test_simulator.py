"""The simulator's clock against the exact formulas of docs/algorithms.md, the time model, and its event-level guarantees."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from apga.oracle.synthetic import SyntheticOracle
from apga.protocol.registry import make_protocol
from apga.runtime.simulator import Simulator
from apga.runtime.timing import TimeModel

RNG = np.random.default_rng(20261123)
RANDOM_H = [list(RNG.uniform(0.1, 5.0, size=n)) for n in (1, 2, 3, 5, 8, 13)] + [
    [math.sqrt(i) for i in range(1, 11)], [1.0] * 7, [0.3, 0.3, 0.7, 2.1]]


def make_sim(name, h, M=8, comm=0.0, allreduce=None, aggregation="server", cancel=True, seed=0,
             compute=None, dim=4, step_size=0.05, momentum=0.5, shift=0.0, noise=1.0, streams="job"):
    n = len(h)
    oracle = SyntheticOracle(n, seed, dim=dim, noise=noise, shift=shift)
    times = TimeModel(compute if compute is not None else list(h), comm, allreduce, n, oracle.dim, seed)
    alg = make_protocol(name, n, oracle.initial_point(), step_size, momentum, M)
    return Simulator(alg, oracle, times, aggregation, cancel, streams)


def brute_rennala(h, M):
    """min{t : sum_i floor(t/h_i) >= M}, by scanning the candidate times k*h_i in order."""
    candidates = sorted({k * hi for hi in h for k in range(1, M + 1)})
    return next(t for t in candidates if sum(math.floor(t / hi + 1e-12) for hi in h) >= M)


def brute_malenia(h, M):
    """First t with every b_i >= 1 and (1/n sum 1/b_i)^-1 >= M/n, in exact rational arithmetic."""
    n = len(h)
    candidates = sorted({k * hi for hi in h for k in range(1, M * n + 2)})
    for t in candidates:
        b = [math.floor(t / hi + 1e-12) for hi in h]
        if min(b) >= 1 and Fraction(n) / sum(Fraction(1, x) for x in b) >= Fraction(M, n):
            return t
    raise AssertionError("no stop time found")


def round_durations(sim, rounds):
    out = []
    for _ in range(rounds):
        start = sim.clock
        sim.step()
        out.append(sim.clock - start)
    return out


@pytest.mark.parametrize("h", RANDOM_H)
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("name", ["rennala_nigt", "rennala_pg"])
def test_rennala_rounds_last_exactly_the_formula(h, M, name):
    sim = make_sim(name, h, M=M)
    expected = brute_rennala(h, M)
    for d in round_durations(sim, 4):
        assert d == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # every gradient finished by the stop is used, ties at the stop included
    used = sum(math.floor(expected / hi + 1e-12) for hi in h)
    assert used >= M and sim.totals.trajectories == 4 * used


@pytest.mark.parametrize("h", RANDOM_H)
@pytest.mark.parametrize("M", [1, 6, 20])
def test_malenia_rounds_end_at_the_harmonic_mean_condition(h, M):
    sim = make_sim("malenia_nigt", h, M=M)
    expected = brute_malenia(h, M)
    for d in round_durations(sim, 3):
        assert d == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("h", RANDOM_H)
@pytest.mark.parametrize("M", [1, 7, 30])
@pytest.mark.parametrize("name", ["sync_nigt", "sync_pg"])
def test_sync_rounds_wait_for_the_slowest_quota(h, M, name):
    sim = make_sim(name, h, M=M)
    n = len(h)
    expected = max(math.ceil(M / n) * hi for hi in h)
    for d in round_durations(sim, 3):
        assert d == pytest.approx(expected, rel=1e-12)
    assert sim.totals.trajectories == 3 * n * math.ceil(M / n)


@pytest.mark.parametrize("h", RANDOM_H)
def test_afedpg_update_count_by_time(h):
    sim = make_sim("afedpg", h)
    T = 7.3 * max(h)
    times = []
    while not times or times[-1] <= T:
        sim.step()
        times.append(sim.clock)
    made = sum(1 for t in times if t <= T)
    assert made == sum(math.floor(T / hi) for hi in h)
    assert times == sorted(times)


def test_afedpg_charges_one_upload_and_one_download_per_gradient():
    h, kappa = [1.0, 2.5], [0.2, 0.7]
    sim = make_sim("afedpg", h, comm=kappa)
    arrivals = {0: [], 1: []}
    sim.enable_trace()
    for _ in range(12):
        sim.step()
        worker = sim.trace[-1][1]
        arrivals[worker].append(sim.clock)
    for i in (0, 1):
        # download k, compute h, upload k: the k-th gradient reaches the server at k (h + 2 kappa)
        expected = [(k + 1) * (h[i] + 2 * kappa[i]) for k in range(len(arrivals[i]))]
        assert arrivals[i] == pytest.approx(expected, rel=1e-12)
    assert sim.totals.vector_comms == 2 + 2 * 12  # n initial downloads + upload/download per update


@pytest.mark.parametrize("name", ["rennala_nigt", "malenia_nigt", "sync_nigt", "rennala_pg", "sync_pg"])
def test_server_round_timeline_with_communication(name):
    h, kappa, M = [1.0, 1.7, 3.1], [0.5, 0.25, 1.5], 6
    sim = make_sim(name, h, M=M, comm=kappa)
    sim.enable_trace()
    sim.step()
    used = [r for r in sim.trace if r[5] == "used"]
    for _, worker, job, start, finish, _ in used:
        if job == 0:
            assert start == kappa[worker]  # the point reaches worker i after its download time
    stop = max(r[4] for r in used)
    uploaders = {r[1] for r in used}
    if name.startswith("sync"):
        last = {w: max(r[4] for r in used if r[1] == w) for w in uploaders}
        expected = max(last[w] + kappa[w] for w in uploaders)
    else:
        expected = max(stop + kappa[w] for w in uploaders)
    assert sim.clock == pytest.approx(expected, rel=1e-12)
    assert sim.totals.vector_comms == len(h) + len(uploaders)


@pytest.mark.parametrize("name", ["rennala_nigt", "malenia_nigt", "sync_nigt", "rennala_pg", "sync_pg"])
def test_server_and_allreduce_give_the_same_iterates(name):
    h, M = [1.0, 1.3, 2.2, 4.0], 10
    common = dict(M=M, comm=0.4, seed=5)
    server = make_sim(name, h, aggregation="server", **common)
    allred = make_sim(name, h, aggregation="allreduce", allreduce=0.9, **common)
    for _ in range(6):
        server.step()
        allred.step()
        np.testing.assert_allclose(server.alg.theta, allred.alg.theta, rtol=0, atol=1e-12)
    # Same work, different clocks and counts: server = download + upload per round, one AllReduce otherwise.
    assert server.totals.trajectories == allred.totals.trajectories
    assert allred.totals.vector_comms == 6
    assert server.totals.vector_comms > allred.totals.vector_comms
    base = make_sim(name, h, M=M, comm=0.0, seed=5)
    round_time = round_durations(base, 1)[0]
    assert server.clock == pytest.approx(6 * (round_time + 2 * 0.4), rel=1e-12)
    assert allred.clock == pytest.approx(6 * (round_time + 0.9), rel=1e-12)


@pytest.mark.parametrize("name", ["rennala_nigt", "malenia_nigt"])
@pytest.mark.parametrize("cancel", [True, False])
def test_no_stale_gradient_enters_an_aggregate(name, cancel):
    sim = make_sim(name, [1.0, 1.5, 2.0, 3.0], M=8, cancel=cancel, comm=[0.1, 0.2, 0.3, 0.4],
                   compute={"dist": "exponential", "mean": "sqrt"}, seed=11)
    sim.enable_trace()
    round_starts = []
    for _ in range(25):
        round_starts.append(sim.clock)
        sim.step()
    for version, worker, job, start, finish, status in sim.trace:
        if status == "used":
            # every used gradient was started within its own round, at that round's point
            assert start >= round_starts[version] - 1e-12
            if version + 1 < len(round_starts):
                assert finish <= round_starts[version + 1] + 1e-12
    statuses = {r[5] for r in sim.trace}
    assert ("discarded" in statuses) == (not cancel)
    assert ("cancelled" in statuses) == cancel


def test_with_cancel_false_a_busy_worker_joins_only_when_its_stale_job_ends():
    # worker 1 is slow: at every stop it is mid-gradient, which it must finish first.
    sim = make_sim("rennala_nigt", [1.0, 2.5], M=3, cancel=False, comm=0.0)
    sim.enable_trace()
    for _ in range(5):
        sim.step()
    trace = sim.trace
    checked = 0
    for version, worker, job, start, finish, status in trace:
        if status != "discarded":
            continue
        nxt = next((r for r in trace if r[1] == worker and r[2] == job + 1), None)
        if nxt is None:
            continue  # the last round's stale job: no next round simulated
        assert nxt[0] == version + 1 and nxt[3] == pytest.approx(finish, rel=1e-12)
        checked += 1
    assert checked >= 3
    # the trajectories it finished and discarded are counted as computed but never used
    discarded = sum(1 for r in trace if r[5] == "discarded")
    assert sim.totals.trajectories_computed == sim.totals.trajectories + discarded


@pytest.mark.parametrize("cancel", [True, False])
def test_a_worker_whose_download_lands_after_the_stop_starts_nothing(cancel):
    """Worker 1's point arrives at 5.0, after the round stopped at 1.0 (worker 0, M = 1): its job
    never starts, so with cancel: false it does not block worker 1 in the next round either."""
    sim = make_sim("rennala_nigt", [0.5, 0.5], M=1, comm=[0.5, 5.0], cancel=cancel)
    sim.enable_trace()
    for _ in range(3):
        sim.step()
    assert [r[5] for r in sim.trace if r[1] == 1] == ["unstarted"] * 3
    assert sim.busy_until == [0.0, 0.0] and sim.totals.trajectories_computed == 3
    assert round_durations(sim, 1)[0] == pytest.approx(0.5 + 0.5 + 0.5)  # download, job, upload of worker 0


@pytest.mark.parametrize("name", ["rennala_nigt", "malenia_nigt", "sync_nigt", "afedpg"])
def test_same_seed_gives_identical_events(name):
    def run(seed):
        sim = make_sim(name, [1.0, 2.0, 3.0], M=6, seed=seed, comm=0.3,
                       compute={"dist": "lognormal", "mean": "sqrt", "spread": 0.5}, cancel=False)
        sim.enable_trace()
        for _ in range(20):
            sim.step()
        return sim.trace, sim.alg.theta.copy(), sim.totals
    a, b, c = run(1), run(1), run(2)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[0] != c[0]


def test_round_streams_give_equal_schedules_equal_samples():
    """At equal times Rennala and synchronous NIGT run the same schedule (each worker computes
    M/n gradients per round); Rennala's extra jobs, cancelled at each stop, use up
    job indices. Keyed by job, the two then draw different noise from round 2 on; keyed by
    (round, index in round) they are the same run: common random numbers."""
    def run(name, streams):
        sim = make_sim(name, [1.0] * 4, M=8, comm=0.25, seed=3, streams=streams)
        clocks = []
        for _ in range(6):
            sim.step()
            clocks.append(sim.clock)
        return sim, clocks
    (ren, ren_clock), (syn, syn_clock) = run("rennala_nigt", "round"), run("sync_nigt", "round")
    assert ren_clock == syn_clock
    assert ren.next_job != syn.next_job  # Rennala started (and dropped) extra jobs
    np.testing.assert_array_equal(ren.alg.theta, syn.alg.theta)
    (ren_j, _), (syn_j, _) = run("rennala_nigt", "job"), run("sync_nigt", "job")
    assert not np.array_equal(ren_j.alg.theta, syn_j.alg.theta)
    # the schedule (clock, counts) does not depend on the streams; the first round is the same
    assert ren_j.clock == ren.clock and ren_j.totals.trajectories == ren.totals.trajectories


def test_round_sample_keys_never_meet_job_keys():
    from apga.rng import round_sample
    keys = {round_sample(r, k) for r in range(50) for k in range(50)}
    assert len(keys) == 2500 and min(keys) >= 2**63
    with pytest.raises(ValueError):
        round_sample(0, 2**32)


@pytest.mark.parametrize("dist", ["exponential", "uniform", "gamma", "lognormal"])
def test_random_compute_times_have_the_requested_mean(dist):
    from apga.runtime.timing import ComputeTime
    ct = ComputeTime({"dist": dist, "mean": [2.0, 5.0], "spread": 0.5}, 2, seed=3)
    for w, mean in enumerate([2.0, 5.0]):
        draws = np.array([ct(w, j, 0.0) for j in range(4000)])
        cv = 1.0 if dist == "exponential" else 0.5
        assert abs(draws.mean() - mean) < 4 * cv * mean / math.sqrt(len(draws))
        assert draws.min() >= 0
    assert ct(1, 17, 0.0) == ct(1, 17, 99.0)  # a pure function of (seed, worker, job)


def test_schedule_and_trace_models(tmp_path):
    from apga.runtime.timing import ComputeTime
    ct = ComputeTime({"schedule": [{"until": 10, "times": [1, 2]}, {"times": "linear"}]}, 2, seed=0)
    assert ct(1, 0, 9.99) == 2 and ct(1, 0, 10.0) == 2 and ct(0, 0, 10.0) == 1
    assert ComputeTime({"schedule": [{"until": 10, "times": [1, 2]}, {"times": [3, 4]}]}, 2, 0)(1, 0, 11) == 4
    trace = tmp_path / "t.csv"
    trace.write_text("worker,seconds\n0,1.5\n1,2\n0,0.5\n")
    ct = ComputeTime({"trace": str(trace)}, 2, seed=0)
    assert [ct(0, j, 0) for j in range(4)] == [1.5, 0.5, 1.5, 0.5]
    assert ct(1, 5, 0) == 2.0


def test_ring_allreduce_model():
    times = TimeModel(1.0, 0.0, {"bandwidth": 1e6, "latency": 0.01, "bytes_per_param": 4}, 4, 1000, 0)
    assert times.allreduce == pytest.approx(2 * 3 / 4 * 1000 * 4 / 1e6 + 0.01)
    assert TimeModel(1.0, [0.1, 0.4, 0.2, 0.3], None, 4, 10, 0).allreduce == 0.4
    sqrt_d = TimeModel(1.0, "sqrt_d", None, 3, 16, 0).comm
    assert sqrt_d == pytest.approx([math.sqrt(i) * 2 for i in (1, 2, 3)])


@pytest.mark.parametrize("name", ["rennala_nigt", "malenia_nigt", "sync_nigt"])
@pytest.mark.parametrize("aggregation", ["server", "allreduce"])
@pytest.mark.parametrize("n,M", [(10, 32), (10, 7), (25, 50)])
def test_simulator_agrees_with_theory_for_sqrt_times(name, aggregation, n, M):
    from apga import theory
    h = [math.sqrt(i) for i in range(1, n + 1)]
    for kappa, allreduce in ((0.0, 0.0), (h, 2.5)):
        sim = make_sim(name, h, M=M, comm=kappa, allreduce=allreduce, aggregation=aggregation)
        expected = theory.round_time(name, h, M, kappa, allreduce, aggregation)
        for d in round_durations(sim, 3):
            assert d == pytest.approx(expected, rel=1e-12)
