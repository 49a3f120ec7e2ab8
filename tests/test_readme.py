"""The README tells the truth: every Python block runs verbatim (from a copy of the repository's
configs, with the working directory at its root, as the README intends), and the headline it
quotes is what its main job, `apga compare configs/compare_quick.yaml`, produces."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
README = os.path.join(ROOT, "README.md")


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def python_blocks() -> list:
    return re.findall(r"^```python\n(.*?)^```", _readme(), flags=re.S | re.M)


def _params():
    out = []
    for i, block in enumerate(python_blocks()):
        trains = "apga.train(" in block  # a block that trains a policy takes about a minute
        out.append(pytest.param(block, id=f"block{i}", marks=[pytest.mark.slow] if trains else []))
    return out


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("block", _params())
def test_readme_python_block_runs_verbatim(block, tmp_path, monkeypatch):
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code


def _headline_numbers(summary: dict) -> dict:
    st = summary["settings"]["default"]["variants"]["rennala_nigt"]
    return {b: st["paired"][b] for b in ("afedpg", "sync_nigt")}


@pytest.mark.slow
def test_readme_headline_is_what_the_main_job_produces(tmp_path):
    """Runs the README's first command (30 short runs, 1-2 minutes on 2 cores) and compares."""
    from apga.cli import main

    out = str(tmp_path / "compare_quick")
    assert main(["compare", os.path.join(ROOT, "configs", "compare_quick.yaml"), "--out", out, "--quiet"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    text = " ".join(_readme().split())  # the README wraps its lines
    paired = _headline_numbers(summary)
    sync, afedpg = paired["sync_nigt"], paired["afedpg"]
    n = len(summary["seeds"])
    assert f"{n} paired seeds" in text
    assert (f"{sync['ratio']:.2f}× sooner than synchronous NIGT (90 % CI {sync['low']:.2f}–{sync['high']:.2f}; "
            f"first on {sync['first']} of {n} seeds") in text
    assert sync["low"] > 1  # the README says "sooner": the interval must exclude 1
    assert afedpg["high"] < 1 and "AFedPG arrives first" in text
    assert (f"paired speed-up against it is {afedpg['ratio']:.2f}× (90 % CI {afedpg['low']:.2f}–"
            f"{afedpg['high']:.2f}; Rennala NIGT first on {afedpg['first']} of {n} seeds") in text
    assert summary["settings"]["default"]["verdict"] in open(os.path.join(out, "summary.md"), encoding="utf-8").read()
