"""`apga compare` on the local executor against the same comparison through a Ray cluster.

    python benchmarks/compare_cluster_bench.py [--updates 3000]

Starts a two-node cluster on loopback (ray.cluster_utils.Cluster, one CPU per node), runs one
small comparison (synthetic oracle, 2 methods x 2 seeds) with `--jobs 2` and with `--address`,
prints both wall times and whether every run's metrics.csv is byte-identical, and removes
everything it made. A script, not a test: about a minute.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import time

import yaml

COMPARE = {
    "base": {
        "env": {"id": "synthetic", "kwargs": {"dim": 6, "noise": 0.5, "init_scale": 2.0}},
        "algorithm": {"batch_size": 6, "step_size": 0.1},
        "workers": {"n": 3, "compute_time": "sqrt", "comm_time": 0.3},
        "eval": {"every": 100},
        "checkpoint": {"every": 100},
    },
    "seeds": 2,
    "baselines": ["afedpg"],
    "variants": {
        "rennala_nigt": {"algorithm.name": "rennala_nigt"},
        "afedpg": {"algorithm": {"name": "afedpg", "step_size": 0.05}},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=3000, help="budget.iterations of every run")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    from ray.cluster_utils import Cluster

    from apga.cli import main as apga
    from apga.runtime import ray_session
    work = tempfile.mkdtemp(prefix="apga-bench-")
    try:
        data = {**COMPARE, "base": {**COMPARE["base"], "budget": {"time": None, "iterations": args.updates}}}
        cfg = os.path.join(work, "cmp.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(data, f)
        t = time.time()
        assert apga(["compare", cfg, "--out", os.path.join(work, "local"), "--jobs", "2", "--quiet"]) == 0
        local = time.time() - t
        tmp = os.path.join(work, "ray")
        os.makedirs(os.path.join(tmp, "ray"))
        os.environ["RAY_TMPDIR"] = tmp
        with ray_session._loopback_node_ip():
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": tmp})
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=tmp)
            cluster.wait_for_nodes()
        try:
            t = time.time()
            assert apga(["compare", cfg, "--out", os.path.join(work, "cluster"), "--address", cluster.address,
                         "--quiet"]) == 0
            remote = time.time() - t
        finally:
            cluster.shutdown()
        same = all(open(os.path.join(work, "local", "default", v, f"seed{k}", "metrics.csv"), "rb").read()
                   == open(os.path.join(work, "cluster", "default", v, f"seed{k}", "metrics.csv"), "rb").read()
                   for v in ("rennala_nigt", "afedpg") for k in (0, 1))
        print(f"4 runs x {args.updates} updates: local executor (--jobs 2) {local:.1f} s wall; two-node loopback "
              f"cluster (1 CPU each, --address) {remote:.1f} s wall (ratio {remote / local:.2f}); "
              f"metrics.csv identical: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
