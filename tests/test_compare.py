"""`apga compare` end to end on the synthetic oracle (2 methods x 2 seeds, --jobs 2), plus the
plan / pick / interpolation helpers. The outputs are checked against the per-run metrics.csv."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import yaml

from apga import compare as cmp
from apga.cli import main

BASE = {
    "env": {"id": "synthetic", "kwargs": {"dim": 6, "noise": 0.5, "init_scale": 2.0}},
    "algorithm": {"batch_size": 6, "step_size": 0.1},
    "workers": {"n": 3, "compute_time": "sqrt", "comm_time": 0.3},
    "budget": {"time": 30, "iterations": None},
    "eval": {"every": 2},
    "checkpoint": {"every": 4},
}
COMPARE = {
    "base": BASE,
    "seeds": 2,
    "baselines": ["afedpg"],
    "variants": {
        "rennala_nigt": {"algorithm.name": "rennala_nigt"},
        "afedpg": {"algorithm": {"name": "afedpg", "step_size": 0.05}},
    },
}
VARIANTS = ["rennala_nigt", "afedpg"]
SEEDS = [0, 1]


def _write(path, data):
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return str(path)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    cfg = _write(root / "cmp.yaml", COMPARE)
    out = str(root / "out")
    rc = main(["compare", cfg, "--out", out, "--jobs", "2", "--quiet"])
    assert rc == 0
    return cfg, out


def _eval_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return [r for r in csv.DictReader(f) if r["eval_return"] != ""]


def test_outputs_exist_and_runs_are_train_dirs(done):
    _, out = done
    for name in ("comparison.png", "comparison_trajectories.png", "comparison_comms.png", "comparison.csv",
                 "summary.md", "summary.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for v in VARIANTS:
        for k in SEEDS:
            run = os.path.join(out, "default", v, f"seed{k}")
            for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoint.npz", "returns.png", "tb"):
                assert os.path.exists(os.path.join(run, name)), (run, name)
            with open(os.path.join(run, "config.yaml")) as f:
                resolved = yaml.safe_load(f)
            assert resolved["seed"] == k and resolved["algorithm"]["name"] == v
            with open(os.path.join(run, "summary.json")) as f:
                assert json.load(f)["status"] == "finished"
    # same seed = same initial point for every method
    first = {v: [_eval_rows(os.path.join(out, "default", v, f"seed{k}"))[0]["eval_return"] for k in SEEDS]
             for v in VARIANTS}
    assert first["rennala_nigt"] == first["afedpg"]


def test_csv_matches_per_run_eval_rows(done):
    _, out = done
    with open(os.path.join(out, "comparison.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == cmp.CSV_COLUMNS
    for v in VARIANTS:
        for k in SEEDS:
            mine = [(r["time"], r["trajectories"], r["vector_comms"], r["eval_return"]) for r in rows
                    if r["setting"] == "default" and r["variant"] == v and r["seed"] == str(k)]
            theirs = [(r["time"], r["trajectories"], r["vector_comms"], r["eval_return"])
                      for r in _eval_rows(os.path.join(out, "default", v, f"seed{k}"))]
            assert mine == theirs and len(mine) >= 3
    assert len(rows) == sum(len(_eval_rows(os.path.join(out, "default", v, f"seed{k}")))
                            for v in VARIANTS for k in SEEDS)


def test_summary_numbers_match_recomputation(done):
    _, out = done
    ev = {(v, k): _eval_rows(os.path.join(out, "default", v, f"seed{k}")) for v in VARIANTS for k in SEEDS}
    initial = np.mean([float(r[0]["eval_return"]) for r in ev.values()])
    finals = {v: [float(ev[(v, k)][-1]["eval_return"]) for k in SEEDS] for v in VARIANTS}
    best = max(np.mean(f) for f in finals.values())
    threshold = initial + 0.9 * (best - initial)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)["settings"]["default"]
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    assert s["threshold"] == pytest.approx(threshold, rel=1e-12)
    assert f"{threshold:.4g}" in md
    times = {}
    for v in VARIANTS:
        got = s["variants"][v]
        assert got["final"]["mean"] == pytest.approx(np.mean(finals[v]), rel=1e-12)
        assert got["final"]["p20"] == pytest.approx(np.percentile(finals[v], 20), rel=1e-12)
        assert got["final"]["p80"] == pytest.approx(np.percentile(finals[v], 80), rel=1e-12)
        hits = [next((float(r["time"]) for r in ev[(v, k)] if float(r["eval_return"]) >= threshold), None)
                for k in SEEDS]
        reached = [t for t in hits if t is not None]
        assert got["to_threshold"]["reached"] == len(reached)
        assert got["to_threshold"]["time"]["values"] == hits
        times[v] = float(np.mean(reached)) if reached else None
        if reached:
            assert got["to_threshold"]["time"]["mean"] == pytest.approx(times[v], rel=1e-12)
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| `{v}` |"))
        assert f"{np.mean(finals[v]):.4g}" in line and f"{len(reached)}/2" in line
        # median and IQM over both seeds, a seed that never arrived counting at its last evaluation
        ends = [float(ev[(v, k)][-1]["time"]) for k in SEEDS]
        censored = [e if t is None else t for t, e in zip(hits, ends)]
        ts = got["time_stats"]
        assert ts["median"]["estimate"] == pytest.approx(np.median(censored), rel=1e-12)
        assert ts["iqm"]["estimate"] == pytest.approx(np.mean(censored), rel=1e-12)  # IQM of 2 = mean
        assert ts["censored"] == 2 - len(reached)
        assert ts["median"]["low"] <= ts["median"]["estimate"] <= ts["median"]["high"]
        assert f"{ts['median']['estimate']:.4g} (" in line
        # median over both seeds, "never" = infinitely late
        with_inf = [math.inf if t is None else t for t in hits]
        median = float(np.median(with_inf))
        assert got["to_threshold"]["time"]["median"] == (None if math.isinf(median) else pytest.approx(median, rel=1e-12))
        # the robustness fractions are the same rule at another threshold
        for frac in (0.5, 0.75, 0.9):
            thr = initial + frac * (best - initial)
            at = [next((float(r["time"]) for r in ev[(v, k)] if float(r["eval_return"]) >= thr), None) for k in SEEDS]
            rob = got["robustness"][repr(frac)]
            assert rob["threshold"] == pytest.approx(thr, rel=1e-12) and rob["values"] == at
            assert rob["reached"] == sum(t is not None for t in at)
        assert got["robustness"]["0.5"]["reached"] >= got["robustness"]["0.9"]["reached"]
    assert "| method | 50 % (" in md
    assert any(t is not None for t in times.values())  # the best method reaches 90 % of its own progress
    for v in VARIANTS:
        sp = s["variants"][v]["speedup"]["afedpg"]
        if times[v] and times["afedpg"]:
            assert sp["ratio"] == pytest.approx(times["afedpg"] / times[v], rel=1e-12)
    # the paired speed-up: per seed afedpg's time / rennala's, geometric mean, in the sentence
    def censored(v):
        return [next((float(r["time"]) for r in ev[(v, k)] if float(r["eval_return"]) >= threshold),
                     float(ev[(v, k)][-1]["time"])) for k in SEEDS]
    ratios = np.array(censored("afedpg")) / np.array(censored("rennala_nigt"))
    paired = s["variants"]["rennala_nigt"]["paired"]["afedpg"]
    assert paired["per_seed"] == pytest.approx(ratios.tolist(), rel=1e-12)
    assert paired["ratio"] == pytest.approx(math.exp(np.mean(np.log(ratios))), rel=1e-12)
    assert paired["seeds"] == SEEDS and paired["low"] <= paired["ratio"] <= paired["high"]
    assert s["verdict"] and f"**{s['verdict']}**" in md
    assert f"{paired['ratio']:.2f}×" in s["verdict"] and ("CI excludes 1" in s["verdict"]) != ("CI includes 1" in s["verdict"])


def test_rerun_skips_finished_and_resumes_unfinished(done, capsys):
    cfg, out = done
    runs = {(v, k): os.path.join(out, "default", v, f"seed{k}") for v in VARIANTS for k in SEEDS}
    before = {key: os.stat(os.path.join(d, "metrics.csv")).st_mtime_ns for key, d in runs.items()}
    with open(os.path.join(out, "summary.json")) as f:
        summary_before = json.load(f)
    # mark one run unfinished: it is resumed from its checkpoint, the others are skipped
    unfinished = runs[("afedpg", 1)]
    path = os.path.join(unfinished, "summary.json")
    with open(path) as f:
        s = json.load(f)
    s["status"] = "running"
    with open(path, "w") as f:
        json.dump(s, f)
    capsys.readouterr()
    assert main(["compare", cfg, "--out", out, "--jobs", "2", "--quiet"]) == 0
    assert "1 run, 3 already finished, 0 failed" in capsys.readouterr().out
    with open(path) as f:
        assert json.load(f)["status"] == "finished"
    for key, d in runs.items():
        if d != unfinished:
            assert os.stat(os.path.join(d, "metrics.csv")).st_mtime_ns == before[key]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["settings"] == summary_before["settings"]  # resume = same results
    # everything finished now: nothing runs at all
    assert main(["compare", cfg, "--out", out, "--quiet"]) == 0
    assert "0 run, 4 already finished" in capsys.readouterr().out
    # a changed config is refused (not silently overwritten) unless --force
    assert main(["compare", cfg, "--out", out, "--quiet", "--set", "algorithm.batch_size=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "algorithm.batch_size 6 -> 3" in err and "--force" in err


@pytest.mark.parametrize("change, needle", [
    ({"variants": {"afedpg": {"algorithm.step_size": -1}}}, "variant 'afedpg': algorithm.step_size"),
    ({"variants": {"afedpg": {"algorithm.stepsize": 0.1}}}, "unknown key 'algorithm.stepsize'"),
    ({"seeds": 0}, "seeds"),
    ({"treshold": 0.5}, "unknown key 'treshold'"),
    ({"threshold": {"fraction": 2}}, "threshold.fraction"),
    ({"baselines": ["sync"]}, "baselines"),
    ({"settings": {"slow": {"workers.comm_time": "sqrtt"}}}, "setting 'slow', variant 'rennala_nigt': workers.comm_time"),
    ({"base": {**BASE, "env": {"id": "Hoper-v5"}}}, "env.id"),
])
def test_bad_compare_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, change, needle):
    data = {**COMPARE, **change}
    cfg = _write(tmp_path / "bad.yaml", data)
    out = tmp_path / "out"
    assert main(["compare", cfg, "--out", str(out), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("apga: error: ") and needle in err, err
    assert not out.exists()


def test_plan_grid_settings_only_and_override_order(tmp_path):
    data = {
        "base": BASE, "seeds": [3, 5],
        "grid": {"algorithm.step_size": [0.01, 0.1]},
        "settings": {"sqrt": {"workers.compute_time": "sqrt"},
                     "equal": {"workers": {"compute_time": "equal"}, "threshold": -1.5,
                               "variants": {"afedpg": {"algorithm.momentum": 0.5}}}},
        "variants": {"rennala_nigt": {"algorithm.name": "rennala_nigt"},
                     "afedpg": {"algorithm.name": "afedpg", "grid": {"algorithm.momentum": [0.1, 1.0]}}},
    }
    cfg = _write(tmp_path / "g.yaml", data)
    plan = cmp.load_plan(cfg, str(tmp_path / "o"))
    assert plan.variants == ["rennala_nigt@step_size=0.01", "rennala_nigt@step_size=0.1",
                             "afedpg@step_size=0.01,momentum=0.1", "afedpg@step_size=0.01,momentum=1.0",
                             "afedpg@step_size=0.1,momentum=0.1", "afedpg@step_size=0.1,momentum=1.0"]
    assert len(plan.runs) == 2 * 6 * 2 and plan.baselines == []
    assert plan.thresholds == {"sqrt": ("fraction", 0.9), "equal": ("value", -1.5)}
    r = next(r for r in plan.runs if r.setting == "equal" and r.variant == "afedpg@step_size=0.1,momentum=1.0")
    assert r.cfg.workers.compute_time == "equal" and r.cfg.algorithm.momentum == 1.0  # grid beats setting
    assert r.out_dir == os.path.join(str(tmp_path / "o"), "equal", "afedpg@step_size=0.1,momentum=1.0", "seed3")
    assert {r.seed for r in plan.runs} == {3, 5}
    only = cmp.load_plan(cfg, str(tmp_path / "o"), overrides=["budget.time=5"], seeds=1, only=["afedpg", "sqrt"])
    assert {(r.setting, r.family, r.seed) for r in only.runs} == {("sqrt", "afedpg", 0)}
    assert len(only.runs) == 4 and all(r.cfg.budget.time == 5 for r in only.runs)


def test_pick_and_step_hold(tmp_path):
    plan = cmp.Plan("t.yaml", str(tmp_path), "t", [0], ["default"], ["a@step_size=0.1", "a@step_size=0.2", "b"],
                    {"a@step_size=0.1": "a", "a@step_size=0.2": "a", "b": "b"},
                    {"a@step_size=0.1": {"algorithm.step_size": 0.1}, "a@step_size=0.2": {"algorithm.step_size": 0.2},
                     "b": {}}, {"default": ("fraction", 0.9)}, [])
    summary = {"settings": {"default": {"variants": {
        "a@step_size=0.1": {"final": {"mean": 1.0}, "auc": {"mean": 0.9}},
        "a@step_size=0.2": {"final": {"mean": 2.0}, "auc": {"mean": 0.5}},
        "b": {"final": {"mean": 0.0}, "auc": {"mean": 0.0}}}}}}
    assert cmp.pick(plan, summary, "final")["chosen"] == {"default": {"a": "a@step_size=0.2", "b": "b"}}
    picked = cmp.pick(plan, summary, "auc")
    assert picked["chosen"]["default"]["a"] == "a@step_size=0.1"
    cmp.write_picked(plan, picked, str(tmp_path / "picked.yaml"))
    with open(tmp_path / "picked.yaml") as f:
        doc = yaml.safe_load(f)
    assert doc["settings"]["default"]["variants"] == {"a": {"algorithm.step_size": 0.1}, "b": {}}
    xs, ys = np.array([0.0, 2.0, 5.0]), np.array([1.0, 3.0, 4.0])
    assert cmp.step_hold(xs, ys, np.array([0.0, 1.9, 2.0, 4.9, 5.0, 9.0])).tolist() == [1, 1, 3, 3, 4, 4]
    assert math.isclose(cmp.step_hold(xs, ys, np.linspace(0, 5, 6)).mean(), (1 + 1 + 3 + 3 + 3 + 4) / 6)


def test_shipped_compare_configs_are_valid():
    """Every compare config of configs/ resolves and validates (no run is started)."""
    import glob
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = sorted(glob.glob(os.path.join(root, "paper", "*.yaml")) + glob.glob(os.path.join(root, "compare_*.yaml"))
                   + glob.glob(os.path.join(root, "tune_*.yaml")))
    assert len(files) >= 7
    for path in files:
        plan = cmp.load_plan(path, "unused")
        assert plan.runs, path


def test_a_run_from_before_a_new_config_key_still_counts_as_finished(done, tmp_path):
    """Keys added to the schema later (here runtime.streams) are filled by their defaults when a
    finished run's config.yaml is compared with the plan: no --force, no re-run."""
    import shutil
    cfg, out = done
    plan = cmp.load_plan(_write(tmp_path / "job.yaml", {**COMPARE, "base": {**BASE, "runtime": {"streams": "job"}}}), out)
    run = plan.runs[0]
    copy = tmp_path / "old"
    shutil.copytree(run.out_dir, copy)
    old = yaml.safe_load((copy / "config.yaml").read_text())
    del old["runtime"]["streams"]
    (copy / "config.yaml").write_text(yaml.safe_dump(old))
    moved = cmp.Run(run.setting, run.variant, run.family, run.seed, run.cfg, run.resolved, str(copy))
    assert cmp.run_state(moved) == ("finished", "")
    old["algorithm"]["step_size"] = 0.5  # a real change is still one
    (copy / "config.yaml").write_text(yaml.safe_dump(old))
    state, detail = cmp.run_state(moved)
    assert state == "changed" and "algorithm.step_size" in detail


