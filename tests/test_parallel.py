"""Rollouts on several processes and AFedPG batching: bit-identical to one process, one by one;
the pool never leaks processes (close, dead process, exception, KeyboardInterrupt)."""
import subprocess
import os
import signal
import sys
import time

import gymnasium as gym
import numpy as np
import pytest

import apga.run.loop as train_mod
from apga import config as cfgmod
from apga.config import EnvConfig, PolicyConfig
from apga.oracle import parallel
from apga.oracle.parallel import ParallelOracle, PoolError, group_units, resolve_processes
from apga.oracle.rl import RLOracle
from apga.protocol.registry import make_protocol
from apga.runtime.simulator import Simulator
from apga.runtime.timing import TimeModel

# Pendulum (Gaussian policy) with the paper's heterogeneous flags: two env keys, so chunks of
# both groups; a short horizon keeps it fast.
ENV = EnvConfig(id="Pendulum-v1", horizon=40, invert_obs=True)
POL = PolicyConfig(hidden=[16, 16], rollout_batch=3)
N, SEED = 5, 11


def same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for w in a:
        x, y = a[w], b[w]
        assert np.array_equal(x.grad_sum, y.grad_sum), w
        assert (x.count, x.env_steps, x.rejected) == (y.count, y.env_steps, y.rejected), w
        assert np.array_equal(x.returns, y.returns) and np.array_equal(x.lengths, y.lengths), w


@pytest.fixture(scope="module")
def pair():
    par = ParallelOracle(ENV, POL, N, SEED, processes=2)
    one = RLOracle(ENV, POL, N, SEED)
    par.wait_ready()
    yield par, one
    par.close()
    one.close()


def assert_gone(procs) -> None:
    """The processes have ended and were reaped (no zombie left)."""
    procs = list(procs.values()) if isinstance(procs, dict) else list(procs)
    # close() has stopped them; the executor's own thread may be the one that reaps a process (its
    # exit code then shows a moment later): a generous bound that only catches a hang
    deadline = time.monotonic() + 60
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs and all(p.exitcode is not None for p in procs)
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)


def point_of(oracle, k=0):
    return oracle.initial_point() + 0.3 * np.random.default_rng(k).standard_normal(oracle.dim)


def test_gradients_are_bit_identical_to_one_process(pair):
    par, one = pair
    point = point_of(one)
    jobs = [(w, j) for j in range(4) for w in (3, 0, 4, 1, 2)]  # 20 jobs, 8 chunks over 2 env keys
    before = par.pool.units_remote
    same(par.gradients(point, jobs), one.gradients(point, jobs))
    assert par.pool.units_remote > before  # the other process really computed some chunks
    same(par.gradients(point, jobs[:1]), one.gradients(point, jobs[:1]))


def test_gradients_many_and_evaluate_are_bit_identical(pair):
    par, one = pair
    requests = [(point_of(one, k), [(k % N, 7 + k), ((k + 2) % N, 3)]) for k in range(7)]
    for got, want in zip(par.gradients_many(requests), [one.gradients(p, j) for p, j in requests]):
        same(got, want)
    for episodes in (1, 5):
        assert par.evaluate(point_of(one), episodes, key=4) == one.evaluate(point_of(one), episodes, key=4)
        assert par.evaluate(point_of(one), episodes, key=4, deterministic=False) == \
            one.evaluate(point_of(one), episodes, key=4, deterministic=False)


def test_multi_point_rollout_equals_one_chunk_at_a_time():
    one = RLOracle(ENV, PolicyConfig(hidden=[16, 16], rollout_batch=8), N, SEED)
    # a 3-job chunk packed with 5 single jobs (8 trajectories, 6 points), then 2 more singles,
    # one of them at the same point as the chunk
    tasks = [(point_of(one, 9), [(0, 1), (2, 5), (0, 2)])] + [(point_of(one, k), [(k % N, k)]) for k in range(6)]
    tasks.append((tasks[0][0], [(3, 4)]))
    together = one.run_tasks(tasks)
    for (p, chunk), got in zip(tasks, together):
        same(got, one.run_chunk(p, chunk))


class OneByOne(Simulator):
    """The simulator as it was: each AFedPG gradient computed alone, when it arrives."""

    def _gradient_of(self, worker, job, point):
        return self.oracle.gradients(point, [(worker, job)])[worker]


class Counting:
    """Oracle wrapper recording the size of every gradients_many call."""

    def __init__(self, oracle):
        self.oracle, self.sizes = oracle, []
        self.dim, self.initial_point = oracle.dim, oracle.initial_point

    def gradients_many(self, requests):
        self.sizes.append(len(requests))
        return self.oracle.gradients_many(requests)

    def gradients(self, point, jobs):
        return self.oracle.gradients(point, jobs)


