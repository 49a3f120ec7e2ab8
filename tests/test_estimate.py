"""apga.estimate: the schedule replay gives a run's exact updates and trajectories before it runs;
`apga compare --dry-run` prints the estimate."""
from __future__ import annotations

import json
import os

import pytest
import yaml

import apga
from apga import estimate
from apga.cli import main
from apga.run.build import build_oracle

SYNTH = {
    "env": {"id": "synthetic", "kwargs": {"dim": 6, "noise": 0.5}},
    "algorithm": {"batch_size": 6, "step_size": 0.1},
    "workers": {"n": 4, "compute_time": {"dist": "exponential", "mean": "sqrt"}, "comm_time": 0.3},
    "budget": {"time": 40, "iterations": None},
    "eval": {"every": 3, "episodes": 2},
    "checkpoint": {"every": 5},
}


@pytest.mark.parametrize("name", ["rennala_nigt", "malenia_nigt", "sync_nigt", "afedpg"])
def test_schedule_replay_matches_the_run(tmp_path, name):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(SYNTH))
    cfg = apga.load_config(str(path), [f"algorithm.name={name}", "seed=2"])
    result = apga.train(cfg, str(tmp_path / "run"), progress=False)
    m = apga.read_metrics(str(tmp_path / "run"))
    s = estimate.schedule(cfg, build_oracle(cfg).dim)
    assert s.complete
    assert (s.updates, s.trajectories) == (int(m["iteration"][-1]), int(m["trajectories"][-1]))
    assert s.clock == pytest.approx(result.summary["time"], rel=1e-12)


def test_measure_and_cost_of_a_cartpole_run():
    cfg = apga.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml"),
                           ["budget.iterations=5", "env.horizon=100"])
    dim, rate = estimate.measure(cfg)
    assert dim == build_oracle(cfg).dim and rate.steps_per_second > 0 and 1 <= rate.initial_length <= 100
    cost = estimate.run_cost(cfg, dim, rate)
    assert cost["updates"] == 5 and cost["trajectories"] == 5 * 32  # Rennala: M = 32 per update
    assert cost["eval_episodes"] == (5 // 10 + 2) * 10
    assert cost["steps_high"] == (160 + 20) * 100 and cost["steps_low"] <= cost["steps_high"]
    assert cost["core_seconds_high"] == pytest.approx(cost["steps_high"] / rate.steps_per_second)


def test_dry_run_prints_an_estimate_and_runs_nothing(tmp_path, capsys):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump({"base": SYNTH, "seeds": 2, "variants": {
        "rennala_nigt": {"algorithm.name": "rennala_nigt"}, "afedpg": {"algorithm.name": "afedpg"}}}))
    out = tmp_path / "out"
    assert main(["compare", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 runs: 1 setting(s) x 2 variant(s) x 2 seed(s)" in text
    assert "default/rennala_nigt, per seed:" in text and "estimate: 4 runs" in text
    assert not out.exists()
    json.dumps(text)  # plain text
