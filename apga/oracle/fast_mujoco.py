"""A fast, exact step path for Gymnasium's MuJoCo v5 locomotion envs (Hopper, Walker2d,
HalfCheetah, Reacher).

Gymnasium's ``env.step`` spends about as much time in Python (wrappers, ``do_simulation``'s
shape check, ``mj_rnePostConstraint``, the info dict, scalar numpy) as MuJoCo spends on the
physics. :class:`FastStepper` steps a batch of such envs by writing ``data.ctrl`` and calling
``mujoco.mj_step(model, data, nstep=frame_skip)`` on each env's OWN model and data, then builds
the observations, rewards and termination flags of the whole batch with vectorised numpy.

Exactness (checked bit-for-bit against the real envs by tests/test_fast_mujoco.py): the physics
calls are the ones Gymnasium makes, minus ``mj_rnePostConstraint``, which only fills
``cacc`` / ``cfrc_int`` / ``cfrc_ext`` (outputs that none of these four envs read and that
``mj_step`` never reads back); every observation, reward and flag is computed with the same
IEEE operations in the same order as the env's Python (``np.sum`` of fewer than 8 squares is a
left-to-right sum, the norm of Reacher's 3-vector is computed per env exactly as
``np.linalg.norm`` does). Resets still go through ``env.reset``.

:func:`make_stepper` returns ``None`` (the caller falls back to ``env.step``) for anything else:
another env class or version, a subclass, a render mode, an unknown wrapper, changed
``frame_skip`` semantics, a time limit below the horizon. Known wrappers: Gymnasium's
``TimeLimit`` / ``OrderEnforcing`` / ``PassiveEnvChecker`` and apga's ``ModelChanges`` (applied
to the model once: nothing to do per step), ``ActionSign``, ``ObsSign``, ``InvertObs``.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

try:  # MuJoCo is an optional part of gymnasium: without it nothing here is ever used
    import mujoco
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
    from gymnasium.envs.mujoco.reacher_v5 import ReacherEnv
    from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv
except Exception:  # pragma: no cover - depends on the installation
    mujoco = None

from gymnasium.wrappers.common import OrderEnforcing, PassiveEnvChecker, TimeLimit

DISABLE_ENV = "APGA_NO_FAST_STEP"  # set to 1 to force the plain env.step path (debugging)
MAX_SEQ_SUM = 8  # numpy sums fewer than 8 contiguous float64 left to right (pairwise above)


def enabled() -> bool:
    return mujoco is not None and os.environ.get(DISABLE_ENV, "") in ("", "0")


def _seq_sum(x: np.ndarray) -> np.ndarray:
    """Row sums of a (B, n) array, n < 8, in the order numpy's np.sum of one row uses."""
    out = x[:, 0].copy()
    for k in range(1, x.shape[1]):
        out += x[:, k]
    return out


def _unwrap(env, horizon: int):
    """(core env, [action transforms inner->outer], [obs transforms inner->outer]) or None."""
    from apga.oracle.envs import ActionSign, InvertObs, ModelChanges, ObsSign

    act_sign, obs_ops = 1.0, []
    layers = []
    e = env
    while hasattr(e, "env") and e is not getattr(e, "unwrapped", e):
        layers.append(e)
        e = e.env
    for w in layers:
        t = type(w)
        if t is TimeLimit:
            if w._max_episode_steps < horizon:
                return None
        elif t in (OrderEnforcing, PassiveEnvChecker, ModelChanges):
            pass
        elif t is ActionSign:
            act_sign = -act_sign
        elif t is ObsSign:
            obs_ops.append(("neg",))
        elif t is InvertObs:
            obs_ops.append(("invert", float(w._sign), float(w.flag), w.observation_space.dtype))
        else:
            return None
    obs_ops.reverse()  # wrappers were listed outer -> inner; observations pass inner -> outer
    return e, act_sign, tuple(obs_ops)


