"""`apga bench`: runs end to end (tiny measurements) and ends with the JSON line. No speed is
asserted here: timings belong to a quiet machine, see benchmarks/README.md."""
import json
import sys

import pytest

from apga.cli import main

KEYS = {"physics_limit", "gym_single", "apga", "sb3_a2c", "ratio_limit", "ratio_sb3", "round_cost_ratio_1000_10",
        "round_cost", "cores", "horizon"}


def test_quick_bench_prints_a_table_and_the_json_line(capsys):
    pytest.importorskip("stable_baselines3")
    pytest.importorskip("mujoco")
    code = main(["bench", "--quick", "--seconds", "0.05", "--horizon", "20", "--processes", "2"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert any(line.startswith("physics limit") for line in lines) and any("SB3 A2C" in line for line in lines)
    data = json.loads(lines[-1])
    assert KEYS <= set(data)
    assert data["horizon"] == 20 and data["cores"] == 2 and set(data["round_cost"]) == {"10", "100", "1000"}
    for key in ("physics_limit", "gym_single", "apga", "sb3_a2c"):
        assert data[key] > 0
    assert data["ratio_limit"] == pytest.approx(data["apga"] / data["physics_limit"], rel=1e-3)
    assert data["ratio_sb3"] == pytest.approx(data["apga"] / data["sb3_a2c"], rel=1e-3)


def test_missing_stable_baselines3_is_a_friendly_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "stable_baselines3", None)  # import now fails
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "apga[bench]" in err and err.count("\n") == 1


@pytest.mark.parametrize("args,needle", [(["--seconds", "0"], "--seconds"), (["--horizon", "0"], "--horizon"),
                                         (["--env", "CartPole-v1"], "not a MuJoCo env"),
                                         (["--processes", "-1"], "--processes")])
def test_bad_arguments_are_one_line_errors(args, needle, capsys):
    pytest.importorskip("stable_baselines3")
    assert main(["bench", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for opt in ("--seconds", "--quick", "--processes", "--env", "--horizon", "--rollout-batch", "--rounds",
                "physics_limit", "ratio_limit", "apga[bench]"):
        assert opt in out


def _script(name: str, *args: str) -> str:
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", name), *args], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_where_time_goes_splits_the_ratio_into_factors_whose_product_it_is():
    pytest.importorskip("mujoco")
    out = _script("where_time_goes.py", "--horizon", "30", "--cycles", "1", "--seconds", "0.05", "--cores", "2")
    data = json.loads(out.strip().splitlines()[-1])
    assert data["cores"] == 2 and data["apga"] > 0
    product = data["cores_at_once"] * data["trajectories"] * data["apga_share"]
    assert product == pytest.approx(data["ratio_limit"], rel=1e-3)
    assert 0 < data["apga_share"] <= 1.0  # physics CPU never exceeds the cores' wall time


def test_paired_trees_runs_the_same_rounds_in_each_checkout():
    pytest.importorskip("mujoco")
    out = _script("paired_trees.py", "--horizon", "20", "--rounds", "2", "a=.", "b=.")
    lines = out.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["a:", "b:"]
    assert "per round / a: median 1.000" in lines[0] and "2 rounds" in lines[1]
