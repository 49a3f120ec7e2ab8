"""Malformed input to `apga train`: exit code 2, one short line on stderr naming the key and the
fix, no traceback, and nothing written (the --out dir is not created, an existing dir is untouched).

Most cases run the CLI in-process (``apga.cli.main``); two run the real executable to prove the
process exit code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

import apga
from apga.cli import main

BASE = {
    "seed": 3,
    "env": {"id": "synthetic", "kwargs": {"dim": 4}},
    "algorithm": {"name": "rennala_nigt", "batch_size": 4},
    "workers": {"n": 3, "compute_time": "sqrt", "comm_time": 0.1},
    "budget": {"iterations": 6},
    "eval": {"every": 3},
    "checkpoint": {"every": 2},
}


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def snapshot(root) -> dict:
    """Every path under ``root`` with its content hash (dirs: None)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.join(folder, d)] = None
        for f in files:
            p = os.path.join(folder, f)
            with open(p, "rb") as fh:
                out[p] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def run_cli(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def check_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("apga: error: "), line
    assert len(line) < 400, line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


@pytest.fixture
def work(tmp_path):
    """A scratch dir with base.yaml; returns (tmp_path, out) where out must never be created."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    return tmp_path


def expect_rejected(capsys, work, argv, *words):
    """Run argv (strings; {out} and {dir} are filled in), expect a clean error and no writes."""
    out = work / "out"
    argv = [a.format(out=out, dir=work) for a in argv]
    before = snapshot(work)
    code, stdout, err = run_cli(capsys, argv)
    line = check_error(code, err, *words)
    assert not out.exists(), "the run directory was created"
    assert snapshot(work) == before, "something was written"
    return line


def write_cfg(work, cfg, name="cfg.yaml") -> str:
    path = work / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(path)


# --- the config file itself -------------------------------------------------------------------

def test_missing_config(capsys, work):
    expect_rejected(capsys, work, ["train", "{dir}/nope.yaml", "--out", "{out}"], "nope.yaml", "does not exist")


def test_config_is_a_directory(capsys, work):
    (work / "adir").mkdir()
    expect_rejected(capsys, work, ["train", "{dir}/adir", "--out", "{out}"], "is a directory")


def test_config_not_utf8(capsys, work):
    (work / "bin.yaml").write_bytes(b"seed: 1\n\xff\xfe\x00garbage\n")
    expect_rejected(capsys, work, ["train", "{dir}/bin.yaml", "--out", "{out}"], "cannot read config file")


def test_malformed_yaml(capsys, work):
    write_cfg(work, "algorithm: {name: afedpg\nworkers:\n  n: 3\n")
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], "malformed YAML", "line")


@pytest.mark.parametrize("text", ["- seed: 1\n- env: {}\n", "42\n"])
def test_top_level_not_a_mapping(capsys, work, text):
    write_cfg(work, text)
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], "expected a mapping of sections")


def test_duplicate_key(capsys, work):
    write_cfg(work, "seed: 1\nalgorithm: {name: afedpg}\nseed: 2\n")
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], "duplicate key 'seed'", "line 3")


# --- keys and types ---------------------------------------------------------------------------

def test_unknown_top_level_key(capsys, work):
    cfg = dict(BASE)
    cfg["algoritm"] = cfg.pop("algorithm")
    write_cfg(work, cfg)
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"],
                    "unknown key 'algoritm'", "did you mean 'algorithm'")


def test_unknown_nested_key(capsys, work):
    write_cfg(work, _merge(BASE, {"algorithm": {"stepsize": 0.1}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"],
                    "algorithm.stepsize", "did you mean 'step_size'")


def test_unknown_key_without_close_match_lists_keys(capsys, work):
    write_cfg(work, _merge(BASE, {"budget": {"zzz": 1}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"],
                    "budget.zzz", "known keys here: time, trajectories, iterations")


@pytest.mark.parametrize("patch, words", [
    ({"workers": {"n": "ten"}}, ["workers.n", "expected an integer"]),
    ({"workers": {"n": 2.5}}, ["workers.n", "expected an integer"]),
    ({"algorithm": 5}, ["algorithm", "expected a mapping"]),
    ({"algorithm": {"step_size": "fast"}}, ["algorithm.step_size", "expected a number"]),
    ({"algorithm": {"cancel": "yes please"}}, ["algorithm.cancel", "true or false"]),
    ({"eval": {"every": True}}, ["eval.every", "expected an integer"]),
    ({"policy": {"hidden": 64}}, ["policy.hidden", "expected a list"]),
    ({"env": {"kwargs": [1, 2]}}, ["env.kwargs", "expected a mapping"]),
])
def test_wrong_types(capsys, work, patch, words):
    write_cfg(work, _merge(BASE, patch))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], *words)


# --- values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("workers: {n: 0}", ["workers.n", ">= 1"]),
    ("workers: {n: -4}", ["workers.n", ">= 1"]),
    ("algorithm: {batch_size: 0}", ["algorithm.batch_size", "M must be >= 1"]),
    ("algorithm: {batch_size: -2}", ["algorithm.batch_size"]),
    ("algorithm: {init_batch_size: 0}", ["algorithm.init_batch_size"]),
    ("algorithm: {momentum: 0}", ["algorithm.momentum", "(0, 1]"]),
    ("algorithm: {momentum: 1.5}", ["algorithm.momentum", "(0, 1]"]),
    ("algorithm: {momentum: .nan}", ["algorithm.momentum", "(0, 1]"]),
    ("algorithm: {step_size: 0}", ["algorithm.step_size", "> 0"]),
    ("algorithm: {step_size: -1e-3}", ["algorithm.step_size", "> 0"]),
    ("algorithm: {step_size: .inf}", ["algorithm.step_size", "> 0"]),
    ("env: {gamma: 0}", ["env.gamma", "(0, 1]"]),
    ("env: {gamma: 1.01}", ["env.gamma", "(0, 1]"]),
    ("env: {gamma: .nan}", ["env.gamma", "(0, 1]"]),
    ("seed: -1", ["seed", ">= 0"]),
    ("checkpoint: {every: 0}", ["checkpoint.every", ">= 1"]),
    ("eval: {episodes: 0}", ["eval.episodes", ">= 1"]),
    ("algorithm: {aggregation: ring}", ["algorithm.aggregation", "server or allreduce"]),
    ("algorithm: {step_schedule: cosine}", ["algorithm.step_schedule", "constant or delay"]),
    ("runtime: {name: cluster}", ["runtime.name", "sim or ray"]),
    ("runtime: {streams: episode}", ["runtime.streams", "job or round"]),
    ("runtime: {pool: slurm}", ["runtime.pool", "local or ray"]),
    ("{runtime: {pool: ray, processes: 2, name: ray}, env: {id: CartPole-v1}}", ["runtime.pool", "pool: local"]),
    ("{runtime: {pool: ray, processes: 1}, env: {id: CartPole-v1}}", ["runtime.pool", "no actor"]),
    ("runtime: {pool: ray, processes: 0}", ["runtime.pool", "synthetic"]),
    ("budget: {time: .nan, iterations: null}", ["budget.time", "finite"]),
    ("budget: {time: -5}", ["budget.time", "> 0"]),
    ("budget: {iterations: 0}", ["budget.iterations", "> 0"]),
])
def test_bad_values(capsys, work, text, words):
    cfg = _merge(BASE, yaml.safe_load(text))
    write_cfg(work, cfg)
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], *words)


def test_budget_with_nothing_set(capsys, work):
    write_cfg(work, _merge(BASE, {"budget": {"time": None, "trajectories": None, "iterations": None}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"],
                    "budget", "set at least one of budget.time, budget.trajectories, budget.iterations")


def test_unknown_algorithm_did_you_mean(capsys, work):
    write_cfg(work, _merge(BASE, {"algorithm": {"name": "renala_nigt"}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"],
                    "algorithm.name", "did you mean 'rennala_nigt'")


def test_afedpg_with_allreduce(capsys, work):
    write_cfg(work, _merge(BASE, {"algorithm": {"name": "afedpg", "aggregation": "allreduce"}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"],
                    "algorithm.aggregation", "AFedPG has no AllReduce", "use server")


# --- the time model (checked by the runtime's constructor, before the run dir exists) ---------

# Wording belongs to apga/runtime/timing.py; these tests pin the key each message names.
@pytest.mark.parametrize("workers, words", [
    ({"compute_time": -1.0}, ["workers.compute_time", "-1"]),
    ({"compute_time": 0}, ["workers.compute_time"]),
    ({"compute_time": float("nan")}, ["workers.compute_time", "nan"]),
    ({"compute_time": float("inf")}, ["workers.compute_time", "inf"]),
    ({"compute_time": [1.0, 2.0]}, ["workers.compute_time", "2", "3"]),
    ({"compute_time": [1.0, -2.0, 3.0]}, ["workers.compute_time", "-2"]),
    ({"compute_time": "sqrtt"}, ["workers.compute_time", "sqrtt"]),
    ({"compute_time": {"dist": "poisson", "mean": 1}}, ["workers.compute_time.dist", "poisson"]),
    ({"compute_time": {"dist": "gamma", "mean": 1, "spread": -0.5}}, ["workers.compute_time.spread"]),
    ({"compute_time": {"schedule": [{"until": float("nan"), "times": 1}, {"times": 2}]}},
     ["workers.compute_time.schedule[0].until", "nan"]),
    ({"compute_time": {"schedule": [{"until": 5, "times": 1}, {"until": 2, "times": 2}, {"times": 3}]}},
     ["workers.compute_time.schedule[1].until"]),
    ({"comm_time": -0.5}, ["workers.comm_time", "-0.5"]),
    ({"comm_time": float("nan")}, ["workers.comm_time", "nan"]),
    ({"comm_time": [0.1, 0.2, 0.3, 0.4]}, ["workers.comm_time", "4", "3"]),
    ({"comm_time": "cubic"}, ["workers.comm_time", "cubic"]),
    ({"comm_time": {"shape": "sqrt_d", "scale": -1}}, ["workers.comm_time.scale"]),
    ({"comm_time": {"bandwidth": 10}}, ["workers.comm_time"]),
    ({"allreduce_time": {"bandwidth": 0}}, ["workers.allreduce_time.bandwidth"]),
    ({"allreduce_time": -1}, ["workers.allreduce_time"]),
])
def test_bad_time_model(capsys, work, workers, words):
    write_cfg(work, _merge(BASE, {"workers": workers}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], *words)


def test_missing_trace_file(capsys, work):
    write_cfg(work, _merge(BASE, {"workers": {"compute_time": {"trace": str(work / "no_trace.csv")}}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"],
                    "workers.compute_time.trace", "no_trace.csv")


@pytest.mark.parametrize("content, words", [
    (b"worker,seconds\n0,1.0\n1,abc\n2,1\n", [":3"]),
    (b"who,when\n0,1\n", ["worker,seconds"]),
    (b"worker,seconds\n0,1.0\n1,-2\n2,1\n", [":3", "-2"]),
    (b"worker,seconds\n0,1.0\n7,1\n", ["worker 7"]),
    (b"worker,seconds\n0,1.0\n", ["[1, 2]"]),
    (b"\x00\xff\xfe garbage \x00\n\x01\x02", ["workers.compute_time.trace"]),
])
def test_garbled_trace_file(capsys, work, content, words):
    (work / "trace.csv").write_bytes(content)
    write_cfg(work, _merge(BASE, {"workers": {"compute_time": {"trace": str(work / "trace.csv")}}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], "workers.compute_time.trace", *words)


# --- the oracle -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"dim": "big"}, ["env.kwargs.dim", "expected a number"]),
    ({"dimm": 3}, ["env.kwargs", "'dimm'", "did you mean 'dim'"]),
    ({"nan_prob": 2.0}, ["env.kwargs.nan_prob"]),
    ({"noise": -1}, ["env.kwargs.noise"]),
])
def test_bad_synthetic_options(capsys, work, kwargs, words):
    write_cfg(work, _merge(BASE, {"env": {"kwargs": kwargs}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], *words)


@pytest.mark.skipif(importlib.util.find_spec("apga.oracle.rl") is None, reason="needs the RL oracle")
def test_unknown_env_id(capsys, work):
    write_cfg(work, _merge(BASE, {"env": {"id": "CartPole-v99", "kwargs": {}, "horizon": 20}}))
    expect_rejected(capsys, work, ["train", "{dir}/cfg.yaml", "--out", "{out}"], "env.id", "CartPole-v99")


# --- --set ------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, words", [
    ("algorithm.step_size", ["--set 'algorithm.step_size'", "expected section.key=value"]),
    ("=0.5", ["--set '=0.5'", "empty"]),
    ("algorithm..step_size=0.5", ["empty"]),
    ("seed.value=1", ["'seed' is a value, not a section", "--set seed=VALUE"]),
    ("algorithm.name.x=1", ["'algorithm.name' is a value, not a section"]),
    ("algo.name=afedpg", ["unknown key 'algo'", "did you mean 'algorithm'"]),
    ("algorithm.step_sise=0.1", ["algorithm.step_sise", "did you mean 'step_size'"]),
    ("algorithm.name=[afedpg", ["--set", "not valid YAML"]),
    ("workers.n=0", ["workers.n", ">= 1"]),
])
def test_bad_set(capsys, work, item, words):
    expect_rejected(capsys, work, ["train", "{dir}/base.yaml", "--out", "{out}", "--set", item], *words)


# --- the CLI's own arguments ------------------------------------------------------------------

def test_missing_out(capsys, work):
    expect_rejected(capsys, work, ["train", "{dir}/base.yaml"], "--out DIR is required")


def test_resume_with_config(capsys, work):
    expect_rejected(capsys, work, ["train", "{dir}/base.yaml", "--resume", "{dir}"], "--resume DIR takes no CONFIG")


def test_unknown_option(capsys, work):
    expect_rejected(capsys, work, ["train", "{dir}/base.yaml", "--out", "{out}", "--sett", "seed=1"], "--sett")


# --- the output directory ---------------------------------------------------------------------

def test_out_exists_with_foreign_files(capsys, work):
    other = work / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = snapshot(work)
    code, _, err = run_cli(capsys, ["train", str(work / "base.yaml"), "--out", str(other)])
    check_error(code, err, "exists and is not empty", "choose a new --out", "--force")
    assert snapshot(work) == before


def test_out_force_refuses_to_delete_foreign_files(capsys, work):
    other = work / "other"
    other.mkdir()
    # apga run files next to a foreign file: --force must not delete anything, not even the run files
    (other / "metrics.csv").write_text("x\n")
    (other / "summary.json").write_text("{}\n")
    (other / "thesis.tex").write_text("years of work")
    before = snapshot(work)
    code, _, err = run_cli(capsys, ["train", str(work / "base.yaml"), "--out", str(other), "--force"])
    check_error(code, err, "'thesis.tex'", "not an apga run file", "refusing to delete")
    assert snapshot(work) == before


def test_out_is_a_file(capsys, work):
    (work / "afile").write_text("x")
    before = snapshot(work)
    code, _, err = run_cli(capsys, ["train", str(work / "base.yaml"), "--out", str(work / "afile")])
    check_error(code, err, "is not a directory")
    assert snapshot(work) == before


def test_out_under_a_file(capsys, work):
    (work / "afile").write_text("x")
    before = snapshot(work)
    code, _, err = run_cli(capsys, ["train", str(work / "base.yaml"), "--out", str(work / "afile" / "run")])
    check_error(code, err, "cannot create it")
    assert snapshot(work) == before


# --- resume -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    apga.train(apga.load_config(BASE), str(out), progress=False)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    import shutil
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def test_out_is_an_existing_run(capsys, work, run_copy):
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, ["train", str(work / "base.yaml"), "--out", str(run_copy)])
    check_error(code, err, "exists and is not empty", "--resume")
    assert snapshot(run_copy) == before


def test_resume_edited_config(capsys, run_copy):
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["algorithm"]["step_size"] = 0.5
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, ["train", "--resume", str(run_copy)])
    check_error(code, err, "config.yaml was edited", "restore it")
    assert snapshot(run_copy) == before


def test_resume_invalid_edited_config(capsys, run_copy):
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["workers"]["n"] = 0
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, ["train", "--resume", str(run_copy)])
    check_error(code, err, "workers.n")
    assert snapshot(run_copy) == before


def test_resume_non_run_dir(capsys, work):
    (work / "plain").mkdir()
    (work / "plain" / "x.txt").write_text("x")
    before = snapshot(work)
    code, _, err = run_cli(capsys, ["train", "--resume", str(work / "plain")])
    check_error(code, err, "not an apga run directory", "no config.yaml")
    assert snapshot(work) == before


def test_resume_missing_dir(capsys, work):
    before = snapshot(work)
    code, _, err = run_cli(capsys, ["train", "--resume", str(work / "gone")])
    check_error(code, err, "no such run directory")
    assert snapshot(work) == before


def test_resume_corrupt_checkpoint(capsys, run_copy):
    (run_copy / "checkpoint.npz").write_bytes(b"\x80\x05not a checkpoint at all")
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, ["train", "--resume", str(run_copy)])
    check_error(code, err, "cannot read checkpoint.npz", "not a zip")
    assert snapshot(run_copy) == before


def test_resume_truncated_metrics(capsys, run_copy):
    with open(run_copy / "metrics.csv", "r+b") as f:
        f.truncate(50)
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, ["train", "--resume", str(run_copy)])
    check_error(code, err, "metrics.csv is missing or shorter")
    assert snapshot(run_copy) == before


# --- accepted forms that PyYAML alone would get wrong -----------------------------------------

def test_exponent_floats_and_empty_sections(work):
    write_cfg(work, "algorithm:\nenv: {id: synthetic, kwargs: {noise: 1e-1}}\nbudget: {time: 5E+2}\n")
    cfg = apga.load_config(str(work / "cfg.yaml"), ["algorithm.step_size=1e-3", "workers.comm_time=2e-2"])
    assert cfg.algorithm.step_size == 0.001 and cfg.budget.time == 500.0
    assert cfg.env.kwargs["noise"] == 0.1 and cfg.workers.comm_time == 0.02


# --- the real process exit code ---------------------------------------------------------------

def _subprocess(argv, cwd):
    return subprocess.run([sys.executable, "-m", "apga", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_subprocess_malformed_yaml(work):
    write_cfg(work, "seed: [1, 2\n")
    before = snapshot(work)
    p = _subprocess(["train", str(work / "cfg.yaml"), "--out", str(work / "out")], work)
    check_error(p.returncode, p.stderr, "malformed YAML")
    assert p.stdout == ""
    assert snapshot(work) == before


def test_subprocess_bad_time_model(work):
    write_cfg(work, _merge(BASE, {"workers": {"comm_time": [0.1, 0.2]}}))
    before = snapshot(work)
    p = _subprocess(["train", str(work / "cfg.yaml"), "--out", str(work / "out"), "--set", "seed=4"], work)
    check_error(p.returncode, p.stderr, "workers.comm_time")
    assert snapshot(work) == before


def test_run_dir_in_use(capsys, run_copy, work):
    """A second process must not write a run that another apga process is writing."""
    import fcntl
    fd = os.open(run_copy / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        before = snapshot(run_copy)
        code, _, err = run_cli(capsys, ["train", "--resume", str(run_copy)])
        check_error(code, err, "in use by another apga process")
        code, _, err = run_cli(capsys, ["train", str(work / "base.yaml"), "--out", str(run_copy), "--force"])
        check_error(code, err, "in use by another apga process")
        assert snapshot(run_copy) == before
    finally:
        os.close(fd)
