"""Per-worker environments: the paper's invert_obs, sign flips, MuJoCo model changes, validation."""
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from apga.config import EnvConfig
from apga.errors import ConfigError
from apga.oracle.envs import env_key, make_env, worker_settings


def run(env, actions, seed=3):
    obs = [env.reset(seed=seed)[0]]
    for a in actions:
        obs.append(env.step(a)[0])
    return np.array(obs)


def quiet_check_env(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env warns that a wrapped env is checked; expected
        check_env(env, skip_render_check=True)


ACTIONS = [np.array([v], dtype=np.float32) for v in (0.5, -1.0, 1.5, 0.0, -0.3)]


def test_invert_obs_matches_the_paper():
    cfg = EnvConfig(id="Pendulum-v1", horizon=50, invert_obs=True)
    base = run(gym.make("Pendulum-v1"), ACTIONS)
    for worker in range(4):
        env = make_env(cfg, worker)
        f = worker % 2
        assert env.observation_space.shape == (4,)
        obs = run(env, ACTIONS)
        assert obs.dtype == np.float32
        # even workers see (s, 0), odd workers see (-s, 1)
        np.testing.assert_array_equal(obs[:, :3], (1 - 2 * f) * base)
        np.testing.assert_array_equal(obs[:, 3], float(f))
        assert all(env.observation_space.contains(o) for o in obs)
        quiet_check_env(env)


def test_obs_and_action_sign_flips():
    cfg = EnvConfig(id="Pendulum-v1", per_worker=[{}, {"obs_sign": -1}, {"action_sign": -1}])
    base = run(gym.make("Pendulum-v1"), ACTIONS)
    np.testing.assert_array_equal(run(make_env(cfg, 0), ACTIONS), base)
    np.testing.assert_array_equal(run(make_env(cfg, 1), ACTIONS), -base)
    flipped = run(make_env(cfg, 2), ACTIONS)
    assert not np.allclose(flipped, base)
    np.testing.assert_array_equal(flipped, run(gym.make("Pendulum-v1"), [-a for a in ACTIONS]))
    for w in range(3):
        quiet_check_env(make_env(cfg, w))


def test_mujoco_model_changes_take_effect():
    kw = {"terminate_when_unhealthy": False}
    cfg = EnvConfig(
        id="Hopper-v5",
        kwargs=kw,
        per_worker=[{}, {"gravity": [0.0, 0.0, -3.0]}, {"mass_scale": 2.0, "friction_scale": 0.5}],
    )
    envs = [make_env(cfg, w) for w in range(3)]
    ref = gym.make("Hopper-v5", **kw).unwrapped.model
    m0, m1, m2 = (e.unwrapped.model for e in envs)
    np.testing.assert_array_equal(m0.opt.gravity, ref.opt.gravity)
    np.testing.assert_array_equal(m1.opt.gravity, [0.0, 0.0, -3.0])
    np.testing.assert_array_equal(m2.body_mass, 2.0 * ref.body_mass)
    np.testing.assert_array_equal(m2.geom_friction, 0.5 * ref.geom_friction)
    np.testing.assert_array_equal(m1.body_mass, ref.body_mass)
    # the dynamics change: same seed and actions, different trajectories (and the base is unchanged)
    acts = [np.full(3, 0.3)] * 30
    t0, t1, t2 = (run(e, acts) for e in envs)
    np.testing.assert_array_equal(t0, run(gym.make("Hopper-v5", **kw), acts))
    assert not np.allclose(t0, t1) and not np.allclose(t0, t2)
    # a reset does not undo the change
    envs[1].reset(seed=0)
    np.testing.assert_array_equal(m1.opt.gravity, [0.0, 0.0, -3.0])
    # env.spec rebuilds the changed env (check_env relies on it)
    np.testing.assert_array_equal(envs[2].spec.make().unwrapped.model.body_mass, 2.0 * ref.body_mass)
    quiet_check_env(envs[2])


def test_horizon_and_kwargs_reach_gymnasium():
    cfg = EnvConfig(id="Pendulum-v1", horizon=7, kwargs={"g": 5.0}, per_worker=[{"kwargs": {"g": 2.0}}])
    e0, e1 = make_env(cfg, 0), make_env(cfg, 1)
    assert e0.unwrapped.g == 2.0 and e1.unwrapped.g == 5.0
    e1.reset(seed=0)
    truncs = [e1.step(np.zeros(1, np.float32))[3] for _ in range(7)]
    assert truncs == [False] * 6 + [True]


def test_env_key_groups_identical_settings():
    cfg = EnvConfig(
        id="Pendulum-v1",
        invert_obs=True,
        per_worker=[{"kwargs": {"g": 5.0, "max_torque": 2.0}}, {}, {"kwargs": {"max_torque": 2.0, "g": 5.0}}],
    )
    keys = [env_key(cfg, w) for w in range(5)]
    hash(keys[0])
    assert keys[0] == keys[2]  # same kwargs in another order, same flag
    assert keys[1] == keys[3]  # odd workers, no changes
    assert keys[0] != keys[4]  # kwargs differ
    assert keys[1] != keys[4]  # flag differs
    plain = EnvConfig(id="Pendulum-v1")
    assert env_key(plain, 0) == env_key(plain, 1)
    assert env_key(plain, 0) != env_key(EnvConfig(id="Pendulum-v1", horizon=9), 0)


@pytest.mark.parametrize(
    "cfg, worker, match",
    [
        (EnvConfig(id="NoSuchEnv-v0"), 0, r"^env\.id: 'NoSuchEnv-v0'"),
        (EnvConfig(id="Hopper-v99"), 0, r"^env\.id: 'Hopper-v99'"),
        (EnvConfig(id="Pendulum-v1", kwargs={"nope": 1}), 0, r"^env\.kwargs"),
        (EnvConfig(id="Pendulum-v1", kwargs={"max_episode_steps": 3}), 0, r"env\.horizon"),
        (EnvConfig(id="FrozenLake-v1", invert_obs=True), 0, r"^env\.invert_obs: .*Box"),
        (EnvConfig(id="CartPole-v1", per_worker=[{"gravity": [0, 0, -1]}]), 0, r"^env\.per_worker\[0\]\.gravity: .*MuJoCo"),
        (EnvConfig(id="CartPole-v1", per_worker=[{}, {"mass_scale": 2}]), 1, r"^env\.per_worker\[1\]\.mass_scale: .*MuJoCo"),
        (EnvConfig(id="Pendulum-v1", per_worker=[{"mass_scael": 2}]), 0, r"mass_scael.*did you mean 'mass_scale'"),
        (EnvConfig(id="Pendulum-v1", per_worker=[{"obs_sign": 2}]), 0, r"obs_sign: expected \+1 or -1"),
        (EnvConfig(id="Hopper-v5", per_worker=[{"gravity": [0, -9.81]}]), 0, r"gravity: expected 3 numbers"),
        (EnvConfig(id="Hopper-v5", per_worker=[{"mass_scale": -1}]), 0, r"mass_scale: expected a finite positive"),
        (EnvConfig(id="CartPole-v1", per_worker=[{"action_sign": -1}]), 0, r"action_sign: needs a symmetric Box"),
        (EnvConfig(id="Pendulum-v1", per_worker=["bad"]), 0, r"per_worker\[0\]: expected a mapping"),
    ],
)
def test_bad_settings_raise_one_line_config_errors(cfg, worker, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_env(cfg, worker)
    assert "\n" not in str(info.value)


def test_worker_settings_defaults_for_missing_workers():
    s = worker_settings(EnvConfig(id="Pendulum-v1", kwargs={"g": 3.0}), 5)
    assert s == {
        "kwargs": {"g": 3.0},
        "obs_sign": 1,
        "action_sign": 1,
        "gravity": None,
        "mass_scale": None,
        "friction_scale": None,
    }
