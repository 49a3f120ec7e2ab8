"""The Gymnasium oracle: batched rollouts with a numpy policy, GPOMDP gradients with torch autograd.

One stochastic gradient = one trajectory of at most H steps (it ends at termination or at the
horizon; no bootstrapping) turned into the GPOMDP estimate

    g(tau) = sum_{t<H} ( sum_{h=t}^{H-1} gamma^h r_h ) grad log pi(a_t | s_t).

Determinism: job (w, j) draws its env reset seed and then all its action noise from
``rng.stream(seed, TRAJECTORY, w, j)`` and nothing else, and the numpy policy computes each row
independently of the batch, so its trajectory (observations, actions, rewards, return, length) is
bit-identical whichever jobs share its batch, in whatever order. Per-worker gradient sums are
exactly equal when that worker's jobs fall into the same chunks (same sub-lists, same order) and
equal up to float rounding otherwise (the torch reduction over a chunk's rows changes).

Work plan of :meth:`RLOracle.gradients`: jobs are grouped by ``env_key`` (order of first
appearance), each group is cut into chunks of ``policy.rollout_batch`` jobs in the given order,
and every chunk is one batched rollout followed by one torch forward+backward per worker of the
chunk. The chunking depends only on the jobs and the config, never on processes, so a parallel
runtime can map :meth:`RLOracle.run_chunk` over the chunks of :meth:`RLOracle.plan` and combine
them with :meth:`RLOracle.combine` to get the same result.

Several (point, chunk) tasks can run together (:meth:`RLOracle.run_tasks`, used by
:meth:`RLOracle.gradients_many`, e.g. for AFedPG's in-flight jobs, each at its own point): the
trajectories of tasks that share an env_key are rolled out in one batch, every trajectory with
its own parameter vector (:class:`apga.oracle.policies.RowParams`), and each task's gradients are
then computed from its own rows exactly as :meth:`RLOracle.run_chunk` would, so every task's
result is bit-identical to running it alone.

Stepping: the MuJoCo v5 tasks that :mod:`apga.oracle.fast_mujoco` covers (Hopper, Walker2d,
HalfCheetah, Reacher, Swimmer, InvertedPendulum, Ant, Humanoid) run a rollout as the simulations
of ``mujoco.batch.Batch`` (observations and rewards vectorised, bit-identical to ``env.step``):
with ``threads`` > 1 the rows are cut into one block per thread, each block a batch of its own
whose whole step loop (policy, physics with the GIL released, observations) runs on its
thread, so one block's policy is computed while another's physics runs and no thread waits
for another between steps. The torch passes of a round's (chunk, worker) partial sums share
the same threads. Results never depend on the thread count. Every other env goes through
``env.step``, one env per trajectory.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence

import numpy as np
import torch

from apga import rng
from apga.config import EnvConfig, PolicyConfig
from apga.errors import ConfigError
from apga.oracle import fast_mujoco, policies
from apga.oracle.base import Cancelled, Job, Oracle, WorkerBatch
from apga.oracle.envs import env_key, make_env, worker_settings

SEED_HIGH = 2**31 - 1  # env.reset seeds are drawn in [0, SEED_HIGH)
EVAL_JOB_STRIDE = 2**32  # evaluation stream job index = key * EVAL_JOB_STRIDE + episode
BATCH_PACK = 64  # trajectories a MuJoCo batch may roll out together, whatever rollout_batch (same bits)


class Rollout:
    """Stored trajectories of one chunk, shape (B, H, ...); step t of trajectory b is valid iff t < lengths[b]."""

    def __init__(self, obs, samples, rewards, lengths, bad):
        self.obs, self.samples, self.rewards = obs, samples, rewards
        self.lengths, self.bad = lengths, bad  # bad: a non-finite observation or reward was seen


class RLOracle(Oracle):
    """GPOMDP gradients of a Gaussian / categorical MLP policy on per-worker Gymnasium envs.

    ``RLOracle(env, policy, n_workers, seed, threads=1)``: ``env`` and ``policy`` are the config
    sections, ``seed`` the run seed (initial point, trajectories and evaluation streams derive
    from it), ``threads`` the threads a rollout on a MuJoCo batch and its torch passes use
    (never changes a result; other envs use one thread: their parallelism is processes').

    ``policy.baseline`` and ``policy.normalize_returns`` are outside the theory: both make a
    trajectory's weights depend on the other trajectories of its (chunk, worker) batch, which
    breaks the exact unbiasedness of the estimator (and the chunk-independence of results).
    """

    def __init__(self, env: EnvConfig, policy: PolicyConfig, n_workers: int, seed: int, threads: int = 1):
        if int(n_workers) < 1:
            raise ConfigError(f"workers.n: must be >= 1, got {n_workers}")
        if int(env.horizon) < 1:
            raise ConfigError(f"env.horizon: must be >= 1, got {env.horizon}")
        if not 0.0 <= float(env.gamma) <= 1.0:
            raise ConfigError(f"env.gamma: must be in [0, 1], got {env.gamma}")
        if int(policy.rollout_batch) < 1:
            raise ConfigError(f"policy.rollout_batch: must be >= 1, got {policy.rollout_batch}")
        if len(env.per_worker or []) > int(n_workers):
            raise ConfigError(
                f"env.per_worker: {len(env.per_worker)} entries for {n_workers} workers; give at most workers.n entries"
            )
        # One thread: deterministic reductions, and the cores are better spent on rollouts.
        torch.set_num_threads(1)
        self.env_cfg, self.policy_cfg = env, policy
        self.n_workers, self.seed = int(n_workers), int(seed)
        self.horizon, self.gamma = int(env.horizon), float(env.gamma)
        self.rollout_batch = int(policy.rollout_batch)
        for w in range(self.n_workers):
            worker_settings(env, w)  # validate every worker's entry now, not at its first job
        self.keys = [env_key(env, w) for w in range(self.n_workers)]
        self._rep = {}  # env_key -> first worker with it (builds that key's envs)
        for w, k in enumerate(self.keys):
            self._rep.setdefault(k, w)
        self._envs: dict[tuple, list] = {}  # env_key -> reusable env instances (one per batch slot)
        self._steppers: dict[tuple, object] = {}  # env_key -> its fast_mujoco.BatchStepper parts (or None)
        self._pool = None  # the threads after the caller's (rollout blocks, torch passes), made on first use
        self._covered: dict[tuple, bool] = {}  # env_key -> whether fast_mujoco covers its env
        # Threads of a rollout on a MuJoCo batch and of its torch passes (never changes a result).
        self._threads = max(1, int(threads))
        spaces_seen = {}
        for k, w in self._rep.items():
            e = self._env_slots(k, 1)[0]
            spaces_seen[k] = (e.observation_space, e.action_space)
        obs_space, act_space = spaces_seen[self.keys[0]]
        for k, (o, a) in spaces_seen.items():
            if o.shape != obs_space.shape or a != act_space:
                raise ConfigError(
                    f"env.per_worker: worker {self._rep[k]} has observation {o} / action {a}, worker 0 has "
                    f"{obs_space} / {act_space}; all workers must share one policy, so spaces must match"
                )
        self.spec = policies.make_spec(obs_space, act_space, policy.hidden, policy.init_std)
        self.dim = self.spec.dim
        self._gamma_pow = self.gamma ** np.arange(self.horizon, dtype=np.float64)
        # Exact batched stepping of MuJoCo v5 envs (apga.oracle.fast_mujoco); False (or
        # APGA_NO_FAST_STEP=1) forces env.step. Results are identical either way.
        self.fast_step = True

    @property
    def threads(self) -> int:
        """Threads of a rollout on a MuJoCo batch (fixed: the parts and the pool are sized by it)."""
        return self._threads

    # ------------------------------------------------------------------ Oracle API
    def initial_point(self) -> np.ndarray:
        return policies.init_params(self.spec, rng.stream(self.seed, rng.INIT))

    def gradients(self, point: np.ndarray, jobs: Sequence[Job],
                  should_stop: Callable[[], bool] | None = None) -> dict[int, WorkerBatch]:
        point = self._check_point(point)
        return self.combine(jobs, self.run_tasks([(point, chunk) for chunk in self.plan(jobs)], should_stop))

    def gradients_many(
        self, requests: Sequence[tuple[np.ndarray, Sequence[Job]]]
    ) -> list[dict[int, WorkerBatch]]:
        """Several (point, jobs) requests; each result is bit-identical to ``gradients(point, jobs)``.

        All chunks of all requests run through :meth:`run_tasks`, so the trajectories of
        different requests (different points) are rolled out together.
        """
        tasks, owner = self.plan_many(requests)
        return self.combine_many(requests, owner, self.run_tasks(tasks))

    def plan_many(self, requests) -> tuple[list[tuple[np.ndarray, list[Job]]], list[int]]:
        """(tasks, owner): the (point, chunk) tasks of all requests and the request of each task."""
        tasks, owner = [], []
        for r, (point, jobs) in enumerate(requests):
            point = self._check_point(point)
            for chunk in self.plan(jobs):
                tasks.append((point, chunk))
                owner.append(r)
        return tasks, owner

    def combine_many(self, requests, owner: Sequence[int], results: Sequence[dict]) -> list[dict[int, WorkerBatch]]:
        per_request: list[list] = [[] for _ in requests]
        for r, res in zip(owner, results):
            per_request[r].append(res)
        return [self.combine(jobs, per_request[r]) for r, (_, jobs) in enumerate(requests)]

    def evaluate(self, point: np.ndarray, episodes: int, key: int, deterministic: bool = True) -> float:
        """Mean undiscounted return (episodes cut at the horizon), averaged over the workers.

        Each distinct environment is evaluated once, with ``episodes`` episodes drawn from
        ``rng.stream(seed, EVALUATION, w, key * 2**32 + episode)`` where w is the first worker
        with that environment; a worker's score is its environment's mean, so heterogeneous
        settings evaluate the average task. ``deterministic``: act with squash(mu) / argmax.
        """
        point = self._check_point(point)
        tasks = self.eval_plan(episodes)
        return self.eval_combine(tasks, [self.eval_task(point, t, key, deterministic) for t in tasks])

    def eval_plan(self, episodes: int, batch: int | None = None) -> list[tuple[int, int, int]]:
        """Evaluation tasks (representative worker, first episode, end episode), in batches of
        ``batch`` (default rollout_batch) episodes. Each episode's return does not depend on its
        batch, and :meth:`eval_combine` concatenates in episode order, so any ``batch`` gives the
        same evaluation."""
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        batch = self.rollout_batch if batch is None else max(1, int(batch))
        return [(w, s, min(s + batch, episodes)) for w in self._rep.values() for s in range(0, episodes, batch)]

    def eval_task(self, point: np.ndarray, task: tuple[int, int, int], key: int, deterministic: bool) -> np.ndarray:
        """Undiscounted returns of one evaluation task's finite episodes, in episode order."""
        w, start, end = task
        streams = [rng.stream(self.seed, rng.EVALUATION, w, key * EVAL_JOB_STRIDE + e) for e in range(start, end)]
        ro = self._rollout(point, self.keys[w], streams, store=False, greedy=deterministic)
        return ro.rewards.sum(axis=1)[~ro.bad]  # non-finite episodes are left out

    def eval_combine(self, tasks, totals) -> float:
        per_key: dict[tuple, list] = {}
        for (w, _, _), t in zip(tasks, totals):
            per_key.setdefault(self.keys[w], []).append(t)
        mean_of_key = {}
        for k, parts in per_key.items():
            allt = np.concatenate(parts)
            mean_of_key[k] = float(allt.mean()) if allt.size else float("nan")
        return float(np.mean([mean_of_key[k] for k in self.keys]))

    def batched(self, worker: int = 0) -> bool:
        """Whether worker ``worker``'s trajectories are stepped on a MuJoCo batch (else env.step)."""
        key = self.keys[worker]
        if key not in self._covered:
            self._covered[key] = fast_mujoco.covered(self._env_slots(key, 1)[0], self.horizon)
        return self.fast_step and self._covered[key]

    def close(self) -> None:
        self._steppers.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for slots in self._envs.values():
            for e in slots:
                e.close()
        self._envs.clear()

    # ------------------------------------------------------------------ work plan
    def plan(self, jobs: Sequence[Job]) -> list[list[Job]]:
        """Chunks of at most rollout_batch jobs sharing one env_key, in job order within each key."""
        groups: dict[tuple, list[Job]] = {}
        for w, j in jobs:
            if not 0 <= w < self.n_workers:
                raise ValueError(f"job ({w}, {j}): worker out of range [0, {self.n_workers})")
            groups.setdefault(self.keys[w], []).append((int(w), int(j)))
        rb = self.rollout_batch
        return [g[i : i + rb] for g in groups.values() for i in range(0, len(g), rb)]

    def combine(self, jobs: Sequence[Job], chunk_results: Sequence[dict[int, WorkerBatch]]) -> dict[int, WorkerBatch]:
        """Sum the per-chunk results of each worker in chunk order (keys in order of first job)."""
        out = {w: WorkerBatch.empty(self.dim) for w, _ in jobs}
        for res in chunk_results:
            for w, wb in res.items():
                out[w] = out[w].merge(wb)
        return out

    def run_chunk(self, point: np.ndarray, chunk: Sequence[Job]) -> dict[int, WorkerBatch]:
        """Roll out one chunk (jobs sharing an env_key) and return each worker's partial sums."""
        return self.run_tasks([(point, chunk)])[0]

    def run_tasks(self, tasks: Sequence[tuple[np.ndarray, Sequence[Job]]],
                  should_stop: Callable[[], bool] | None = None) -> list[dict[int, WorkerBatch]]:
        """``[run_chunk(point, chunk) for point, chunk in tasks]``, bit for bit, but with the
        trajectories of consecutive tasks that share an env_key rolled out together (each with
        its own point) in batches of up to max(rollout_batch, chunk length) trajectories (at least
        BATCH_PACK on a MuJoCo batch, where more simulations per step cost less per step)."""
        results: list = [None] * len(tasks)
        groups: dict[tuple, list[int]] = {}
        for i, (_, chunk) in enumerate(tasks):
            if not chunk:
                raise ValueError("run_tasks: empty chunk")
            groups.setdefault(self.keys[chunk[0][0]], []).append(i)
        for key, idx in groups.items():
            pack: list[int] = []
            size = 0
            least = BATCH_PACK if self.batched(self._rep[key]) else 1
            for i in idx + [None]:
                n = len(tasks[i][1]) if i is not None else 0
                if pack and (i is None or size + n > max(self.rollout_batch, len(tasks[pack[0]][1]), least)):
                    self._run_pack(key, [tasks[p] for p in pack], pack, results, should_stop)
                    pack, size = [], 0
                if i is not None:
                    pack.append(i)
                    size += n
        return results

    def _run_pack(self, key, pack_tasks, positions, results, should_stop=None) -> None:
        """One rollout for the tasks of ``pack_tasks`` (same env_key); fills results[positions]."""
        points = [self._check_point(p) for p, _ in pack_tasks]
        jobs = [jb for _, chunk in pack_tasks for jb in chunk]
        streams = [rng.stream(self.seed, rng.TRAJECTORY, w, j) for w, j in jobs]
        if all(p is points[0] or np.array_equal(p, points[0]) for p in points[1:]):
            params = points[0]  # one point for all: the shared forward (same rows, bit for bit)
        else:
            per_row = np.repeat(np.stack(points), [len(c) for _, c in pack_tasks], axis=0)
            params = policies.RowParams.stack(self.spec, per_row)
        ro = self._rollout(params, key, streams, store=True, greedy=False, should_stop=should_stop)
        valid = np.arange(self.horizon)[None, :] < ro.lengths[:, None]  # (B, H)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught below: rejected
            weights = self._weights(ro.rewards)
            returns_all = ro.rewards.sum(axis=1)  # undiscounted
        # Each (chunk, worker) partial sum is one torch pass over that worker's rows of the chunk;
        # the passes are independent, so they share the threads (torch releases the GIL).
        sums, start = [], 0
        for pos, point, (_, chunk) in zip(positions, points, pack_tasks):
            rows = np.arange(start, start + len(chunk))
            start += len(chunk)
            workers = np.full(len(ro.lengths), -1)
            workers[rows] = [w for w, _ in chunk]
            results[pos] = {}
            for w in dict.fromkeys(workers[rows].tolist()):  # workers in order of first appearance
                sums.append((pos, w, point, workers == w))

        def partial_sum(item, stop):
            _, _, point, mine = item
            return self._partial_sum(point, ro, mine, valid, weights)

        # Off the MuJoCo batch the cores belong to the rollout processes (parallel.ParallelOracle).
        grads = self._share(partial_sum, sums, self.threads if self.batched(self._rep[key]) else 1)
        for (pos, w, _, mine), (grad, good, rejected) in zip(sums, grads):
            results[pos][w] = WorkerBatch(
                grad_sum=grad,
                count=int(good.size),
                returns=returns_all[good],
                lengths=ro.lengths[good].astype(np.int64),
                env_steps=int(ro.lengths[mine].sum()),
                rejected=rejected,
            )

    def _partial_sum(self, point, ro: "Rollout", mine, valid, weights):
        """(gradient sum, good rows, rejected count) of one worker's rows ``mine`` of a chunk."""
        good = np.flatnonzero(mine & ~ro.bad)
        rejected = int(np.count_nonzero(mine & ro.bad))
        grad = np.zeros(self.dim)
        if good.size:
            theta = torch.from_numpy(np.array(point, dtype=np.float64)).requires_grad_(True)
            grad = self._grad(theta, ro, good, valid[good], weights[good])
            if not np.all(np.isfinite(grad)):  # a non-finite score: drop the whole partial sum
                grad, rejected, good = np.zeros(self.dim), rejected + good.size, good[:0]
        return grad, good, rejected

    def _share(self, fn, items: list, threads: int, should_stop: Callable[[], bool] | None = None) -> list:
        """``[fn(x, stop) for x in items]`` on this thread and up to ``threads - 1`` of the pool's,
        each taking the next item. ``stop()`` turns True once an item failed or ``should_stop()``
        says so: no thread takes another item, and a long item (a rollout block) checks it to
        end within a step. The first failure is raised, once all threads have stopped (the
        ``Cancelled`` it causes in the others is not)."""
        abort, failed, todo, lock = threading.Event(), [], iter(range(len(items))), threading.Lock()
        out = [None] * len(items)

        def stop() -> bool:
            return abort.is_set() or (should_stop is not None and should_stop())

        def work() -> None:
            while not abort.is_set():
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                try:
                    out[i] = fn(items[i], stop)
                except BaseException as exc:
                    with lock:
                        if not abort.is_set():
                            failed.append(exc)
                        abort.set()

        futures = []
        try:
            for _ in range(min(threads, len(items)) - 1):
                futures.append(self._threads_pool().submit(work))
            work()
            wait(futures)
        finally:
            if not all(f.done() for f in futures):  # interrupted while waiting: stop the others
                abort.set()
                wait(futures)
        if failed:
            raise failed[0]
        return out

    def _threads_pool(self):
        """The threads after this one (rollout parts, gradient passes), made on first use."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="apga-oracle")
        return self._pool

    # ------------------------------------------------------------------ internals
    def _check_point(self, point) -> np.ndarray:
        point = np.asarray(point, dtype=np.float64)
        if point.shape != (self.dim,):
            raise ValueError(f"point has shape {point.shape}, expected ({self.dim},)")
        return point

    def _env_slots(self, key: tuple, n: int) -> list:
        """At least n cached envs of this key (built on demand, reused across calls)."""
        slots = self._envs.setdefault(key, [])
        while len(slots) < n:
            slots.append(make_env(self.env_cfg, self._rep[key]))
        return slots

    def _parts(self, key: tuple, n: int):
        """The key's MuJoCo batch parts, one per thread, of ceil(n / threads) simulations each
        (grown when too small), or None when the env is not covered."""
        parts = self._steppers.get(key, False)
        per_part = -(-n // self.threads)
        if parts is None or (parts and len(parts) == self.threads and parts[0].nsim >= per_part):
            return parts
        env = self._env_slots(key, 1)[0]
        first = fast_mujoco.make_stepper(env, self.horizon, per_part)
        parts = None if first is None else [first] + [
            fast_mujoco.make_stepper(env, self.horizon, per_part) for _ in range(self.threads - 1)]
        self._steppers[key] = parts
        return parts

    def _weights(self, rewards: np.ndarray) -> np.ndarray:
        """GPOMDP weights: discounted reward-to-go sum_{h>=t} gamma^h r_h (rewards are 0 after the end)."""
        disc = rewards * self._gamma_pow
        return np.cumsum(disc[:, ::-1], axis=1)[:, ::-1]  # row by row: no cross-trajectory mixing

    def _grad(self, theta: torch.Tensor, ro: Rollout, rows: np.ndarray, valid: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """grad of sum_t w_t log pi(sample_t | s_t) over the given trajectories (one torch pass)."""
        w = weights.copy()
        if self.policy_cfg.baseline:  # outside the theory: mean weight of the trajectories alive at t
            alive = valid.sum(axis=0)
            mean = np.divide((w * valid).sum(axis=0), alive, out=np.zeros(self.horizon), where=alive > 0)
            w -= mean
        if self.policy_cfg.normalize_returns:  # outside the theory: unit std over the batch's steps
            std = w[valid].std()
            w /= std + 1e-8
        b_idx, t_idx = np.nonzero(valid)  # row-major: trajectory by trajectory, t increasing
        b_idx = rows[b_idx]
        obs = torch.from_numpy(ro.obs[b_idx, t_idx])
        samples = torch.from_numpy(ro.samples[b_idx, t_idx])
        w_t = torch.from_numpy(w[valid])
        loss = (w_t * policies.log_prob(self.spec, theta, obs, samples)).sum()
        (g,) = torch.autograd.grad(loss, theta)
        return g.numpy().copy()

    def _rollout(self, params, key: tuple, streams: list, store: bool, greedy: bool,
                 should_stop: Callable[[], bool] | None = None) -> Rollout:
        """Batched rollout: one numpy policy forward per step (and block) for the live trajectories.

        Trajectory b uses only ``streams[b]``: first its reset seed, then its noise for all H steps.
        ``params``: the point shared by all trajectories, or a RowParams with one point per trajectory.
        On a MuJoCo batch the rows are cut into one block per thread, each block stepped by a
        BatchStepper of its own, and every block's step loop runs on its own thread; rows are
        independent, so the result does not depend on the number of threads.
        """
        spec, H, B = self.spec, self.horizon, len(streams)
        parts = self._parts(key, B) if self.fast_step else None
        seeds = [int(s.integers(0, SEED_HIGH)) for s in streams]
        noise = None
        if not greedy:
            noise = np.empty((B,) + spec.noise_shape(H))
            for b, s in enumerate(streams):
                noise[b] = policies.draw_noise(spec, s, H)
        ro = Rollout(np.zeros((B, H, spec.obs_dim)) if store else None,
                     np.zeros((B, H) + spec.sample_shape, dtype=spec.sample_dtype) if store else None,
                     np.zeros((B, H)), np.zeros(B, dtype=np.int64), np.zeros(B, dtype=bool))
        obs = np.empty((B, spec.obs_dim))
        blocks = []  # (first row, end row, step function) of each block (one, on env.step)
        if parts is not None:
            size = -(-B // len(parts))
            for part, lo in zip(parts, range(0, B, size)):  # resets on this thread: they share the key's env
                hi = min(B, lo + size)
                obs[lo:hi] = part.reset(range(hi - lo), seeds[lo:hi])
                blocks.append((lo, hi, part.step))
        else:
            envs = self._env_slots(key, B)
            for b in range(B):
                obs[b] = envs[b].reset(seed=seeds[b])[0]
            blocks.append((0, B, self._env_step(envs)))
        if not isinstance(params, policies.RowParams):
            params = policies.Prepared(spec, params)

        def run_block(block, stop) -> None:  # rows lo..hi-1, on views of the rollout's arrays
            lo, hi, step = block
            rows = slice(lo, hi)
            view = Rollout(*(None if x is None else x[rows] for x in (ro.obs, ro.samples, ro.rewards)),
                           ro.lengths[rows], ro.bad[rows])
            view.bad[:] = ~np.isfinite(obs[rows]).all(axis=1)
            mine = params.take(np.arange(lo, hi)) if isinstance(params, policies.RowParams) and hi - lo < B else params
            self._steps(np.flatnonzero(~view.bad), step, mine, None if noise is None else noise[rows], obs[rows],
                        view, greedy, stop)

        # one block per thread; MuJoCo releases the GIL, so one block's physics runs while
        # another computes its policy
        self._share(run_block, blocks, self.threads, should_stop)
        return ro

    def _env_step(self, envs):
        discrete = self.spec.kind == "categorical"

        def step(rows, actions):
            actions = actions.tolist() if discrete else list(actions)
            obs = np.empty((rows.size, self.spec.obs_dim))
            rewards = np.empty(rows.size)
            done = np.zeros(rows.size, dtype=bool)
            for k, b in enumerate(rows.tolist()):
                obs[k], rewards[k], term, trunc, _ = envs[b].step(actions[k])
                done[k] = term or trunc
            return obs, rewards, done

        return step

    def _steps(self, alive, step, params, noise, obs, ro: Rollout, greedy, should_stop) -> None:
        """The step loop over rows ``alive`` (one part's, or all): policy, ``step``, bookkeeping."""
        spec, H, B = self.spec, self.horizon, len(obs)
        per_row = isinstance(params, policies.RowParams)
        live_params, live_rows = params, None
        for t in range(H):
            if alive.size == 0:
                break
            if should_stop is not None and should_stop():
                raise Cancelled()  # a real runtime abandons the trajectory within one env step
            if per_row and (live_rows is None or not np.array_equal(live_rows, alive)):
                live_rows = alive  # gather the live rows' parameters only when the live set changes
                live_params = params if alive.size == B else params.take(alive)
            sel = slice(None) if alive.size == B else alive  # all alive: cheaper basic indexing
            o = obs[sel]
            if greedy:
                actions = policies.greedy_action(spec, live_params, o)
            else:
                stored, actions = policies.sample(spec, live_params, o, noise[sel, t])
            if ro.obs is not None:
                ro.obs[sel, t] = o
                ro.samples[sel, t] = stored
            o2, r, done = step(alive, actions)
            obs[sel] = o2
            ro.rewards[sel, t] = r
            ends = done
            if not (np.isfinite(r).all() and np.isfinite(o2).all()):
                # stop a broken trajectory at once; its rewards must not reach the weights
                broken = ~(np.isfinite(r) & np.isfinite(o2).all(axis=1))
                ro.bad[alive[broken]] = True
                ro.rewards[alive[broken]] = 0.0
                ends = done | broken
            if ends.any():
                ro.lengths[alive[ends]] = t + 1
                alive = alive[~ends]
        ro.lengths[alive] = H  # the rows still alive ran to the horizon
