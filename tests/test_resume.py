"""Crash safety: SIGKILL `apga train` at arbitrary moments (including in the middle of a checkpoint
write), then `apga train --resume DIR` finishes and metrics.csv is byte-identical to an
uninterrupted run with the same seed, for every algorithm.

After every kill: metrics.csv holds only whole lines with the header's number of fields and is a
byte prefix of the uninterrupted run's file; checkpoint.npz (when there is one) loads and refers
to a prefix of the file. Kills that must land inside a checkpoint write use the test hook
APGA_TEST_SLOW_WRITES (apga/files.py), and the test waits until a half-written temp file of a
checkpoint (a zip) exists before it kills.

The reference runs and the last resume of each chain run in-process (fast); the killed runs are
real `python -m apga train` processes.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

import apga
from apga import statefile
from apga.run import train as run_train
from apga.run.logger import COLUMNS
from apga.run.loop import Trainer

SLOW_ENV = "APGA_TEST_SLOW_WRITES"

BASE = {
    "seed": 11,
    "env": {"id": "synthetic", "kwargs": {"dim": 6, "noise": 0.5}},
    "algorithm": {"batch_size": 8, "step_size": 0.05, "momentum": 0.3},
    "workers": {"n": 4, "comm_time": 0.05},
    "eval": {"every": 5},
    "checkpoint": {"every": 7},
}

CASES = {
    "rennala_server_cancel": {
        "algorithm": {"name": "rennala_nigt", "aggregation": "server", "cancel": True},
        "workers": {"compute_time": {"dist": "exponential", "mean": "sqrt"}},
        "budget": {"iterations": 250},
    },
    "malenia_allreduce_nocancel": {
        "env": {"kwargs": {"dim": 6, "noise": 0.5, "shift": 1.0}},
        "algorithm": {"name": "malenia_nigt", "aggregation": "allreduce", "cancel": False},
        "workers": {"compute_time": {"dist": "lognormal", "mean": "sqrt", "spread": 0.7}},
        "budget": {"iterations": 200},
    },
    "sync_server_nocancel": {
        "algorithm": {"name": "sync_nigt", "aggregation": "server", "cancel": False},
        "workers": {"compute_time": {"dist": "uniform", "mean": "linear", "spread": 0.5}},
        "budget": {"iterations": 250},
    },
    "afedpg_delay": {
        "algorithm": {"name": "afedpg", "step_schedule": "delay"},
        "workers": {"compute_time": {"dist": "exponential", "mean": "sqrt"}, "comm_time": "sqrt"},
        "budget": {"iterations": 500},
    },
}
SLOW_CASES = {
    "rennala_allreduce_nocancel": {
        "algorithm": {"name": "rennala_nigt", "aggregation": "allreduce", "cancel": False},
        "workers": {"compute_time": {"dist": "gamma", "mean": "sqrt", "spread": 1.5}},
        "budget": {"iterations": 700},
    },
    "malenia_server_cancel": {
        "env": {"kwargs": {"dim": 6, "noise": 0.5, "shift": 1.0}},
        "algorithm": {"name": "malenia_nigt", "aggregation": "server", "cancel": True},
        "workers": {"compute_time": {"dist": "exponential", "mean": "sqrt"}},
        "budget": {"iterations": 500},
    },
    "afedpg_constant_budget_time": {
        "algorithm": {"name": "afedpg"},
        "workers": {"compute_time": {"dist": "exponential", "mean": "linear"}},
        "budget": {"time": 1500.0, "iterations": None},
    },
    "afedpg_long": {
        "algorithm": {"name": "afedpg"},
        "workers": {"n": 10, "compute_time": {"dist": "exponential", "mean": "sqrt"}, "comm_time": "sqrt"},
        "budget": {"iterations": 5000},
        "checkpoint": {"every": 50},
    },
}


def merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs (in-process), built on first use: name -> (config path, metrics bytes)."""
    root = tmp_path_factory.mktemp("references")
    cache = {}

    def get(name: str):
        if name not in cache:
            cfg = merge(BASE, {**CASES, **SLOW_CASES}[name])
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            out = root / name
            run_train(apga.load_config(str(path)), str(out), progress=False)
            cache[name] = (str(path), read(out / "metrics.csv"), str(out))
        return cache[name]

    return get


