"""Running a plan on a Ray cluster (``apga compare --address HOST:PORT|auto``): every run is one
Ray task on some node, with the plan, the skipping and resuming, the progress display and the
outputs of the local executor (apga/compare/execute.py).

- Runs write into the output directory, so every node must see it (a shared filesystem): checked
  before anything runs. The driver writes a marker with a random token; one task pinned to each
  node reads it back; a node that does not see it (or sees another directory at that path) is
  named in a one-line error.
- A task decides on the node whether to start its run or resume it (``run_state``), so when a node
  dies Ray retries the task elsewhere and it continues from the run's last checkpoint.
- Ctrl-C cancels the tasks (their processes are killed); every run can be resumed by running the
  same command again.
- Each task runs in a fresh worker process (``max_calls=1``) with ``--cpus-per-run`` CPUs.
"""
from __future__ import annotations

import os
import secrets
import time

from apga.compare.execute import OverallProgress, _execute, run_fraction, run_state
from apga.compare.plan import Plan, Run
from apga.errors import ApgaError

MARKER = ".apga-shared-fs-check"
TASK_RETRIES = 3  # retries of a run whose node or worker process died


def _run_task(run: Run, log_path: str) -> tuple:
    """On a node: train or resume one run as its directory says (a retried task resumes)."""
    state, _ = run_state(run)
    mode = "resume" if state == "resume" else "train"
    return _execute((mode, run.out_dir, run.resolved, log_path))


def _read_marker(path: str) -> tuple[str, str | None]:
    """On a node: (its IP, the marker's content or None if the node cannot read it)."""
    import ray
    ip = ray.util.get_node_ip_address()
    try:
        with open(path) as f:
            return ip, f.read()
    except OSError:
        return ip, None


def check_shared_filesystem(out: str) -> None:
    """Every alive node sees ``out`` (the same directory, not just the same path), or ApgaError."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    os.makedirs(out, exist_ok=True)
    path = os.path.join(os.path.abspath(out), MARKER)
    token = secrets.token_hex(16)
    with open(path, "w") as f:
        f.write(token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        reader = ray.remote(num_cpus=0)(_read_marker)
        refs = {reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(path): n for n in nodes}
        # Every read is awaited before any node is named: a task still pending when the driver
        # disconnects makes Ray log an error line on stderr after ours.
        answers = ray.get(list(refs), timeout=120)
        for (ip, seen), node in zip(answers, refs.values()):
            if seen != token:
                what = "cannot read" if seen is None else "sees another directory at"
                raise ApgaError(f"--address: node {node['NodeID'][:12]} ({ip}) {what} {os.path.abspath(out)!r}: "
                                "--out must be on a filesystem every node of the cluster sees (e.g. NFS)")
    finally:
        os.unlink(path)


def execute_on_cluster(plan: Plan, todo: list, skipped: int, total: int, address: str,
                       cpus_per_run: float = 1.0, progress: bool = True) -> dict:
    """Run ``todo`` (runs not finished) as Ray tasks on the cluster at ``address``; same report as
    the local executor: {'skipped', 'ran', 'failed'}."""
    from apga.runtime import ray_session
    session = ray_session.join(address)
    import ray
    try:
        check_shared_filesystem(plan.out)
        task = ray.remote(num_cpus=cpus_per_run, max_calls=1, max_retries=TASK_RETRIES,
                          retry_exceptions=False)(_run_task)
        refs = {}
        for r in todo:
            log = os.path.join(os.path.abspath(plan.out), "logs", r.setting, r.variant, f"seed{r.seed}.log")
            refs[task.remote(r, log)] = r
        slots = max(1, int(float(ray.cluster_resources().get("CPU", 1.0)) // cpus_per_run))
        report = {"skipped": skipped, "ran": 0, "failed": []}
        bar = OverallProgress(total, progress)
        done_frac = {id(r): 0.0 for r in todo}
        finished, start, pending = skipped, time.time(), dict(refs)
        try:
            bar.update(skipped, finished, 0, 0)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                events = []
                for ref in ready:
                    r = pending.pop(ref)
                    try:
                        status, payload, _tb = ray.get(ref)
                    except Exception as exc:  # the task failed for good (retries used up)
                        status, payload = "error", f"task failed on the cluster: {type(exc).__name__}: {exc}"
                    name = f"{r.setting}/{r.variant}/seed{r.seed}"
                    done_frac[id(r)] = 1.0
                    if status == "ok":
                        finished += 1
                        report["ran"] += 1
                        events.append(f"{name} finished")
                    else:
                        report["failed"].append((r, payload))
                        events.append(f"{name} failed: {payload}")
                running = 0
                for r in pending.values():
                    done_frac[id(r)] = run_fraction(r, start - 1.0)
                    running += done_frac[id(r)] > 0
                total_done = skipped + sum(done_frac.values())
                for ev in events or [None]:
                    bar.update(total_done, finished, min(running, slots), len(report["failed"]), ev)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)  # kills the task's process; its run resumes next time
            raise
        finally:
            bar.close()
        return report
    finally:
        session.close()
