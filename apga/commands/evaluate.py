"""`apga evaluate RUN_DIR`: the return of a run's trained policy, optionally with a video.

The evaluation is the one training logs (RLOracle.eval_plan / eval_task / eval_combine: the same
episodes, seeds and actions), so with the run's own settings it reproduces the logged
``eval_return`` of the policy's iteration exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from apga.errors import ApgaError, ConfigError

EPILOG = """\
examples:
  apga evaluate runs/quick                         # the final policy, the run's own evaluation settings
  apga evaluate runs/quick --best --episodes 100 --seed 7
  apga evaluate runs/quick --stochastic --json
  MUJOCO_GL=egl apga evaluate runs/reacher --video reacher.mp4
  apga evaluate runs/hetero --set env.invert_obs=false     # the same policy on another environment setting

Defaults come from the run: episodes = eval.episodes, deterministic = eval.deterministic, seed =
the run's seed, and the evaluation key is the policy's iteration; with all of them the mean equals
the eval_return logged in metrics.csv for that iteration. --video records the first evaluation
episode (rgb_array frames, written with imageio-ffmpeg); MuJoCo without a display needs
MUJOCO_GL=egl (GPU/EGL) or MUJOCO_GL=osmesa (software).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="return of a run's trained policy (mean, std, min, max; video)",
                       description="Evaluate the final (or best) policy of a run directory or a policy file.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or a policy_*.safetensors file)")
    p.add_argument("--best", action="store_true", help="the best policy by evaluation return (default: final)")
    p.add_argument("--episodes", type=int, metavar="N", help="episodes (default: the run's eval.episodes)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the evaluation streams (default: the run's seed)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="deterministic", action="store_true", default=None,
                      help="act with the mean / argmax action (default: the run's eval.deterministic)")
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", help="sample actions")
    p.add_argument("--video", metavar="FILE.mp4", help="record the first episode to this video file")
    p.add_argument("--env-id", metavar="ID", help="evaluate on another Gymnasium env (same spaces)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="env.KEY=VALUE",
                   help="change an env.* key (e.g. env.kwargs, env.per_worker, env.horizon); repeatable")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    result = evaluate(args.run_dir, which="best" if args.best else "final", episodes=args.episodes, seed=args.seed,
                      deterministic=args.deterministic, env_id=args.env_id, overrides=args.overrides,
                      video=args.video, progress=not args.quiet)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    logged = result["logged_eval_return"]
    print(f"policy: {result['policy']} (iteration {result['iteration']}"
          + (f", logged eval_return {logged:.6g})" if logged is not None else ")"))
    print(f"{result['env']}: {result['episodes']} episodes, "
          f"{'deterministic' if result['deterministic'] else 'stochastic'}, seed {result['seed']}")
    print(f"return {result['mean']:.6g} ± {result['std']:.3g} (mean ± std), min {result['min']:.6g}, "
          f"max {result['max']:.6g}")
    if result["matches_logged"] is not None:
        print("equals the logged eval_return exactly" if result["matches_logged"]
              else "differs from the logged eval_return (settings differ?)")
    if result.get("video"):
        print(f"video: {result['video']} (first episode, return {result['video_return']:.6g})")
    return 0


def _config(source: str, spec: dict, env_id: str | None, overrides: list[str]):
    """The run's config (or one rebuilt from a policy file's spec) with the env changes applied."""
    from apga import config as cfgmod
    for item in overrides:
        if not item.strip().startswith("env."):
            raise ConfigError(f"--set {item!r}: apga evaluate changes only env.* keys")
    extra = list(overrides) + ([f"env.id={env_id}"] if env_id else [])
    cfg_path = os.path.join(source, "config.yaml")
    if os.path.isdir(source) and os.path.isfile(cfg_path):
        return cfgmod.load_config(cfg_path, extra)
    env = spec["env"]
    n = max(len(env.get("per_worker") or []), 2 if env.get("invert_obs") else 1)
    data = {"seed": spec["run"].get("seed", 0), "env": dict(env), "workers": {"n": n},
            "policy": {"hidden": spec["network"]["hidden"]},
            "eval": {"episodes": spec["run"]["eval"]["episodes"], "deterministic": spec["run"]["eval"]["deterministic"]}}
    return cfgmod.load_config(data, extra)


