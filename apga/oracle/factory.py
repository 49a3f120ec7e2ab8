"""The gradient oracle a config asks for (the simulator's, the Ray driver's and every Ray actor's)."""
from __future__ import annotations

from apga.errors import ApgaError


def build_oracle(cfg):
    """The gradient oracle of cfg.env; bad env settings raise ConfigError (before any write)."""
    if cfg.env.id == "synthetic":
        from apga.oracle.synthetic import SyntheticOracle
        return SyntheticOracle.from_kwargs(cfg.workers.n, cfg.seed, cfg.env.kwargs)
    try:
        from apga.oracle.rl import RLOracle
    except ModuleNotFoundError as exc:
        raise ApgaError(f"env.id {cfg.env.id!r}: the Gymnasium oracle cannot be loaded (missing module "
                        f"{exc.name!r}); reinstall apga, or use env.id: synthetic") from None
    from apga.guards import env_construction
    with env_construction(cfg.env.id):  # any failure to build the environments: one line, exit 2
        if cfg.runtime.name == "sim" and (cfg.runtime.processes != 1 or cfg.runtime.pool == "ray"):
            # Rollouts on every core (0 = one per core) or on Ray actors; bit-identical to one process.
            from apga.oracle.parallel import make_oracle
            return make_oracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed, cfg.runtime.processes,
                               cfg.runtime.pool, cfg.runtime.address)
        return RLOracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed)
