"""Policies as functional MLPs over ONE flat float64 parameter vector.

There is no ``nn.Module`` state: a :class:`PolicySpec` records the network shape and where each
weight lives inside the flat vector, and the functions below read the weights as views.

* Gaussian (Box actions): a tanh MLP trunk, a mean head mu(s) and a std head
  sigma(s) = softplus(head(s)) + MIN_STD. The sampled pre-squash value is u ~ N(mu, diag sigma^2)
  and the env action is ``center + scale * tanh(u)`` (``scale * tanh(u)`` for symmetric boxes;
  unbounded boxes get u itself). The score is grad log N(u; mu, sigma): the tanh Jacobian does not
  depend on the parameters, so it drops out of the gradient.
* Categorical (Discrete actions): a tanh MLP with a logits head.

Two forwards exist on purpose: a NUMPY one for rollouts (:func:`sample`, :func:`greedy_action`,
no torch in the step loop) and a TORCH one (:func:`log_prob`) that autograd differentiates.

Row independence: a trajectory's actions must not depend on which other trajectories share its
batch. A plain ``(B, K) @ (K, N)`` BLAS gemm changes its summation order with B (measured: last-bit
differences), so each linear layer is a stacked ``(B, 1, K) @ (K, N)`` product instead: numpy runs
the same vector-matrix product once per row, whatever B, the row's position or its alignment
(checked by tests/test_policies.py; costs ~1.3x a gemm at B = 32-64, negligible next to the envs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces

from apga.errors import ConfigError

MIN_STD = 1e-5  # floor on sigma: keeps log N finite when the softplus head saturates low
HIDDEN_GAIN = math.sqrt(2.0)  # orthogonal init gains (CleanRL / PPO defaults)
HEAD_GAIN = 0.01  # small heads: the initial policy is nearly state-independent


@dataclass(frozen=True)
class Block:
    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True, eq=False)
class PolicySpec:
    """Shape of the policy network and the slicing layout of its flat parameter vector.

    Layout: for each layer ``l`` a weight ``W{l}`` of shape (in, out) then a bias ``b{l}``. Hidden
    layers come first; the last layer is the head. The Gaussian head has ``2 * act_dim`` outputs:
    columns ``[:act_dim]`` are the mean, ``[act_dim:]`` the softplus-std pre-activation.
    """

    kind: str  # "gaussian" | "categorical"
    obs_dim: int
    act_dim: int  # Gaussian: action dimensions; categorical: number of actions
    hidden: tuple[int, ...]
    init_std: float
    center: np.ndarray | None  # Gaussian with bounded box: action = center + scale * tanh(u)
    scale: np.ndarray | None  # None: unbounded box, action = u
    blocks: tuple[Block, ...]
    dim: int

    @property
    def n_layers(self) -> int:
        return len(self.hidden) + 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-step shape of the stored sample (u for Gaussian, an index for categorical)."""
        return (self.act_dim,) if self.kind == "gaussian" else ()

    @property
    def sample_dtype(self):
        return np.float64 if self.kind == "gaussian" else np.int64

    def noise_shape(self, steps: int) -> tuple[int, ...]:
        """Shape of the randomness one trajectory of ``steps`` steps needs (see :func:`draw_noise`)."""
        return (steps, self.act_dim) if self.kind == "gaussian" else (steps,)


