"""The Ray runtime: every algorithm on real actors, equality with the simulator where the job
assignment is deterministic, loopback-only networking, a two-node cluster, worker crashes.

Lean on purpose (2 workers, short CartPole trajectories, a few rounds): most of the time goes
into starting actor processes. One local Ray instance serves a whole test class.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from apga import statefile  # noqa: E402
from apga.config import load_config  # noqa: E402
from apga.errors import ApgaError  # noqa: E402
from apga.runtime import ray_session  # noqa: E402
from apga.runtime.ray_runtime import RayRuntime  # noqa: E402
from apga.run.build import build_oracle, build_runtime  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

HOME_RAY = os.path.expanduser("~/.ray")
M = 4


def config(name="rennala_nigt", aggregation="server", env="CartPole-v1", n=2, **runtime):
    return load_config({
        "seed": 3,
        "env": {"id": env, "horizon": 100},
        "policy": {"hidden": [16, 16], "rollout_batch": 1},
        "workers": {"n": n, "compute_time": runtime.pop("compute_time", 1.0)},
        "algorithm": {"name": name, "aggregation": aggregation, "batch_size": M, "step_size": 0.05,
                      "momentum": 0.5, "cancel": runtime.pop("cancel", True)},
        "runtime": {"name": "ray", **runtime},
        "budget": {"iterations": 3},
        "eval": {"every": 0},
    })


def batched_config():
    """Rennala NIGT, M = 8 on 2 workers, rollouts of up to 8 trajectories: a worker's share of a
    round is one batch."""
    return load_config({**_as_dict(config("rennala_nigt", "server")),
                        "policy": {"hidden": [16, 16], "rollout_batch": 8},
                        "algorithm": {"name": "rennala_nigt", "batch_size": 8, "step_size": 0.05,
                                      "momentum": 0.5}})


def simulator_for(cfg):
    sim_cfg = load_config({**_as_dict(cfg), "runtime": {"name": "sim", "streams": cfg.runtime.streams}})
    oracle = build_oracle(sim_cfg)
    return build_runtime(sim_cfg, oracle), oracle


def _as_dict(cfg):
    from apga.config import to_dict
    return to_dict(cfg)


def ss_non_loopback(pids):
    """Lines of `ss -tanp` (TCP, every state) owned by ``pids`` whose local address (listening
    sockets) or local and peer addresses (connections) are not loopback."""
    if shutil.which("ss") is None:
        return []
    out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True).stdout
    bad = []
    for line in out.splitlines():
        if not {int(x) for x in re.findall(r"pid=(\d+)", line)} & pids:
            continue
        state, _, _, local, peer = line.split()[:5]
        hosts = [local] if state == "LISTEN" else [local, peer]
        if not all(ray_session.is_loopback(h.rsplit(":", 1)[0].strip("[]")) for h in hosts):
            bad.append(line)
    return bad


# ============================================================================== one local Ray
@pytest.fixture(scope="class")
def local_ray():
    s = ray_session.start_local(2)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.usefixtures("local_ray")
class TestLocal:

    @pytest.mark.parametrize("name,aggregation", [
        ("rennala_nigt", "server"), ("rennala_nigt", "allreduce"),
        ("malenia_nigt", "server"), ("malenia_nigt", "allreduce"),
        ("sync_nigt", "server"), ("sync_nigt", "allreduce"),
    ])
    def test_algorithm_trains_on_actors(self, name, aggregation):
        """A few rounds of each round algorithm on CartPole; protocol invariants on every event.
        sync_nigt assigns jobs deterministically: its iterates equal the simulator's bit for bit.
        (AFedPG runs in the Trainer test below.)"""
        cfg = config(name, aggregation)
        if name == "sync_nigt" and aggregation == "allreduce":
            cfg.runtime.streams = "round"  # the actors key trajectories as the simulator does
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        assert isinstance(rt, RayRuntime)
        sim, sim_oracle = simulator_for(cfg) if name == "sync_nigt" else (None, None)
        theta0 = rt.alg.theta.copy()
        try:
            for it in range(3):
                ev = rt.step()
                u = ev.update
                assert rt.totals.iteration == it + 1 and rt.alg.version == it + 1
                assert u.used + u.rejected == sum(ev.counts)
                if name == "rennala_nigt":
                    assert sum(ev.counts) == M  # stops at the first moment sum b_i >= M
                elif name == "malenia_nigt":
                    b = np.array(ev.counts)
                    assert b.min() >= 1 and M * np.sum(1.0 / b) <= 4 * (1 + 1e-12)
                else:
                    assert ev.counts == [M // 2, M // 2]
                    sim.step()
                    np.testing.assert_array_equal(rt.alg.theta, sim.alg.theta)
                    np.testing.assert_array_equal(rt.alg.state.d, sim.alg.state.d)
                    assert rt.next_job == sim.next_job
                assert u.env_steps > 0 and len(u.returns) == u.used
                assert ev.round_start <= ev.stop <= ev.time == rt.clock
            assert rt.totals.trajectories_computed >= rt.totals.trajectories
            assert not np.array_equal(rt.alg.theta, theta0)
            if aggregation == "allreduce" and name == "rennala_nigt":
                # During a run (gloo group up): every socket of every Ray process is on loopback.
                procs = ray_session.session_processes()
                assert ray_session.non_loopback_sockets(procs) == []
                assert ss_non_loopback({p.pid for p in procs}) == []
                assert rt.resyncs == 0
        finally:
            rt.close()
            oracle.close()
            if sim_oracle is not None:
                sim_oracle.close()

    @pytest.mark.parametrize("direct", [True, False])
    def test_a_point_over_the_inline_size_reaches_every_worker(self, direct):
        """Server aggregation with a policy of 17,794 parameters (139 KB, over INLINE_BYTES): the
        point travels by value over the links, or once through the object store (a reference
        the actor resolves) without them; either way the rounds consume M gradients computed at
        the driver's point (the uploads' fingerprints are checked against it)."""
        from apga.runtime.ray_runtime import INLINE_BYTES
        cfg = load_config({**_as_dict(config("rennala_nigt", "server", direct_calls=direct)),
                           "policy": {"hidden": [128, 128], "rollout_batch": 1}})
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        try:
            assert rt.alg.round_point().nbytes > INLINE_BYTES
            for it in range(2):
                ev = rt.step()
                assert sum(ev.counts) == M and rt.alg.version == it + 1
        finally:
            rt.close()
            oracle.close()

    @pytest.mark.parametrize("name,direct", [("rennala_nigt", True), ("rennala_nigt", False),
                                             ("malenia_nigt", True), ("rennala_pg", True)])
    def test_rounds_consume_what_the_simulator_consumes_ties_included(self, name, direct):
        """Injected delays on binary-exact times (h = 1/16, 1/8, 1/8, 1/4 s) make finishes tie
        exactly; both runtimes apply the protocol's one consumption rule to the same nominal
        times, so every round consumes the same gradients per worker (ties at the stop
        included) and, with round streams and server aggregation, the iterates are equal bit
        for bit; the same whether the round's calls go over the direct links or through Ray."""
        from apga.runtime.link import Link
        cfg = load_config({**_as_dict(config(name, "server", env="synthetic", n=4, inject_delays=True,
                                             streams="round", compute_time=[0.0625, 0.125, 0.125, 0.25],
                                             direct_calls=direct)),
                           "algorithm": {"name": name, "batch_size": 3, "step_size": 0.05, "momentum": 0.5}})
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        sim, sim_oracle = simulator_for(cfg)
        try:
            rt.start()
            assert all(isinstance(ln, Link) if direct else ln is None for ln in rt._links) and len(rt._links) == 4
            for _ in range(3):
                ev, sim_ev = rt.step(), sim.step()
                assert ev.counts == sim_ev.counts
                assert sum(ev.counts) > 3  # the rule's tie: gradients finishing at the stop count
                np.testing.assert_array_equal(rt.alg.theta, sim.alg.theta)
        finally:
            rt.close()
            oracle.close()
            sim_oracle.close()

    def test_batched_rounds_consume_whole_batches_of_exact_gradients(self):
        """Real time, policy.rollout_batch 8, 2 workers on 2 CPUs: each actor rolls its target
        out as one oracle call (one batch, one GPOMDP pass), then waits (or, if the other keeps
        it waiting long, goes on one job at a time). A batch's gradients finish together, so the
        consumption rule takes whole batches (ties), and the round's update equals one
        recomputed from exactly those oracle calls, at the job indices the event reports."""
        import copy
        from apga.oracle.base import WorkerBatch
        from apga.runtime.ray_runtime import round_targets
        cfg = batched_config()
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        last = None
        try:
            for k in range(3):
                before = copy.deepcopy(rt.alg)
                targets = round_targets(before, [True, True], last)
                assert sum(targets) == 8 and (k > 0 or targets == [4, 4])
                point = before.round_point()
                ev = rt.step()
                last, first = ev.counts, ev.first_jobs
                assert sum(ev.counts) >= 8 and ev.update.used + ev.update.rejected == sum(ev.counts)
                sums = {}
                for w, b in enumerate(ev.counts):
                    assert b == 0 or b >= targets[w]  # never part of a batch
                    if b:
                        jobs = range(first[w], first[w] + b)
                        calls = [list(jobs[:targets[w]])] + [[j] for j in jobs[targets[w]:]]
                        total = WorkerBatch.empty(oracle.dim)
                        for call in calls:
                            total = total.merge(oracle.gradients(point, [(w, j) for j in call])[w])
                        sums[w] = total
                before.finish_round(sums)  # two workers: the sum's order does not matter
                np.testing.assert_array_equal(rt.alg.theta, before.theta)
            assert rt.totals.trajectories_computed >= rt.totals.trajectories
        finally:
            rt.close()
            oracle.close()

    def test_workers_sharing_cores_hold_at_their_targets_and_are_extended(self, monkeypatch):
        """4 workers on 2 CPUs (real time): each computes exactly its target (2 of M = 8) and
        waits, so rounds consume 2 + 2 + 2 + 2 with nothing computed in vain (and counted as
        computed exactly: reports carry running totals); when an actor (workers 2 and 3) is
        killed mid-round their shares never come, every live worker waits, and the driver extends
        their targets until the round closes."""
        cfg = load_config({**_as_dict(config("rennala_nigt", "server", n=4)),
                           "policy": {"hidden": [16, 16], "rollout_batch": 8},
                           "algorithm": {"name": "rennala_nigt", "batch_size": 8, "step_size": 0.05,
                                         "momentum": 0.5}})
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        try:
            for _ in range(4):
                assert rt.step().counts == [2, 2, 2, 2]
            assert rt.totals.trajectories_computed == rt.totals.trajectories == 32
            kill_mid_round(monkeypatch, rt, rt.worker_pids()[3])
            ev = rt.step()  # holding workers with nobody to extend them would hang here
            assert sum(ev.counts) >= 8 and ev.update.used + ev.update.rejected == sum(ev.counts)
            if ev.counts[3] == 0:  # the other targets (2 each) fell short of 8: someone was extended
                assert max(ev.counts) >= 3
            deadline = time.monotonic() + 120  # only catches a hang
            while rt.restarts == 0:
                assert sum(rt.step().counts) >= 8
                assert time.monotonic() < deadline
        finally:
            rt.close()
            oracle.close()

    def test_a_worker_waiting_at_its_target_goes_on_while_another_straggles(self):
        """Real time, 2 workers with a core each, M = 8 (targets 4 and 4): worker 1's actor is
        made a straggler by stopping its process 95 ms in every 100 (SIGSTOP / SIGCONT), so it
        stays responsive within 0.1 s but computes at a twentieth of its speed, whatever the
        scheduler does. Worker 0 rolls its 4 out, waits as long again, then goes on one job at a
        time, as in Rennala: the round closes with worker 0's gradients beyond its target, and
        the next round's targets follow the counts. (A busy process and nice 19 on the
        straggler's core were not enough: a waking low-priority task may still run at once,
        and the straggler kept up in some runs.)"""
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("needs 2 cores (a core per worker: otherwise no worker goes on past its target)")
        cfg = batched_config()
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        done, throttle, slow = threading.Event(), None, None

        def straggle(pid: int) -> None:
            while not done.is_set():
                os.kill(pid, signal.SIGSTOP)
                done.wait(0.095)
                os.kill(pid, signal.SIGCONT)
                done.wait(0.005)

        try:
            assert rt.step().counts == [4, 4]  # equal targets at first; both wait at them
            slow = rt.worker_pids()[1]
            throttle = threading.Thread(target=straggle, args=(slow,), daemon=True)
            throttle.start()
            ev = rt.step()
            assert ev.counts[0] > 4 and sum(ev.counts) >= 8  # worker 0 went on past its target
            assert ev.update.used + ev.update.rejected == sum(ev.counts)
            ev = rt.step()
            assert ev.counts[0] >= 7  # the targets follow the last counts (7 and 1 after 8 and 0)
        finally:
            done.set()
            if throttle is not None:
                throttle.join()
            if slow is not None:
                os.kill(slow, signal.SIGCONT)
            rt.close()
            oracle.close()

    @pytest.mark.parametrize("aggregation", ["server", "allreduce"])
    def test_workers_sharing_cores_share_actors_and_roll_out_together(self, aggregation, monkeypatch):
        """4 workers on 2 CPUs: 2 actor processes host 2 workers each and roll both workers'
        targets out as one oracle call; each worker's sum is its part of that call, so the
        round's update equals one recomputed from those calls. AllReduce runs with one rank per
        actor; killing an actor loses both its workers, the group is rebuilt without it and again
        with it once Ray has restarted it."""
        import copy
        cfg = load_config({**_as_dict(config("rennala_nigt", aggregation, n=4)),
                           "policy": {"hidden": [16, 16], "rollout_batch": 8},
                           "algorithm": {"name": "rennala_nigt", "aggregation": aggregation, "batch_size": 8,
                                         "step_size": 0.05, "momentum": 0.5}})
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        try:
            rt.start()
            pids = rt.worker_pids()
            assert pids[0] == pids[1] != pids[2] == pids[3]
            for _ in range(3):
                before, first = copy.deepcopy(rt.alg), list(rt.next_job)
                point = before.round_point()
                ev = rt.step()
                assert ev.counts == [2, 2, 2, 2] and ev.first_jobs == first  # holding: nothing past the targets
                sums = {}
                for group in ([0, 1], [2, 3]):
                    out = oracle.gradients(point, [(w, j) for w in group for j in (first[w], first[w] + 1)])
                    sums.update({w: out[w] for w in group})
                before.finish_round(sums)  # the runtimes add the workers' sums in another order
                np.testing.assert_allclose(rt.alg.theta, before.theta, rtol=1e-12, atol=1e-14)
            assert rt.totals.trajectories_computed == rt.totals.trajectories == 24
            if aggregation == "allreduce":
                assert rt._group == [0, 1] and rt.resyncs == 0
            kill_mid_round(monkeypatch, rt, pids[2])
            deadline = time.monotonic() + 120  # only catches a hang
            while True:
                ev = rt.step()
                assert sum(ev.counts) >= 8 and ev.update.used + ev.update.rejected == sum(ev.counts)
                if rt.restarts == 2 and ev.counts[2] > 0 and ev.counts[3] > 0:
                    break
                assert time.monotonic() < deadline
            assert rt.worker_pids()[2] not in pids and rt.resyncs == 0
            # the driver's link to that actor leads to its new incarnation
            assert not rt._links[1].lost and rt._links[1].incarnation == rt.worker_info[2]["incarnation"]
            if aggregation == "allreduce":
                assert rt._group == [0, 1]
        finally:
            rt.close()
            oracle.close()

    def test_afedpg_workers_sharing_cores_roll_their_jobs_out_together(self):
        """AFedPG, 4 workers on 2 CPUs: 2 actors host 2 workers each and roll their in-flight
        jobs (each at its own point) out together; the driver still applies one gradient per
        update, from every worker, and each is bit for bit the gradient of its job at the point
        that job was sent."""
        from collections import deque
        cfg = config("afedpg", "server", n=4)
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        sent = {w: deque() for w in range(4)}  # per worker: (job, point) in flight, oldest first
        applied = []
        real_dispatch, real_apply = rt._dispatch, rt.alg.apply

        def dispatch(w):
            sent[w].append((rt.next_job[w], rt.alg.current_point()[1].copy()))
            real_dispatch(w)

        def apply(batch, version):
            applied.append(batch)
            return real_apply(batch, version)

        rt._dispatch, rt.alg.apply = dispatch, apply
        try:
            rt.start()
            pids = rt.worker_pids()
            assert pids[0] == pids[1] != pids[2] == pids[3]
            senders = []
            for it in range(12):
                ev = rt.step()
                w = ev.worker
                assert ev.counts == [int(i == w) for i in range(4)] and ev.update.used == 1
                job, point = sent[w].popleft()
                expected = oracle.gradients(point, [(w, job)])[w]
                np.testing.assert_array_equal(applied[-1].grad_sum, expected.grad_sum)
                senders.append(w)
            assert set(senders) == {0, 1, 2, 3} and rt.totals.trajectories == 12
        finally:
            rt.close()
            oracle.close()

    def test_trainer_runs_afedpg_and_checkpoints_on_ray(self, tmp_path, capfd):
        """apga.run.train with runtime: ray and AFedPG: one gradient per update, one vector each way,
        metrics on the wall clock, a checkpoint whose runtime loads without Ray."""
        from apga.run import read_metrics, train
        cfg = load_config({**_as_dict(config("afedpg", "server")), "eval": {"every": 2, "episodes": 2},
                           "budget": {"iterations": 6}})
        res = train(cfg, str(tmp_path / "run"), progress=True)
        # the start-up stages are shown (stderr is not a terminal here: plain lines)
        err = capfd.readouterr().err
        assert "ray: up in" not in err  # this class's Ray was already running: not started again
        assert re.search(r"ray: 2 actors up on 1 node\(s\) after [0-9.]+ s; first round running", err), err
        m = read_metrics(res.out_dir)
        assert list(m["iteration"]) == list(range(7)) and res.summary["runtime"] == "ray"
        assert list(np.diff(m["trajectories"])) == [1] * 6
        assert m["vector_comms"][1] == 2 + 2 and list(np.diff(m["vector_comms"][1:])) == [2] * 5
        assert np.all(np.diff(m["time"]) > 0) and not np.isnan(m["eval_return"][-1])
        state = statefile.loads((tmp_path / "run" / "checkpoint.npz").read_bytes())
        rt = state["runtime"]
        assert rt.totals.iteration == 6 and rt._actors is None and rt.clock == m["time"][-1]
        assert sum(rt.next_job) >= 6
        assert rt._authkey is None and rt._links == []  # the links' secret stays out of the file

    def test_cancellation_is_immediate_and_discarding_waits(self):
        """Worker 1 is 20x slower (injected). With cancel, its trajectory in flight is abandoned at
        each stop; with cancel: false (switched on the same runtime) it finishes, is discarded,
        and keeps worker 1 busy across rounds."""
        cfg = config("rennala_nigt", "server", env="synthetic", compute_time=[0.05, 1.0], inject_delays=True)
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        try:
            rt.start()
            for k in range(6):
                rt.cancel = k < 3
                ev = rt.step()
                assert ev.counts == [M, 0]
                if k == 2:
                    # worker 1 started one job per round, each cancelled: none ever completed
                    assert rt.totals.trajectories_computed == 3 * M and rt.next_job[1] == 3
                    # Worker 0 may already have started its next job when the stop reaches it.
                    assert 3 * M <= rt.next_job[0] <= 3 * (M + 1)
            assert rt.next_job[1] == 4  # job 3 still running: worker 1 started nothing since
            deadline = time.monotonic() + 120  # only catches a hang
            while rt.next_job[1] == 4:  # busy with job 3 (1 s): worker 1 starts nothing else
                assert rt.step().counts == [M, 0]
                assert time.monotonic() < deadline
            assert rt.next_job[1] == 5  # job 3 finished (discarded), and only then job 4 started
            # job 3 was computed and never used (worker 0 may have finished-and-discarded some too)
            assert rt.totals.trajectories_computed >= rt.totals.trajectories + 1
        finally:
            rt.close()
            oracle.close()

    def test_rennala_survives_a_killed_worker(self, monkeypatch):
        """SIGKILL worker 1 mid-round: the round goes on with worker 0, worker 1 restarts and rejoins."""
        cfg = config("rennala_nigt", "server", env="synthetic", compute_time=[0.15, 0.15], inject_delays=True)
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        try:
            rt.start()
            rt.step()
            pid = rt.worker_pids()[1]
            kill_mid_round(monkeypatch, rt, pid)
            events = [rt.step()]
            deadline = time.monotonic() + 120  # only catches a hang
            while rt.restarts == 0 or events[-1].counts[1] == 0:
                events.append(rt.step())
                assert time.monotonic() < deadline
            for ev in events:
                assert sum(ev.counts) == M and ev.update.used == M
            assert rt.restarts == 1 and rt.worker_pids()[1] != pid
            assert rt.totals.trajectories == M * rt.totals.iteration
        finally:
            rt.close()
            oracle.close()

    def test_malenia_waits_for_a_restart_and_fails_after_the_timeout(self, tmp_path, monkeypatch):
        """Malenia needs every worker: a killed worker is waited for and rejoins (AllReduce group
        rebuilt, NIGT copy reloaded); one that never comes back fails the run after worker_timeout."""
        hang = str(tmp_path / "hang")

        def factory():  # hangs forever on a restart once the marker file exists
            if os.path.exists(hang) and ray.get_runtime_context().was_current_actor_reconstructed:
                time.sleep(3600)
            from apga.oracle.synthetic import SyntheticOracle
            return SyntheticOracle(2, 3)

        cfg = config("malenia_nigt", "allreduce", env="synthetic", compute_time=[0.1, 0.1], inject_delays=True)
        oracle = build_oracle(cfg)
        rt = build_runtime(cfg, oracle)
        rt.oracle_factory = factory
        try:
            rt.start()
            rt.step()
            kill_mid_round(monkeypatch, rt, rt.worker_pids()[1])
            ev = rt.step()
            assert ev.restarts == 1 and min(ev.counts) >= 1
            ev = rt.step()
            assert ev.restarts == 0 and rt.resyncs == 0 and rt.alg.version == 3
            open(hang, "w").close()
            rt.worker_timeout = 3.0
            os.kill(rt.worker_pids()[1], signal.SIGKILL)
            t = time.monotonic()
            with pytest.raises(ApgaError, match=r"worker\(s\) \[1\] did not come back within runtime.worker_timeout=3"):
                rt.step()
            assert 3.0 <= time.monotonic() - t < 120  # waited the timeout (the upper bound only catches a hang)
            assert rt.alg.version == 3 and rt.totals.iteration == 3  # nothing aggregated was lost
        finally:
            rt.close()
            oracle.close()


