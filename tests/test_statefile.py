"""Checkpoints without pickle: the state file keeps every supported value exactly, rebuilds only
registered classes, never runs code from the file, and a run directory with a hostile or
older-format checkpoint is refused with one line and nothing executed."""
from __future__ import annotations

import io
import json
import math
import os
import pathlib
import pickle
import shutil
import zipfile
from fractions import Fraction

import numpy as np
import pytest

import apga
from apga import statefile
from apga.cli import main
from apga.errors import ApgaError
from apga.oracle.synthetic import SyntheticOracle
from apga.protocol.registry import make_protocol
from apga.runtime.simulator import Simulator
from apga.runtime.timing import TimeModel

BASE = {"seed": 3, "env": {"id": "synthetic", "kwargs": {"dim": 5, "noise": 0.5}},
        "algorithm": {"batch_size": 6, "step_size": 0.05, "momentum": 0.3},
        "workers": {"n": 3}, "budget": {"iterations": 20}, "eval": {"every": 5}, "checkpoint": {"every": 4}}


def test_plain_values_round_trip_exactly():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    value = {
        "none": None, "t": True, "i": -(2**70), "f": 0.1, "neg0": -0.0, "nan": math.nan, "inf": -math.inf,
        "s": "$not a tag", "b": b"\x00\xff", "tuple": (1, (2.5, "x")), "list": [1, [2]],
        "set": {3, 1, 2}, "fs": frozenset({"a"}), "frac": Fraction(1, 3) + Fraction(10**30),
        "np64": np.float64(1.5), "npint": np.int64(-7), "npbool": np.bool_(True),
        "arr": arr, "same": arr, "empty": np.zeros(0), "ints": np.arange(3, dtype=np.uint64),
        7: "int key", (1, 2): "tuple key", "$dollar": 1,
    }
    back = statefile.loads(statefile.dumps(value))
    assert set(back) == set(value)
    for k, v in value.items():
        b = back[k]
        assert type(b) is type(v), k
        if isinstance(v, np.ndarray):
            assert b.dtype == v.dtype and b.shape == v.shape and np.array_equal(b, v)
        elif isinstance(v, float) and math.isnan(v):
            assert math.isnan(b)
        else:
            assert b == v, k
    assert math.copysign(1.0, back["neg0"]) == -1.0
    assert back["arr"] is back["same"]  # sharing is kept
    assert statefile.dumps(value) == statefile.dumps(value)  # deterministic bytes


def test_unregistered_types_are_refused_when_writing():
    class Foreign:
        pass
    with pytest.raises(statefile.StateFileError, match=r"state\['x'\]\[1\].*Foreign.*register"):
        statefile.dumps({"x": [1, Foreign()]})
    with pytest.raises(statefile.StateFileError, match="dtype object"):
        statefile.dumps(np.array([None, 1], dtype=object))
    with pytest.raises(statefile.StateFileError):
        statefile.dumps(print)  # functions are code, not state


def test_registered_class_without_init_and_cycles():
    calls = []

    @statefile.register(name="test_statefile.Node", transient=("handle",))
    class Node:
        def __init__(self):
            calls.append(1)
            self.children, self.parent, self.handle = [], None, object()

    root = Node()
    child = Node()
    child.parent = root
    root.children.append(child)
    calls.clear()
    back = statefile.loads(statefile.dumps(root))
    assert calls == []  # __init__ never ran
    assert type(back) is Node and back.children[0].parent is back and back.handle is None


def test_simulator_state_continues_bit_for_bit():
    def build():
        oracle = SyntheticOracle(n_workers=3, seed=1, dim=6, noise=1.0, shift=0.5)
        times = TimeModel({"dist": "exponential", "mean": "sqrt"}, 0.1, None, n=3, dim=oracle.dim, seed=1)
        return oracle, times
    for name in ("malenia_nigt", "afedpg"):
        oracle, times = build()
        alg = make_protocol(name, 3, oracle.initial_point(), step_size=0.05, momentum=0.2, batch_size=8)
        sim = Simulator(alg, oracle, times)
        for _ in range(15):
            sim.step()
        copy = statefile.loads(statefile.dumps(sim))
        copy.attach(*build())
        for _ in range(15):
            a, b = sim.step(), copy.step()
            assert a.time == b.time and a.update.grad_norm == b.update.grad_norm
        assert np.array_equal(sim.alg.theta, copy.alg.theta) and sim.totals == copy.totals


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


class _Touch:
    """Unpickling this creates the marker file (what a hostile checkpoint would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_hostile_files_execute_nothing(tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps({"version": 2, "x": _Touch(str(marker))})
    obj_array = io.BytesIO()
    np.save(obj_array, np.array([_Touch(str(marker))], dtype=object), allow_pickle=True)
    doc = {"format": statefile.FORMAT, "version": statefile.VERSION, "arrays": 1, "root": {"$array": 0}}
    cases = {
        "pickle": (payload, "not a zip"),
        "pickled npy": (_zip({"state.json": json.dumps(doc).encode(), "a0.npy": obj_array.getvalue()}), "a0.npy"),
        "class name": (_zip({"state.json": json.dumps({**doc, "arrays": 0, "root": {
            "$obj": "posix.system", "id": 0, "state": {}}}).encode()}), "unknown class 'posix.system'"),
        "version": (_zip({"state.json": json.dumps({**doc, "version": 99}).encode()}), "version 99"),
        "tag": (_zip({"state.json": json.dumps({**doc, "arrays": 0, "root": {"$eval": "1"}}).encode()}), "$eval"),
    }
    for name, (data, words) in cases.items():
        with pytest.raises(statefile.StateFileError) as info:
            statefile.loads(data)
        assert words in str(info.value) and "\n" not in str(info.value), name
    assert not marker.exists()
    pickle.loads(payload)  # the payload is real: unpickling it does create the marker
    assert marker.exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("statefile") / "run"
    apga.train(apga.load_config(BASE), str(out), progress=False)
    return out


@pytest.mark.parametrize("where", ["checkpoint.pkl", "checkpoint.npz"])
def test_resume_with_a_hostile_pickle_checkpoint_runs_nothing(finished, tmp_path, capsys, where):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    marker = tmp_path / "marker"
    if where == "checkpoint.pkl":  # a run directory of an older apga, or one that was tampered with
        os.unlink(run / "checkpoint.npz")
    (run / where).write_bytes(pickle.dumps({"version": 2, "runtime": _Touch(str(marker))}))
    before = {p: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code = main(["train", "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("apga: error:")
    assert ("checkpoint version 1 or 2" if where == "checkpoint.pkl" else "not a zip") in err
    assert not marker.exists()
    assert {p: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_checkpoint_is_versioned_and_readable_with_numpy(finished):
    with np.load(finished / "checkpoint.npz", allow_pickle=False) as z:
        doc = json.loads(z["state.json"])
        assert doc["format"] == "apga-state" and doc["version"] == statefile.VERSION
        assert all(z[name].dtype != object for name in z.files if name.endswith(".npy"))
    state = statefile.loads((finished / "checkpoint.npz").read_bytes())
    assert state["version"] == 3 and state["runtime"].totals.iteration == 20


def test_other_checkpoint_version_is_refused(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    state = statefile.loads((run / "checkpoint.npz").read_bytes())
    state["version"] = 2
    (run / "checkpoint.npz").write_bytes(statefile.dumps(state))
    with pytest.raises(ApgaError, match="checkpoint version 2, this apga reads version 3"):
        apga.resume(str(run), progress=False)