def afedpg_run(sim_cls, oracle, steps=14):
    times = TimeModel("sqrt", "sqrt", None, N, oracle.dim, SEED)
    alg = make_protocol("afedpg", N, oracle.initial_point(), 0.05, 0.3, 1)
    sim = sim_cls(alg, oracle, times)
    events = [sim.step() for _ in range(steps)]
    return sim, [(e.time, e.update.grad_norm, e.update.env_steps, tuple(e.update.returns)) for e in events]


def test_afedpg_batching_is_identical_to_one_by_one(pair):
    par, one = pair
    ref_sim, ref = afedpg_run(OneByOne, one)
    counting = Counting(one)
    sim, got = afedpg_run(Simulator, counting)
    assert got == ref and np.array_equal(sim.alg.theta, ref_sim.alg.theta)
    assert max(counting.sizes) == N and len(counting.sizes) < 14  # in-flight jobs were batched
    par_sim, par_got = afedpg_run(Simulator, par)  # batched AND spread over processes
    assert par_got == ref and np.array_equal(par_sim.alg.theta, ref_sim.alg.theta)


def base_config(name: str, processes: int) -> dict:
    return {
        "seed": 3,
        "env": {"id": "CartPole-v1", "horizon": 60},
        "policy": {"hidden": [16, 16], "rollout_batch": 2},
        "algorithm": {"name": name, "batch_size": 8, "step_size": 0.05},
        "workers": {"n": 4, "compute_time": "sqrt"},
        "runtime": {"processes": processes},
        "budget": {"iterations": 6 if name != "afedpg" else 12},
        "eval": {"every": 3, "episodes": 3},
        "checkpoint": {"every": 3},
    }


@pytest.fixture(scope="module")
def cartpole_pool():
    """The oracle a `processes: 2` run of base_config builds, shared by the runs below."""
    cfg = cfgmod.load_config(base_config("rennala_nigt", 2))
    oracle = train_mod.build_oracle(cfg)
    assert isinstance(oracle, ParallelOracle) and oracle.processes == 2
    oracle.wait_ready()  # so that the other process takes part from the first round
    yield oracle
    oracle.close()
    assert_gone(oracle.pool.procs)


class KeepOpen:
    """The shared pool, handed to one run: the run's close() must not stop it."""

    def __init__(self, oracle):
        self._oracle = oracle
        self.closed = False

    def close(self):
        self.closed = True

    def __getattr__(self, name):
        return getattr(self._oracle, name)


@pytest.mark.parametrize("name", ["rennala_nigt", "afedpg"])
def test_training_runs_are_identical_with_1_and_2_processes(tmp_path, monkeypatch, cartpole_pool, name):
    built = []
    original = train_mod.build_oracle

    def build(cfg):
        built.append(original(cfg) if cfg.runtime.processes == 1 else KeepOpen(cartpole_pool))
        return built[-1]

    monkeypatch.setattr(train_mod, "build_oracle", build)
    texts = []
    remote = cartpole_pool.pool.units_remote
    for processes in (1, 2):
        cfg = cfgmod.load_config(base_config(name, processes))
        train_mod.train(cfg, str(tmp_path / f"p{processes}"), progress=False)
        texts.append((tmp_path / f"p{processes}" / "metrics.csv").read_text())
    assert isinstance(built[0], RLOracle) and built[1].closed
    assert cartpole_pool.pool.units_remote > remote  # both processes worked
    assert texts[0] == texts[1] and texts[0].count("\n") > 6


def test_build_oracle_uses_the_pool_only_when_asked():
    cfg = cfgmod.load_config(base_config("rennala_nigt", 1))
    one = train_mod.build_oracle(cfg)
    assert isinstance(one, RLOracle)
    one.close()
    ray_cfg = cfgmod.load_config({**base_config("rennala_nigt", 2), "runtime": {"name": "ray", "processes": 2}})
    on_ray = train_mod.build_oracle(ray_cfg)  # runtime.processes is the simulator's: not for Ray
    assert type(on_ray) is RLOracle
    on_ray.close()
    par = train_mod.build_oracle(cfgmod.load_config(base_config("rennala_nigt", 0)))
    try:
        assert isinstance(par, ParallelOracle if resolve_processes(0) > 1 else RLOracle)
    finally:
        par.close()  # right away, while the process may still be starting: no wait, no leak
    if isinstance(par, ParallelOracle):
        assert_gone(par.pool.procs)


