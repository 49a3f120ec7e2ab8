"""Per-worker Gymnasium environments built from ``EnvConfig``.

Worker ``i`` gets ``gymnasium.make(env.id, max_episode_steps=env.horizon, **kwargs)`` where kwargs
are ``env.kwargs`` updated with ``env.per_worker[i].kwargs``, then, in this order:

1. MuJoCo model changes applied once to ``env.unwrapped.model``: ``gravity`` (3 floats),
   ``mass_scale`` (multiplies every ``body_mass``), ``friction_scale`` (multiplies every
   ``geom_friction``);
2. ``action_sign = -1``: the env receives ``-a``;
3. ``obs_sign = -1``: the agent sees ``-s``;
4. ``invert_obs`` (the paper's heterogeneous environments): worker i has flag f = i % 2 and sees
   ``concat((1 - 2f) s, [f])``; the observation grows by one dimension.

:func:`env_key` summarises all of this, so workers with equal keys can share batched rollouts.
"""
from __future__ import annotations

import difflib
import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from apga.config import EnvConfig
from apga.errors import ConfigError

PER_WORKER_KEYS = ("kwargs", "obs_sign", "action_sign", "gravity", "mass_scale", "friction_scale")
MUJOCO_KEYS = ("gravity", "mass_scale", "friction_scale")


# ----------------------------------------------------------------------------- wrappers
def _flipped_box(space: spaces.Box) -> spaces.Box:
    """The box that holds -x for every x in ``space``."""
    return spaces.Box(-space.high, -space.low, shape=space.shape, dtype=space.dtype)


# The wrappers record their constructor arguments so that ``env.spec.make()`` rebuilds the same
# worker environment (gymnasium's check_env relies on it).


