"""What a run writes as it goes: metrics.csv rows, TensorBoard events and a progress display.

``RunLogger`` writes one update everywhere at once; ``read_metrics`` reads metrics.csv back.
"""
from __future__ import annotations

import csv
import math
import os
import socket
import struct
import sys
import time

import numpy as np

from apga.files import AppendLog, write_whole

COLUMNS = ["time", "iteration", "trajectories", "trajectories_computed", "env_steps", "vector_comms",
           "train_return", "eval_return", "grad_norm", "rejected"]
# timings.csv (a real runtime's measured durations): the trace format of workers.compute_time /
# comm_time / allreduce_time {trace: FILE}, with the kind of each row and the update it fell in.
TIMING_COLUMNS = ["kind", "worker", "update", "seconds"]


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventLog:
    """A TensorBoard event file (TFRecord of Event protos), written without torch or TensorFlow.

    Records are buffered and written in one write(2) at ``flush()`` (every checkpoint), so the
    file only holds whole records. ``purge_step`` (on resume) starts the file with a SessionLog
    START: TensorBoard then drops the earlier events with step >= purge_step, i.e. whatever the
    killed process logged after its last checkpoint. File names carry a timestamp forced to grow
    from file to file, so TensorBoard reads a resumed run's files in order.
    """

    def __init__(self, folder: str, purge_step: int | None = None):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        os.makedirs(folder, exist_ok=True)
        stamp = int(time.time())
        for name in os.listdir(folder):
            parts = name.split(".")
            if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
                stamp = max(stamp, int(parts[3]) + 1)
        self.path = os.path.join(folder, f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.buf: list[bytes] = []
        self._add(self._event(wall_time=time.time(), step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step is not None:
            log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add(self._event(wall_time=time.time(), step=purge_step, session_log=log))
        self.flush()

    def _add(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.buf.append(header + struct.pack("<I", _masked_crc32c(header)) + data
                        + struct.pack("<I", _masked_crc32c(data)))
        if len(self.buf) >= 4096:
            self.flush()

    def scalars(self, step: int, values: dict) -> None:
        """One event holding several scalars (tag -> float) at ``step``."""
        if values:
            summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
            self._add(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        if self.buf and self.fd is not None:
            data = b"".join(self.buf)
            self.buf = []
            write_whole(self.fd, data)  # whole records or none, even on a full disk

    def close(self) -> None:
        if self.fd is not None:
            self.flush()
            os.close(self.fd)
            self.fd = None


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""  # not logged (a rejected update's grad_norm, no evaluation...): never nan / inf
    if isinstance(v, float):
        return repr(v)
    return str(v)


class Progress:
    """A tqdm bar on a terminal; otherwise a plain line every 5 % of the budget."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label = enabled, label
        self.bar, self.next_mark = None, 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=1000, desc=label, unit="‰", leave=True, file=sys.stderr)

    def update(self, fraction: float, iteration: int, ret) -> None:
        if not self.enabled:
            return
        fraction = min(fraction, 1.0)
        ret_s = "" if ret is None else f"{ret:.2f}"
        if self.bar is not None:
            self.bar.n = int(fraction * 1000)
            self.bar.set_postfix_str(f"it={iteration} return={ret_s}", refresh=True)
        elif fraction >= self.next_mark:
            sys.stderr.write(f"{self.label}: {fraction:6.1%}  iteration {iteration}  return {ret_s}\n")
            sys.stderr.flush()
            self.next_mark = math.floor(fraction * 20 + 1e-9) / 20 + 0.05

    def note(self, message: str) -> None:
        """A line about what is happening (e.g. a runtime's start-up), above the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """metrics.csv (one whole line per update, only deterministic values), TensorBoard events by
    iteration (tb/) and evaluation return by runtime milliseconds (tb/time/: two TensorBoard
    runs, because a purge applies to every tag of a run alike), and the progress display.

    ``resume_from`` = the checkpoint a resumed run continues from (its csv_bytes, iteration,
    time_step, timings_bytes): the CSVs are cut back there and TensorBoard drops later events."""

    def __init__(self, out_dir: str, label: str, progress: bool, resume_from: dict | None = None):
        r = resume_from or {}
        self.csv = AppendLog(os.path.join(out_dir, "metrics.csv"), truncate_to=r.get("csv_bytes", 0))
        if resume_from is None:
            self.csv.write_line(",".join(COLUMNS))
        self.timings_path, self.timings_log = os.path.join(out_dir, "timings.csv"), None
        if r.get("timings_bytes"):
            self.timings_log = AppendLog(self.timings_path, truncate_to=r["timings_bytes"])
        elif os.path.exists(self.timings_path):
            os.unlink(self.timings_path)  # written after the checkpoint by a killed process
        iteration, time_step = r.get("iteration"), r.get("time_step")
        tb_dir = os.path.join(out_dir, "tb")
        self.tb = EventLog(tb_dir, purge_step=iteration + 1 if resume_from else None)
        self.tb_time = EventLog(os.path.join(tb_dir, "time"), purge_step=time_step + 1 if resume_from else None)
        self.progress = Progress(progress, label)

    def row(self, values: dict, initial: bool, time_step: int | None) -> None:
        """Log one update (``values`` by column); ``time_step`` is the tb/time step of its
        evaluation (None: no evaluation)."""
        self.csv.write_line(",".join(_fmt(values[c]) for c in COLUMNS))
        if initial:
            return
        scalars = {k: values[k] for k in ("train_return", "eval_return", "grad_norm")
                   if values[k] is not None and math.isfinite(values[k])}
        scalars.update({f"counters/{k}": values[k] for k in ("time", "trajectories", "env_steps",
                                                             "vector_comms", "rejected")})
        self.tb.scalars(values["iteration"], scalars)
        if time_step is not None:
            self.tb_time.scalars(time_step, {"eval_return_vs_time": values["eval_return"]})

    def timings(self, rows) -> None:
        """Append measured durations (kind, worker, update, seconds) to timings.csv."""
        if not rows:
            return
        if self.timings_log is None:
            self.timings_log = AppendLog(self.timings_path, truncate_to=0)
            self.timings_log.write_line(",".join(TIMING_COLUMNS))
        for kind, worker, update, seconds in rows:
            self.timings_log.write_line(f"{kind},{worker},{update},{seconds!r}")

    def sync(self) -> dict:
        """Everything logged so far on disk; returns the sizes of the CSV files (what a
        checkpoint records)."""
        self.tb.flush()
        self.tb_time.flush()
        return {"csv_bytes": self.csv.sync(),
                "timings_bytes": self.timings_log.sync() if self.timings_log is not None else 0}

    def close(self) -> None:
        """Close everything; a flush that fails (a full disk) leaves its file whole and does not
        stop the others from closing; the first failure is raised at the end."""
        self.progress.close()
        failure = None
        for log in (self.tb, self.tb_time, self.csv, self.timings_log):
            try:
                if log is not None:
                    log.close()
            except OSError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


def read_metrics(out_dir: str) -> dict[str, np.ndarray]:
    """metrics.csv as a dict of float arrays (empty cells -> nan). A last line without its
    newline (a run killed in the middle of writing it) is ignored."""
    path = os.path.join(out_dir, "metrics.csv")
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    lines = text.splitlines()
    header = lines[0].split(",") if lines else list(COLUMNS)
    rows = list(csv.reader(lines[1:]))
    return {c: np.array([float(r[k]) if r[k] != "" else math.nan for r in rows], dtype=float)
            for k, c in enumerate(header) if c}
