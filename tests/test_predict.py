"""Record on Ray, replay in the simulator: a Ray run's timings.csv predicts its own round times."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import apga
from apga.cli import main

RUN = {
    "seed": 2,
    "env": {"id": "synthetic", "kwargs": {"dim": 8}},
    "algorithm": {"name": "rennala_nigt", "batch_size": 6, "step_size": 0.05},
    "workers": {"n": 3, "compute_time": {"shape": "sqrt", "scale": 0.2}, "comm_time": {"shape": "sqrt", "scale": 0.05}},
    "budget": {"iterations": 6},
    "eval": {"every": 0},
}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_replayed_round_times_match_the_ray_run(tmp_path, capsys):
    """Injected heterogeneous delays (h_i = 0.2 sqrt(i) s, kappa_i = 0.05 sqrt(i) s): the Ray run
    records every job and transfer; replaying them predicts its time per round within 10 %."""
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    cfg = apga.load_config({**RUN, "runtime": {"name": "ray", "inject_delays": True}})
    apga.train(cfg, str(out), progress=False)
    with open(out / "timings.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"compute", "download", "upload"}
    compute = {w: [float(r["seconds"]) for r in rows if r["kind"] == "compute" and int(r["worker"]) == w]
               for w in range(3)}
    for w in range(3):  # padded to the time model: at least h_i each
        assert compute[w] and min(compute[w]) >= 0.2 * np.sqrt(w + 1) - 1e-3
    assert sorted({int(r["update"]) for r in rows}) == list(range(6))

    assert main(["predict", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in result["methods"]}
    own = rows["rennala_nigt"]
    assert own["updates"] == own["measured_updates"] == 6
    assert own["measured_per_update"] == pytest.approx(own["predicted_per_update"], rel=0.10)
    assert set(rows) == {"rennala_nigt", "malenia_nigt", "sync_nigt", "afedpg", "rennala_pg", "sync_pg"}
    # the same file is a time model: replaying it by hand gives the prediction
    sim = apga.load_config({**RUN, "workers": {"n": 3, "compute_time": {"trace": str(out / "timings.csv")},
                                               "comm_time": {"trace": str(out / "timings.csv")}}})
    apga.train(sim, str(tmp_path / "sim"), progress=False)
    assert apga.read_metrics(str(tmp_path / "sim"))["time"][-1] == pytest.approx(own["predicted_total"], rel=1e-12)


def test_predict_refuses_what_it_cannot_replay(tmp_path, capsys):
    apga.train(apga.load_config(RUN), str(tmp_path / "sim"), progress=False)
    for target, words in ((tmp_path / "sim", "is a simulator run"), (tmp_path / "nothing", "not an apga run directory")):
        assert main(["predict", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]