def make_spec(observation_space, action_space, hidden=(64, 64), init_std: float = 0.6) -> PolicySpec:
    """Build the spec of the policy for these spaces (Box observations; Box or Discrete actions)."""
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
        raise ConfigError(
            f"env: observation space {observation_space} is not supported; the MLP policy needs a "
            "flat Box observation (wrap the env with a flattening wrapper)"
        )
    try:
        hidden = tuple(int(h) for h in hidden)
    except (TypeError, ValueError):
        raise ConfigError(f"policy.hidden: expected a list of positive integers, got {hidden!r}") from None
    if any(h < 1 for h in hidden):
        raise ConfigError(f"policy.hidden: sizes must be positive integers, got {list(hidden)}")
    if not (init_std > MIN_STD and math.isfinite(init_std)):
        raise ConfigError(f"policy.init_std: must be a finite number > {MIN_STD}, got {init_std}")
    obs_dim = int(observation_space.shape[0])
    center = scale = None
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
        kind, act_dim, out_dim = "gaussian", int(action_space.shape[0]), 2 * int(action_space.shape[0])
        low = np.asarray(action_space.low, dtype=np.float64)
        high = np.asarray(action_space.high, dtype=np.float64)
        bounded = np.isfinite(low) & np.isfinite(high)
        if bounded.all():
            center, scale = (high + low) / 2.0, (high - low) / 2.0
            if np.all(center == 0.0):
                center = None  # symmetric box: action = high * tanh(u) exactly
        elif bounded.any():
            raise ConfigError(
                "env: action space mixes bounded and unbounded dimensions; the Gaussian policy "
                "needs all bounds finite (tanh squashing) or all infinite (no squashing)"
            )
    elif isinstance(action_space, spaces.Discrete):
        kind, act_dim, out_dim = "categorical", int(action_space.n), int(action_space.n)
    else:
        raise ConfigError(
            f"env: action space {action_space} is not supported; use a flat Box or a Discrete space"
        )
    blocks, offset, fan_in = [], 0, obs_dim
    for layer, fan_out in enumerate(hidden + (out_dim,)):
        for name, shape in ((f"W{layer}", (fan_in, fan_out)), (f"b{layer}", (fan_out,))):
            blocks.append(Block(name, offset, shape))
            offset += int(np.prod(shape))
        fan_in = fan_out
    return PolicySpec(kind, obs_dim, act_dim, hidden, float(init_std), center, scale, tuple(blocks), offset)


def unpack(spec: PolicySpec, params):
    """Views of the flat vector (numpy array or torch tensor): [(W0, b0), (W1, b1), ...]."""
    views = [params[b.offset : b.offset + b.size].reshape(b.shape) for b in spec.blocks]
    return list(zip(views[0::2], views[1::2]))


def init_params(spec: PolicySpec, rng: np.random.Generator) -> np.ndarray:
    """Orthogonal weights (gain sqrt 2 hidden, 0.01 heads), zero biases, std bias for init_std.

    Deterministic given ``rng``; pass ``apga.rng.stream(seed, apga.rng.INIT)``.
    """
    params = np.zeros(spec.dim)
    layers = unpack(spec, params)
    for layer, (w, b) in enumerate(layers):
        gain = HEAD_GAIN if layer == len(layers) - 1 else HIDDEN_GAIN
        w[...] = gain * _orthogonal(rng, w.shape)
    if spec.kind == "gaussian":
        # softplus(bias) + MIN_STD = init_std, i.e. bias = softplus^-1(init_std - MIN_STD)
        layers[-1][1][spec.act_dim :] = math.log(math.expm1(spec.init_std - MIN_STD))
    return params


def _orthogonal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))  # sign fix: makes the distribution uniform (Haar)
    return q if rows >= cols else q.T


def draw_noise(spec: PolicySpec, rng: np.random.Generator, steps: int) -> np.ndarray:
    """All the randomness one trajectory needs: N(0, 1) per action dim, or U[0, 1) per step."""
    if spec.kind == "gaussian":
        return rng.standard_normal((steps, spec.act_dim))
    return rng.random(steps)


# ----------------------------------------------------------------------------- numpy forward
class Prepared:
    """A flat parameter vector unpacked once into its layer views, for the many forwards of a
    rollout (unpacking costs more than a small layer's product). Numerically the same as
    passing the flat vector."""

    def __init__(self, spec: PolicySpec, params):
        self.layers = unpack(spec, np.asarray(params, dtype=np.float64))


class RowParams:
    """One parameter vector PER ROW of a batch (e.g. AFedPG jobs handed out at different points).

    Holds each layer stacked over the rows, ``W`` (B, in, out) and ``b`` (B, 1, out), so that the
    numpy forward runs ``(B, 1, K) @ (B, K, N)``: the same vector-matrix product per row as the
    shared-parameter ``(B, 1, K) @ (K, N)``, hence bit-identical row results (checked by
    tests/test_policies.py). Pass it wherever the numpy forwards take ``params``.
    """

    def __init__(self, layers: list):
        self.layers = layers

    @staticmethod
    def stack(spec: PolicySpec, points) -> "RowParams":
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != spec.dim:
            raise ValueError(f"points have shape {points.shape}, expected (B, {spec.dim})")
        n = points.shape[0]
        layers = []
        for wb, bb in zip(spec.blocks[0::2], spec.blocks[1::2]):
            w = np.ascontiguousarray(points[:, wb.offset : wb.offset + wb.size].reshape((n,) + wb.shape))
            b = np.ascontiguousarray(points[:, bb.offset : bb.offset + bb.size].reshape(n, 1, bb.size))
            layers.append((w, b))
        return RowParams(layers)

    def take(self, rows) -> "RowParams":
        """The parameters of ``rows`` (an index array), as a new contiguous RowParams."""
        return RowParams([(w[rows], b[rows]) for w, b in self.layers])

    def __len__(self) -> int:
        return self.layers[0][0].shape[0]


