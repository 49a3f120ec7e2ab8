"""CPU time per env step of one training process on one thread, a figure that other load on the
machine disturbs much less than a throughput (used in benchmarks/README.md).

usage: python benchmarks/cpu_per_step.py [ENV_ID] [HORIZON]     (default Hopper-v5 300)

Rolls out and differentiates 32 trajectories (RLOracle.gradients, terminate_when_unhealthy off,
policy.rollout_batch 16) three times after a warm-up and prints the best CPU microseconds per
env step, physics included. To compare two trees, run it with PYTHONPATH set to each.
"""
import sys
import time

from apga.config import EnvConfig, PolicyConfig
from apga.oracle.rl import RLOracle


def main() -> None:
    env_id = sys.argv[1] if len(sys.argv) > 1 else "Hopper-v5"
    horizon = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    env = EnvConfig(id=env_id, horizon=horizon, kwargs={"terminate_when_unhealthy": False})
    oracle = RLOracle(env, PolicyConfig(rollout_batch=16), 10, 0)
    point = oracle.initial_point()
    oracle.gradients(point, [(w, 0) for w in range(4)])  # warm-up: envs, batches, lazy imports
    best = float("inf")
    for k in range(3):
        t0 = time.process_time()
        result = oracle.gradients(point, [(w % 10, 1 + 4 * k + w // 10) for w in range(32)])
        steps = sum(b.env_steps for b in result.values())
        best = min(best, (time.process_time() - t0) / steps * 1e6)
    oracle.close()
    print(f"{env_id}, H = {horizon}: {best:.1f} CPU us per env step (one process, one thread)")


if __name__ == "__main__":
    main()
