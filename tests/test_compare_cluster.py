"""`apga compare --address`: the runs of a comparison as Ray tasks on a two-node cluster
(ray.cluster_utils.Cluster, both nodes on 127.0.0.1), with the local executor's results."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

ray = pytest.importorskip("ray")

from apga.cli import main  # noqa: E402
from apga.runtime import ray_session  # noqa: E402

from _cluster import loopback_cluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

COMPARE = {
    "base": {
        "env": {"id": "synthetic", "kwargs": {"dim": 6, "noise": 0.5, "init_scale": 2.0}},
        "algorithm": {"batch_size": 6, "step_size": 0.1},
        "workers": {"n": 3, "compute_time": "sqrt", "comm_time": 0.3},
        "budget": {"time": 30, "iterations": None},
        "eval": {"every": 2},
        "checkpoint": {"every": 4},
    },
    "seeds": 2,
    "baselines": ["afedpg"],
    "variants": {
        "rennala_nigt": {"algorithm.name": "rennala_nigt"},
        "afedpg": {"algorithm": {"name": "afedpg", "step_size": 0.05}},
    },
}


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each, on loopback; torn down (and its files removed) after."""
    with loopback_cluster() as c:
        yield c


def _write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _runs(out):
    return {os.path.relpath(os.path.join(d, "metrics.csv"), out): open(os.path.join(d, "metrics.csv"), "rb").read()
            for d, _, files in os.walk(out) if "metrics.csv" in files}


def _summary(out):
    text = open(os.path.join(out, "summary.json")).read().replace(str(out), "OUT")
    return json.loads(text)


def test_compare_on_the_cluster_equals_the_local_compare(cluster, tmp_path):
    cfg = _write(tmp_path / "cmp.yaml", COMPARE)
    assert main(["compare", cfg, "--out", str(tmp_path / "local"), "--jobs", "2", "--quiet"]) == 0
    assert main(["compare", cfg, "--out", str(tmp_path / "cluster"), "--address", cluster.address, "--quiet"]) == 0
    assert not ray.is_initialized()  # the driver disconnected
    local, remote = _runs(tmp_path / "local"), _runs(tmp_path / "cluster")
    assert len(local) == 4 and local == remote  # every run byte for byte
    assert _summary(tmp_path / "local") == _summary(tmp_path / "cluster")
    # a second call skips every finished run
    assert main(["compare", cfg, "--out", str(tmp_path / "cluster"), "--address", cluster.address]) == 0


def test_an_interrupted_cluster_compare_resumes(cluster, tmp_path):
    """Ctrl-C while the runs are under way cancels the tasks; the same command resumes and ends
    with what an uninterrupted local compare writes."""
    data = json.loads(json.dumps(COMPARE))
    data["base"]["budget"] = {"time": None, "iterations": 4000}
    data["base"]["eval"]["every"] = 200
    data["base"]["checkpoint"]["every"] = 100
    cfg = _write(tmp_path / "cmp.yaml", data)
    out = tmp_path / "cluster"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "apga", "compare", cfg, "--out", str(out), "--address",
                             cluster.address, "--quiet"], env=env, stderr=subprocess.PIPE,
                            # Ctrl-C as a terminal delivers it, also when pytest runs in the background
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300  # only catches a hang
    while not any(len(v.splitlines()) > 20 for v in _runs(out).values() if os.path.isdir(out)):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert "run the same `apga compare` command again to resume" in proc.stderr.read().decode()
    unfinished = [d for d, _, files in os.walk(out) if "summary.json" in files
                  and json.load(open(os.path.join(d, "summary.json")))["status"] != "finished"]
    assert unfinished  # interrupted mid-way
    assert main(["compare", cfg, "--out", str(out), "--address", cluster.address, "--quiet"]) == 0
    assert main(["compare", cfg, "--out", str(tmp_path / "local"), "--jobs", "2", "--quiet"]) == 0
    assert _runs(out) == _runs(tmp_path / "local")
    assert _summary(out) == _summary(tmp_path / "local")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) to hide a directory")
