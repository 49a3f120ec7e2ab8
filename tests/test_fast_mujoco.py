"""The batched MuJoCo step path reproduces Gymnasium's envs bit for bit (full trajectories)."""
import threading

import gymnasium as gym
import numpy as np
import pytest

from apga.config import EnvConfig, PolicyConfig
from apga.oracle import fast_mujoco
from apga.oracle.base import Cancelled
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
    ("Swimmer-v5", {}, {}),
    ("Swimmer-v5", {"exclude_current_positions_from_observation": False}, {"mass_scale": 0.8}),
    ("InvertedPendulum-v5", {}, {}),
    ("Ant-v5", {}, {}),
    ("Ant-v5", {"include_cfrc_ext_in_observation": False, "healthy_z_range": [0.3, 1.0]},
     {"friction_scale": 1.5, "action_sign": -1}),
    ("Humanoid-v5", {}, {}),
    ("Humanoid-v5", {"include_cinert_in_observation": False, "terminate_when_unhealthy": False},
     {"gravity": [0, 0, -7.0], "mass_scale": 1.2, "obs_sign": -1}),
]
HORIZON = {"Humanoid-v5": 120, "Ant-v5": 150}


def _envs(env_id, kwargs, per_worker, invert, worker, horizon, n):
    cfg = EnvConfig(id=env_id, horizon=horizon, kwargs=dict(kwargs), invert_obs=invert,
                    per_worker=[dict(per_worker)] * (worker + 1))
    return [make_env(cfg, worker) for _ in range(n)]


@pytest.mark.parametrize("env_id,kwargs,per_worker", CASES)
@pytest.mark.parametrize("invert,worker,threads,spare", [(False, 0, 1, 1), (True, 1, 2, 0)])
def test_batch_step_reproduces_gymnasium_trajectories(env_id, kwargs, per_worker, invert, worker, threads, spare):
    horizon, batch = HORIZON.get(env_id, 200), 3
    refs = _envs(env_id, kwargs, per_worker, invert, worker, horizon, batch)
    (env,) = _envs(env_id, kwargs, per_worker, invert, worker, horizon, 1)
    # spare = 1: one simulation never used (rows by index); 0: every simulation stepped while all
    # rows live (the whole-batch path), by index once row 0 stops
    stepper = fast_mujoco.make_stepper(env, horizon, batch + spare, threads)
    assert stepper is not None
    rng = np.random.default_rng(7)
    low, high = refs[0].action_space.low.astype(np.float64), refs[0].action_space.high.astype(np.float64)
    first = stepper.reset(range(batch), [100 + b for b in range(batch)])
    for b in range(batch):
        assert np.array_equal(first[b], refs[b].reset(seed=100 + b)[0])
    resets = [0] * batch
    alive = list(range(batch))
    steps = terms = 0
    for t in range(horizon):
        if t == horizon // 3:
            alive = alive[1:]  # unequal lengths: row 0 stops early, the others go on
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
            if te:  # a new episode in that row only, in both
                resets[b] += 1
                seed = 1000 * resets[b] + b
                assert np.array_equal(stepper.reset([b], [seed])[0], refs[b].reset(seed=seed)[0])
    assert steps > horizon * (batch - 1)
    if env_id.startswith(("Hopper", "Walker", "InvertedPendulum", "Humanoid")) and kwargs.get("terminate_when_unhealthy", True):
        assert terms > 0  # the termination path was exercised


def test_uncovered_envs_fall_back():
    cfg = EnvConfig(id="CartPole-v1", horizon=50)
    assert fast_mujoco.make_stepper(make_env(cfg, 0), 50, 2) is None
    cfg = EnvConfig(id="Hopper-v5", horizon=50)
    env = make_env(cfg, 0)
    assert fast_mujoco.make_stepper(env, 100, 2) is None  # time limit below the horizon
    assert fast_mujoco.make_stepper(gym.wrappers.ClipAction(env), 50, 2) is None  # unknown wrapper
    assert fast_mujoco.make_stepper(make_env(EnvConfig(id="Pusher-v5", horizon=50), 0), 50, 2) is None
    assert fast_mujoco.make_stepper(make_env(EnvConfig(id="Hopper-v4", horizon=50), 0), 50, 2) is None


def test_row_sums_and_einsum_equal_numpy_per_row():
    """The vectorised reductions used above equal numpy's per-row ones, for every row length."""
    rng = np.random.default_rng(3)
    for n in (2, 3, 7, 8, 9, 17, 84, 130, 348):
        for b in (1, 2, 5, 33):
            x = rng.standard_normal((b, n)) * 10.0 ** rng.uniform(-3, 3, (b, n))
            assert np.array_equal(x.sum(axis=1), [np.sum(r) for r in x])
    mass, xipos = rng.uniform(0.5, 5, 14), rng.standard_normal((9, 14, 3))
    assert np.array_equal(np.einsum("b,sbj->sj", mass, xipos), [np.einsum("b,bj->j", mass, x) for x in xipos])


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Reacher-v5", "Humanoid-v5"])
def test_oracle_gradients_identical_with_and_without_fast_step(env_id):
    horizon = 60 if env_id == "Humanoid-v5" else 120
    env = EnvConfig(id=env_id, horizon=horizon, invert_obs=True)
    pol = PolicyConfig(rollout_batch=4)
    fast, slow = RLOracle(env, pol, 3, 5, threads=2), RLOracle(env, pol, 3, 5)
    slow.fast_step = False
    assert fast.batched() and not slow.batched()
    point = fast.initial_point() + 0.2 * np.random.default_rng(1).standard_normal(fast.dim)
    jobs = [(w, j) for j in range(3) for w in range(3)]
    a, b = fast.gradients(point, jobs), slow.gradients(point, jobs)
    for w in range(3):
        assert np.array_equal(a[w].grad_sum, b[w].grad_sum)
        assert np.array_equal(a[w].returns, b[w].returns) and np.array_equal(a[w].lengths, b[w].lengths)
    assert fast.evaluate(point, 3, key=2) == slow.evaluate(point, 3, key=2)
    # AFedPG's in-flight batching: each request at its own point, one batch, same bits
    p2 = point + 0.1
    many = fast.gradients_many([(point, jobs[:4]), (p2, jobs[4:])])
    alone = [slow.gradients(point, jobs[:4]), slow.gradients(p2, jobs[4:])]
    for got, want in zip(many, alone):
        for w in want:
            assert np.array_equal(got[w].grad_sum, want[w].grad_sum)
            assert np.array_equal(got[w].returns, want[w].returns)


