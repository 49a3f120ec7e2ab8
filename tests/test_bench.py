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
