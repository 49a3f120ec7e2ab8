"""Build a run's parts from its config: oracle, time model, protocol and runtime. Everything that
can fail on bad input is built here, before the run directory is touched."""
from __future__ import annotations

from apga.config import Config
from apga.errors import ConfigError
from apga.oracle.factory import build_oracle
from apga.protocol.registry import make_protocol

__all__ = ["build_oracle", "build_times", "build_protocol", "build_runtime"]


def build_times(cfg: Config, oracle):
    """The simulator's time model (also used by Ray for delays); bad time specs raise ConfigError."""
    from apga.runtime.timing import TimeModel
    w = cfg.workers
    return TimeModel(w.compute_time, w.comm_time, w.allreduce_time, w.n, oracle.dim, cfg.seed)


def build_protocol(cfg: Config, theta0):
    """The protocol of cfg.algorithm for cfg.workers.n workers, starting at ``theta0``."""
    a = cfg.algorithm
    return make_protocol(a.name, cfg.workers.n, theta0, a.step_size, a.momentum, a.batch_size,
                         a.init_batch_size, a.step_schedule, a.options)


def build_runtime(cfg: Config, oracle):
    """The protocol for cfg.algorithm on the runtime of cfg.runtime."""
    a = cfg.algorithm
    times = build_times(cfg, oracle)
    alg = build_protocol(cfg, oracle.initial_point())
    if cfg.runtime.name == "sim":
        from apga.runtime.simulator import Simulator
        return Simulator(alg, oracle, times, a.aggregation, a.cancel, cfg.runtime.streams)
    if cfg.runtime.address:  # Ray starts lazily; a cluster that does not answer is refused now
        from apga.runtime.ray_session import check_address
        check_address(cfg.runtime.address)
    try:
        from apga.runtime.ray_runtime import RayRuntime  # noqa: WPS433 (optional dependency)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == "ray" or exc.name.startswith("ray.") or exc.name.startswith("apga.runtime")):
            raise ConfigError(f"runtime.name: ray is not available here (no module {exc.name!r}); "
                              "pip install 'apga[ray]', or use runtime.name: sim") from None
        raise
    return RayRuntime(cfg, alg, oracle, times)