def test_a_node_that_cannot_see_the_output_directory_is_named(cluster, tmp_path):
    """A third node runs in its own mount namespace, where an empty tmpfs hides the directory that
    holds --out (as a node without the shared filesystem would): the compare refuses to start, in
    one line naming that node, and writes no run."""
    hidden = tmp_path / "shared"
    hidden.mkdir()
    cfg = _write(tmp_path / "cmp.yaml", COMPARE)
    node_tmp = tempfile.mkdtemp(prefix="apga-n3-")
    # A node started as ray.cluster_utils.Cluster.add_node does, in a child whose mount namespace
    # hides ``hidden`` under an empty tmpfs; it lives until it is sent SIGTERM.
    code = ("import signal, sys, ray; from ray._private.parameter import RayParams; from ray._private.node import Node; "
            "from apga.runtime import ray_session\n"
            "with ray_session._loopback_node_ip():\n"
            f"    p = RayParams(gcs_address={cluster.gcs_address!r}, node_ip_address='127.0.0.1', num_cpus=1, "
            f"num_gpus=0, object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0, "
            f"include_log_monitor=False, node_manager_port=0, temp_dir={node_tmp!r})\n"
            "    p.dashboard_agent_listen_port = None\n"
            "    node = Node(p, head=False, shutdown_at_exit=True, spawn_reaper=True)\n"
            "signal.signal(signal.SIGTERM, lambda *a: (node.kill_all_processes(check_alive=False, allow_graceful=True), sys.exit(0)))\n"
            "signal.pause()\n")
    script = f"mount -t tmpfs tmpfs {hidden} && exec {sys.executable} -c \"$0\""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, code], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # only catches a hang
        while sum(n["Alive"] for n in _nodes(cluster.address)) < 3:
            assert node.poll() is None, node.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        out = hidden / "out"
        proc = subprocess.run([sys.executable, "-m", "apga", "compare", cfg, "--out", str(out), "--address",
                               cluster.address], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert "cannot read" in err[0] and "(127.0.0.1)" in err[0] and str(out) in err[0]
        assert sorted(os.listdir(out)) == []  # no run was started, the marker removed
    finally:
        node.send_signal(signal.SIGTERM)  # the child stops the node's processes
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _kill_tree_of(node_tmp)
        shutil.rmtree(node_tmp, ignore_errors=True)


def _nodes(address):
    """The cluster's nodes, from a short-lived connection in a child process (this process stays
    unconnected)."""
    code = ("import json, ray; from apga.runtime import ray_session; ray_session.join(%r); "
            "print(json.dumps([{'Alive': n['Alive']} for n in ray.nodes()])); ray.shutdown()" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []


def _kill_tree_of(temp_dir):
    """Any process still using the third node's temp dir (its raylet, agents, workers)."""
    psutil = ray_session._psutil()
    for p in psutil.process_iter():
        try:
            if temp_dir in " ".join(p.cmdline()):
                p.kill()
        except psutil.Error:
            pass


def test_one_simulated_run_spreads_its_rollouts_over_the_nodes(cluster):
    """runtime.pool: ray with runtime.address: a round's chunks on actors on both nodes; the
    gradients and evaluations equal one process's bit for bit."""
    import numpy as np

    from apga.config import EnvConfig, PolicyConfig
    from apga.oracle.parallel import make_oracle
    from apga.oracle.rl import RLOracle

    env, policy = EnvConfig(id="Pendulum-v1", horizon=30, invert_obs=True), PolicyConfig(hidden=[8], rollout_batch=2)
    pooled = make_oracle(env, policy, 3, 7, processes=3, pool="ray", address=cluster.address)
    one = RLOracle(env, policy, 3, 7)
    try:
        pooled.wait_ready()
        assert len({node for node, _ in pooled.pool.placement}) == 2  # one actor per one-CPU node
        point = one.initial_point()
        jobs = [(w, i) for w in range(3) for i in range(4)]  # (worker, job index)
        got, want = pooled.gradients(point, jobs), one.gradients(point, jobs)
        assert list(got) == list(want)
        for w in want:
            assert np.array_equal(got[w].grad_sum, want[w].grad_sum)
            assert np.array_equal(got[w].returns, want[w].returns)
        assert pooled.pool.units_remote > 0
        assert pooled.evaluate(point, 6, key=1) == one.evaluate(point, 6, key=1)
    finally:
        pooled.close()
        one.close()
    assert not ray.is_initialized()  # the pool's connection is closed; the cluster is the fixture's