@pytest.mark.parametrize("name", ["rennala_nigt", "afedpg"])
def test_training_is_identical_on_1_and_2_cores(tmp_path, name):
    """runtime.processes on a covered MuJoCo env = the batch's threads, in one process: same bits."""
    import apga.run.loop as train_mod
    from apga import config as cfgmod
    from apga.oracle.parallel import ParallelOracle

    texts = []
    for processes in (1, 2):
        cfg = cfgmod.load_config({
            "seed": 2, "env": {"id": "Hopper-v5", "horizon": 40},
            "policy": {"hidden": [16, 16], "rollout_batch": 3},
            "algorithm": {"name": name, "batch_size": 6, "step_size": 0.05},
            "workers": {"n": 3, "compute_time": "sqrt"}, "runtime": {"processes": processes},
            "budget": {"iterations": 4 if name != "afedpg" else 10}, "eval": {"every": 2, "episodes": 2},
        })
        oracle = train_mod.build_oracle(cfg)
        assert isinstance(oracle, RLOracle) and not isinstance(oracle, ParallelOracle)
        assert oracle.threads == processes and oracle.batched()
        oracle.close()
        train_mod.train(cfg, str(tmp_path / f"p{processes}"), progress=False)
        texts.append((tmp_path / f"p{processes}" / "metrics.csv").read_text())
    assert texts[0] == texts[1] and texts[0].count("\n") > 4


def _same(a, b):
    assert list(a) == list(b)  # the same workers, in the same order
    for w in a:
        assert np.array_equal(a[w].grad_sum, b[w].grad_sum)
        assert np.array_equal(a[w].returns, b[w].returns) and np.array_equal(a[w].lengths, b[w].lengths)
        assert (a[w].count, a[w].env_steps, a[w].rejected) == (b[w].count, b[w].env_steps, b[w].rejected)


def test_threads_never_change_a_result_as_rollouts_grow_and_shrink():
    """One block per thread: the blocks grow for a larger rollout and are reused for smaller ones
    (odd sizes: blocks of unequal length, a rollout of one row on one thread)."""
    env, pol = EnvConfig(id="Hopper-v5", horizon=80), PolicyConfig(rollout_batch=4)
    one, two = RLOracle(env, pol, 3, 9), RLOracle(env, pol, 3, 9, threads=2)
    point = one.initial_point() + 0.3 * np.random.default_rng(2).standard_normal(one.dim)
    try:
        for n in (3, 9, 1, 5):
            jobs = [(w % 3, 100 * n + w) for w in range(n)]
            _same(two.gradients(point, jobs), one.gradients(point, jobs))
        assert len(two._steppers[two.keys[0]]) == 2
    finally:
        one.close()
        two.close()


def test_a_cancelled_rollout_on_threads_stops_every_block_within_a_step():
    env = EnvConfig(id="Hopper-v5", horizon=200, kwargs={"terminate_when_unhealthy": False})
    pol = PolicyConfig(rollout_batch=8)
    oracle, fresh = RLOracle(env, pol, 2, 3, threads=2), RLOracle(env, pol, 2, 3)
    point, jobs = oracle.initial_point(), [(w % 2, w) for w in range(8)]
    checks, lock = [], threading.Lock()

    def should_stop():  # every block checks before each of its steps
        with lock:
            checks.append(threading.current_thread().name)
            return len(checks) > 40

    try:
        with pytest.raises(Cancelled):
            oracle.gradients(point, jobs, should_stop)
        assert "MainThread" in checks and any(n.startswith("apga-oracle") for n in checks)
        assert len(checks) <= 42  # the cancel, then at most one more check by the other block
        _same(oracle.gradients(point, jobs), fresh.gradients(point, jobs))  # nothing left half-done
    finally:
        oracle.close()
        fresh.close()


def test_an_error_in_one_block_stops_the_others_and_is_raised_once():
    env = EnvConfig(id="Hopper-v5", horizon=200, kwargs={"terminate_when_unhealthy": False})
    oracle = RLOracle(env, PolicyConfig(rollout_batch=8), 2, 3, threads=2)
    main_checks = []

    def should_stop():
        if threading.current_thread() is threading.main_thread():
            main_checks.append(1)
            return False
        if len(main_checks) >= 5:
            raise ValueError("stop condition failed")
        return False

    try:
        with pytest.raises(ValueError, match="stop condition failed"):
            oracle.gradients(oracle.initial_point(), [(w % 2, w) for w in range(8)], should_stop)
        assert 5 <= len(main_checks) < 200  # the caller's block stopped long before its horizon
    finally:
        oracle.close()
