"""runtime.pool: ray: the simulator's rollout chunks on Ray actors, bit-identical to one process;
the private Ray instance is gone when the run ends. (The two-node cluster case is in
tests/test_compare_cluster.py, which owns the cluster fixture.)"""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

import apga.run.loop as train_mod  # noqa: E402
from apga import config as cfgmod  # noqa: E402
from apga.oracle.parallel import ParallelOracle  # noqa: E402
from apga.runtime import ray_session  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def config(name: str, runtime: dict) -> dict:
    return {
        "seed": 5,
        "env": {"id": "CartPole-v1", "horizon": 50},
        "policy": {"hidden": [16, 16], "rollout_batch": 2},
        "algorithm": {"name": name, "batch_size": 8, "step_size": 0.05},
        "workers": {"n": 4, "compute_time": "sqrt"},
        "runtime": runtime,
        "budget": {"iterations": 5 if name != "afedpg" else 10},
        "eval": {"every": 2, "episodes": 3},
        "checkpoint": {"every": 2},
    }


@pytest.mark.parametrize("name", ["rennala_nigt", "afedpg"])
def test_a_run_on_ray_actors_equals_one_process_and_leaves_nothing(tmp_path, monkeypatch, name):
    assert not ray.is_initialized()
    built = []
    original = train_mod.build_oracle

    def build(cfg):  # keep the oracle to look at its pool after the run
        built.append(original(cfg))
        return built[-1]

    monkeypatch.setattr(train_mod, "build_oracle", build)
    texts = {}
    for label, runtime in (("one", {"processes": 1}), ("ray", {"pool": "ray", "processes": 3})):
        cfg = cfgmod.load_config(config(name, runtime))
        train_mod.train(cfg, str(tmp_path / label), progress=False)
        texts[label] = (tmp_path / label / "metrics.csv").read_text()
    pooled = built[1]
    assert isinstance(pooled, ParallelOracle) and pooled.processes == 3
    assert pooled.pool.units_remote > 0  # the actors did part of the work
    assert texts["one"] == texts["ray"] and texts["one"].count("\n") > 5
    assert not ray.is_initialized()  # the run's private Ray instance is shut down
    assert ray_session.ray_processes() == []


def test_processes_zero_means_every_cpu_of_the_cluster(tmp_path):
    session = ray_session.start_local(3)
    try:
        cfg = cfgmod.load_config(config("rennala_nigt", {"pool": "ray", "processes": 0}))
        oracle = train_mod.build_oracle(cfg)
        try:
            oracle.wait_ready()
            assert oracle.pool.children == 2 and oracle.processes == 3  # 3 CPUs: the driver and 2 actors
        finally:
            oracle.close()
        assert ray.is_initialized()  # a connection the caller owns stays open
    finally:
        session.close()
