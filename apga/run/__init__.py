"""One training run, by responsibility: ``build`` (oracle, time model, protocol, runtime from a
config), ``loop`` (the training loop: step, evaluate, checkpoint, resume), ``logger``
(metrics.csv, TensorBoard, progress) and ``rundir`` (the run directory's files and lock)."""
from apga.run.logger import read_metrics
from apga.run.loop import RunResult, resume, train

__all__ = ["train", "resume", "read_metrics", "RunResult"]
