"""Counter-based random streams: every stream is a pure function of (seed, purpose, worker, job).

Nothing in apga draws from global random state. A stream is rebuilt from its key whenever it is
needed, so a checkpoint only has to store counters (job indices, iterations), never RNG states.
"""
from __future__ import annotations

import numpy as np

# Purposes keep streams that share (seed, worker, job) apart.
COMPUTE_TIME = 1
TRAJECTORY = 2
EVALUATION = 3
SYNTHETIC_NOISE = 4
INIT = 5


def stream(seed: int, purpose: int, worker: int = 0, job: int = 0) -> np.random.Generator:
    """A numpy Generator that depends only on its key (Philox, a counter-based generator)."""
    # The key holds (seed, purpose); the high counter words hold (job, worker), so streams of
    # different jobs start 2**128 blocks apart and never overlap.
    key = np.array([seed & 0xFFFFFFFFFFFFFFFF, purpose], dtype=np.uint64)
    counter = np.array([0, 0, job, worker], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def round_sample(round_index: int, index: int) -> int:
    """The job key of a round's ``index``-th trajectory on a worker under ``runtime.streams:
    round``: it depends on the round and the position in it, not on how many jobs the worker
    started before (cancelled ones included), so equal schedules draw equal trajectories."""
    if not (0 <= index < 2**32 and 0 <= round_index < 2**31):
        raise ValueError(f"round sample key out of range: round {round_index}, index {index}")
    return (1 << 63) | (round_index << 32) | index  # top bit: never equal to a plain job index
