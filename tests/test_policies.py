"""Functional policies: layout, init, numpy vs torch forwards, score vs finite differences."""
import math

import numpy as np
import pytest
import torch
from gymnasium import spaces

from apga import rng
from apga.errors import ConfigError
from apga.oracle import policies

OBS = spaces.Box(-np.inf, np.inf, (5,), np.float64)
SYM = spaces.Box(-2.0, 2.0, (3,), np.float32)
ASYM = spaces.Box(np.array([-1.0, 0.0]), np.array([3.0, 0.5]), dtype=np.float64)
DISC = spaces.Discrete(4)


def ref_head(spec, params, obs):
    """Independent forward: plain per-layer loops over the documented layout."""
    x = np.asarray(obs, dtype=np.float64)
    layers = policies.unpack(spec, params)
    for i, (w, b) in enumerate(layers):
        x = np.array([[sum(row[k] * w[k, j] for k in range(w.shape[0])) + b[j] for j in range(w.shape[1])] for row in x])
        if i < len(layers) - 1:
            x = np.tanh(x)
    return x


def random_point(spec, seed=0, scale=0.5):
    # Away from the init (tiny heads) so every block of the network matters.
    g = np.random.default_rng(seed)
    return policies.init_params(spec, g) + scale * g.standard_normal(spec.dim)


@pytest.mark.parametrize("act_space", [SYM, ASYM, DISC])
def test_layout_dim_and_unpack_views(act_space):
    spec = policies.make_spec(OBS, act_space, hidden=[7, 6], init_std=0.5)
    out = 2 * act_space.shape[0] if isinstance(act_space, spaces.Box) else act_space.n
    assert spec.dim == 5 * 7 + 7 + 7 * 6 + 6 + 6 * out + out
    params = np.arange(spec.dim, dtype=np.float64)
    layers = policies.unpack(spec, params)
    assert [w.shape for w, _ in layers] == [(5, 7), (7, 6), (6, out)]
    layers[1][0][0, 0] = -1.0  # views, not copies
    assert params[5 * 7 + 7] == -1.0


def test_init_is_deterministic_orthogonal_and_sets_init_std():
    spec = policies.make_spec(OBS, SYM, hidden=[64, 64], init_std=0.37)
    a = policies.init_params(spec, rng.stream(3, rng.INIT))
    b = policies.init_params(spec, rng.stream(3, rng.INIT))
    c = policies.init_params(spec, rng.stream(4, rng.INIT))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    (w0, b0), (w1, _), _ = policies.unpack(spec, a)
    np.testing.assert_allclose(w1.T @ w1, 2.0 * np.eye(64), atol=1e-10)  # orthogonal, gain sqrt 2
    np.testing.assert_allclose(w0 @ w0.T, 2.0 * np.eye(5), atol=1e-10)  # wide matrix: orthonormal rows
    assert np.all(b0 == 0)
    obs = np.random.default_rng(0).standard_normal((50, 5))
    mu, sigma = policies.mean_std(spec, a, obs)
    assert np.abs(mu).max() < 0.1  # small mean head
    np.testing.assert_allclose(sigma, 0.37, rtol=0.05)


