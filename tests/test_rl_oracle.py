"""RLOracle: GPOMDP unbiasedness against exact gradients, determinism, non-finite safety, evaluation."""
import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from apga.config import EnvConfig, PolicyConfig
from apga.errors import ConfigError
from apga.oracle import policies
from apga.oracle.rl import RLOracle

# ----------------------------------------------------------------------------- a tiny known MDP
# Two contexts c (picked at reset with probability 1/2 each), a fixed observation sequence per
# context, reward -(a_t - target_t)^2 (continuous) or a table lookup (discrete). The episode ends
# after step 0 if the first action is "high" (a_0 > 1.5, or index 2). The env itself never stops
# otherwise: only the horizon H = 3 (TimeLimit) does, and steps t >= 3 would still pay rewards.
CONTEXTS = np.array(
    [[[1.0, 0.5], [-0.5, 1.0], [0.3, -1.0], [0.8, 0.8]], [[-1.0, 0.2], [0.6, -0.4], [-0.2, 0.9], [0.1, 0.1]]]
)
TARGETS = np.array([[2.0, 0.0, 1.0, 2.5], [-0.5, 1.5, 0.5, 0.0]])
TABLE = np.array(  # [context, t, action]
    [[[1.0, -0.5, 0.3], [0.0, 1.0, -1.0], [0.5, -0.2, 0.8], [3.0, 3.0, 3.0]],
     [[-1.0, 0.6, 0.1], [0.7, -0.3, 0.2], [-0.4, 0.9, 0.0], [3.0, 3.0, 3.0]]]
)
LOW, HIGH, THRESH, H, GAMMA = -1.0, 3.0, 1.5, 3, 0.9


class TinyMDP(gym.Env):
    def __init__(self, discrete=False, context=None, reward_scale=1.0, bad=None):
        self.observation_space = spaces.Box(-2.0, 2.0, (2,), np.float64)
        self.action_space = spaces.Discrete(3) if discrete else spaces.Box(LOW, HIGH, (1,), np.float64)
        self.discrete, self.context, self.reward_scale, self.bad = discrete, context, reward_scale, bad

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.c = int(self.np_random.integers(2)) if self.context is None else self.context
        self.t = 0
        return CONTEXTS[self.c, 0].copy(), {}

    def step(self, action):
        c, t = self.c, self.t
        if self.discrete:
            r, high = TABLE[c, t, int(action)], int(action) == 2
        else:
            a = float(np.asarray(action).reshape(-1)[0])
            r, high = -((a - TARGETS[c, t]) ** 2), a > THRESH
        obs = CONTEXTS[c, min(t + 1, 3)].copy()
        self.t += 1
        if self.bad == "nan_reward" and t == 1 and high:
            r = float("nan")
        if self.bad == "inf_obs" and t == 1 and c == 1:
            obs[0] = np.inf
        if self.bad == "huge_reward":
            r = 1e308
        return obs, float(r) * self.reward_scale, bool(t == 0 and high), False, {}


if "ApgaTinyMDP-v0" not in gym.registry:
    gym.register("ApgaTinyMDP-v0", entry_point=TinyMDP)


def tiny_oracle(n_workers=1, seed=0, hidden=(4,), rollout_batch=64, horizon=H, **env_kwargs):
    env = EnvConfig(id="ApgaTinyMDP-v0", horizon=horizon, gamma=GAMMA, kwargs=env_kwargs)
    return RLOracle(env, PolicyConfig(hidden=list(hidden), init_std=0.8, rollout_batch=rollout_batch), n_workers, seed)


# ----------------------------------------------------------------------------- the exact gradient
def ref_head(spec, params, obs):
    """Independent numpy forward (no apga forward code)."""
    x = np.asarray(obs, dtype=np.float64)
    layers = policies.unpack(spec, params)
    for i, (w, b) in enumerate(layers):
        x = np.einsum("bk,kj->bj", x, w) + b
        if i < len(layers) - 1:
            x = np.tanh(x)
    return x


GH_X, GH_W = np.polynomial.hermite_e.hermegauss(150)  # E f(u), u ~ N(mu, s^2) = sum w f(mu + s x) / sqrt(2 pi)


