"""Exact batched stepping of Gymnasium's MuJoCo v5 envs on ``mujoco.batch.Batch``.

Gymnasium's ``env.step`` spends about as much time in Python (wrappers, ``do_simulation``'s
shape check, the info dict, scalar numpy) as MuJoCo spends on the physics, and one env steps
on one core. :class:`BatchStepper` holds trajectories of one rollout (one env_key; a block of
them when the rollout runs on several threads) as the simulations of one ``mujoco.batch.Batch``
of the env's own model (so per-worker model changes -- ``gravity``, ``mass_scale``,
``friction_scale`` -- are simply that worker's model): a step writes the controls of the live
simulations, runs ``mj_step(nstep=frame_skip)`` on all of them (the GIL released; bit-identical
to one ``MjData`` per simulation at any thread count of the batch), and builds observations,
rewards and termination flags of the whole batch with vectorised numpy from the bound
``(nsim, ...)`` arrays. A stepper belongs to one thread at a time (:class:`apga.oracle.rl.RLOracle`
gives each of its threads a stepper of its own).

Exactness (checked bit for bit against the real envs by tests/test_fast_mujoco.py):

* Resets go through ``env.reset(seed)`` of one env of the key (the env's own reset-noise
  stream); its integration state (``mj_getState(mjSTATE_INTEGRATION)``: qpos, qvel, warm start,
  time, ...) becomes the simulation's row, and the derived quantities a step reads "before" the
  physics (Ant's body position, Humanoid's centre of mass) are taken from its data.
* The physics is Gymnasium's ``mj_step``; derived fields (``xpos``, ``cinert``, ``cvel``,
  ``qfrc_actuator``, ...) come out of the batch one substep behind the state, as in ``MjData``.
  ``cfrc_ext`` needs ``mj_rnePostConstraint`` on the step's own data (with RK4, the last stage's
  contacts): Ant and Humanoid run a persistent batch and call it on ``get_data(sim)``.
* Every observation, reward and flag is computed with the same IEEE operations in the same
  order as the env's Python. Row sums over a C-contiguous ``(B, n)`` array equal ``np.sum`` of
  each row (numpy reduces each row with the same pairwise sum); the norm of Reacher's 3-vector is
  computed per row exactly as ``np.linalg.norm`` does; Humanoid's ``einsum`` batched over rows
  equals the per-row one (both checked by the tests).

Covered: Hopper, Walker2d, HalfCheetah, Reacher, Swimmer, InvertedPendulum, Ant, Humanoid (v5).
:func:`make_stepper` returns ``None`` (the caller falls back to ``env.step``, one env per
trajectory) for anything else: another env class or version, a subclass, a render mode, an
unknown wrapper, a time limit below the horizon, a MuJoCo without ``mujoco.batch``. Known
wrappers: Gymnasium's ``TimeLimit`` / ``OrderEnforcing`` / ``PassiveEnvChecker`` and apga's
``ModelChanges`` (already in the model), ``ActionSign``, ``ObsSign``, ``InvertObs``.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

try:  # MuJoCo is an optional part of gymnasium: without it nothing here is ever used
    import mujoco
    from mujoco.batch import Batch
    from gymnasium.envs.mujoco.ant_v5 import AntEnv
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
    from gymnasium.envs.mujoco.humanoid_v5 import HumanoidEnv
    from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv
    from gymnasium.envs.mujoco.reacher_v5 import ReacherEnv
    from gymnasium.envs.mujoco.swimmer_v5 import SwimmerEnv
    from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv
except Exception:  # pragma: no cover - depends on the installation
    mujoco = None

from gymnasium.wrappers.common import OrderEnforcing, PassiveEnvChecker, TimeLimit

DISABLE_ENV = "APGA_NO_FAST_STEP"  # set to 1 to force the plain env.step path (debugging)

_KINDS = {}
if mujoco is not None:
    _KINDS = {HopperEnv: "hopper", Walker2dEnv: "walker2d", HalfCheetahEnv: "half_cheetah",
              ReacherEnv: "reacher", SwimmerEnv: "swimmer", InvertedPendulumEnv: "inverted_pendulum",
              AntEnv: "ant", HumanoidEnv: "humanoid"}
COVERED = ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Reacher-v5", "Swimmer-v5", "InvertedPendulum-v5",
           "Ant-v5", "Humanoid-v5")
NEEDS_CFRC_EXT = ("ant", "humanoid")


def enabled() -> bool:
    return mujoco is not None and os.environ.get(DISABLE_ENV, "") in ("", "0")


def _unwrap(env, horizon: int):
    """(core env, action sign, obs transforms inner->outer) or None for an unknown stack."""
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


def covered(env, horizon: int) -> bool:
    """Whether :func:`make_stepper` would step this env (else: env.step)."""
    return _describe(env, horizon) is not None


def _describe(env, horizon: int):
    if not enabled():
        return None
    found = _unwrap(env, horizon)
    if found is None:
        return None
    core, act_sign, obs_ops = found
    kind = _KINDS.get(type(core))
    if kind is None or getattr(core, "render_mode", None) is not None:
        return None
    if not isinstance(getattr(core, "model", None), mujoco.MjModel):
        return None
    return kind, core, act_sign, obs_ops


def make_stepper(env, horizon: int, nsim: int, threads: int = 1) -> "BatchStepper | None":
    """A :class:`BatchStepper` of ``nsim`` simulations of ``env`` (reset through ``env``), or
    None when the env is not covered. ``threads``: the batch's own threads for its physics (the
    oracle uses 1 per stepper and a stepper per thread; the tests check other counts)."""
    found = _describe(env, horizon)
    if found is None:
        return None
    kind, core, act_sign, obs_ops = found
    return BatchStepper(kind, env, core, act_sign, obs_ops, int(nsim), int(threads))


class BatchStepper:
    """``nsim`` simulations of one env (its model, its reset noise), stepped together.

    ``reset(rows, seeds)`` starts an episode in each row (as ``env.reset(seed=...)``) and
    returns the observations; ``step(rows, actions)`` steps rows ``rows`` (sorted, unique) with
    ``actions`` (float64, one row each: the actions the OUTER env receives) and returns
    ``(obs, rewards, terminated)`` exactly as ``env.step`` would. Truncation by the time limit
    is the caller's business (it stops at the horizon).
    """

    def __init__(self, kind: str, env, core, act_sign: float, obs_ops: tuple, nsim: int, threads: int):
        self.kind, self.env, self.core = kind, env, core
        self.act_sign, self.obs_ops = act_sign, obs_ops
        self.nsim = nsim
        model = core.model
        self.model = model
        self.frame_skip = int(core.frame_skip)
        self.dt = core.dt  # a Python float, as the env's property computes it
        self.persistent = kind in NEEDS_CFRC_EXT
        self.batch = Batch(model, nsim=nsim, nthread=threads, persistent=self.persistent)
        b = self.batch
        self.state = b.state
        self.ctrl, self.qpos, self.qvel = b.bind("ctrl"), b.bind("qpos"), b.bind("qvel")
        self.nq, self.nv = model.nq, model.nv
        self.before = np.zeros((nsim, 2))  # Ant body xy / Humanoid centre of mass before a step
        self._spec = int(mujoco.mjtState.mjSTATE_INTEGRATION)
        c = core
        if kind == "reacher":
            self.xpos = b.bind("xpos")
            self.fingertip, self.target = model.body("fingertip").id, model.body("target").id
            self.dist_w, self.ctrl_w = float(c._reward_dist_weight), float(c._reward_control_weight)
        if kind in ("hopper", "walker2d", "half_cheetah", "swimmer", "ant", "humanoid"):
            self.fw, self.cw = c._forward_reward_weight, c._ctrl_cost_weight
            self.exclude = bool(c._exclude_current_positions_from_observation)
        if kind in ("hopper", "walker2d", "ant", "humanoid"):
            self.healthy_reward = c._healthy_reward
            self.terminate = bool(c._terminate_when_unhealthy)
            self.z_range = tuple(c._healthy_z_range)
        if kind in ("hopper", "walker2d"):
            self.angle_range = tuple(c._healthy_angle_range)
        if kind == "hopper":
            self.state_range = tuple(c._healthy_state_range)
        if self.persistent:
            self.scratch = mujoco.MjData(model)  # receives one simulation's data for rnePostConstraint
            self.contact_w = c._contact_cost_weight
        if kind == "ant":
            self.main = model.body(c._main_body).id
            self.xpos = b.bind("xpos")
            self.force_range = tuple(c._contact_force_range)
            self.include_cfrc = bool(c._include_cfrc_ext_in_observation)
        if kind == "humanoid":
            self.xipos = b.bind("xipos")
            self.body_mass = model.body_mass
            self.mass_sum = model.body_mass.sum()  # mass_center's denominator, as Gymnasium computes it
            self.contact_range = tuple(c._contact_cost_range)
            self.include = (bool(c._include_cinert_in_observation), bool(c._include_cvel_in_observation),
                            bool(c._include_qfrc_actuator_in_observation), bool(c._include_cfrc_ext_in_observation))
            self.cinert, self.cvel = b.bind("cinert"), b.bind("cvel")
            self.qfrc_actuator = b.bind("qfrc_actuator")

    # ------------------------------------------------------------------ episodes
    def reset(self, rows: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        """Start an episode in each row: ``env.reset(seed)``, then its state becomes the row."""
        env, model, data = self.env, self.model, self.core.data
        out = None
        for k, (b, seed) in enumerate(zip(rows, seeds)):
            o = env.reset(seed=int(seed))[0]
            if out is None:
                out = np.empty((len(rows),) + np.shape(o), dtype=np.asarray(o).dtype)
            out[k] = o
            mujoco.mj_getState(model, data, self.state[b], self._spec)
            if self.kind == "ant":
                self.before[b] = data.xpos[self.main, :2]
            elif self.kind == "humanoid":
                self.before[b] = (np.einsum("b,bj->j", model.body_mass, data.xipos) / self.mass_sum)[0:2]
        return out

    # ------------------------------------------------------------------ stepping
    def step(self, rows, actions: np.ndarray):
        """Step ``rows`` and return ``(obs, rewards, terminated)`` (the physics on the caller's
        thread and the batch's own, with the GIL released)."""
        rows, a, x_before = self._prepare(rows, actions)
        return self._observe(rows, a, x_before, self._physics(rows))

    def _prepare(self, rows, actions):
        a = np.ascontiguousarray(actions, dtype=np.float64)
        if self.act_sign < 0:
            a = -a  # what the core env receives (ActionSign: -np.asarray(action))
        if len(rows) == self.nsim:  # every simulation: basic indexing, and step(None)
            rows = None
            self.ctrl[:] = a
        else:
            rows = np.asarray(rows, dtype=np.int32)
            self.ctrl[rows] = a
        x_before = None
        if self.kind in ("hopper", "walker2d", "half_cheetah", "swimmer"):
            x_before = self.qpos[:, 0].copy() if rows is None else self.qpos[rows, 0]
        return rows, a, x_before

    def _physics(self, rows):
        """mj_step(nstep=frame_skip) on ``rows`` (None: all), and their cfrc_ext where the env reads it."""
        self.batch.step(rows, nstep=self.frame_skip)
        return self._cfrc_ext(range(self.nsim) if rows is None else rows) if self.persistent else None

    def _observe(self, rows, a, x_before, cfrc):
        kind = self.kind
        # The bound arrays are live views: read here, before this batch's next step. Every
        # observation below is a new array (concatenate / arithmetic), never a view of them.
        sel = slice(None) if rows is None else rows
        n = self.nsim if rows is None else len(rows)
        qpos, qvel = self.qpos[sel], self.qvel[sel]
        if kind == "reacher":
            obs, reward, term = self._reacher(qpos, qvel, self.xpos[sel], a)
        elif kind == "inverted_pendulum":
            obs = np.concatenate((qpos, qvel), axis=1)
            term = ~np.isfinite(obs).all(axis=1) | (np.abs(obs[:, 1]) > 0.2)
            reward = (~term).astype(np.float64)  # int(not terminated)
        elif kind == "swimmer":
            x_velocity = (qpos[:, 0] - x_before) / self.dt
            reward = self.fw * x_velocity - self.cw * np.square(a).sum(axis=1)
            obs = np.concatenate((qpos[:, 2:] if self.exclude else qpos, qvel), axis=1)
            term = np.zeros(n, dtype=bool)
        elif kind in ("ant", "humanoid"):
            if kind == "ant":
                obs, reward, term = self._ant(sel, qpos, qvel, cfrc, a)
            else:
                obs, reward, term = self._humanoid(sel, qpos, qvel, cfrc)
        else:
            obs, reward, term = self._locomotion(qpos, qvel, x_before, a)
        for op in self.obs_ops:
            if op[0] == "neg":
                obs = -obs
            else:
                _, sign, flag, dtype = op
                out = np.empty((n, obs.shape[1] + 1), dtype=dtype)
                np.multiply(obs, sign, out=out[:, :-1])
                out[:, -1] = flag
                obs = out
        return obs, reward, term

    def _cfrc_ext(self, rows) -> np.ndarray:
        """cfrc_ext of each row after its step: mj_rnePostConstraint on the step's own data."""
        model, d, get = self.model, self.scratch, self.batch.get_data
        out = np.empty((len(rows),) + d.cfrc_ext.shape)
        post = mujoco.mj_rnePostConstraint
        for k, b in enumerate(rows.tolist() if isinstance(rows, np.ndarray) else rows):
            get(b, d)
            post(model, d)
            out[k] = d.cfrc_ext
        return out

    def _locomotion(self, qpos, qvel, x_before, a):
        kind = self.kind
        x_velocity = (qpos[:, 0] - x_before) / self.dt
        forward = self.fw * x_velocity
        ctrl_cost = self.cw * np.square(a).sum(axis=1)
        if kind == "half_cheetah":
            obs = np.concatenate((qpos[:, 1:] if self.exclude else qpos, qvel), axis=1)
            return obs, forward - ctrl_cost, np.zeros(len(qpos), dtype=bool)
        z, angle = qpos[:, 1], qpos[:, 2]
        (zmin, zmax), (amin, amax) = self.z_range, self.angle_range
        healthy = (zmin < z) & (z < zmax)
        healthy &= amin < angle
        healthy &= angle < amax
        if kind == "hopper":  # np.all(min < state_vector()[2:] < max)
            smin, smax = self.state_range
            rest = np.concatenate((qpos[:, 2:], qvel), axis=1)
            healthy &= ((smin < rest) & (rest < smax)).all(axis=1)
        reward = forward + healthy * self.healthy_reward
        reward -= ctrl_cost
        term = ~healthy if self.terminate else np.zeros(len(qpos), dtype=bool)
        vel = np.minimum(np.maximum(qvel, -10.0), 10.0)  # np.clip(qvel, -10, 10), without its wrapper
        obs = np.concatenate((qpos[:, 1:] if self.exclude else qpos, vel), axis=1)
        return obs, reward, term

    def _reacher(self, qpos, qvel, xpos, a):
        vec = xpos[:, self.fingertip] - xpos[:, self.target]
        theta = qpos[:, :2]
        obs = np.concatenate((np.cos(theta), np.sin(theta), qpos[:, 2:], qvel[:, :2], vec[:, :2]), axis=1)
        # np.linalg.norm of a 1-D float64 vector is sqrt(x.dot(x)): kept per row (a BLAS dot)
        norms = np.array([math.sqrt(v.dot(v)) for v in vec])
        reward_dist = -norms * self.dist_w
        reward_ctrl = -np.square(a).sum(axis=1) * self.ctrl_w
        return obs, reward_dist + reward_ctrl, np.zeros(len(qpos), dtype=bool)

    def _ant(self, sel, qpos, qvel, cfrc, a):
        after = self.xpos[sel, self.main, :2]
        before = self.before[sel]
        x_velocity = (after[:, 0] - before[:, 0]) / self.dt
        self.before[sel] = after
        lo, hi = self.force_range
        forces = np.clip(cfrc, lo, hi)
        state = np.concatenate((qpos, qvel), axis=1)
        zmin, zmax = self.z_range
        healthy = np.isfinite(state).all(axis=1) & (zmin <= state[:, 2]) & (state[:, 2] <= zmax)
        rewards = x_velocity * self.fw + healthy * self.healthy_reward
        ctrl_cost = self.cw * np.square(a).sum(axis=1)
        contact_cost = self.contact_w * np.square(forces).reshape(len(qpos), -1).sum(axis=1)
        reward = rewards - (ctrl_cost + contact_cost)
        term = ~healthy if self.terminate else np.zeros(len(qpos), dtype=bool)
        parts = [qpos[:, 2:] if self.exclude else qpos, qvel]
        if self.include_cfrc:
            parts.append(forces[:, 1:].reshape(len(qpos), -1))
        return np.concatenate(parts, axis=1), reward, term

    def _humanoid(self, sel, qpos, qvel, cfrc):
        n = len(qpos)
        xipos = self.xipos[sel]
        after = (np.einsum("b,sbj->sj", self.body_mass, xipos) / self.mass_sum)[:, 0:2]
        before = self.before[sel]
        x_velocity = (after[:, 0] - before[:, 0]) / self.dt
        self.before[sel] = after
        zmin, zmax = self.z_range
        healthy = (zmin < qpos[:, 2]) & (qpos[:, 2] < zmax)
        ctrl = self.ctrl[sel]
        ctrl_cost = self.cw * np.square(ctrl).reshape(n, -1).sum(axis=1)
        lo, hi = self.contact_range
        contact_cost = np.clip(self.contact_w * np.square(cfrc).reshape(n, -1).sum(axis=1), lo, hi)
        reward = (self.fw * x_velocity + healthy * self.healthy_reward) - (ctrl_cost + contact_cost)
        term = ~healthy if self.terminate else np.zeros(n, dtype=bool)
        parts = [qpos[:, 2:] if self.exclude else qpos, qvel]
        inc_cinert, inc_cvel, inc_qfrc, inc_cfrc = self.include
        if inc_cinert:
            parts.append(self.cinert[sel][:, 1:].reshape(n, -1))
        if inc_cvel:
            parts.append(self.cvel[sel][:, 1:].reshape(n, -1))
        if inc_qfrc:
            parts.append(self.qfrc_actuator[sel][:, 6:])
        if inc_cfrc:
            parts.append(cfrc[:, 1:].reshape(n, -1))
        return np.concatenate(parts, axis=1), reward, term