def test_round_targets_split_the_closing_total_by_the_last_round():
    """The batch hints: the smallest total that closes the round, split among the live workers
    in proportion to the last round's counts (equally at first); any protocol, never named."""
    from apga.protocol.registry import make_protocol
    from apga.runtime.ray_runtime import apportion, round_targets
    assert apportion(20, [12, 8]) == [12, 8] and apportion(7, [1, 1, 1]) == [3, 2, 2]
    assert apportion(5, [0, 0]) == [0, 0]
    theta = np.zeros(3)
    rennala = make_protocol("rennala_nigt", 3, theta, 0.1, batch_size=20)
    assert round_targets(rennala, [True] * 3, None) == [7, 7, 6]
    assert round_targets(rennala, [True] * 3, [12, 8, 0]) == [11, 8, 1]  # at least 1: another chance
    assert round_targets(rennala, [True, False, True], [12, 8, 0]) == [18, 0, 2]
    assert round_targets(rennala, [True, False, True], [0, 8, 0]) == [10, 0, 10]
    assert round_targets(rennala, [True] * 3, [12, 8, 0], base=[9, 7, 0]) == [2, 2, 0]  # 4 more
    sync = make_protocol("sync_nigt", 3, theta, 0.1, batch_size=6)
    assert round_targets(sync, [True] * 3, None) == [sync.quota(w) for w in range(3)] == [2, 2, 2]
    assert round_targets(sync, [True, True, False], None) is None  # cannot close without worker 2


