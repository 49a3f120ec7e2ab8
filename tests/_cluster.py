"""A two-node Ray cluster on loopback for the tests (ray.cluster_utils.Cluster: a head and a
worker node, one CPU each, both 127.0.0.1, files in a private temp dir)."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager


@contextmanager
def loopback_cluster():
    """Yields the Cluster; afterwards the driver is disconnected, the nodes stopped and their
    files removed."""
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.cluster_utils import Cluster

    from apga.runtime import ray_session

    tmp = tempfile.mkdtemp(prefix="apga-cluster-")
    os.makedirs(os.path.join(tmp, "ray"))
    # Token authentication on the nodes, as `ray start --head` turns it on when a token is at hand
    # (Cluster's nodes skip that step): apga's join() turns it on in the driver whenever a token
    # is, and a driver in token mode talking to nodes without it loses its actors. Ray's own call
    # sets RAY_AUTH_MODE=token for this process and the nodes it starts (a local apga session turns
    # it on the same way, so it stays on).
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # Cluster writes <tmp>/ray/ray_current_cluster
    cluster = None
    try:
        with ray_session._loopback_node_ip():
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": tmp})
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=tmp)
            cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)
