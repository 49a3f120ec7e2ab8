"""The trained policy as a file and as a ``torch.nn.Module``.

A policy file (``policy_final.safetensors``, ``policy_best.safetensors`` in a run directory) is
one safetensors file: the layer tensors ``W0, b0, W1, b1, ...`` (float64; ``W{l}`` has shape
(in, out) and a layer computes ``x @ W + b``; tanh between layers, none after the head) and, in
the safetensors header's metadata under ``apga.policy``, a JSON spec: format and apga versions,
env id and kwargs, observation and action spaces, network shape, activation, std head, action
squashing, the heterogeneous-env flag input if any, and where in the run the parameters come
from. One file, so the tensors and their spec are always replaced together (atomically), and
reading it runs no code (safetensors is a JSON header plus raw little-endian arrays).

``load_policy(run_dir_or_file, which="final" | "best")`` rebuilds the network of
:mod:`apga.oracle.policies` as an ``nn.Module`` (:class:`Policy`): ``policy(obs)`` is the
deterministic action (squash(mu) for Box actions, argmax for Discrete), ``policy.act(obs,
deterministic=False, generator=...)`` samples as training does.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from apga.errors import ApgaError
from apga.files import atomic_write_bytes

FORMAT = "apga-policy"
FORMAT_VERSION = 1  # bump on any incompatible change; keep reading every older version
METADATA_KEY = "apga.policy"
FILE_NAMES = {"final": "policy_final.safetensors", "best": "policy_best.safetensors"}


# ----------------------------------------------------------------------------- spaces <-> JSON
def _floats(values) -> list:
    """Floats for JSON: non-finite values as the strings "inf" / "-inf" / "nan" (strict JSON)."""
    return [v if math.isfinite(v) else repr(v) for v in np.asarray(values, dtype=np.float64).ravel().tolist()]


def _unfloats(values) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=np.float64)


def space_to_json(space) -> dict:
    from gymnasium import spaces
    if isinstance(space, spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": np.dtype(space.dtype).name,
                "low": _floats(space.low), "high": _floats(space.high)}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    raise ValueError(f"space {space} cannot be stored in a policy file")


def space_from_json(data: dict):
    from gymnasium import spaces
    if data["type"] == "Box":
        shape = tuple(int(s) for s in data["shape"])
        dtype = np.dtype(data["dtype"])
        return spaces.Box(_unfloats(data["low"]).reshape(shape).astype(dtype),
                          _unfloats(data["high"]).reshape(shape).astype(dtype), shape=shape, dtype=dtype)
    if data["type"] == "Discrete":
        return spaces.Discrete(int(data["n"]), start=int(data.get("start", 0)))
    raise ValueError(f"unknown space type {data['type']!r}")


# ----------------------------------------------------------------------------- spec
def make_file_spec(spec, observation_space, action_space, cfg, run: dict) -> dict:
    """The JSON spec of a policy file. ``spec``: the oracle's PolicySpec; ``cfg``: the run's
    Config (env section and seed); ``run``: where the parameters come from (which, iteration,
    eval_return, ...)."""
    import apga
    from apga.config import to_dict
    from apga.oracle import policies
    env = to_dict(cfg)["env"]
    flag = None
    if env.get("invert_obs"):
        flag = {"source": "env.invert_obs", "index": spec.obs_dim - 1, "values": [0, 1],
                "meaning": "worker i has flag f = i mod 2 and observes concat((1 - 2f) s, [f])"}
    gaussian = spec.kind == "gaussian"
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "apga_version": apga.__version__,
        "env": {"id": env["id"], "kwargs": env.get("kwargs") or {}, "horizon": env.get("horizon"),
                "invert_obs": bool(env.get("invert_obs")), "per_worker": env.get("per_worker") or []},
        "observation_space": space_to_json(observation_space),
        "action_space": space_to_json(action_space),
        "network": {
            "kind": spec.kind, "obs_dim": spec.obs_dim, "act_dim": spec.act_dim,
            "hidden": list(spec.hidden), "activation": "tanh",
            "layers": [[b.name, list(b.shape)] for b in spec.blocks],
            "head": ("mean = out[:act_dim], std = softplus(out[act_dim:]) + min_std" if gaussian
                     else "logits"),
        },
        "std_head": {"type": "softplus", "min_std": policies.MIN_STD, "init_std": spec.init_std} if gaussian else None,
        "squash": None if not gaussian or spec.scale is None else {
            "type": "tanh", "scale": _floats(spec.scale),
            "center": None if spec.center is None else _floats(spec.center)},
        "flag_input": flag,
        "run": run,
    }


def encode(spec_json: dict, theta: np.ndarray, blocks) -> bytes:
    """The bytes of a policy file: one float64 tensor per block of the flat vector ``theta``."""
    from safetensors.numpy import save
    theta = np.asarray(theta, dtype=np.float64)
    tensors = {b.name: np.ascontiguousarray(theta[b.offset: b.offset + b.size].reshape(b.shape)) for b in blocks}
    return save(tensors, metadata={METADATA_KEY: json.dumps(spec_json, sort_keys=True)})


def write(path: str, spec_json: dict, theta: np.ndarray, blocks) -> None:
    atomic_write_bytes(path, encode(spec_json, theta, blocks))


def resolve_path(source: str, which: str = "final") -> str:
    if which not in FILE_NAMES:
        raise ApgaError(f"which={which!r}: choose 'final' or 'best'")
    source = os.fspath(source)
    if os.path.isdir(source):
        path = os.path.join(source, FILE_NAMES[which])
        if not os.path.isfile(path):
            hint = ("no evaluation has run yet (eval.every: 0?)" if which == "best" and
                    os.path.isfile(os.path.join(source, FILE_NAMES["final"])) else
                    "is it an apga run directory of a Gymnasium env, written by apga >= 0.1 with policy files?")
            raise ApgaError(f"{source!r} has no {FILE_NAMES[which]}: {hint}")
        return path
    if not os.path.isfile(source):
        raise ApgaError(f"{source!r}: no such run directory or policy file")
    return source


def read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(spec, tensors) of a policy file; any problem is one ApgaError line. Runs no code."""
    from safetensors import SafetensorError
    from safetensors.numpy import load
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ApgaError(f"{path!r}: cannot read it ({exc.strerror})") from None
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + header_len])
        spec = json.loads(header["__metadata__"][METADATA_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise ApgaError(f"{path!r} is not an apga policy file ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ApgaError(f"{path!r} is not an apga policy file (no '{FORMAT}' spec)")
    version = spec.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise ApgaError(f"{path!r}: policy file format version {version!r} is not readable by apga "
                        f"{_version()} (reads versions 1 to {FORMAT_VERSION}); upgrade apga")
    return spec, tensors


def _version() -> str:
    import apga
    return apga.__version__


def flat_parameters(spec: dict, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The flat parameter vector of the oracle's layout (apga.oracle.policies) from a file's tensors."""
    parts = []
    for name, shape in spec["network"]["layers"]:
        t = tensors.get(name)
        if t is None or list(t.shape) != list(shape):
            raise ApgaError(f"policy file: tensor {name} is missing or has shape "
                            f"{None if t is None else list(t.shape)}, the spec says {shape}")
        parts.append(np.asarray(t, dtype=np.float64).ravel())
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- the module
class Policy(nn.Module):
    """The apga MLP policy as a torch module (float64, like training).

    ``policy(obs)``: deterministic action for one observation (shape (obs_dim,)) or a batch
    (B, obs_dim), numpy in -> numpy out, torch in -> torch out. ``policy.act(obs, deterministic=False,
    generator=None)``: a sampled action (Gaussian: squash(mu + sigma * N(0, 1)); Discrete: drawn
    from softmax(logits)). ``forward`` is plain torch, so the module can be traced or scripted.
    """

    def __init__(self, spec: dict, tensors: dict[str, np.ndarray]):
        super().__init__()
        net = spec["network"]
        self.spec = spec
        self.gaussian = net["kind"] == "gaussian"
        self.act_dim = int(net["act_dim"])
        self.obs_dim = int(net["obs_dim"])
        layers = []
        for (wname, wshape), (bname, _) in zip(net["layers"][0::2], net["layers"][1::2]):
            w = torch.from_numpy(np.array(tensors[wname], dtype=np.float64))
            lin = nn.Linear(int(wshape[0]), int(wshape[1]), dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(w.T)
                lin.bias.copy_(torch.from_numpy(np.array(tensors[bname], dtype=np.float64)))
            layers.append(lin)
        self.layers = nn.ModuleList(layers)
        squash = spec.get("squash")
        self.squash = squash is not None
        self.has_center = bool(squash and squash.get("center") is not None)
        scale = _unfloats(squash["scale"]) if self.squash else np.ones(max(self.act_dim, 1))
        center = _unfloats(squash["center"]) if self.has_center else np.zeros(max(self.act_dim, 1))
        self.register_buffer("scale", torch.from_numpy(scale))
        self.register_buffer("center", torch.from_numpy(center))
        std = spec.get("std_head") or {}
        self.min_std = float(std.get("min_std", 0.0))
        self.observation_space = space_from_json(spec["observation_space"])
        self.action_space = space_from_json(spec["action_space"])
        self.requires_grad_(False)

    # -- plain torch (traceable / scriptable) ----------------------------------------------------
    def head(self, obs: torch.Tensor) -> torch.Tensor:
        """Last-layer outputs (B, out) for a batch of observations (B, obs_dim)."""
        x = obs.to(torch.float64)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1:
                x = torch.tanh(x)
        return x

    def _to_action(self, u: torch.Tensor) -> torch.Tensor:
        if not self.squash:
            return u
        a = torch.tanh(u) * self.scale
        if self.has_center:
            a = a + self.center
        return a

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        single = obs.dim() == 1
        x = obs.unsqueeze(0) if single else obs
        out = self.head(x)
        if self.gaussian:
            action = self._to_action(out[:, : self.act_dim])
        else:
            action = torch.argmax(out, dim=1)
        return action.squeeze(0) if single else action

    # -- convenience (numpy in / numpy out) ---------------------------------------------------------
    def __call__(self, obs):
        if isinstance(obs, torch.Tensor):
            return super().__call__(obs)
        out = super().__call__(torch.as_tensor(np.asarray(obs, dtype=np.float64)))
        return _to_numpy(out)

    @torch.no_grad()
    def act(self, obs, deterministic: bool = False, generator: torch.Generator | None = None):
        """An action for ``obs`` (one or a batch); sampled unless ``deterministic``."""
        is_numpy = not isinstance(obs, torch.Tensor)
        x = torch.as_tensor(np.asarray(obs, dtype=np.float64)) if is_numpy else obs.to(torch.float64)
        if deterministic:
            out = self.forward(x)
        else:
            single = x.dim() == 1
            xb = x.unsqueeze(0) if single else x
            head = self.head(xb)
            if self.gaussian:
                mu = head[:, : self.act_dim]
                sigma = torch.nn.functional.softplus(head[:, self.act_dim:]) + self.min_std
                noise = torch.randn(mu.shape, dtype=mu.dtype, generator=generator)
                out = self._to_action(mu + sigma * noise)
            else:
                probs = torch.softmax(head, dim=1)
                out = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            out = out.squeeze(0) if single else out
        return _to_numpy(out) if is_numpy else out

    def extra_repr(self) -> str:
        return (f"{self.spec['env']['id']}: {'Gaussian' if self.gaussian else 'categorical'}, "
                f"obs {self.obs_dim} -> act {self.act_dim}, hidden {self.spec['network']['hidden']}")


def _to_numpy(out: torch.Tensor):
    arr = out.detach().numpy()
    return arr[()] if arr.ndim == 0 else arr  # one Discrete action: a numpy integer scalar


def load_policy(source, which: str = "final") -> Policy:
    """The policy of a run directory (``which``: "final" or "best") or of a policy file."""
    spec, tensors = read(resolve_path(source, which))
    flat_parameters(spec, tensors)  # checks every tensor's presence and shape
    return Policy(spec, tensors).eval()


# ----------------------------------------------------------------------------- run-directory writer
class PolicyWriter:
    """Writes a run's policy files; built from the run's Config (None for env.id: synthetic)."""

    @staticmethod
    def for_config(cfg) -> "PolicyWriter | None":
        if cfg.env.id == "synthetic":
            return None
        return PolicyWriter(cfg)

    def __init__(self, cfg):
        from apga.oracle import policies
        from apga.oracle.envs import make_env
        env = make_env(cfg.env, 0)
        try:
            self.observation_space, self.action_space = env.observation_space, env.action_space
        finally:
            env.close()
        self.cfg = cfg
        self.spec = policies.make_spec(self.observation_space, self.action_space, cfg.policy.hidden,
                                       cfg.policy.init_std)

    def write(self, out_dir: str, which: str, theta: np.ndarray, iteration: int,
              eval_return: float | None) -> None:
        cfg = self.cfg
        run: dict[str, Any] = {
            "which": which, "iteration": int(iteration), "algorithm": cfg.algorithm.name, "seed": int(cfg.seed),
            "eval_return": None if eval_return is None or not math.isfinite(eval_return) else float(eval_return),
            "eval": {"episodes": int(cfg.eval.episodes), "deterministic": bool(cfg.eval.deterministic),
                     "key": int(iteration)},
        }
        spec_json = make_file_spec(self.spec, self.observation_space, self.action_space, cfg, run)
        write(os.path.join(out_dir, FILE_NAMES[which]), spec_json, theta, self.spec.blocks)

    def remove(self, out_dir: str, which: str) -> None:
        try:
            os.unlink(os.path.join(out_dir, FILE_NAMES[which]))
        except FileNotFoundError:
            pass