def kill_mid_round(monkeypatch, rt, pid):
    """SIGKILL ``pid`` from inside the next round, once the driver has begun it and waits for
    the workers' first reports (an event of the round, not a timer)."""
    real_wait = rt._wait

    def wait(*args, **kwargs):
        monkeypatch.setattr(rt, "_wait", real_wait)
        os.kill(pid, signal.SIGKILL)
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(rt, "_wait", wait)


def test_rl_cancellation_hook_stops_within_one_env_step():
    """The RL oracle checks should_stop before every env step and raises Cancelled."""
    from apga.oracle.base import Cancelled
    cfg = config()
    oracle = build_oracle(cfg)
    try:
        calls = []

        def check():
            calls.append(1)
            return len(calls) > 5

        with pytest.raises(Cancelled):
            oracle.gradients(oracle.initial_point(), [(0, 0)], should_stop=check)
        assert len(calls) == 6  # five steps taken, the sixth refused
    finally:
        oracle.close()


@pytest.mark.parametrize("cancel", [True, False])
def test_a_begin_cancels_a_rollout_of_the_last_round_still_running(cancel):
    """In real time the driver begins the next round without waiting for the halts' replies, so
    a begin can reach an actor whose rollout of the last round is still running (its halt not
    there yet). The begin cancels it (cancel: true) or lets it finish and discards it (false);
    either way the new round's gradients are its own and no job index is used twice. The actor
    body runs in this process: the order of the calls is the point, not Ray."""
    from apga.runtime.ray_worker import WorkerActor
    cfg = config(env="Pendulum-v1", n=1)
    long_round = 400  # 400 Pendulum trajectories of 100 steps: one rollout (batch) of seconds
    spec = {"n": 1, "times": None, "inject": False, "cancel": cancel, "batch": long_round,
            "oracle_factory": lambda: build_oracle(cfg), "release": False, "aggregation": "server"}
    actor = WorkerActor([0], spec)
    try:
        point, origin = actor.oracle.initial_point(), time.time()

        def begin(r, target):  # (worker, round, point, first job, quota, origin, cancel, sample round,
            # round start, late, target), as the driver sends it
            actor.begin_all([(0, r, point, 0, None, origin, cancel, None, time.time(), False, target)])

        begin(1, long_round)
        deadline = time.monotonic() + 60
        while actor.slots[0].job_stop is None:  # the compute thread has taken the rollout
            assert time.monotonic() < deadline, "the round-1 rollout never started"
            time.sleep(0.001)
        begin(2, 1)  # no halt of round 1 first
        report = actor.progress(2, {0: None}, 120.0, {})[0]
        while report["round"] == 2 and not report["finishes"] and time.monotonic() < deadline + 120:
            report = actor.progress(2, {0: report["stamp"]}, 120.0, {})[0]  # as the driver polls on
        assert report["round"] == 2 and len(report["finishes"]) == 1  # round 1's batch is not in round 2
        assert report["first_job"] == long_round  # jobs 0..399 went to round 1: never used twice
        assert report["next_job"] == long_round + 1
        # cancel: the round-1 rollout was abandoned, only round 2's trajectory completed; else
        # it ran to its end and was discarded
        assert report["completed"] == (1 if cancel else long_round + 1)
        with actor.cv:
            assert actor.slots[0].first(2, 1).trajectories == 1
    finally:
        actor.shutdown()
        actor.oracle.close()


