"""Round-trip latency of a call from the driver to an actor: a Ray actor call against the Ray
runtime's direct link (apga/runtime/link.py), with 0, 1 and 2 busy-looping processes on the
machine (the Ray runtime's actors keep the cores busy while the driver calls them).

    python benchmarks/call_latency.py [--calls 300]

Prints, per load, the median and 90th percentile milliseconds of each kind of call (an empty
reply, and a 41 KB float64 vector there and back: a Reacher-v5 policy's parameters), and the
ratio Ray / link of the medians; ``--json PATH`` writes them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np


class Echo:
    """An actor whose one method returns its argument (on a Ray call thread, or a link thread)."""

    def __init__(self, authkey: bytes):
        import ray
        from apga.runtime.link import LinkServer
        self.server = LinkServer(self, ray.util.get_node_ip_address(), authkey, threads=4)

    def address(self):
        return self.server.address

    def progress(self, x):  # named as a call the link serves; it only echoes
        return x


def _busy(stop) -> None:
    while not stop.is_set():
        pass


def _timed(call, payload, count: int) -> np.ndarray:
    out = np.empty(count)
    for k in range(count):
        t = time.perf_counter()
        call(payload)
        out[k] = time.perf_counter() - t
    return out * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300, help="calls per kind and load (default 300)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    from apga.runtime import link, ray_session
    ray = ray_session._import_ray()
    session = ray_session.start_local(num_cpus=2)
    rows = []
    try:
        authkey = os.urandom(32)
        actor = ray.remote(Echo).options(max_concurrency=4).remote(authkey)
        ln = link.Link(ray.get(actor.address.remote()), authkey)
        vector = np.zeros(5_000)

        def via_ray(x):
            return ray.get(actor.progress.remote(x))

        def via_link(x):
            c = ln.call("progress", x)
            link.wait([c], 60.0)
            return c.result()

        for busy in (0, 1, 2):
            stop = mp.Event()
            hogs = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
            for h in hogs:
                h.start()
            time.sleep(0.2)
            for name, payload in (("empty", None), ("41 KB", vector)):
                for _ in range(20):  # warm up
                    via_ray(payload), via_link(payload)
                r, k = _timed(via_ray, payload, args.calls), _timed(via_link, payload, args.calls)
                row = {"busy_processes": busy, "payload": name,
                       "ray_ms_median": float(np.median(r)), "ray_ms_p90": float(np.percentile(r, 90)),
                       "link_ms_median": float(np.median(k)), "link_ms_p90": float(np.percentile(k, 90))}
                row["ratio_ray_link"] = row["ray_ms_median"] / row["link_ms_median"]
                rows.append(row)
                print(f"busy {busy}, {name:>5}: Ray {row['ray_ms_median']:.3f} ms (p90 {row['ray_ms_p90']:.3f}), "
                      f"link {row['link_ms_median']:.3f} ms (p90 {row['link_ms_p90']:.3f}), "
                      f"Ray / link {row['ratio_ray_link']:.1f}", flush=True)
            stop.set()
            for h in hogs:
                h.join()
        ln.close()
        ray.kill(actor)
    finally:
        session.close()
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"calls": args.calls, "rows": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