def _head_np(spec: PolicySpec, params, obs: np.ndarray) -> np.ndarray:
    """Last-layer outputs, shape (B, out); each row is computed independently of the others.

    ``params``: a flat vector shared by all rows (or its :class:`Prepared` form), or a
    :class:`RowParams` with one per row.
    """
    x = np.asarray(obs, dtype=np.float64)[:, None, :]  # (B, 1, K): one vector-matrix product per row
    layers = params.layers if isinstance(params, (RowParams, Prepared)) else unpack(spec, params)
    for layer, (w, b) in enumerate(layers):
        x = x @ w
        x += b
        if layer < len(layers) - 1:
            np.tanh(x, out=x)
    return x[:, 0, :]


def _softplus_np(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(z, 0.0)


def _squash(spec: PolicySpec, u: np.ndarray) -> np.ndarray:
    if spec.scale is None:
        return u.copy()
    a = np.tanh(u)
    a *= spec.scale
    if spec.center is not None:
        a += spec.center
    return a


def mean_std(spec: PolicySpec, params: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mu(s), sigma(s) (numpy), each (B, act_dim)."""
    out = _head_np(spec, params, obs)
    return out[:, : spec.act_dim], _softplus_np(out[:, spec.act_dim :]) + MIN_STD


def probs(spec: PolicySpec, params: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Categorical action probabilities (numpy), (B, n)."""
    logits = _head_np(spec, params, obs)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return p


def sample(spec: PolicySpec, params: np.ndarray, obs: np.ndarray, noise: np.ndarray):
    """One batched policy step with caller-supplied randomness.

    ``noise``: (B, act_dim) standard normals (Gaussian) or (B,) uniforms in [0, 1) (categorical),
    one row per trajectory, from that trajectory's own stream.
    Returns ``(stored, action)``: the pre-squash u (B, act_dim) and the env action (B, act_dim),
    or the action index (B,) twice for categorical (inverse-CDF sampling).
    """
    if spec.kind == "gaussian":
        mu, sigma = mean_std(spec, params, obs)
        u = mu + sigma * noise
        return u, _squash(spec, u)
    cdf = np.cumsum(probs(spec, params, obs), axis=1)
    # index = number of CDF steps at or below the uniform; the clip guards cdf[-1] < 1 by rounding
    idx = np.minimum((cdf <= noise[:, None]).sum(axis=1), spec.act_dim - 1).astype(np.int64)
    return idx, idx


def greedy_action(spec: PolicySpec, params: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Deterministic evaluation action: squash(mu) for Gaussian, argmax logits for categorical."""
    out = _head_np(spec, params, obs)
    if spec.kind == "gaussian":
        return _squash(spec, out[:, : spec.act_dim])
    return out.argmax(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------- torch forward
def _head_torch(spec: PolicySpec, params: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    x = obs
    layers = unpack(spec, params)
    for layer, (w, b) in enumerate(layers):
        x = torch.addmm(b, x, w)
        if layer < len(layers) - 1:
            x = torch.tanh(x)
    return x


def log_prob(spec: PolicySpec, params: torch.Tensor, obs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """log pi(sample | obs) per row (torch, differentiable in ``params``).

    Gaussian: log N(u; mu(s), diag sigma(s)^2) summed over action dims (the tanh Jacobian is
    omitted: it does not depend on the parameters). Categorical: log softmax(logits)[index].
    """
    out = _head_torch(spec, params, obs)
    if spec.kind == "gaussian":
        mu = out[:, : spec.act_dim]
        sigma = torch.logaddexp(out[:, spec.act_dim :], torch.zeros((), dtype=out.dtype)) + MIN_STD
        z = (samples - mu) / sigma
        return (-0.5 * z * z - torch.log(sigma)).sum(dim=1) - 0.5 * math.log(2 * math.pi) * spec.act_dim
    logp = torch.log_softmax(out, dim=1)
    return logp.gather(1, samples.long().unsqueeze(1)).squeeze(1)
