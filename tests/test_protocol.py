"""Algorithm-level guarantees: unbiasedness of the aggregators, NIGT convergence, eta = 1."""
from __future__ import annotations

import numpy as np
import pytest

from apga.oracle.base import WorkerBatch
from apga.oracle.synthetic import SyntheticOracle
from apga.protocol.afedpg import AFedPG
from apga.protocol.malenia_nigt import MaleniaNIGT, malenia_stop
from apga.protocol.nigt import NIGTState, extrapolated_point, nigt_step
from apga.protocol.rennala_nigt import RennalaNIGT, rennala_stop
from apga.protocol.sync_nigt import sync_quota, sync_stop
from apga.runtime.simulator import Simulator
from apga.runtime.timing import TimeModel


def aggregates_at_fixed_point(cls, rounds=600, seed=7):
    """Rounds of a protocol on heterogeneous workers (h_i = i, exponential times) whose steps
    cannot move theta (alpha ~ 0). With eta = 1 the NIGT momentum after each round is exactly
    that round's aggregate, so the aggregates are read off the real update path. Returns them
    and the workers' true gradients."""
    n, M = 4, 12
    oracle = SyntheticOracle(n, seed, dim=3, noise=0.3, shift=1.5)
    times = TimeModel({"dist": "exponential", "mean": "linear"}, 0.0, None, n, oracle.dim, seed)
    alg = cls(n, oracle.initial_point(), 1e-300, momentum=1.0, batch_size=M)
    sim = Simulator(alg, oracle, times)
    g = []
    for _ in range(rounds):
        sim.step()
        g.append(alg.state.d.copy())
    theta = alg.theta
    assert np.array_equal(theta, oracle.initial_point())
    per_worker = np.array([oracle.true_gradient(theta, w) for w in range(n)])
    return np.array(g), per_worker


def test_malenia_aggregate_is_unbiased_for_the_average_gradient():
    g, per_worker = aggregates_at_fixed_point(MaleniaNIGT)
    target = per_worker.mean(axis=0)
    stderr = g.std(axis=0, ddof=1) / np.sqrt(len(g))
    z = (g.mean(axis=0) - target) / stderr
    assert np.all(np.abs(z) < 4.0), z  # 3 coordinates: a 4-sigma bound fails with prob ~2e-4


def test_rennala_aggregate_is_biased_towards_fast_workers():
    g, per_worker = aggregates_at_fixed_point(RennalaNIGT)
    target = per_worker.mean(axis=0)
    stderr = g.std(axis=0, ddof=1) / np.sqrt(len(g))
    z = (g.mean(axis=0) - target) / stderr
    assert np.max(np.abs(z)) > 8.0, z
    # the bias points to the fastest worker's gradient: closer to it than the average is
    fast = per_worker[0]
    assert np.linalg.norm(g.mean(axis=0) - fast) < np.linalg.norm(target - fast)


def test_aggregates_and_stop_rules_on_known_sums():
    batches = {0: WorkerBatch(np.array([2.0, 0.0]), 1), 1: WorkerBatch(np.array([0.0, 9.0]), 3)}
    rennala = RennalaNIGT(2, np.zeros(2), 1e-300, momentum=1.0, batch_size=4)
    rennala.finish_round(batches)
    np.testing.assert_allclose(rennala.state.d, [0.5, 2.25])  # sum of all / sum of counts
    malenia = MaleniaNIGT(2, np.zeros(2), 1e-300, momentum=1.0, batch_size=4)
    malenia.finish_round(batches)
    np.testing.assert_allclose(malenia.state.d, [1.0, 1.5])  # mean of the per-worker means
    assert rennala_stop([3, 2], 5) and not rennala_stop([3, 1], 5)
    # harmonic mean of (3, 6) = 4 = M/n for M = 8: stops exactly on the boundary
    assert malenia_stop([3, 6], 8) and not malenia_stop([3, 6], 9)
    assert not malenia_stop([0, 9], 2) and not malenia_stop([1, 9], 4)
    assert sync_quota(3, 10) == 4 and sync_stop([4, 4, 4], 10) and not sync_stop([4, 3, 9], 10)