def test_compare_pairs_by_default_and_a_config_can_opt_out(tmp_path):
    """runtime.streams is round in every run unless the compare config (or --set) says job."""
    plan = cmp.load_plan(_write(tmp_path / "c.yaml", COMPARE), str(tmp_path / "o"))
    assert {r.cfg.runtime.streams for r in plan.runs} == {"round"}
    job = {**COMPARE, "base": {**BASE, "runtime": {"streams": "job", "processes": 1}}}
    plan = cmp.load_plan(_write(tmp_path / "j.yaml", job), str(tmp_path / "o"))
    assert {r.cfg.runtime.streams for r in plan.runs} == {"job"}
    plan = cmp.load_plan(_write(tmp_path / "c.yaml", COMPARE), str(tmp_path / "o"), ["runtime.streams=job"])
    assert {r.cfg.runtime.streams for r in plan.runs} == {"job"}
    # the shipped paper configs pin job: the numbers quoted in docs/results.md stay reproducible
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    plan = cmp.load_plan(os.path.join(root, "paper", "sqrt.yaml"), "unused")
    assert {r.cfg.runtime.streams for r in plan.runs} == {"job"}


def test_titles_wrap_only_between_clauses():
    title = "CartPole-v1, n = 10, h_i = sqrt(i), kappa_i = sqrt(i) d^(1/4)"
    lines = cmp.wrap_title(title, 30).split("\n")
    assert lines == ["CartPole-v1, n = 10,", "h_i = sqrt(i),", "kappa_i = sqrt(i) d^(1/4)"]
    assert cmp.wrap_title(title, 200) == title