def exact_return(spec, params, gamma=GAMMA, termination=True):
    """J(theta) = E[sum_{t<H} gamma^t r_t] by quadrature (continuous) or enumeration (discrete)."""
    total = 0.0
    for c in range(2):
        head = ref_head(spec, params, CONTEXTS[c, :H])
        if spec.kind == "gaussian":
            mu, sig = head[:, 0], np.log1p(np.exp(head[:, 1])) + policies.MIN_STD
            u = mu[:, None] + sig[:, None] * GH_X[None, :]
            a = (LOW + HIGH) / 2 + (HIGH - LOW) / 2 * np.tanh(u)
            er = (-((a - TARGETS[c, :H, None]) ** 2) * GH_W).sum(axis=1) / math.sqrt(2 * math.pi)
            z = (math.atanh((THRESH - (LOW + HIGH) / 2) / ((HIGH - LOW) / 2)) - mu[0]) / sig[0]
            p_continue = 0.5 * (1 + math.erf(z / math.sqrt(2)))
        else:
            p = np.exp(head - head.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            er = (p * TABLE[c, :H]).sum(axis=1)
            p_continue = 1 - p[0, 2]
        if not termination:
            p_continue = 1.0
        total += 0.5 * (er[0] + p_continue * sum(gamma**t * er[t] for t in range(1, H)))
    return total


def exact_gradient(spec, params, **kw):
    eps = 1e-6
    return np.array(
        [(exact_return(spec, params + eps * e, **kw) - exact_return(spec, params - eps * e, **kw)) / (2 * eps) for e in np.eye(spec.dim)]
    )


@pytest.mark.parametrize("discrete", [False, True])
def test_gpomdp_mean_matches_the_exact_gradient(discrete):
    n_workers, per_worker = 100, 100
    oracle = tiny_oracle(n_workers=n_workers, rollout_batch=500, discrete=discrete)
    spec = oracle.spec
    point = oracle.initial_point() + 0.4 * np.random.default_rng(1).standard_normal(oracle.dim)
    exact = exact_gradient(spec, point)

    res = oracle.gradients(point, [(w, j) for w in range(n_workers) for j in range(per_worker)])
    assert all(res[w].count == per_worker and res[w].rejected == 0 for w in range(n_workers))
    # 100 independent batch means of 100 trajectories each: ~normal, unbiased for grad J_H
    means = np.array([res[w].grad_sum / res[w].count for w in range(n_workers)])
    mean, se = means.mean(axis=0), means.std(axis=0, ddof=1) / math.sqrt(n_workers)
    z = np.abs(mean - exact) / se
    assert z.max() <= 4.0, f"max |z| = {z.max():.2f} at coordinate {z.argmax()}"
    # The test has power: the gradient is resolved, and plausible wrong answers are rejected.
    assert (np.abs(exact) / se > 10).sum() >= 5
    for wrong in (exact_gradient(spec, point, gamma=0.5), exact_gradient(spec, point, termination=False)):
        assert (np.abs(mean - wrong) / se).max() > 6
    # lengths: 1 (terminated after the first step) or H (cut by the horizon), nothing else
    lengths = np.concatenate([res[w].lengths for w in range(n_workers)])
    assert set(lengths.tolist()) == {1, H}
    assert sum(res[w].env_steps for w in range(n_workers)) == lengths.sum()


# ----------------------------------------------------------------------------- determinism
def pendulum_oracle(rollout_batch, n_workers=4, seed=7):
    # InvertedDoublePendulum: episodes end at different times (so batches shrink while rolling
    # out) and returns are real-valued fingerprints of the trajectories.
    env = EnvConfig(id="InvertedDoublePendulum-v5", horizon=40, gamma=0.99, invert_obs=True)
    return RLOracle(env, PolicyConfig(hidden=[16, 16], rollout_batch=rollout_batch), n_workers, seed)


def per_job(jobs, res, field):
    """{job: value} from per-worker results (each worker's stats are in its job order)."""
    out, pos = {}, {}
    for w, j in jobs:
        k = pos.get(w, 0)
        out[(w, j)] = getattr(res[w], field)[k]
        pos[w] = k + 1
    return out


def test_trajectories_are_bit_identical_in_any_batch():
    jobs = [(w, j) for w in range(4) for j in range(5)]
    base = pendulum_oracle(rollout_batch=64)
    point = base.initial_point() + 0.3 * np.random.default_rng(0).standard_normal(base.dim)
    ref = base.gradients(point, jobs)
    ref_ret, ref_len = per_job(jobs, ref, "returns"), per_job(jobs, ref, "lengths")
    assert len(set(ref_len.values())) > 3  # trajectories really drop out at different steps

    shuffled = [jobs[i] for i in np.random.default_rng(1).permutation(len(jobs))]
    mixed = [(3, 9), (0, 7)] + jobs[::2] + [(1, 11)]  # a subset, with extra jobs around it
    for rb, js in [(1, jobs), (3, shuffled), (7, mixed), (64, shuffled), (64, mixed)]:
        # rb 64: the same oracle again (its cached envs are reused, in other slots)
        res = (base if rb == 64 else pendulum_oracle(rollout_batch=rb)).gradients(point, js)
        ret, ln = per_job(js, res, "returns"), per_job(js, res, "lengths")
        for job in js:
            if job in ref_ret:
                assert ret[job] == ref_ret[job] and ln[job] == ref_len[job], (rb, job)
    # different jobs are different trajectories
    assert len(set(ref_ret.values())) == len(jobs)


def test_single_trajectory_gradients_are_bit_identical_in_any_batch():
    # one job per worker: each worker's grad_sum is one trajectory's GPOMDP gradient
    jobs = [(w, 3 * w) for w in range(8)]
    point = pendulum_oracle(1, n_workers=8).initial_point()
    ref = pendulum_oracle(64, n_workers=8).gradients(point, jobs)
    for rb, js in [(1, jobs), (3, jobs[::-1]), (5, jobs[2:] + jobs[:2])]:
        res = pendulum_oracle(rb, n_workers=8).gradients(point, js)
        for w, _ in js:
            assert np.array_equal(res[w].grad_sum, ref[w].grad_sum), (rb, w)
            assert np.any(res[w].grad_sum != 0)


def test_worker_sums_exact_for_the_same_chunks_and_close_otherwise():
    jobs = [(w, j) for w in range(4) for j in range(6)]
    oracle = pendulum_oracle(rollout_batch=4)
    point = oracle.initial_point()
    ref = oracle.gradients(point, jobs)
    # Workers 0 and 2 share an env (even flag); adding jobs of the odd workers or reordering the
    # two env groups keeps every even worker's chunks the same sub-lists: exact equality.
    odd_first = [jb for jb in jobs if jb[0] % 2] + [(1, 40), (3, 41)] + [jb for jb in jobs if jb[0] % 2 == 0]
    res = pendulum_oracle(rollout_batch=4).gradients(point, odd_first)
    for w in (0, 2):
        assert np.array_equal(res[w].grad_sum, ref[w].grad_sum)
    # A different rollout_batch changes the chunks: the same trajectories, summed in another
    # grouping, so equal only up to float rounding (and counts/returns exactly equal).
    for rb in (1, 5):
        res = pendulum_oracle(rollout_batch=rb).gradients(point, jobs)
        for w in range(4):
            np.testing.assert_allclose(res[w].grad_sum, ref[w].grad_sum, rtol=1e-10, atol=1e-10 * np.abs(ref[w].grad_sum).max())
            assert res[w].count == ref[w].count == 6
            assert np.array_equal(res[w].returns, ref[w].returns)


def test_initial_point_depends_only_on_the_seed():
    a, b, c = (tiny_oracle(seed=s).initial_point() for s in (3, 3, 4))
    assert a.dtype == np.float64 and a.shape == (tiny_oracle().dim,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ----------------------------------------------------------------------------- bookkeeping, safety
def test_results_per_worker_in_job_order():
    oracle = tiny_oracle(n_workers=3, rollout_batch=2)
    point = oracle.initial_point()
    jobs = [(2, 0), (0, 0), (2, 1), (2, 2), (0, 1)]
    res = oracle.gradients(point, jobs)
    assert list(res) == [2, 0]
    assert res[2].count == 3 and res[0].count == 2
    assert res[2].env_steps == res[2].lengths.sum()
    alone = oracle.gradients(point, [(2, 1)])
    assert res[2].returns[1] == alone[2].returns[0]  # returns follow the worker's job order


@pytest.mark.parametrize("bad", ["nan_reward", "inf_obs"])
def test_non_finite_trajectories_are_rejected(bad):
    oracle = tiny_oracle(n_workers=2, rollout_batch=16, bad=bad)
    jobs = [(w, j) for w in range(2) for j in range(40)]
    res = oracle.gradients(oracle.initial_point(), jobs)
    rejected = sum(r.rejected for r in res.values())
    assert 0 < rejected < 80
    for r in res.values():
        assert r.count + r.rejected == 40
        assert np.all(np.isfinite(r.grad_sum)) and np.any(r.grad_sum != 0)
        assert np.all(np.isfinite(r.returns)) and len(r.returns) == r.count
    # the surviving trajectories are exactly those of the clean env with the same seeds
    clean = tiny_oracle(n_workers=2, rollout_batch=16).gradients(oracle.initial_point(), jobs)
    for w in range(2):
        assert set(res[w].returns.tolist()) <= set(clean[w].returns.tolist())


def test_non_finite_gradient_drops_the_partial_sum():
    oracle = tiny_oracle(n_workers=2, rollout_batch=4, bad="huge_reward")  # weights overflow to inf
    res = oracle.gradients(oracle.initial_point(), [(0, 0), (0, 1), (1, 0)])
    assert res[0].rejected == 2 and res[0].count == 0 and res[1].rejected == 1
    assert np.array_equal(res[0].grad_sum, np.zeros(oracle.dim))
    assert res[0].env_steps > 0


def test_baseline_and_normalize_returns_options():
    point = tiny_oracle().initial_point() + 0.4 * np.random.default_rng(1).standard_normal(tiny_oracle().dim)
    jobs = [(0, j) for j in range(32)]

    def grad(scale=1.0, **opts):
        env = EnvConfig(id="ApgaTinyMDP-v0", horizon=H, gamma=GAMMA, kwargs={"reward_scale": scale})
        pol = PolicyConfig(hidden=[4], init_std=0.8, rollout_batch=8, **opts)
        return RLOracle(env, pol, 1, 0).gradients(point, jobs)[0].grad_sum

    plain = grad()
    # baseline: a lone trajectory per (chunk, worker) has its weights minus their own mean = 0
    env = EnvConfig(id="ApgaTinyMDP-v0", horizon=H, gamma=GAMMA)
    lone = RLOracle(env, PolicyConfig(hidden=[4], rollout_batch=1, baseline=True), 1, 0).gradients(point, jobs[:3])
    assert np.array_equal(lone[0].grad_sum, np.zeros_like(plain))
    based = grad(baseline=True)
    assert np.all(np.isfinite(based)) and not np.allclose(based, plain)
    # normalize_returns: invariant to the reward scale, unlike the plain estimator
    np.testing.assert_allclose(grad(normalize_returns=True), grad(10.0, normalize_returns=True), rtol=1e-6, atol=1e-12)  # up to the 1e-8 std floor
    np.testing.assert_allclose(grad(10.0), 10 * plain, rtol=1e-9)


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_greedy_equals_the_exact_average_task_return():
    # fixed context 0, invert_obs: workers 0, 2 see (s, 0), worker 1 sees (-s, 1)
    env = EnvConfig(id="ApgaTinyMDP-v0", horizon=H, gamma=GAMMA, invert_obs=True, kwargs={"context": 0})
    oracle = RLOracle(env, PolicyConfig(hidden=[4], init_std=0.8), 3, 0)
    point = oracle.initial_point() + 0.4 * np.random.default_rng(2).standard_normal(oracle.dim)

    def greedy_return(flag):
        total = 0.0
        for t in range(H):
            obs = np.concatenate([(1 - 2 * flag) * CONTEXTS[0, t], [flag]])[None]
            a = (LOW + HIGH) / 2 + (HIGH - LOW) / 2 * np.tanh(ref_head(oracle.spec, point, obs)[0, 0])
            total += -((a - TARGETS[0, t]) ** 2)
            if t == 0 and a > THRESH:
                break
        return total

    r0, r1 = greedy_return(0), greedy_return(1)
    assert r0 != r1
    np.testing.assert_allclose(oracle.evaluate(point, episodes=3, key=5), (2 * r0 + r1) / 3, rtol=1e-12)


def test_evaluate_is_repeatable_and_keyed():
    oracle = tiny_oracle(n_workers=2, rollout_batch=4)
    point = oracle.initial_point()
    a = oracle.evaluate(point, episodes=10, key=1, deterministic=False)
    assert a == tiny_oracle(n_workers=2, rollout_batch=7).evaluate(point, episodes=10, key=1, deterministic=False)
    assert a != oracle.evaluate(point, episodes=10, key=2, deterministic=False)
    assert np.isfinite(oracle.evaluate(point, episodes=10, key=1))


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    "env, policy, n, match",
    [
        (EnvConfig(id="ApgaTinyMDP-v0"), PolicyConfig(rollout_batch=0), 1, r"policy\.rollout_batch"),
        (EnvConfig(id="ApgaTinyMDP-v0", gamma=1.5), PolicyConfig(), 1, r"env\.gamma"),
        (EnvConfig(id="ApgaTinyMDP-v0", horizon=0), PolicyConfig(), 1, r"env\.horizon"),
        (EnvConfig(id="ApgaTinyMDP-v0", per_worker=[{}, {}, {}]), PolicyConfig(), 2, r"env\.per_worker"),
        (EnvConfig(id="ApgaTinyMDP-v0", per_worker=[{}, {"kwargs": {"discrete": True}}]), PolicyConfig(), 2, r"spaces must match"),
        (EnvConfig(id="ApgaTinyMDP-v0", per_worker=[{}, {"bogus": 1}]), PolicyConfig(), 2, r"per_worker\[1\]\.bogus"),
        (EnvConfig(id="NoSuchEnv-v3"), PolicyConfig(), 1, r"^env\.id"),
    ],
)
def test_bad_configuration_raises_config_error(env, policy, n, match):
    with pytest.raises(ConfigError, match=match):
        RLOracle(env, policy, n, 0)