def test_nigt_drives_the_gradient_norm_down():
    n = 4
    oracle = SyntheticOracle(n, 3, dim=8, noise=0.5, init_scale=1.0)
    times = TimeModel("sqrt", 0.0, None, n, oracle.dim, 3)
    alg = RennalaNIGT(n, oracle.initial_point(), 0.02, momentum=0.1, batch_size=16)
    sim = Simulator(alg, oracle, times)

    def grad_norm():
        return np.linalg.norm(np.mean([oracle.true_gradient(alg.theta, w) for w in range(n)], axis=0))

    start = grad_norm()
    for _ in range(400):
        sim.step()
    assert grad_norm() < 0.15 * start
    assert oracle.evaluate(alg.theta, 1, 0) > oracle.evaluate(oracle.initial_point(), 1, 0)


def test_eta_one_is_normalised_sgd_step_for_step():
    n, alpha = 3, 0.05
    oracle = SyntheticOracle(n, 9, dim=5, noise=1.0)
    times = TimeModel([1.0, 1.4, 2.0], 0.0, None, n, oracle.dim, 9)
    alg = RennalaNIGT(n, oracle.initial_point(), alpha, momentum=1.0, batch_size=6)
    sim = Simulator(alg, oracle, times)
    sim.enable_trace()
    theta = oracle.initial_point().copy()
    for version in range(30):
        sim.step()
        jobs = [(w, j) for v, w, j, _, _, s in sim.trace if v == version and s == "used"]
        batches = oracle.gradients(theta, jobs)
        g = sum(b.grad_sum for b in batches.values()) / sum(b.count for b in batches.values())
        theta = theta + alpha * g / np.linalg.norm(g)  # plain normalised SGD
        np.testing.assert_allclose(alg.theta, theta, rtol=0, atol=1e-12)


def test_nigt_step_matches_the_definition():
    rng = np.random.default_rng(0)
    theta0, eta, alpha = rng.normal(size=4), 0.3, 0.1
    s = NIGTState.initial(theta0)
    assert np.array_equal(extrapolated_point(s, eta), theta0)
    g0, g1 = rng.normal(size=4), rng.normal(size=4)
    s1, stepped = nigt_step(s, g0, alpha, eta)
    assert stepped and np.allclose(s1.theta, theta0 + alpha * g0 / np.linalg.norm(g0))
    x = extrapolated_point(s1, eta)
    assert np.allclose(x, s1.theta + (1 - eta) / eta * (s1.theta - theta0))
    s2, _ = nigt_step(s1, g1, alpha, eta)
    d1 = (1 - eta) * g0 + eta * g1
    assert np.allclose(s2.theta, s1.theta + alpha * d1 / np.linalg.norm(d1))
    zero, stepped = nigt_step(NIGTState.initial(theta0), np.zeros(4), alpha, eta)
    assert not stepped and np.array_equal(zero.theta, theta0)


def test_non_finite_aggregates_never_reach_the_parameters():
    alg = RennalaNIGT(2, np.zeros(3), 0.1, momentum=0.5, batch_size=2)
    bad = {0: WorkerBatch(np.array([np.nan, 0, 0]), 1, np.zeros(1), np.ones(1, dtype=np.int64), 1),
           1: WorkerBatch(np.ones(3), 1, np.zeros(1), np.ones(1, dtype=np.int64), 1)}
    u = alg.finish_round(bad)
    assert not u.stepped and u.rejected == 2 and np.array_equal(alg.theta, np.zeros(3))
    a = AFedPG(2, np.zeros(3), 0.1, momentum=0.5)
    u = a.apply(WorkerBatch(np.array([np.inf, 1, 1]), 1), 0)
    assert not u.stepped and np.array_equal(a.theta, np.zeros(3))


def test_afedpg_delay_schedule_shrinks_stale_steps():
    g = WorkerBatch(np.array([1.0, 0.0]), 1)
    fresh = AFedPG(2, np.zeros(2), 0.1, momentum=1.0, step_schedule="delay")
    fresh.apply(g, 0)
    stale = AFedPG(2, np.zeros(2), 0.1, momentum=1.0, step_schedule="delay")
    stale.version = 3  # three updates since the point was handed out
    stale.apply(g, 0)
    assert fresh.theta[0] == pytest.approx(0.1) and stale.theta[0] == pytest.approx(0.1 / 2)
