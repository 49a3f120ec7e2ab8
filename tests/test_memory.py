"""Long simulations run in constant memory: nothing accumulates per update in the simulator,
the protocol or the synthetic oracle (RSS read from /proc/self/status, no psutil)."""
from __future__ import annotations

import gc

import pytest

from apga.oracle.synthetic import SyntheticOracle
from apga.protocol.registry import make_protocol
from apga.runtime.simulator import Simulator
from apga.runtime.timing import TimeModel

pytestmark = pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def simulator(name: str, n: int = 10, dim: int = 50, seed: int = 0) -> Simulator:
    oracle = SyntheticOracle(n, seed, dim=dim, noise=1.0, nan_prob=0.01)
    times = TimeModel({"dist": "exponential", "mean": "sqrt"}, "sqrt", None, n, dim, seed)
    alg = make_protocol(name, n, oracle.initial_point(), 0.01, 0.1, 16)
    return Simulator(alg, oracle, times, "server", cancel=False)


def run_and_measure(sim: Simulator, updates: int, warmup: int = 2000) -> float:
    for _ in range(warmup):
        sim.step()
    gc.collect()
    start = rss_mb()
    for _ in range(updates - warmup):
        sim.step()
    gc.collect()
    growth = rss_mb() - start
    print(f"RSS {start:.1f} MB -> {start + growth:.1f} MB over {updates - warmup} updates")
    return growth


def check_bounded_state(sim: Simulator) -> None:
    assert len(sim.in_flight) <= sim.n  # AFedPG: one job per worker in flight, never more
    assert len(sim.next_job) == len(sim.busy_until) == sim.n


def test_afedpg_20k_updates_constant_memory():
    sim = simulator("afedpg")
    growth = run_and_measure(sim, 20_000)
    assert sim.totals.iteration == 20_000
    check_bounded_state(sim)
    assert growth < 10.0, f"RSS grew by {growth:.1f} MB over 18000 AFedPG updates"


@pytest.mark.slow
def test_afedpg_100k_updates_constant_memory():
    sim = simulator("afedpg")
    growth = run_and_measure(sim, 100_000)
    assert sim.totals.iteration == 100_000
    check_bounded_state(sim)
    assert growth < 50.0, f"RSS grew by {growth:.1f} MB over 98000 AFedPG updates"


def test_rennala_rounds_constant_memory():
    sim = simulator("rennala_nigt")
    growth = run_and_measure(sim, 1000, warmup=200)
    assert sim.totals.iteration == 1000
    assert growth < 10.0, f"RSS grew by {growth:.1f} MB over 800 Rennala rounds"
