"""Non-finite gradients: rejected, counted (`rejected` column), never applied to the parameters;
a run where no gradient is finite stops with a one-line error (exit 2) instead of spinning."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

import apga
from apga import statefile
from apga.cli import main
from apga.oracle.base import WorkerBatch
from apga.oracle.synthetic import SyntheticOracle
from apga.protocol.afedpg import AFedPG
from apga.protocol.registry import make_protocol
from apga.protocol.rennala_nigt import RennalaNIGT
from apga.run import read_metrics
from apga.run import train as run_train
from apga.run.logger import COLUMNS


def config(name: str, nan_prob: float, iterations: int = 150, **algorithm) -> dict:
    return {
        "seed": 5,
        "env": {"id": "synthetic", "kwargs": {"dim": 5, "nan_prob": nan_prob}},
        "algorithm": {"name": name, "batch_size": 6, "step_size": 0.05, **algorithm},
        "workers": {"n": 3, "compute_time": {"dist": "exponential", "mean": "sqrt"}, "comm_time": 0.1},
        "budget": {"iterations": iterations},
        "eval": {"every": 5},
        "checkpoint": {"every": 25},
    }


@pytest.mark.parametrize("name, extra", [
    ("rennala_nigt", {}), ("malenia_nigt", {"aggregation": "allreduce"}),
    ("sync_nigt", {}), ("afedpg", {}),
])
def test_nan_gradients_are_rejected_and_counted(tmp_path, name, extra):
    out = tmp_path / "run"
    run_train(apga.load_config(config(name, 0.3, **extra)), str(out), progress=False)
    text = (out / "metrics.csv").read_text()
    assert "nan" not in text.lower() and "inf" not in text.lower()
    m = read_metrics(str(out))
    for col in COLUMNS:  # every logged value is finite (empty cells are "not logged")
        v = m[col][~np.isnan(m[col])]
        assert np.all(np.isfinite(v)), col
    assert np.all(~np.isnan(m["eval_return"][::5]))  # evaluation of the parameters: always finite
    rejected = m["rejected"]
    assert np.all(np.diff(rejected) >= 0) and rejected[-1] > 0
    # cancel: true, so every computed gradient was either used or rejected
    assert np.array_equal(m["trajectories"] + rejected, m["trajectories_computed"])
    used = np.diff(m["trajectories"]) + np.diff(rejected)
    assert 0.15 < rejected[-1] / used.sum() < 0.45  # about nan_prob of them
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == rejected[-1] and summary["status"] == "finished"
    alg = statefile.loads((out / "checkpoint.npz").read_bytes())["runtime"].alg
    assert np.all(np.isfinite(alg.state.theta)) and np.all(np.isfinite(alg.state.d))


def test_afedpg_rejected_update_leaves_parameters(tmp_path):
    """Drive the simulator: an AFedPG update whose gradient was NaN does not move theta."""
    from apga.runtime.simulator import Simulator
    from apga.runtime.timing import TimeModel
    oracle = SyntheticOracle(3, 1, dim=4, nan_prob=0.5)
    alg = AFedPG(3, oracle.initial_point(), 0.1, momentum=0.5)
    sim = Simulator(alg, oracle, TimeModel({"dist": "exponential", "mean": "sqrt"}, 0.1, None, 3, 4, 1))
    seen = 0
    for _ in range(300):
        before = alg.theta.copy(), None if alg.state.d is None else alg.state.d.copy()
        update = sim.step().update
        assert np.all(np.isfinite(alg.theta))
        if update.used == 0:
            seen += 1
            assert update.rejected == 1 and not update.stepped and math.isnan(update.grad_norm)
            assert np.array_equal(alg.theta, before[0])
            assert (before[1] is None and alg.state.d is None) or np.array_equal(alg.state.d, before[1])
    assert 100 < seen < 200 and sim.totals.rejected == seen


def test_round_aggregates_only_finite_gradients():
    """A Rennala round with NaN gradients: the step uses the mean of the finite ones only."""
    n, dim, seed = 3, 4, 2
    nan_oracle = SyntheticOracle(n, seed, dim=dim, nan_prob=0.5)
    alg = RennalaNIGT(n, nan_oracle.initial_point(), 0.1, momentum=1.0, batch_size=12)
    point = alg.round_point()
    jobs = [(w, j) for j in range(4) for w in range(n)]
    finite = []
    for job in jobs:
        one = nan_oracle.gradients(point, [job])[job[0]]
        if one.count:
            finite.append(one.grad_sum)
    assert 0 < len(finite) < len(jobs)
    update = alg.finish_round(nan_oracle.gradients(point, jobs))
    g = np.mean(finite, axis=0)
    assert update.used == len(finite) and update.rejected == len(jobs) - len(finite)
    np.testing.assert_allclose(alg.theta, point + 0.1 * g / np.linalg.norm(g), rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_protocol_guard_round(bad):
    """finish_round rejects a non-finite aggregate even when the oracle let it through."""
    theta0 = np.arange(3.0)
    for name in ("rennala_nigt", "malenia_nigt", "sync_nigt"):
        alg = make_protocol(name, 2, theta0, 0.1, momentum=0.5, batch_size=2)
        good = WorkerBatch(np.ones(3), 1, np.array([1.0]), np.ones(1, dtype=np.int64), 1)
        poisoned = WorkerBatch(np.array([1.0, bad, 0.0]), 1, np.array([1.0]), np.ones(1, dtype=np.int64), 1)
        update = alg.finish_round({0: good, 1: poisoned})
        assert (update.used, update.rejected, update.stepped) == (0, 2, False)
        assert math.isnan(update.grad_norm)
        assert np.array_equal(alg.theta, theta0) and alg.state.d is None and alg.version == 1
        update = alg.finish_round({0: good, 1: good})  # a later finite round steps normally
        assert update.stepped and np.all(np.isfinite(alg.theta))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_protocol_guard_afedpg(bad):
    theta0 = np.zeros(3)
    alg = AFedPG(2, theta0, 0.1, momentum=0.5)
    alg.apply(WorkerBatch(np.ones(3), 1), 0)
    theta1, d1 = alg.theta.copy(), alg.state.d.copy()
    update = alg.apply(WorkerBatch(np.array([bad, 1.0, 1.0]), 1), 1)
    assert (update.used, update.rejected, update.stepped) == (0, 1, False)
    assert np.array_equal(alg.theta, theta1) and np.array_equal(alg.state.d, d1) and alg.version == 2
    update = alg.apply(WorkerBatch(np.zeros(3), 0, rejected=1), 2)  # nothing finite at all
    assert update.rejected == 1 and np.array_equal(alg.theta, theta1)


@pytest.mark.parametrize("name", ["rennala_nigt", "afedpg"])
def test_all_gradients_nan_stops_with_one_line(tmp_path, capsys, name):
    cfg = config(name, 1.0, iterations=100000)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    code = main(["train", str(tmp_path / "cfg.yaml"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().split("\n")
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("apga: error: no finite gradient in the last 10 updates")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["iterations"] == 10 and summary["trajectories"] == 0
    assert "no finite gradient" in summary["error"]


def test_mostly_nan_later_stops(tmp_path, monkeypatch):
    """A run that had finite gradients and then gets none for STALL_LIMIT updates stops too."""
    import apga.run.loop as T
    monkeypatch.setattr(T, "STALL_LIMIT", 30)
    from apga.runtime.simulator import Simulator
    real = Simulator._gradient_of

    def grad(self, worker, job, point):
        batch = real(self, worker, job, point)
        if self.totals.iteration >= 50:  # from update 51 on, every gradient is non-finite
            return WorkerBatch(np.zeros_like(batch.grad_sum), 0, env_steps=1, rejected=1)
        return batch

    monkeypatch.setattr(Simulator, "_gradient_of", grad)
    with pytest.raises(apga.ApgaError, match="no finite gradient in the last 30 updates"):
        run_train(apga.load_config(config("afedpg", 0.0, iterations=1000)), str(tmp_path / "run"), progress=False)
    m = read_metrics(str(tmp_path / "run"))
    assert m["iteration"][-1] == 79 and m["rejected"][-1] == 29
