"""`apga evaluate`: reproduces the logged evaluation exactly, reports mean/std/min/max, records a
video of the first evaluation episode, and refuses bad input with one line (exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import apga
from apga.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
CARTPOLE = ["budget.iterations=7", "eval.every=3", "eval.episodes=4", "checkpoint.every=2",
            "algorithm.batch_size=8", "env.horizon=80", "algorithm.step_size=0.1", "seed=4"]
REACHER = ["env.id=Reacher-v5", "env.horizon=30", "workers.n=3", "algorithm.batch_size=4", "budget.iterations=4",
           "eval.every=2", "eval.episodes=3", "checkpoint.every=2", "algorithm.step_size=0.2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    out = {}
    for name, overrides in (("cartpole", CARTPOLE), ("reacher", REACHER)):
        out[name] = str(root / name)
        apga.train(apga.load_config(QUICKSTART, overrides), out[name], progress=False)
    return out


def _json(capsys, argv) -> dict:
    assert main(["evaluate", *argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["cartpole", "reacher"])
def test_evaluate_reproduces_the_logged_eval_return(runs, capsys, name):
    m = apga.read_metrics(runs[name])
    for flag, which in (([], "final"), (["--best"], "best")):
        r = _json(capsys, [runs[name], *flag])
        row = int(np.flatnonzero(m["iteration"] == r["iteration"])[0])
        assert r["mean"] == m["eval_return"][row] == r["logged_eval_return"]  # exactly, not approximately
        assert r["matches_logged"] is True and r["which"] == which
        returns = np.array(r["returns"])
        assert len(returns) == r["episodes"] == 4 if name == "cartpole" else 3
        assert r["std"] == returns.std() and r["min"] == returns.min() and r["max"] == returns.max()
    assert _json(capsys, [runs[name]])["iteration"] == m["iteration"][-1]


def test_evaluate_options_change_the_evaluation(runs, capsys):
    run = runs["cartpole"]
    base = _json(capsys, [run, "--episodes", "6"])
    assert base["matches_logged"] is None and len(base["returns"]) == 6
    assert _json(capsys, [run, "--episodes", "6"])["returns"] == base["returns"]  # deterministic
    assert base["returns"][:4] == _json(capsys, [run])["returns"]  # episode k does not depend on N
    assert _json(capsys, [run, "--episodes", "6", "--seed", "99"])["returns"] != base["returns"]
    stochastic = _json(capsys, [run, "--episodes", "6", "--stochastic"])
    assert stochastic["deterministic"] is False and stochastic["returns"] != base["returns"]
    other = _json(capsys, [run, "--episodes", "6", "--env-id", "CartPole-v0"])  # same spaces
    assert other["env"] == "CartPole-v0"
    short = _json(capsys, [run, "--episodes", "6", "--set", "env.horizon=10"])
    assert max(short["returns"]) <= 10
    as_file = _json(capsys, [os.path.join(run, "policy_final.safetensors")])  # a policy file alone
    assert as_file["mean"] == as_file["logged_eval_return"]


def test_evaluate_prints_a_summary(runs, capsys):
    assert main(["evaluate", runs["cartpole"], "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "± " in out and "min " in out and "max " in out and "equals the logged eval_return exactly" in out


def test_video_of_the_first_evaluation_episode(runs, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    video = str(tmp_path / "reacher.mp4")
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "apga", "evaluate", runs["reacher"], "--video", video, "--json",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # a machine without EGL: one line that says what to do
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "MUJOCO_GL" in proc.stderr
        assert not os.path.exists(video)
        pytest.skip("no EGL renderer here")
    r = json.loads(proc.stdout)
    assert r["video_return"] == r["returns"][0]
    import imageio.v2 as imageio
    frames = imageio.mimread(video, memtest=False)
    assert len(frames) == 31 and frames[0].ndim == 3  # reset + 30 steps (horizon)
    proc = subprocess.run([sys.executable, "-m", "apga", "evaluate", runs["reacher"], "--video", video, "--json",
                           "--quiet", "--stochastic"], env=env, capture_output=True, text=True, timeout=300)
    r = json.loads(proc.stdout)
    assert r["video_return"] == r["returns"][0] and not r["deterministic"]  # the same sampled episode
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_video_without_a_renderer_is_one_line(runs, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    try:
        import pygame  # noqa: F401
        pytest.skip("pygame installed: CartPole can render here")
    except ImportError:
        pass
    video = tmp_path / "cartpole.mp4"
    assert main(["evaluate", runs["cartpole"], "--video", str(video), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot render CartPole-v1" in err and "MUJOCO_GL=egl" in err
    assert not video.exists() and not os.listdir(tmp_path)


@pytest.mark.parametrize("argv, words", [
    (["{run}", "--episodes", "0"], "--episodes 0"),
    (["{run}", "--set", "algorithm.step_size=1"], "only env.* keys"),
    (["{run}", "--env-id", "Pendulum-v1"], "choose an environment with the policy's spaces"),
    (["{run}", "--env-id", "NoSuchEnv-v0"], "env.id"),
    (["{run}", "--set", "env.horizon=-3"], "env.horizon"),
    (["{run}", "--video", "{tmp}/no/such/dir/v.mp4"], "does not exist"),
    (["{run}", "--video", "{tmp}/v.txt"], ".mp4"),
    (["{tmp}/missing"], "no such run directory"),
    (["{tmp}"], "has no policy_final.safetensors"),
    (["{run}", "--stochastic", "--deterministic"], "not allowed with argument"),
    (["{run}", "--episodes", "x"], "invalid int value"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, argv, words):
    argv = [a.format(run=runs["cartpole"], tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) if "--deterministic" in argv or "x" in argv else _nothing():
        code = main(["evaluate", *argv, "--quiet"])
        assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert os.listdir(tmp_path) == []


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