def test_dead_process_raises_and_close_cleans_up():
    par = ParallelOracle(EnvConfig(id="CartPole-v1", horizon=20), PolicyConfig(rollout_batch=1), 2, 0, processes=2)
    try:
        par.wait_ready()
        procs = list(par.pool.procs.values())
        assert len(procs) == 1 and procs[0].exitcode is None
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].join(10)
        with pytest.raises(PoolError, match="exited unexpectedly"):
            for k in range(5):  # the parent may finish a call alone before it notices
                par.gradients(par.initial_point(), [(0, 10 * k + j) for j in range(6)])
        with pytest.raises(PoolError, match="unusable"):
            par.gradients(par.initial_point(), [(0, 1)])
    finally:
        par.close()
    par.close()  # idempotent
    assert_gone(procs)


class ParentOnly(gym.Env):
    """Registered in this process only: a rollout process cannot build it."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float64)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2), {}

    def step(self, action):
        return np.zeros(2), 1.0, True, False, {}


def test_a_process_that_cannot_start_is_a_one_line_error():
    if "ApgaParentOnly-v0" not in gym.registry:
        gym.register("ApgaParentOnly-v0", entry_point=ParentOnly)
    par = ParallelOracle(EnvConfig(id="ApgaParentOnly-v0", horizon=5), PolicyConfig(), 2, 0, processes=2)
    try:
        with pytest.raises(PoolError, match="could not build its oracle .*ApgaParentOnly") as info:
            par.wait_ready()
        assert "\n" not in str(info.value) and "runtime.processes: 1" in str(info.value)
    finally:
        par.close()
    assert_gone(par.pool.procs)


def test_keyboard_interrupt_in_training_leaves_no_process(tmp_path, monkeypatch):
    pools = []
    original_init = parallel.ProcessPool.__init__

    def record(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        pools.append(self)

    calls = {"n": 0}
    original_step = Simulator.step

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(parallel.ProcessPool, "__init__", record)
    monkeypatch.setattr(Simulator, "step", interrupted)
    cfg = cfgmod.load_config(base_config("rennala_nigt", 0))  # 0 = one per core
    if resolve_processes(0) == 1:
        pytest.skip("one core: no pool to shut down")
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, str(tmp_path / "run"), progress=False)
    assert len(pools) == 1
    assert_gone(pools[0].procs)


def test_units_and_process_counts():
    assert resolve_processes(3) == 3 and resolve_processes(0) >= 1
    with pytest.raises(ValueError):
        resolve_processes(-1)
    assert group_units([16, 16], 2, 16) == [[0], [1]]
    assert group_units([32], 2, 64) == [[0]]  # one chunk cannot be split: chunking is the config's
    assert group_units([1] * 10, 2, 16) == [list(range(5)), list(range(5, 10))]
    assert group_units([1] * 40, 2, 16) == [list(range(0, 16)), list(range(16, 32)), list(range(32, 40))]
    assert group_units([8, 8, 8, 8], 2, 8) == [[0], [1], [2], [3]]


def test_no_rollout_process_is_left_behind():
    """After close only the standard library's resource tracker may remain (it exits with this
    process); the rollout processes are gone."""
    def children():
        out = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "pid=,args="], capture_output=True,
                             text=True).stdout
        return {int(line.split()[0]): line for line in out.strip().splitlines()}

    before = children()
    par = ParallelOracle(EnvConfig(id="CartPole-v1", horizon=10), PolicyConfig(), 1, 0, processes=2)
    pids = set(par.pool.pids)
    assert pids and pids <= set(children())
    par.close()
    left = {pid: line for pid, line in children().items() if pid not in before}
    assert not (set(left) & pids)
    assert all("resource_tracker" in line or " ps " in f" {line} " for line in left.values()), left


def test_rollout_processes_die_with_their_parent(tmp_path):
    """A parent killed with SIGKILL (no cleanup at all) takes its rollout processes with it."""
    code = (
        "import os, sys, time\n"
        "from apga.config import EnvConfig, PolicyConfig\n"
        "from apga.oracle.parallel import ParallelOracle\n"
        "if __name__ == '__main__':\n"
        "    par = ParallelOracle(EnvConfig(id='CartPole-v1', horizon=10), PolicyConfig(), 1, 0, processes=3)\n"
        "    par.wait_ready()\n"
        "    print(' '.join(map(str, par.pool.pids)), flush=True)\n"
        "    time.sleep(60)\n"
    )
    script = tmp_path / "parent.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Running (a zombie, already dead, waiting for its reaper, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
