"""Running a plan: each run one ``apga.run`` training (or resume) on a process pool, the
finished ones skipped, with one overall progress display (``apga compare``)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import yaml

from apga import config as cfgmod
from apga.errors import ApgaError, ConfigError
from apga.compare.plan import Plan, Run, _first_difference


# --------------------------------------------------------------------------------------------
# run states and execution
# --------------------------------------------------------------------------------------------

def _normalise(d: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(d, sort_keys=True))


def run_state(run: Run) -> tuple[str, str]:
    """('new' | 'finished' | 'resume' | 'changed', detail) for the run's directory."""
    cfg_path = os.path.join(run.out_dir, "config.yaml")
    if not os.path.isdir(run.out_dir) or not os.listdir(run.out_dir):
        return "new", ""
    if not os.path.exists(cfg_path):
        return "new", ""
    try:
        old = cfgmod.read_yaml(cfg_path)
    except ConfigError as exc:
        return "changed", f"unreadable config.yaml ({exc})"
    try:
        old = cfgmod.with_defaults(old)  # keys added to the schema since the run are no change
    except ConfigError:
        pass  # e.g. a key removed since: the comparison below names it
    new = _normalise(run.resolved)
    if _normalise(old) != new:
        return "changed", _first_difference(_normalise(old), new)
    try:
        with open(os.path.join(run.out_dir, "summary.json")) as f:
            status = json.load(f).get("status")
    except (OSError, ValueError):
        status = None
    if status == "finished":
        return "finished", ""
    return "resume", ""


def _child_init() -> None:
    """Children ignore Ctrl-C (the terminal sends it to the whole group): the parent stops them."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from apga.guards import die_with_parent
    die_with_parent()  # a parent killed by SIGKILL or SIGHUP takes its workers with it


def _stop_children(executor) -> None:
    """Terminate the pool's processes now; their runs resume from the last checkpoint next time."""
    for proc in list(getattr(executor, "_processes", {}).values()):
        try:
            proc.terminate()
        except Exception:  # noqa: BLE001 - already gone
            pass
    executor.shutdown(wait=False, cancel_futures=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _execute(task: tuple) -> tuple:
    """Child process: run (or resume) one run quietly; stdout/stderr go to the task's log file."""
    mode, out_dir, data, log_path = task
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        try:
            import torch
            torch.set_num_threads(1)
        except ImportError:  # pragma: no cover
            pass
        from apga import run as training
        if mode == "resume":
            result = training.resume(out_dir, progress=False)
        else:
            result = training.train(cfgmod.from_dict(data), out_dir, force=True, progress=False)
        return ("ok", result.summary, "")
    except ApgaError as exc:
        return ("error", str(exc), "")
    except BaseException as exc:  # noqa: BLE001 - report any crash of one run, keep the others going
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        return ("error", f"{type(exc).__name__}: {exc}", tb)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _last_row(metrics_path: str) -> dict | None:
    try:
        with open(metrics_path, "rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    if not lines or len(lines[-1].split(",")) != len(header) or lines[-1].startswith(header[0]):
        return None
    cells = dict(zip(header, lines[-1].split(",")))
    try:
        return {k: float(v) if v else math.nan for k, v in cells.items()}
    except ValueError:
        return None


def run_fraction(run: Run, not_before: float = 0.0) -> float:
    """How far a run is through its budget, from the last line of its metrics.csv."""
    path = os.path.join(run.out_dir, "metrics.csv")
    try:
        if os.path.getmtime(path) < not_before:
            return 0.0
    except OSError:
        return 0.0
    row = _last_row(path)
    if row is None:
        return 0.0
    from apga.run.loop import budget_progress
    done = budget_progress(run.cfg.budget, row.get("time", 0.0), row.get("trajectories", 0.0), row.get("iteration", 0.0))
    return float(min(1.0, done))


class OverallProgress:
    """ONE bar for the whole comparison (tqdm on a terminal, else a plain line every 5 % and per run)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar, self.next_mark = None, 0.05
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="compare", unit="run", file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}<{remaining}{postfix}]")

    def update(self, done: float, finished: int, running: int, failed: int, event: str | None = None) -> None:
        if not self.enabled:
            return
        frac = done / self.total if self.total else 1.0
        if self.bar is not None:
            self.bar.n = round(done, 2)
            self.bar.set_postfix_str(f"{finished} done, {running} running" + (f", {failed} failed" if failed else ""),
                                     refresh=True)
            if event and "failed" in event:
                self.bar.write(event, file=sys.stderr)
        elif event or frac >= self.next_mark:
            msg = f"compare: {frac:6.1%}  {finished}/{self.total} runs done, {running} running"
            if failed:
                msg += f", {failed} failed"
            if event:
                msg += f"  ({event})"
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
            while self.next_mark <= frac:
                self.next_mark += 0.05

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(plan: Plan, jobs: int | None = None, force: bool = False, progress: bool = True,
            address: str | None = None, cpus_per_run: float = 1.0) -> dict:
    """Run every unfinished run of the plan in parallel processes, or with ``address`` as Ray tasks
    on that cluster (apga/compare/cluster.py). Returns {'skipped', 'ran', 'failed'}."""
    states = [(run, *run_state(run)) for run in plan.runs]
    changed = [(r, d) for r, st, d in states if st == "changed"]
    if changed and not force:
        r, d = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ApgaError(f"{r.out_dir} holds a run of a different config ({d}){more}: pass --force to rerun "
                        "such runs, or choose another --out")
    todo = [(r, st) for r, st, _ in states if st != "finished"]
    skipped = len(states) - len(todo)
    report = {"skipped": skipped, "ran": 0, "failed": []}
    if not todo:
        return report
    if address is not None:
        from apga.compare.cluster import execute_on_cluster
        return execute_on_cluster(plan, [r for r, _ in todo], skipped, len(states), address, cpus_per_run, progress)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    bar = OverallProgress(len(states), progress)
    done_frac = {id(r): 1.0 for r, st, _ in states if st == "finished"}
    start = time.time()
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    finished, failed = skipped, []
    import signal
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    executor = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_child_init)
    try:
        futures = {}
        for r, st in todo:
            mode = "resume" if st == "resume" else "train"
            log = os.path.join(plan.out, "logs", r.setting, r.variant, f"seed{r.seed}.log")
            futures[executor.submit(_execute, (mode, r.out_dir, r.resolved, log))] = (r, st)
        pending = set(futures)
        bar.update(skipped, finished, 0, 0)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            events = []
            for fut in done:
                r, st = futures[fut]
                try:
                    status, payload, _tb = fut.result()
                except Exception as exc:  # the worker process died
                    status, payload = "error", f"worker process failed: {type(exc).__name__}: {exc}"
                name = f"{r.setting}/{r.variant}/seed{r.seed}"
                if status == "ok":
                    finished += 1
                    report["ran"] += 1
                    done_frac[id(r)] = 1.0
                    events.append(f"{name} finished")
                else:
                    failed.append((r, payload))
                    done_frac[id(r)] = 1.0
                    events.append(f"{name} failed: {payload}")
            running = 0
            for fut in pending:
                if fut.running():  # (includes the few tasks already queued to a worker)
                    r, st = futures[fut]
                    done_frac[id(r)] = run_fraction(r, 0.0 if st == "resume" else start - 1.0)
                    running += 1
            running = min(running, jobs)
            total = sum(done_frac.values())
            for ev in events or [None]:
                bar.update(total, finished, running, len(failed), ev)
    except KeyboardInterrupt:
        _stop_children(executor)
        bar.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    report["failed"] = failed
    return report