def spawn(argv, slow_writes: float | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(SLOW_ENV, None)
    if slow_writes:
        env[SLOW_ENV] = str(slow_writes)
    return subprocess.Popen([sys.executable, "-m", "apga", "train", *argv, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _checkpoint_temp(out) -> bool:
    """A half-written temp file of a checkpoint exists (zip local-file header)."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return False
    for name in names:
        if name.startswith(".tmp-"):
            try:
                with open(os.path.join(out, name), "rb") as f:
                    if f.read(4) == b"PK\x03\x04":
                        return True
            except FileNotFoundError:
                pass
    return False


def kill_when(proc: subprocess.Popen, out, moment: str, ref: bytes, fraction: float = 0.0,
              timeout: float = 60.0) -> str:
    """SIGKILL ``proc`` at ``moment``: 'config' (config.yaml exists), 'rows' (metrics.csv has
    reached ``fraction`` of the reference size) or 'checkpoint' (past ``fraction``, a checkpoint
    temp file is half written). Returns what happened: 'killed' or 'finished' (too late)."""
    metrics, target = os.path.join(out, "metrics.csv"), int(fraction * len(ref))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()
            assert proc.returncode == 0, err
            return "finished"
        if moment == "config":
            ready = os.path.exists(os.path.join(out, "config.yaml"))
        else:
            try:
                ready = os.path.getsize(metrics) >= target
            except FileNotFoundError:
                ready = False
            if ready and moment == "checkpoint":
                ready = _checkpoint_temp(out)
        if ready:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            return "killed"
        time.sleep(0.001)
    proc.kill()
    raise AssertionError(f"timed out waiting for {moment}")


def check_killed_dir(out, ref: bytes) -> dict:
    """What a killed run leaves behind is consistent; returns facts for the figures."""
    facts = {"temp_files": sorted(n for n in os.listdir(out) if n.startswith(".tmp-"))}
    metrics = os.path.join(out, "metrics.csv")
    data = read(metrics) if os.path.exists(metrics) else b""
    assert data == ref[:len(data)], "metrics.csv of a killed run is not a prefix of the uninterrupted one"
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    for line in data.decode().splitlines():
        assert len(line.split(",")) == len(COLUMNS), f"torn line {line!r}"
    facts["rows"] = max(data.count(b"\n") - 1, 0)
    ckpt = os.path.join(out, "checkpoint.npz")
    facts["checkpoint"] = os.path.exists(ckpt)
    if facts["checkpoint"]:
        state = statefile.loads(read(ckpt))  # always loadable: written by temp + fsync + rename
        assert state["csv_bytes"] <= len(data)
        facts["checkpoint_iteration"] = state["runtime"].totals.iteration
    return facts


def finish_in_process(out, ref: bytes, ref_dir: str) -> None:
    Trainer.resume(str(out), progress=False)
    assert read(os.path.join(out, "metrics.csv")) == ref, "resumed metrics.csv differs from the uninterrupted run"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    got = yaml.safe_load(read(os.path.join(out, "summary.json")))
    want = yaml.safe_load(read(os.path.join(ref_dir, "summary.json")))
    got.pop("wall_seconds"), want.pop("wall_seconds")
    assert got == want and got["status"] == "finished"


def scalar_steps(tb_dir: str, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.parametrize("name", list(CASES))
def test_kill_and_resume_is_byte_identical(name, references, tmp_path):
    """Two kills per algorithm: one at a random-ish moment (30 % of the rows), then the resumed
    process is killed inside a checkpoint write; a final resume must reproduce the reference."""
    cfg_path, ref, ref_dir = references(name)
    out = tmp_path / "run"
    proc = spawn([cfg_path, "--out", str(out)])
    assert kill_when(proc, out, "rows", ref, 0.3) == "killed"  # a running process was interrupted
    check_killed_dir(out, ref)

    proc = spawn(["--resume", str(out)], slow_writes=0.02)
    assert kill_when(proc, out, "checkpoint", ref, 0.6) == "killed"
    assert check_killed_dir(out, ref)["temp_files"], "the kill should have left a half-written temp file"
    finish_in_process(out, ref, ref_dir)

    if name == "afedpg_delay":  # TensorBoard sees every update once, despite two purges
        n = yaml.safe_load(read(os.path.join(ref_dir, "summary.json")))["iterations"]
        assert scalar_steps(str(out / "tb"), "counters/trajectories") == list(range(1, n + 1))
        steps = scalar_steps(str(out / "tb" / "time"), "eval_return_vs_time")
        assert steps == sorted(set(steps)) and len(steps) == n // BASE["eval"]["every"]


def test_kill_before_first_checkpoint_then_repeated_resume(references, tmp_path):
    """Killed as soon as config.yaml exists (before any checkpoint), then killed again after the
    resume restarted it, then resumed twice more (the last one a no-op on a finished run)."""
    cfg_path, ref, ref_dir = references("rennala_server_cancel")
    out = tmp_path / "run"
    proc = spawn([cfg_path, "--out", str(out)], slow_writes=0.02)
    assert kill_when(proc, out, "config", ref) == "killed"
    check_killed_dir(out, ref)
    proc = spawn(["--resume", str(out)])
    assert kill_when(proc, out, "rows", ref, 0.5) == "killed"
    check_killed_dir(out, ref)
    finish_in_process(out, ref, ref_dir)
    finish_in_process(out, ref, ref_dir)  # resuming a finished run changes nothing


def train_until_interrupted(monkeypatch, cfg, out, iteration: int) -> None:
    """Train ``cfg`` into ``out`` in-process; the simulator raises KeyboardInterrupt (as Ctrl-C
    would) once, before update ``iteration``."""
    from apga.runtime.simulator import Simulator
    real_step, fired = Simulator.step, []

    def step(self):
        if self.totals.iteration == iteration and not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Simulator, "step", step)
    with pytest.raises(KeyboardInterrupt):
        run_train(apga.load_config(cfg), str(out), progress=False)


def test_resume_after_keyboard_interrupt(references, tmp_path, monkeypatch):
    """An in-process interruption (Ctrl-C) at an update that is not a checkpoint."""
    cfg_path, ref, ref_dir = references("afedpg_delay")
    out = tmp_path / "run"
    train_until_interrupted(monkeypatch, cfg_path, out, 333)
    assert yaml.safe_load(read(out / "summary.json"))["status"] == "running"
    finish_in_process(out, ref, ref_dir)


def test_resume_of_a_run_started_before_a_config_key_existed(references, tmp_path, monkeypatch):
    """A run written by an apga without ``runtime.streams`` (config.yaml, the checkpoint's resolved
    config and its stored simulator all lack it) resumes: the new key takes its default."""
    cfg_path, ref, ref_dir = references("rennala_server_cancel")
    out = tmp_path / "run"
    train_until_interrupted(monkeypatch, cfg_path, out, 100)
    monkeypatch.undo()
    doc = yaml.safe_load(read(out / "config.yaml"))
    del doc["runtime"]["streams"]
    (out / "config.yaml").write_text(yaml.safe_dump(doc))
    state = statefile.loads(read(out / "checkpoint.npz"))
    del state["resolved"]["runtime"]["streams"]
    del state["runtime"].__dict__["streams"]
    (out / "checkpoint.npz").write_bytes(statefile.dumps(state))
    finish_in_process(out, ref, ref_dir)


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(apga.__file__), "oracle", "rl.py")),
                    reason="needs the RL oracle")
def test_resume_cartpole(tmp_path, monkeypatch):
    """The Gymnasium oracle resumes exactly too (interrupted in-process, between checkpoints)."""
    cfg = {"seed": 2, "env": {"id": "CartPole-v1", "horizon": 40},
           "policy": {"hidden": [8], "rollout_batch": 8},
           "algorithm": {"name": "afedpg", "step_size": 0.05},
           "workers": {"n": 3, "compute_time": {"dist": "exponential", "mean": "sqrt"}},
           "budget": {"iterations": 40}, "eval": {"every": 10, "episodes": 2}, "checkpoint": {"every": 6}}
    ref_dir = tmp_path / "ref"
    run_train(apga.load_config(cfg), str(ref_dir), progress=False)
    ref = read(ref_dir / "metrics.csv")
    out = tmp_path / "run"
    train_until_interrupted(monkeypatch, cfg, out, 22)
    finish_in_process(out, ref, str(ref_dir))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES) + list(SLOW_CASES))
def test_many_random_kills(name, references, tmp_path):
    """Six kills per config at random moments (seeded), half of them inside checkpoint writes
    (slow writes, checkpoint temp file present), each resumed by a new process."""
    cfg_path, ref, ref_dir = references(name)
    rnd = random.Random(name)
    out = tmp_path / "run"
    fractions = sorted(rnd.uniform(0.05, 0.95) for _ in range(6))
    for k, frac in enumerate(fractions):
        argv = [cfg_path, "--out", str(out)] if k == 0 else ["--resume", str(out)]
        moment = "checkpoint" if k % 2 else "rows"
        proc = spawn(argv, slow_writes=0.01 if moment == "checkpoint" else None)
        assert kill_when(proc, out, moment, ref, frac) == "killed"
        check_killed_dir(out, ref)
    finish_in_process(out, ref, ref_dir)