@pytest.mark.parametrize("act_space", [SYM, ASYM, DISC])
def test_numpy_forward_matches_independent_reference_and_torch(act_space):
    spec = policies.make_spec(OBS, act_space, hidden=[6, 5], init_std=0.6)
    params = random_point(spec)
    obs = np.random.default_rng(1).standard_normal((9, 5))
    head = ref_head(spec, params, obs)
    t_params, t_obs = torch.from_numpy(params), torch.from_numpy(obs)
    if spec.kind == "gaussian":
        mu, sigma = policies.mean_std(spec, params, obs)
        np.testing.assert_allclose(mu, head[:, : spec.act_dim], rtol=1e-12, atol=1e-12)
        ref_sigma = np.log1p(np.exp(head[:, spec.act_dim :])) + policies.MIN_STD
        np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-12)
        u, _ = policies.sample(spec, params, obs, np.random.default_rng(2).standard_normal((9, spec.act_dim)))
        ref_logp = (-0.5 * ((u - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(axis=1)
        got = policies.log_prob(spec, t_params, t_obs, torch.from_numpy(u)).numpy()
    else:
        p = policies.probs(spec, params, obs)
        ref_p = np.exp(head) / np.exp(head).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(p, ref_p, rtol=1e-12)
        idx = np.arange(9) % spec.act_dim
        ref_logp = np.log(ref_p[np.arange(9), idx])
        got = policies.log_prob(spec, t_params, t_obs, torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(got, ref_logp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act_space", [SYM, DISC])
def test_log_prob_gradient_matches_finite_differences(act_space):
    spec = policies.make_spec(OBS, act_space, hidden=[6, 5], init_std=0.6)
    params = random_point(spec, seed=5)
    g = np.random.default_rng(6)
    obs = g.standard_normal((7, 5))
    noise = policies.draw_noise(spec, g, 7)
    samples, _ = policies.sample(spec, params, obs, noise)
    weights = g.standard_normal(7)

    def f(p):
        lp = policies.log_prob(spec, torch.from_numpy(p), torch.from_numpy(obs), torch.from_numpy(samples))
        return float((torch.from_numpy(weights) * lp).sum())

    theta = torch.from_numpy(params.copy()).requires_grad_(True)
    lp = policies.log_prob(spec, theta, torch.from_numpy(obs), torch.from_numpy(samples))
    (grad,) = torch.autograd.grad((torch.from_numpy(weights) * lp).sum(), theta)
    eps = 1e-6
    fd = np.array([(f(params + eps * e) - f(params - eps * e)) / (2 * eps) for e in np.eye(spec.dim)])
    np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-6, atol=1e-7)
    assert np.abs(fd).max() > 1e-2  # not a vacuous comparison


def test_gaussian_sample_uses_the_noise_and_squashes_into_the_box():
    spec = policies.make_spec(OBS, ASYM, hidden=[8], init_std=0.6)
    params = random_point(spec)
    obs = np.random.default_rng(0).standard_normal((6, 5))
    noise = np.random.default_rng(1).standard_normal((6, 2)) * 3
    u, a = policies.sample(spec, params, obs, noise)
    mu, sigma = policies.mean_std(spec, params, obs)
    np.testing.assert_array_equal(u, mu + sigma * noise)
    np.testing.assert_allclose(a, np.array([1.0, 0.25]) + np.array([2.0, 0.25]) * np.tanh(u), rtol=1e-15)
    assert np.all(a >= ASYM.low) and np.all(a <= ASYM.high)
    # symmetric box: bound * tanh(u); greedy: bound * tanh(mu)
    spec = policies.make_spec(OBS, SYM, hidden=[8], init_std=0.6)
    params = random_point(spec)
    u, a = policies.sample(spec, params, obs, np.random.default_rng(1).standard_normal((6, 3)))
    np.testing.assert_array_equal(a, np.tanh(u) * 2.0)
    mu, _ = policies.mean_std(spec, params, obs)
    np.testing.assert_array_equal(policies.greedy_action(spec, params, obs), np.tanh(mu) * 2.0)


def test_categorical_inverse_cdf_sampling_has_the_policy_frequencies():
    spec = policies.make_spec(OBS, DISC, hidden=[8], init_std=0.6)
    params = random_point(spec, scale=1.0)
    obs = np.tile(np.random.default_rng(0).standard_normal((1, 5)), (40000, 1))
    p = policies.probs(spec, params, obs[:1])[0]
    idx, act = policies.sample(spec, params, obs, np.random.default_rng(1).random(40000))
    assert np.array_equal(idx, act) and idx.dtype == np.int64
    freq = np.bincount(idx, minlength=4) / 40000
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / 40000)), (freq, p)
    assert policies.greedy_action(spec, params, obs[:1])[0] == np.argmax(p)


@pytest.mark.parametrize("act_space", [SYM, DISC])
def test_rows_do_not_depend_on_batch_size_position_or_alignment(act_space):
    # The property that makes trajectories independent of their batch: bit-identical rows.
    spec = policies.make_spec(spaces.Box(-np.inf, np.inf, (11,)), act_space, hidden=[64, 64], init_std=0.6)
    params = random_point(spec)
    g = np.random.default_rng(0)
    obs = g.standard_normal((70, 11))
    noise = policies.draw_noise(spec, g, 70)
    full_s, full_a = policies.sample(spec, params, obs, noise)
    full_g = policies.greedy_action(spec, params, obs)
    for start, size in [(0, 1), (5, 1), (3, 2), (1, 7), (10, 33), (0, 64), (2, 68)]:
        buf = np.empty(size * 11 + 1)  # misaligned copy of the rows
        sub = buf[1:].reshape(size, 11)
        sub[:] = obs[start : start + size]
        s, a = policies.sample(spec, params, sub, noise[start : start + size])
        assert np.array_equal(s, full_s[start : start + size])
        assert np.array_equal(a, full_a[start : start + size])
        assert np.array_equal(policies.greedy_action(spec, params, sub), full_g[start : start + size])


def test_unsupported_spaces_and_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="observation"):
        policies.make_spec(spaces.Discrete(3), DISC)
    with pytest.raises(ConfigError, match="action space"):
        policies.make_spec(OBS, spaces.MultiBinary(3))
    with pytest.raises(ConfigError, match="bounded and unbounded"):
        policies.make_spec(OBS, spaces.Box(np.array([-1.0, -np.inf]), np.array([1.0, np.inf]), dtype=np.float64))
    with pytest.raises(ConfigError, match="policy.hidden"):
        policies.make_spec(OBS, SYM, hidden=[0])
    with pytest.raises(ConfigError, match="policy.init_std"):
        policies.make_spec(OBS, SYM, init_std=0.0)


def test_unbounded_box_is_not_squashed():
    spec = policies.make_spec(OBS, spaces.Box(-np.inf, np.inf, (2,)), hidden=[4])
    params = random_point(spec)
    obs = np.ones((3, 5))
    u, a = policies.sample(spec, params, obs, np.ones((3, 2)))
    assert np.array_equal(u, a)