@pytest.mark.parametrize("cancel", [True, False])
def test_a_halted_job_the_compute_thread_has_not_seen_yet_shifts_no_nominal_time(cancel):
    """With injected delays the driver begins the next round once the halts' replies are in; the
    compute thread may not have woken from the cancelled job yet (a loaded machine). The new
    round's nominal times must not depend on that: a cancelled job holds nothing up, and its
    finish is not the new round's horizon; cancel: false lets it finish, so the new round starts
    at its nominal end, as in the simulator. The actor's lock is held from the halt to the begin
    so that the compute thread is certainly behind: the order of events is the point, not Ray."""
    from apga.runtime.ray_worker import WorkerActor
    cfg = config(env="synthetic", n=1, compute_time=0.5, inject_delays=True)
    oracle = build_oracle(cfg)
    times = build_runtime(cfg, oracle).times
    spec = {"n": 1, "times": times, "inject": True, "cancel": cancel, "batch": 1,
            "oracle_factory": lambda: build_oracle(cfg), "release": False, "aggregation": "server"}
    actor = WorkerActor([0], spec)
    try:
        point, origin = actor.oracle.initial_point(), time.time()

        def begin(r, wall):
            actor.begin_all([(0, r, point, actor.slots[0].next_job, None, origin, cancel, None, wall, False, 1)])

        begin(1, time.time())
        deadline = time.monotonic() + 60  # only catches a hang
        while actor.slots[0].inflight_finish is None:  # the first job (nominal 0 -> 0.5) is in flight
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with actor.cv:  # the compute thread cannot take the halt into account until released
            actor.halt(1, [0], {})
            busy_until, wall2 = actor.slots[0].busy_until, time.time()
            begin(2, wall2)
            start = max(0.0, busy_until - wall2) if not cancel else 0.0  # cancel: false waits for the job
            assert actor.slots[0].report(2, None)["horizon"] == start  # nothing of round 2 can finish before
        report = actor.progress(2, {0: None}, 60.0, {})[0]
        while report["round"] == 2 and not report["finishes"] and time.monotonic() < deadline:
            report = actor.progress(2, {0: report["stamp"]}, 60.0, {})[0]
        assert report["finishes"] == [start + 0.5]
        if not cancel:
            assert start > 0.0  # the job of round 1 was still running when round 2 began
    finally:
        actor.shutdown()
        actor.oracle.close()
        oracle.close()