class FastStepper:
    """Batched exact stepping of envs that share one core class and one wrapper stack.

    ``step(rows, actions)`` steps envs ``rows`` (indices into the list given to
    :func:`make_stepper`) with ``actions`` (float64, one row per env, the actions the OUTER env
    would receive) and returns ``(obs, rewards, terminated)`` exactly as ``env.step`` would.
    Truncation by the time limit is the caller's business (it stops at the horizon).
    """

    def __init__(self, kind: str, cores: list, act_sign: float, obs_ops: tuple):
        self.kind = kind
        self.cores = cores
        self.act_sign = act_sign
        self.obs_ops = obs_ops
        c0 = cores[0]
        self.frame_skip = int(c0.frame_skip)
        self.models = [c.model for c in cores]
        self.datas = [c.data for c in cores]
        self.ctrl = [d.ctrl for d in self.datas]  # views into MjData: stable for the data's life
        self.qpos = [d.qpos for d in self.datas]
        self.qvel = [d.qvel for d in self.datas]
        self.nq, self.nv, self.nu = c0.model.nq, c0.model.nv, c0.model.nu
        # dt exactly as the env's property computes it (per env: models may differ per worker)
        self.dt = np.array([c.model.opt.timestep * c.frame_skip for c in cores])
        self.dt0 = float(self.dt[0]) if np.all(self.dt == self.dt[0]) else None  # the usual case
        if kind == "reacher":
            self.fingertip = c0.model.body("fingertip").id
            self.target = c0.model.body("target").id
            self.xpos = [d.xpos for d in self.datas]
            self.dist_w = float(c0._reward_dist_weight)
            self.ctrl_w = float(c0._reward_control_weight)
        else:
            self.fw = float(c0._forward_reward_weight)
            self.cw = float(c0._ctrl_cost_weight)
            self.exclude = bool(c0._exclude_current_positions_from_observation)
        if kind in ("hopper", "walker2d"):
            self.healthy_reward = float(c0._healthy_reward)
            self.terminate = bool(c0._terminate_when_unhealthy)
            self.z_range = tuple(c0._healthy_z_range)
            self.angle_range = tuple(c0._healthy_angle_range)
        if kind == "hopper":
            self.state_range = tuple(c0._healthy_state_range)

    # ------------------------------------------------------------------ stepping
    def step(self, rows: Sequence[int], actions: np.ndarray):
        k = len(rows)
        a = np.ascontiguousarray(actions, dtype=np.float64)
        if self.act_sign < 0:
            a = -a  # what the core env receives (ActionSign: -np.asarray(action))
        nq = self.nq
        state = np.empty((k, nq + self.nv))  # [qpos, qvel] per env = the env's state_vector()
        x_before = np.empty(k)
        models, datas, ctrl, qp, qv = self.models, self.datas, self.ctrl, self.qpos, self.qvel
        nstep, mj_step = self.frame_skip, mujoco.mj_step
        reacher = self.kind == "reacher"
        vec = np.empty((k, 3)) if reacher else None
        for n, b in enumerate(rows):
            q = qp[b]
            x_before[n] = q[0]
            ctrl[b][:] = a[n]
            mj_step(models[b], datas[b], nstep=nstep)
            row = state[n]
            row[:nq] = q
            row[nq:] = qv[b]
            if reacher:
                xp = self.xpos[b]
                vec[n] = xp[self.fingertip] - xp[self.target]
        if reacher:
            obs, reward, term = self._reacher(state, vec, a)
        else:
            dt = self.dt0 if self.dt0 is not None else self.dt[np.asarray(rows, dtype=np.int64)]
            obs, reward, term = self._locomotion(state, x_before, dt, a)
        for op in self.obs_ops:
            if op[0] == "neg":
                obs = -obs
            else:
                _, sign, flag, dtype = op
                out = np.empty((k, obs.shape[1] + 1), dtype=dtype)
                np.multiply(obs, sign, out=out[:, :-1])
                out[:, -1] = flag
                obs = out
        return obs, reward, term

    def _locomotion(self, state, x_before, dt, a):
        kind, nq = self.kind, self.nq
        x_velocity = (state[:, 0] - x_before) / dt
        forward = self.fw * x_velocity
        ctrl_cost = self.cw * _seq_sum(np.square(a))
        if kind == "half_cheetah":
            obs = state[:, 1:] if self.exclude else state
            return obs, forward - ctrl_cost, np.zeros(len(state), dtype=bool)
        z, angle = state[:, 1], state[:, 2]
        (zmin, zmax), (amin, amax) = self.z_range, self.angle_range
        healthy = (zmin < z) & (z < zmax)
        healthy &= amin < angle
        healthy &= angle < amax
        if kind == "hopper":  # np.all(min < state_vector()[2:] < max)
            smin, smax = self.state_range
            rest = state[:, 2:]
            healthy &= ((smin < rest) & (rest < smax)).all(axis=1)
        reward = forward + healthy * self.healthy_reward
        reward -= ctrl_cost
        term = ~healthy if self.terminate else np.zeros(len(state), dtype=bool)
        # velocities clipped to [-10, 10] (np.clip; min(max(.)) is the same for every float)
        vel = state[:, nq:]
        np.maximum(vel, -10.0, out=vel)
        np.minimum(vel, 10.0, out=vel)
        obs = state[:, 1:] if self.exclude else state
        return obs, reward, term

    def _reacher(self, state, vec, a):
        nq = self.nq
        qpos, qvel = state[:, :nq], state[:, nq:]
        theta = qpos[:, :2]
        obs = np.concatenate((np.cos(theta), np.sin(theta), qpos[:, 2:], qvel[:, :2], vec[:, :2]), axis=1)
        # np.linalg.norm of a 1-D float64 vector is sqrt(x.dot(x)): kept per row (a BLAS dot)
        norms = np.array([math.sqrt(v.dot(v)) for v in vec])
        reward_dist = -norms * self.dist_w
        reward_ctrl = -_seq_sum(np.square(a)) * self.ctrl_w
        return obs, reward_dist + reward_ctrl, np.zeros(len(state), dtype=bool)


_KINDS = {}
if mujoco is not None:
    _KINDS = {HopperEnv: "hopper", Walker2dEnv: "walker2d", HalfCheetahEnv: "half_cheetah", ReacherEnv: "reacher"}


def make_stepper(envs: Sequence, horizon: int) -> FastStepper | None:
    """A :class:`FastStepper` for these envs, or None when any of them is not covered."""
    if not envs or not enabled():
        return None
    kind, sig, cores = None, None, []
    for env in envs:
        found = _unwrap(env, horizon)
        if found is None:
            return None
        core, act_sign, obs_ops = found
        k = _KINDS.get(type(core))
        if k is None or getattr(core, "render_mode", None) is not None:
            return None
        if not isinstance(getattr(core, "model", None), mujoco.MjModel) or core.model.nu >= MAX_SEQ_SUM:
            return None
        this = (k, act_sign, obs_ops)
        if sig is None:
            kind, sig = k, this
        elif this != sig:
            return None
        cores.append(core)
    return FastStepper(kind, cores, sig[1], sig[2])