def evaluate(source: str, which: str = "final", episodes: int | None = None, seed: int | None = None,
             deterministic: bool | None = None, env_id: str | None = None, overrides: list[str] | None = None,
             video: str | None = None, progress: bool = True) -> dict:
    """Evaluate a run's policy (see the module docstring); returns the figures as a dict."""
    from apga import policy_file
    from apga.oracle.rl import RLOracle

    path = policy_file.resolve_path(source, which)
    spec, tensors = policy_file.read(path)
    theta = policy_file.flat_parameters(spec, tensors)
    cfg = _config(source, spec, env_id, overrides or [])
    episodes = cfg.eval.episodes if episodes is None else episodes
    if episodes < 1:
        raise ApgaError(f"--episodes {episodes}: give at least 1")
    deterministic = cfg.eval.deterministic if deterministic is None else deterministic
    seed = cfg.seed if seed is None else seed
    if video is not None:
        _check_video_path(video)
    key = int(spec["run"]["iteration"])
    oracle = RLOracle(cfg.env, cfg.policy, cfg.workers.n, seed)
    try:
        s = oracle.spec
        net = spec["network"]
        if (s.kind, s.obs_dim, s.act_dim, list(s.hidden)) != (net["kind"], net["obs_dim"], net["act_dim"], net["hidden"]):
            raise ApgaError(f"{cfg.env.id}: its spaces give a {s.kind} policy with observation {s.obs_dim} and action "
                            f"{s.act_dim}, the policy file has a {net['kind']} one with {net['obs_dim']} and "
                            f"{net['act_dim']}; choose an environment with the policy's spaces")
        batch = max(1, min(oracle.rollout_batch, math.ceil(episodes / 10)))  # any batch: same returns
        tasks = oracle.eval_plan(episodes, batch)
        video_return = None
        if video is not None:  # first: a missing renderer fails before the (longer) evaluation
            video_return = _record(oracle, cfg, theta, tasks[0][0], key, deterministic, video)
        totals = []
        bar = _bar(progress, len(tasks) and sum(e - b for _, b, e in tasks))
        for task in tasks:
            totals.append(oracle.eval_task(theta, task, key, deterministic))
            if bar is not None:
                bar.update(task[2] - task[1])
        if bar is not None:
            bar.close()
        mean = oracle.eval_combine(tasks, totals)
        returns = np.concatenate(totals) if totals else np.zeros(0)
        result = {
            "policy": path, "which": which, "iteration": key, "env": cfg.env.id, "episodes": episodes,
            "finite_episodes": int(returns.size), "deterministic": bool(deterministic), "seed": int(seed),
            "mean": mean, "std": float(returns.std()) if returns.size else math.nan,
            "min": float(returns.min()) if returns.size else math.nan,
            "max": float(returns.max()) if returns.size else math.nan,
            "returns": returns.tolist(),
        }
        logged = spec["run"].get("eval_return")
        own = (not overrides and env_id is None and seed == spec["run"].get("seed")
               and episodes == spec["run"]["eval"]["episodes"]
               and bool(deterministic) == bool(spec["run"]["eval"]["deterministic"]))
        result["logged_eval_return"] = logged
        result["matches_logged"] = (mean == logged) if (own and logged is not None) else None
        if video is not None:
            result["video"], result["video_return"] = video, video_return
        return result
    finally:
        oracle.close()


def _bar(enabled: bool, total: int):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="evaluate", unit="episode", file=sys.stderr)


def _check_video_path(video: str) -> None:
    folder = os.path.dirname(os.path.abspath(video))
    if not os.path.isdir(folder):
        raise ApgaError(f"--video {video!r}: folder {folder!r} does not exist")
    if os.path.isdir(video):
        raise ApgaError(f"--video {video!r} is a directory; give a file name such as run.mp4")
    if not video.lower().endswith((".mp4", ".gif", ".webm", ".mkv", ".avi")):
        raise ApgaError(f"--video {video!r}: give a .mp4 (or .gif / .webm / .mkv / .avi) file name")
    try:
        import imageio  # noqa: F401
        if not video.lower().endswith(".gif"):
            import imageio_ffmpeg  # noqa: F401
    except ImportError as exc:
        raise ApgaError(f"--video needs the module {exc.name} (pip install 'apga[video]')") from None


def _record(oracle, cfg, theta, worker: int, key: int, deterministic: bool, video: str) -> float:
    """Play evaluation episode 0 of ``worker``'s environment with rendering and write the frames.

    The reset seed and the action noise are drawn exactly as the evaluation rollout draws them
    (apga.oracle.rl: the episode's stream gives the reset seed, then the noise of every step), so
    the recorded episode is the first evaluated one. Returns its undiscounted return."""
    import dataclasses
    from apga import rng
    from apga.oracle import policies, rl
    from apga.oracle.envs import make_env

    env_cfg = dataclasses.replace(cfg.env, kwargs={**(cfg.env.kwargs or {}), "render_mode": "rgb_array"})
    spec = oracle.spec
    stream = rng.stream(oracle.seed, rng.EVALUATION, worker, key * rl.EVAL_JOB_STRIDE + 0)
    reset_seed = int(stream.integers(0, rl.SEED_HIGH))
    noise = None if deterministic else policies.draw_noise(spec, stream, oracle.horizon)
    frames = []
    rewards = np.zeros((1, oracle.horizon))  # summed as the rollout sums its (B, H) rewards
    env = None
    import warnings
    try:
        warnings.filterwarnings("ignore", module="glfw")  # a failing GL backend warns, then raises
        env = make_env(env_cfg, worker)
        obs, _ = env.reset(seed=reset_seed)
        frames.append(env.render())
        for t in range(oracle.horizon):
            o = np.asarray(obs, dtype=np.float64)[None, :]
            if deterministic:
                action = policies.greedy_action(spec, theta, o)[0]
            else:
                action = policies.sample(spec, theta, o, noise[t][None])[1][0]
            obs, r, term, trunc, _ = env.step(action.item() if spec.kind == "categorical" else action)
            rewards[0, t] = r
            frames.append(env.render())
            if term or trunc:
                break
        fps = int(env.metadata.get("render_fps") or 30)
    except ApgaError:
        raise
    except Exception as exc:  # noqa: BLE001 - no renderer (no display, no OpenGL, no pygame)
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ApgaError(f"--video: cannot render {cfg.env.id} here ({type(exc).__name__}: {text}); MuJoCo "
                        "without a display needs MUJOCO_GL=egl or MUJOCO_GL=osmesa, classic-control envs "
                        "need pygame (pip install 'gymnasium[classic-control]')") from None
    finally:
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001
                pass
    if any(f is None for f in frames):
        raise ApgaError(f"--video: {cfg.env.id} returned no rgb_array frames")
    import tempfile
    import imageio.v2 as imageio
    ext = os.path.splitext(video)[1].lower()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=os.path.dirname(os.path.abspath(video)))
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: give the video the usual permissions
        options = {"codec": "libx264", "macro_block_size": 1} if ext == ".mp4" else {}
        with imageio.get_writer(tmp, fps=fps, **options) as w:
            for f in frames:
                w.append_data(np.asarray(f))
        os.replace(tmp, video)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return float(rewards.sum(axis=1)[0])