# ============================================================================== two nodes
def test_two_node_cluster_on_loopback():
    """ray.cluster_utils.Cluster with a head and a worker node (both 127.0.0.1): the runtime joins
    it through runtime.address, places one worker actor on each node, and AllReduces across them."""
    from _cluster import loopback_cluster
    rt = oracle = None
    with loopback_cluster() as cluster:
        try:
            cfg = config("rennala_nigt", "allreduce", address=cluster.address)
            oracle = build_oracle(cfg)
            rt = build_runtime(cfg, oracle)
            rt.start()
            nodes = {info["node_id"] for info in rt.worker_info}
            assert len(nodes) == 2, rt.worker_info
            assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == nodes
            for _ in range(2):
                ev = rt.step()
                assert sum(ev.counts) == M
            assert rt.resyncs == 0
            assert ray_session.non_loopback_sockets() == []
        finally:
            if rt is not None:
                rt.close()  # disconnects the driver; the cluster is not ours to stop
            if oracle is not None:
                oracle.close()


def test_an_interrupted_start_leaves_nothing_running(tmp_path):
    """Ctrl-C (or a failure) right after ray.init has started Ray's processes, inside
    start_local: they are stopped and the private folder is gone (a driver process of its own, so
    that this one's Ray state is untouched)."""
    psutil = ray_session._psutil()
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, ray\n"
        "from apga.runtime import ray_session\n"
        "real = ray.init\n"
        "def init(**kwargs):\n"
        "    real(**kwargs)\n"
        "    print('pids', *[p.pid for p in ray_session.ray_processes()], flush=True)\n"
        "    raise KeyboardInterrupt\n"
        "ray.init = init\n"
        "try:\n"
        "    ray_session.start_local(1)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n")
    before = set(glob.glob(f"{tempfile.gettempdir()}/{ray_session.TEMP_PREFIX}*"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300).stdout
    assert "interrupted" in out, out
    pids = [int(x) for x in out.split("pids", 1)[1].split("\n", 1)[0].split()]
    assert pids  # GCS, raylet, agents were up

    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert [pid for pid in pids if running(pid)] == []
    assert set(glob.glob(f"{tempfile.gettempdir()}/{ray_session.TEMP_PREFIX}*")) == before


def test_nothing_left_running():
    """A local session that ran a runtime leaves, once closed, no Ray process (none of those it
    started, and none reparented to init that belongs to its temp dir), no temp dir and no token
    in $HOME."""
    psutil = ray_session._psutil()
    home_before = os.path.exists(HOME_RAY)
    session = ray_session.start_local(1)
    temp_dir = session.temp_dir
    cfg = config("rennala_nigt", "server", env="synthetic")
    oracle = build_oracle(cfg)
    rt = build_runtime(cfg, oracle)
    try:
        assert sum(rt.step().counts) >= M
        started = ray_session.ray_processes()
        assert started  # GCS, raylet, agents, the actors
    finally:
        rt.close()
        oracle.close()
        session.close()

    def ours(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and (
                p in started or temp_dir in " ".join(p.cmdline()))
        except psutil.NoSuchProcess:
            return False

    assert [p for p in started if ours(p)] == []  # Session.close waits for them and kills stragglers
    assert [p for p in psutil.process_iter() if ray_session.is_ray_process(p) and ours(p)] == []
    assert not ray.is_initialized()
    assert not os.path.exists(temp_dir)
    if not home_before:
        assert not os.path.exists(HOME_RAY)
