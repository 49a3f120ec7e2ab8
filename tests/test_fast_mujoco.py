"""The fast MuJoCo step path reproduces Gymnasium's envs bit for bit (full trajectories)."""
import gymnasium as gym
import numpy as np
import pytest

from apga.config import EnvConfig, PolicyConfig
from apga.oracle import fast_mujoco
from apga.oracle.envs import make_env
from apga.oracle.rl import RLOracle

pytestmark = pytest.mark.skipif(fast_mujoco.mujoco is None, reason="needs MuJoCo")

CASES = [
    ("Hopper-v5", {}, {}),
    ("Hopper-v5", {"terminate_when_unhealthy": False}, {}),
    ("Hopper-v5", {"exclude_current_positions_from_observation": False, "healthy_z_range": [0.9, 1.5]}, {}),
    ("Walker2d-v5", {}, {}),
    ("Walker2d-v5", {"terminate_when_unhealthy": False}, {"action_sign": -1, "mass_scale": 1.3}),
    ("HalfCheetah-v5", {}, {"obs_sign": -1, "friction_scale": 0.7, "gravity": [0, 0, -5.0]}),
    ("Reacher-v5", {}, {}),
    ("Reacher-v5", {}, {"action_sign": -1, "obs_sign": -1}),
]


def _pair(env_id, kwargs, per_worker, invert, worker, horizon):
    cfg = EnvConfig(id=env_id, horizon=horizon, kwargs=dict(kwargs), invert_obs=invert,
                    per_worker=[dict(per_worker)] * (worker + 1))
    return make_env(cfg, worker), make_env(cfg, worker)


@pytest.mark.parametrize("env_id,kwargs,per_worker", CASES)
@pytest.mark.parametrize("invert,worker", [(False, 0), (True, 1)])
def test_fast_step_reproduces_gymnasium_trajectories(env_id, kwargs, per_worker, invert, worker):
    horizon, batch = 200, 2
    refs, fasts = zip(*(_pair(env_id, kwargs, per_worker, invert, worker, horizon) for _ in range(batch)))
    stepper = fast_mujoco.make_stepper(list(fasts), horizon)
    assert stepper is not None
    rng = np.random.default_rng(7)
    low, high = refs[0].action_space.low.astype(np.float64), refs[0].action_space.high.astype(np.float64)
    for b in range(batch):
        o_ref = refs[b].reset(seed=100 + b)[0]
        o_fast = fasts[b].reset(seed=100 + b)[0]
        assert np.array_equal(o_ref, o_fast)
    resets = [0] * batch
    alive = list(range(batch))
    steps = terms = 0
    for t in range(horizon):
        # bounded actions, some pushed past the box (MuJoCo clamps ctrl; both paths alike)
        actions = rng.uniform(1.2 * low, 1.2 * high, size=(len(alive), len(low)))
        obs, rew, term = stepper.step(alive, actions)
        for k, b in enumerate(alive):
            o, r, te, tr, _ = refs[b].step(actions[k])
            assert np.array_equal(obs[k], o), (t, b)
            assert obs[k].dtype == np.asarray(o).dtype
            assert np.float64(rew[k]).tobytes() == np.float64(r).tobytes(), (t, b, rew[k], r)
            assert bool(term[k]) == te, (t, b)
            steps += 1
            terms += te
            if te:  # start a new episode in both (the fast path continues from env.reset)
                resets[b] += 1
                seed = 1000 * resets[b] + b
                assert np.array_equal(refs[b].reset(seed=seed)[0], fasts[b].reset(seed=seed)[0])
    assert steps == horizon * batch
    if env_id.startswith(("Hopper", "Walker")) and kwargs.get("terminate_when_unhealthy", True):
        assert terms > 0  # the termination path was exercised


def test_uncovered_envs_fall_back():
    cfg = EnvConfig(id="CartPole-v1", horizon=50)
    assert fast_mujoco.make_stepper([make_env(cfg, 0)], 50) is None
    cfg = EnvConfig(id="Hopper-v5", horizon=50)
    env = make_env(cfg, 0)
    assert fast_mujoco.make_stepper([env], 100) is None  # time limit below the horizon
    assert fast_mujoco.make_stepper([gym.wrappers.ClipAction(env)], 50) is None  # unknown wrapper
    assert fast_mujoco.make_stepper([make_env(EnvConfig(id="Humanoid-v5", horizon=50), 0)], 50) is None


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Reacher-v5"])
def test_oracle_gradients_identical_with_and_without_fast_step(env_id, monkeypatch):
    env = EnvConfig(id=env_id, horizon=120, invert_obs=True)
    pol = PolicyConfig(rollout_batch=4)
    fast, slow = RLOracle(env, pol, 3, 5), RLOracle(env, pol, 3, 5)
    slow.fast_step = False
    point = fast.initial_point() + 0.2 * np.random.default_rng(1).standard_normal(fast.dim)
    jobs = [(w, j) for j in range(3) for w in range(3)]
    a, b = fast.gradients(point, jobs), slow.gradients(point, jobs)
    for w in range(3):
        assert np.array_equal(a[w].grad_sum, b[w].grad_sum)
        assert np.array_equal(a[w].returns, b[w].returns) and np.array_equal(a[w].lengths, b[w].lengths)
    assert fast.evaluate(point, 3, key=2) == slow.evaluate(point, 3, key=2)