class ModelChanges(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """MuJoCo model changes, applied once here: reset() restores the state, never the model."""

    def __init__(self, env: gym.Env, gravity=None, mass_scale=None, friction_scale=None):
        gym.utils.RecordConstructorArgs.__init__(
            self, gravity=gravity, mass_scale=mass_scale, friction_scale=friction_scale
        )
        gym.Wrapper.__init__(self, env)
        model = env.unwrapped.model
        if gravity is not None:
            model.opt.gravity[:] = gravity
        if mass_scale is not None:
            model.body_mass[:] *= mass_scale
        if friction_scale is not None:
            model.geom_friction[:] *= friction_scale


class InvertObs(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """The paper's heterogeneous task: observe ``((1 - 2f) s, f)`` with a constant flag f in {0, 1}.

    The observation space is the same for both flags (it holds s and -s, and the flag in [0, 1]),
    so one policy serves every worker.
    """

    def __init__(self, env: gym.Env, flag: int):
        gym.utils.RecordConstructorArgs.__init__(self, flag=flag)
        gym.ObservationWrapper.__init__(self, env)
        box = env.observation_space
        self.flag = int(flag)
        self._sign = 1.0 - 2.0 * self.flag
        low = np.concatenate([np.minimum(box.low, -box.high), [0.0]]).astype(box.dtype)
        high = np.concatenate([np.maximum(box.high, -box.low), [1.0]]).astype(box.dtype)
        self.observation_space = spaces.Box(low, high, dtype=box.dtype)

    def observation(self, observation):
        out = np.empty(self.observation_space.shape, dtype=self.observation_space.dtype)
        np.multiply(observation, self._sign, out=out[:-1])
        out[-1] = self.flag
        return out


class ObsSign(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """The agent sees ``-s`` (a sign flip of the whole observation)."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        self.observation_space = _flipped_box(env.observation_space)

    def observation(self, observation):
        return -observation


class ActionSign(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """The env receives ``-a``; needs a symmetric Box so the action space is unchanged."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ActionWrapper.__init__(self, env)

    def action(self, action):
        return -np.asarray(action)


# ----------------------------------------------------------------------------- per-worker settings
def _freeze(value: Any):
    """A hashable, order-independent copy of a config value (dicts, lists, numbers, strings)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


def _number(value, where: str, positive: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or (positive and x <= 0):
        raise ConfigError(f"{where}: expected a finite{' positive' if positive else ''} number, got {value!r}")
    return x


def _sign(value, where: str) -> int:
    if isinstance(value, bool) or value not in (1, -1):
        raise ConfigError(f"{where}: expected +1 or -1, got {value!r}")
    return int(value)


def worker_settings(env_cfg: EnvConfig, worker: int) -> dict:
    """Validated per-worker changes of ``worker`` (missing entries: no change).

    Returns a dict with every key of PER_WORKER_KEYS: kwargs (merged with env.kwargs), obs_sign,
    action_sign, gravity (tuple or None), mass_scale, friction_scale (floats or None).
    """
    raw = env_cfg.per_worker[worker] if worker < len(env_cfg.per_worker or []) else None
    where = f"env.per_worker[{worker}]"
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(PER_WORKER_KEYS)}, got {raw!r}")
    for k in raw:
        if k not in PER_WORKER_KEYS:
            hint = difflib.get_close_matches(str(k), PER_WORKER_KEYS, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(PER_WORKER_KEYS)}"
            raise ConfigError(f"{where}.{k}: unknown per-worker key; {fix}")
    if not isinstance(env_cfg.kwargs or {}, dict):
        raise ConfigError(f"env.kwargs: expected a mapping, got {env_cfg.kwargs!r}")
    extra = raw.get("kwargs") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}.kwargs: expected a mapping, got {extra!r}")
    kwargs = {**(env_cfg.kwargs or {}), **extra}
    if "max_episode_steps" in kwargs:
        raise ConfigError("env.kwargs.max_episode_steps: set env.horizon instead")
    gravity = raw.get("gravity")
    if gravity is not None:
        if not isinstance(gravity, (list, tuple)) or len(gravity) != 3:
            raise ConfigError(f"{where}.gravity: expected 3 numbers like [0, 0, -9.81], got {gravity!r}")
        gravity = tuple(_number(g, f"{where}.gravity") for g in gravity)
    mass = raw.get("mass_scale")
    friction = raw.get("friction_scale")
    return {
        "kwargs": kwargs,
        "obs_sign": _sign(raw.get("obs_sign", 1), f"{where}.obs_sign"),
        "action_sign": _sign(raw.get("action_sign", 1), f"{where}.action_sign"),
        "gravity": gravity,
        "mass_scale": None if mass is None else _number(mass, f"{where}.mass_scale", positive=True),
        "friction_scale": None if friction is None else _number(friction, f"{where}.friction_scale", positive=True),
    }


def env_key(env_cfg: EnvConfig, worker: int) -> tuple:
    """Hashable summary of worker ``worker``'s environment; equal keys = identical environments."""
    s = worker_settings(env_cfg, worker)
    flag = worker % 2 if env_cfg.invert_obs else None
    return (
        env_cfg.id,
        int(env_cfg.horizon),
        _freeze(s["kwargs"]),
        flag,
        s["obs_sign"],
        s["action_sign"],
        s["gravity"],
        s["mass_scale"],
        s["friction_scale"],
    )


# ----------------------------------------------------------------------------- construction
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _mujoco_model(env: gym.Env):
    try:
        import mujoco
    except ImportError:  # no MuJoCo installed: nothing can be a MuJoCo env
        return None
    model = getattr(env.unwrapped, "model", None)
    return model if isinstance(model, mujoco.MjModel) else None


def make_env(env_cfg: EnvConfig, worker: int) -> gym.Env:
    """Build worker ``worker``'s environment (a fresh instance; see the module docstring)."""
    s = worker_settings(env_cfg, worker)
    try:
        env = gym.make(env_cfg.id, max_episode_steps=int(env_cfg.horizon), **s["kwargs"])
    except gym.error.Error as exc:
        kind = "could not be created" if isinstance(exc, gym.error.DependencyNotInstalled) else "is not a known Gymnasium environment"
        raise ConfigError(f"env.id: '{env_cfg.id}' {kind} ({_first_line(exc)}); check the id and its version suffix (e.g. Hopper-v5)") from None
    except TypeError as exc:
        raise ConfigError(f"env.kwargs: {env_cfg.id} rejected the keyword arguments {sorted(s['kwargs'])} ({_first_line(exc)})") from None

    where = f"env.per_worker[{worker}]"
    wanted = [k for k in MUJOCO_KEYS if s[k] is not None]
    if wanted:
        if _mujoco_model(env) is None:
            env.close()
            raise ConfigError(
                f"{where}.{wanted[0]}: {env_cfg.id} is not a MuJoCo environment; model changes "
                f"({', '.join(MUJOCO_KEYS)}) need one (e.g. Hopper-v5), or remove the key"
            )
        env = ModelChanges(env, s["gravity"], s["mass_scale"], s["friction_scale"])

    if s["action_sign"] == -1:
        box = env.action_space
        if not isinstance(box, spaces.Box) or not np.array_equal(box.low, -box.high):
            env.close()
            raise ConfigError(f"{where}.action_sign: needs a symmetric Box action space, {env_cfg.id} has {box}; remove the key")
        env = ActionSign(env)
    if s["obs_sign"] == -1:
        if not isinstance(env.observation_space, spaces.Box):
            env.close()
            raise ConfigError(f"{where}.obs_sign: needs a Box observation space, {env_cfg.id} has {env.observation_space}; remove the key")
        env = ObsSign(env)
    if env_cfg.invert_obs:
        box = env.observation_space
        if not isinstance(box, spaces.Box) or len(box.shape) != 1:
            env.close()
            raise ConfigError(f"env.invert_obs: needs a flat Box observation space, {env_cfg.id} has {box}; set env.invert_obs: false")
        env = InvertObs(env, worker % 2)
    return env
