"""Continuing a finished run with a larger budget (`apga train --resume DIR --set budget.KEY=V`):
the extended metrics.csv, summary and policy files equal those of a run started with that budget."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

import apga
from apga.cli import main

BASE = {"seed": 5, "env": {"id": "synthetic", "kwargs": {"dim": 6, "noise": 0.5}},
        "algorithm": {"batch_size": 8, "step_size": 0.05, "momentum": 0.3},
        "workers": {"n": 4, "comm_time": 0.05, "compute_time": {"dist": "exponential", "mean": "sqrt"}},
        "eval": {"every": 5}, "checkpoint": {"every": 4}}


def _cfg(patch: dict, budget: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for k, v in patch.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    out["budget"] = {"time": None, "trajectories": None, "iterations": None, **budget}
    return out


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _summary(out) -> dict:
    s = json.loads(_read(os.path.join(out, "summary.json")))
    s.pop("wall_seconds")
    return s


def _same_run(a, b, files=("metrics.csv",)) -> None:
    for name in files:
        assert _read(os.path.join(a, name)) == _read(os.path.join(b, name)), name
    assert _summary(a) == _summary(b)


@pytest.mark.parametrize("name, patch, small, large", [
    # the final row (23) is evaluated only because it is the last; 24 is also a checkpoint
    ("rennala_iterations", {"algorithm": {"name": "rennala_nigt"}}, {"iterations": 23}, {"iterations": 41}),
    ("malenia_checkpoint_at_end", {"algorithm": {"name": "malenia_nigt", "cancel": False}},
     {"iterations": 24}, {"iterations": 37}),
    ("afedpg_time", {"algorithm": {"name": "afedpg"}}, {"time": 40.0}, {"time": 95.0}),
    ("sync_trajectories", {"algorithm": {"name": "sync_nigt", "aggregation": "allreduce"}},
     {"trajectories": 100}, {"trajectories": 260}),
])
def test_extended_run_equals_a_run_with_the_larger_budget(tmp_path, capsys, name, patch, small, large):
    ref = str(tmp_path / "ref")
    apga.train(apga.load_config(_cfg(patch, large)), ref, progress=False)
    out = str(tmp_path / "run")
    apga.train(apga.load_config(_cfg(patch, small)), out, progress=False)
    assert _summary(out)["status"] == "finished"
    sets = []
    for key, value in large.items():
        sets += ["--set", f"budget.{key}={value}"]
    assert main(["train", "--resume", out, "--quiet", *sets]) == 0
    _same_run(out, ref)
    assert yaml.safe_load(_read(os.path.join(out, "config.yaml")))["budget"] == \
        yaml.safe_load(_read(os.path.join(ref, "config.yaml")))["budget"]
    assert main(["train", "--resume", out, "--quiet"]) == 0  # a no-op now
    _same_run(out, ref)


def test_two_extensions_and_a_budget_edited_in_config_yaml(tmp_path):
    """Extend twice (API), then once more by editing config.yaml's budget by hand (what a kill right
    after --set rewrote config.yaml leaves behind): a plain resume continues to it."""
    patch = {"algorithm": {"name": "rennala_nigt"}}
    ref = str(tmp_path / "ref")
    apga.train(apga.load_config(_cfg(patch, {"iterations": 50})), ref, progress=False)
    out = str(tmp_path / "run")
    apga.train(apga.load_config(_cfg(patch, {"iterations": 13})), out, progress=False)
    apga.resume(out, progress=False, budget=["budget.iterations=22"])
    apga.resume(out, progress=False, budget=["budget.iterations=31"])
    doc = yaml.safe_load(_read(os.path.join(out, "config.yaml")))
    doc["budget"]["iterations"] = 50
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(doc, f)
    apga.resume(out, progress=False)
    _same_run(out, ref)


def test_extended_gymnasium_run_has_the_same_policy_files(tmp_path):
    cfg = {"seed": 1, "env": {"id": "CartPole-v1", "horizon": 60}, "policy": {"hidden": [16], "rollout_batch": 8},
           "algorithm": {"name": "rennala_nigt", "batch_size": 8, "step_size": 0.1},
           "workers": {"n": 3}, "eval": {"every": 3, "episodes": 3}, "checkpoint": {"every": 2}}
    ref = str(tmp_path / "ref")
    apga.train(apga.load_config({**cfg, "budget": {"iterations": 14}}), ref, progress=False)
    out = str(tmp_path / "run")
    apga.train(apga.load_config({**cfg, "budget": {"iterations": 7}}), out, progress=False)
    apga.resume(out, progress=False, budget=["budget.iterations=14"])
    _same_run(out, ref, ("metrics.csv", "policy_final.safetensors", "policy_best.safetensors"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("extend") / "run"
    apga.train(apga.load_config(_cfg({}, {"iterations": 12})), str(out), progress=False)
    return out


@pytest.mark.parametrize("sets, words", [
    (["algorithm.step_size=0.5"], "only budget.* keys"),
    (["seed=2"], "only budget.* keys"),
    (["budget.iterations=11"], "already reached"),
    (["budget.iterations=3"], "already reached"),
    (["budget.iterations=-4"], "budget.iterations"),
    (["budget.bogus=4"], "bogus"),
])
def test_bad_extensions_are_refused_with_one_line(finished, tmp_path, capsys, sets, words):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    argv = ["train", "--resume", str(run), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_user_protocol_checkpoints_resumes_and_extends(tmp_path):
    """A user's protocol class (algorithm.name: package.module:ClassName) is stored in checkpoints
    under the name the config gives it, and a run of it extends exactly."""
    user = pytest.importorskip("test_user_protocol")  # tests/ of the protocol platform (user classes)
    cfg = apga.load_config({**_cfg({"algorithm": {"name": user.NAME, "options": {"quorum": 3}}}, {"iterations": 30}),
                            "checkpoint": {"every": 4}})
    ref = str(tmp_path / "ref")
    apga.train(cfg, ref, progress=False)
    out = str(tmp_path / "run")
    short = apga.load_config({**_cfg({"algorithm": {"name": user.NAME, "options": {"quorum": 3}}}, {"iterations": 13}),
                              "checkpoint": {"every": 4}})
    apga.train(short, out, progress=False)
    apga.resume(out, progress=False, budget=["budget.iterations=30"])
    _same_run(out, ref)
