"""The simulator's rollout chunks on Ray actors (``runtime.pool: ray``): one long simulated run
on a cluster's cores.

:class:`RayPool` has the interface of :class:`apga.oracle.parallel.ProcessPool` (``run``,
``wait_ready``, ``close``), so :class:`apga.oracle.parallel.ParallelOracle` drives either: the
same plan of chunks, the same grouping into units, the same dynamic balance (one unit in flight
per actor, the driver computing units from the back of the list meanwhile), the same combine in
chunk order. Each actor builds its own RLOracle from the configs once (one CPU, physics on one
thread) and then only ever receives whole units; a unit's result depends on its tasks alone, so
the run is bit-identical to one process whichever actor computes what.

The session: ``runtime.address`` joins a running cluster (``ray start --head``); null starts a
private loopback-only Ray instance for the run (:mod:`apga.runtime.ray_session`). A process
already connected to Ray (a test fixture, a caller) keeps its connection: the pool then only
creates and kills its actors.

When it pays: every unit costs one actor round trip (about a millisecond here) plus the transfer
of a point and of the chunk's gradients; a unit of ``policy.rollout_batch`` trajectories of H
steps must cost much more than that. ``benchmarks/ray_pool_bench.py`` measures it (the figures
are in ``docs/ray.md``).
"""
from __future__ import annotations

import os

from apga.errors import ConfigError
from apga.oracle.parallel import PoolError, RolloutError, _run_unit, share_units

ACTOR_START_TIMEOUT = 600.0  # seconds for every actor to build its oracle (a loaded cluster imports torch slowly)


class _Rollouts:
    """A Ray actor holding one RLOracle; executes units of work (see apga.oracle.parallel)."""

    def __init__(self, init_args: tuple):
        import torch
        torch.set_num_threads(1)
        from apga.oracle.rl import RLOracle
        self.oracle = RLOracle(*init_args)

    def ready(self) -> tuple[str, int]:
        import ray
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def run(self, unit):
        return _run_unit(self.oracle, unit)


def cluster_cpus() -> int:
    """The CPUs of the connected cluster (at least 1)."""
    import ray
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class RayPool:
    """``children`` Ray actors, each holding an RLOracle built from ``init_args`` (0: one per
    cluster CPU beyond the driver's); :meth:`run` executes a list of units on them and on
    ``local_oracle``."""

    def __init__(self, children: int, init_args: tuple, local_oracle, address: str | None):
        try:
            import ray  # an optional dependency
        except ModuleNotFoundError:
            raise ConfigError("runtime.pool: ray needs Ray: pip install 'apga[ray]', or use runtime.pool: local") from None
        from apga.runtime import ray_session

        self.local = local_oracle
        self.broken: str | None = None
        self.units_local = self.units_remote = 0
        self.session = ray_session.open_session(address)
        self.actors: list = []
        try:
            if children <= 0:
                children = max(1, cluster_cpus() - 1)
            self.children = int(children)
            cls = ray.remote(num_cpus=1, max_restarts=0)(_Rollouts)
            self.actors = [cls.remote(init_args) for _ in range(self.children)]
            self._ready = [a.ready.remote() for a in self.actors]
        except BaseException:
            self.close()
            raise

    @property
    def placement(self) -> list[tuple[str, int]]:
        """(Ray node id, pid) of each actor, once it has started."""
        return [self._value(r) for r in self._ready]

    def wait_ready(self) -> None:
        """Block until every actor has built its oracle (e.g. before timing anything)."""
        import ray
        ready, _ = ray.wait(self._ready, num_returns=len(self._ready), timeout=ACTOR_START_TIMEOUT)
        if len(ready) < len(self._ready):
            self.broken = (f"{len(self._ready) - len(ready)} of {len(self._ready)} Ray rollout actors did not start "
                           f"within {ACTOR_START_TIMEOUT:.0f} s (does the cluster have {self.children} free CPUs?)")
            raise PoolError(self.broken)
        for ref in self._ready:
            self._value(ref)

    def _value(self, ref):
        """The result of a unit computed by an actor, or the pool's error."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        try:
            return ray.get(ref)
        except RayActorError as exc:
            cause = str(exc).strip().splitlines()
            self.broken = ("a Ray rollout actor died or could not build its oracle "
                           f"({cause[0] if cause else type(exc).__name__}); runtime.pool: local runs without Ray")
            raise PoolError(self.broken) from None
        except RayTaskError as exc:
            raise RolloutError(f"a Ray rollout actor failed:\n{exc}") from None

    def run(self, units: list) -> list:
        """Results of ``units`` (in order), computed by the actors and this process together."""
        import ray
        if self.broken:
            raise PoolError(f"the Ray rollout pool is unusable: {self.broken}")
        if self.actors is None:
            raise PoolError("the Ray rollout pool is closed")
        idle, owner = list(self.actors), {}  # free actors; ObjectRef -> the actor computing it

        def submit(unit):
            actor = idle.pop()
            ref = actor.run.remote(unit)
            owner[ref] = actor
            return ref

        def value(ref):
            idle.append(owner.pop(ref))
            return self._value(ref)

        return share_units(self, units, submit, lambda refs: ray.wait(refs, num_returns=len(refs), timeout=0)[0],
                           value, lambda refs: ray.wait(refs, num_returns=1), {})

    def close(self) -> None:
        actors, self.actors = self.actors, None
        if actors:
            import ray
            for actor in actors:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        session, self.session = getattr(self, "session", None), None
        if session is not None:
            session.close()

