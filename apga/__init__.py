"""apga: asynchronous policy-gradient aggregation (Rennala NIGT, Malenia NIGT, AFedPG, synchronous
NIGT) on an exact simulator of heterogeneous workers, or on Ray.

The Python API is what the `apga` command uses::

    import apga
    cfg = apga.load_config("configs/quickstart.yaml", ["algorithm.name=malenia_nigt"])
    result = apga.train(cfg, "runs/quick")          # or apga.resume("runs/quick")
    metrics = apga.read_metrics("runs/quick")      # dict of numpy columns
    policy = apga.load_policy("runs/quick")        # torch.nn.Module: policy(obs) -> action
"""
from apga.config import Config, load_config
from apga.errors import ApgaError, ConfigError

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "train", "resume", "read_metrics", "load_policy", "ApgaError", "ConfigError"]


def train(cfg, out_dir, force=False, progress=True):
    """Run ``cfg`` into ``out_dir``; returns a RunResult(out_dir, summary)."""
    from apga.run import train as _train
    return _train(cfg, out_dir, force=force, progress=progress)


def resume(out_dir, progress=True, budget=None):
    """Continue the run in ``out_dir`` from its last checkpoint; ``budget`` (e.g.
    ["budget.iterations=300"]) continues it, finished or not, up to a new budget."""
    from apga.run import resume as _resume
    return _resume(out_dir, progress=progress, budget=budget)


def read_metrics(out_dir):
    """A run's metrics.csv as a dict of float numpy arrays (empty cells are nan)."""
    from apga.run import read_metrics as _read
    return _read(out_dir)


def load_policy(source, which="final"):
    """The trained policy of a run directory (``which``: "final" or "best") or of a policy file,
    as a ``torch.nn.Module``: ``policy(obs)`` acts deterministically, ``policy.act(obs)`` samples."""
    from apga.policy_file import load_policy as _load
    return _load(source, which)
