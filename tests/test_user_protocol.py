"""A method written by a user, in this file only, runs on the simulator and on Ray unchanged.

``QuorumRennalaNIGT`` is Rennala NIGT with another stop rule: the round stops at the first moment
sum_i b_i >= M *and* at least ``quorum`` workers have a gradient (its own option). Nothing in
apga/ knows it: the config names it as ``test_user_protocol:QuorumRennalaNIGT``.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

import apga
from apga.cli import main
from apga.protocol.base import RoundProtocol
from apga.protocol.nigt import NIGTUpdate

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "test_user_protocol:QuorumRennalaNIGT"


class QuorumRennalaNIGT(NIGTUpdate, RoundProtocol):
    OPTIONS = {"quorum": 2}

    def round_done(self, counts):
        have = sum(1 for b in counts if b > 0)
        return sum(counts) >= self.round_batch() and have >= self.options["quorum"]


def quorum_round_time(h, M, quorum):
    """First t with sum_i floor(t/h_i) >= M and at least ``quorum`` workers with a gradient."""
    candidates = sorted({k * hi for hi in h for k in range(1, M + 1)})
    for t in candidates:
        b = [math.floor(t / hi + 1e-12) for hi in h]
        if sum(b) >= M and sum(1 for x in b if x) >= quorum:
            return t
    raise AssertionError("no stop")


def config(**over):
    data = {
        "seed": 1,
        "env": {"id": "synthetic", "kwargs": {"dim": 6}},
        "algorithm": {"name": NAME, "batch_size": 5, "step_size": 0.05, "options": {"quorum": 4}},
        "workers": {"n": 4, "compute_time": [0.25, 0.5, 1.5, 4.0]},
        "budget": {"iterations": 6},
        "eval": {"every": 0},
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        data.setdefault(section, {})[name] = value
    return apga.load_config(data)


def test_user_protocol_runs_on_the_simulator_with_exact_round_times(tmp_path):
    cfg = config()
    assert cfg.algorithm.options == {"quorum": 4}
    apga.train(cfg, str(tmp_path / "run"), progress=False)
    m = apga.read_metrics(str(tmp_path / "run"))
    h = [0.25, 0.5, 1.5, 4.0]
    expected = quorum_round_time(h, 5, 4)  # = 4.0: the slowest worker's first gradient is needed
    assert expected == 4.0 and quorum_round_time(h, 5, 2) == 1.0
    np.testing.assert_allclose(np.diff(m["time"]), expected, rtol=0, atol=1e-12)
    # every gradient finished by the stop is used, ties at the stop included
    per_round = sum(math.floor(expected / hi + 1e-12) for hi in h)
    assert list(np.diff(m["trajectories"])) == [per_round] * 6


def test_user_protocol_options_are_checked_by_the_class(tmp_path, capsys):
    with pytest.raises(apga.ConfigError, match=r"algorithm.options.quorom: QuorumRennalaNIGT has no option 'quorom'"):
        config(algorithm__options={"quorom": 3})
    with pytest.raises(apga.ConfigError, match=r"algorithm.options.quorum: expected int"):
        config(algorithm__options={"quorum": "all"})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("algorithm: {name: 'no_such_module_xyz:Thing'}\n")
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algorithm.name" in err[0] and "no_such_module_xyz" in err[0]
    assert not (tmp_path / "o").exists()


def test_runtimes_never_name_a_method():
    """The simulator and the Ray runtime drive any protocol: no method names, no isinstance."""
    root = os.path.join(os.path.dirname(HERE), "apga", "runtime")
    for name in ("simulator.py", "ray_runtime.py", "ray_worker.py"):
        text = open(os.path.join(root, name)).read().lower()
        for word in ("rennala", "malenia", "afedpg", "sync_nigt", "nigt", "isinstance(self.alg", "isinstance(alg"):
            assert word not in text, (name, word)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_user_protocol_runs_on_ray(monkeypatch):
    """The same class on Ray actors, AllReduce (every worker holds a copy of the protocol, so
    the actors import this module: PYTHONPATH reaches them as it reaches a user's)."""
    pytest.importorskip("ray")
    from apga.runtime import ray_session
    from apga.run.build import build_oracle, build_runtime
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    session = ray_session.start_local(2)
    cfg = config(algorithm__aggregation="allreduce", runtime__name="ray", runtime__inject_delays=True,
                 workers__compute_time=[0.02, 0.04, 0.12, 0.32])
    oracle = build_oracle(cfg)
    rt = build_runtime(cfg, oracle)
    try:
        for it in range(3):
            ev = rt.step()
            assert sum(ev.counts) >= 5 and min(ev.counts) >= 1  # quorum 4 of 4 workers
            # nominal times: the round stops at 0.32 (worker 3's first gradient), ties included
            assert ev.counts == [16, 8, 2, 1]
            assert rt.alg.version == it + 1 and type(rt.alg).__name__ == "QuorumRennalaNIGT"
    finally:
        rt.close()
        oracle.close()
        session.close()
