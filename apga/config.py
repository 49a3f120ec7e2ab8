"""The run configuration: typed sections, defaults, validation, YAML I/O and ``--set`` overrides.

Every field is documented here; `apga train --help` and docs point at this file.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from apga.errors import ConfigError

MAX_SEED = 2**64 - 1  # seeds key 64-bit Philox streams (apga/rng.py): larger ones would wrap
MAX_ENV_ID = 256
ALGORITHMS = ("rennala_nigt", "malenia_nigt", "sync_nigt", "afedpg", "sync_pg", "rennala_pg")


@dataclass
class EnvConfig:
    """What the workers sample. ``id`` is a Gymnasium id, or ``synthetic`` (known smooth functions).

    ``id: module:Env-v0`` makes Gymnasium import ``module`` first: a config is trusted input, like
    a script (docs/guarantees.md)."""

    id: str = "CartPole-v1"
    horizon: int = 500  # H: trajectories are cut after H steps
    gamma: float = 0.99  # discount in the GPOMDP estimator
    kwargs: dict = field(default_factory=dict)  # passed to gymnasium.make for every worker
    # The paper's heterogeneous environments: worker i gets flag f = i % 2 and sees ((1-2f) s, f).
    invert_obs: bool = False
    # Per-worker changes, a list of n mappings (or shorter: missing workers get none). Keys:
    # kwargs (dict, merged into gymnasium.make kwargs), obs_sign / action_sign (+1 or -1),
    # gravity (3 floats), mass_scale, friction_scale (MuJoCo model changes, factors on all bodies/geoms).
    per_worker: list = field(default_factory=list)


@dataclass
class PolicyConfig:
    hidden: list = field(default_factory=lambda: [64, 64])  # tanh MLP hidden sizes
    init_std: float = 0.6  # initial action std of the Gaussian policy (softplus head bias)
    # Outside the theory (bias the estimator's variance, not its mean); off by default:
    baseline: bool = False  # subtract the per-time-step mean reward-to-go of the batch
    normalize_returns: bool = False  # divide reward-to-go weights by their batch std
    rollout_batch: int = 64  # trajectories rolled out together (fixed, so results never depend on processes)


@dataclass
class AlgorithmConfig:
    # rennala_nigt | malenia_nigt | sync_nigt | afedpg | sync_pg | rennala_pg, or your own protocol
    # class as package.module:ClassName (imported when the config is read: trusted input)
    name: str = "rennala_nigt"
    step_size: float = 0.01  # alpha
    momentum: float = 0.1  # eta in (0, 1]; 1 = plain normalised policy gradient
    batch_size: int = 32  # M
    init_batch_size: int | None = None  # M_init; default: batch_size
    aggregation: str = "server"  # server | allreduce (AFedPG: server only)
    cancel: bool = True  # cancel in-flight gradients at a round's end (false: finish and discard)
    step_schedule: str = "constant"  # AFedPG: constant | delay (alpha / sqrt(1 + delay))
    options: dict = field(default_factory=dict)  # the protocol class's own options (its OPTIONS)


@dataclass
class WorkersConfig:
    n: int = 10
    # Seconds per stochastic gradient: a number, a list of n numbers, a shape name
    # (equal | sqrt | linear | decreasing), or a mapping, see apga/runtime/timing.py.
    compute_time: Any = "sqrt"
    # Seconds to upload or download one d-vector, per worker: same forms, plus the shape sqrt_d.
    comm_time: Any = 0.0
    # Seconds per AllReduce: a number, or {bandwidth, latency, bytes_per_param} for the ring model;
    # null = the slowest worker's comm_time.
    allreduce_time: Any = None


@dataclass
class RuntimeConfig:
    name: str = "sim"  # sim | ray
    processes: int = 1  # cores for the simulator's rollouts (0 = all): threads of MuJoCo batches, or rollout processes
    # Where the simulator's rollout chunks run: local (this machine: batch threads or processes)
    # or ray (this process plus processes - 1 Ray actors, 0 = one per CPU of the cluster at
    # runtime.address, or of a private local Ray instance when it is null).
    pool: str = "local"
    # Which random stream a round's trajectory draws from: job = (seed, worker, job index);
    # round = (seed, worker, round, index in the round), so methods whose schedules coincide
    # draw the same trajectories (common random numbers: paired, less noisy comparisons).
    # AFedPG has no rounds and always uses job.
    streams: str = "job"
    address: str | None = None  # ray: join an existing cluster (ray start); null = local
    inject_delays: bool = False  # ray: pad each trajectory to workers.compute_time real seconds
    worker_timeout: float = 120.0  # ray: seconds to wait for a crashed worker to come back
    max_restarts: int = 3  # ray: restarts per crashed worker actor before the run fails
    # ray: the round's calls (begin, progress, halt, AllReduce) go over a direct authenticated
    # socket per actor (a tenth of a Ray actor call's latency or less); false: Ray actor calls only
    direct_calls: bool = True


@dataclass
class BudgetConfig:
    """Stop at the first limit reached; at least one must be set."""

    time: float | None = None  # simulated (sim) or wall (ray) seconds
    trajectories: int | None = None  # trajectories used by updates
    iterations: int | None = 100  # model updates


@dataclass
class EvalConfig:
    every: int = 10  # evaluate every this many updates (and at the last); 0 = never
    episodes: int = 10
    deterministic: bool = True  # act with the mean action


@dataclass
class CheckpointConfig:
    every: int = 10  # write a checkpoint every this many updates (and at the end)


@dataclass
class Config:
    seed: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --- loading, overriding, validating ---------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader with two fixes for config files:

    - numbers in exponent form without a dot (``1e-3``, ``5E+2``) are floats, as in YAML 1.2
      (PyYAML's YAML 1.1 rules read them as strings);
    - a key repeated in one mapping is an error, instead of the last one silently winning.
    """

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def construct_yaml_int(self, node):
        digits = sum(ch.isalnum() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer with {digits} digits is out of range for any setting", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(key)}: give each key once", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


# A config is a few hundred values. Anchors and aliases (`&a` / `*a`) are allowed, but the
# document they expand to must stay small: nested aliases can describe 10^9 values in 400 bytes
# (a "billion laughs" document), which would exhaust memory once expanded into dicts and lists.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64  # nesting levels
MAX_INT_DIGITS = 100  # longer integers are no sensible config value (and Python refuses > 4300)


def _check_expanded_size(root) -> None:
    """Count the nodes of the composed document as if every alias were expanded (each distinct
    node is visited once, its expanded size memoised) and refuse recursive or huge documents,
    before anything is constructed from it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            children = _children(node)
            total = 1 + sum(size[id(c)] for c in children)
            size[key] = total
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if depth[key] > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"values are nested more than {MAX_YAML_DEPTH} levels deep", node.start_mark)
            if total > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"the document expands to more than {MAX_YAML_NODES} values (through anchors "
                    "and aliases); write the values out or shorten the config", node.start_mark)
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it "
                                              "(a recursive structure); remove the alias", node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [c for pair in node.value for c in pair]
    return []


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str):
    """Parse YAML text with the config loader (see ``_Loader``); raises yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:  # PyYAML composes recursively: thousands of '[' exhaust the stack
        raise yaml.composer.ComposerError(None, None, f"values are nested more than {MAX_YAML_DEPTH} "
                                          "levels deep", None) from None


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about ``limit`` characters: error lines stay one short line even when
    the bad value is a 10 MB string."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


_short = short_repr


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(full: str, key: str, names) -> str:
    hint = did_you_mean(key, names)
    if not hint:
        hint = f"; known keys here: {', '.join(names)}"
    return f"unknown key {_short(full)}{hint}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r}")


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(_unknown_key(full, str(key), names))
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def from_dict(data: Any) -> Config:
    """Build and validate a Config from a nested mapping (as read from YAML)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def with_defaults(data: dict) -> dict:
    """A resolved config as written by an earlier apga, with keys added to the schema since then
    filled by their defaults: a run is compared by meaning, not by the schema it was written with."""
    return to_dict(from_dict(data))


def _override_target(item: str, parts: list[str]) -> None:
    """Check that every part of a ``--set`` path but the last names a section of the schema."""
    tp: Any = Config
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[:depth + 1])
        if not dataclasses.is_dataclass(tp):
            return  # inside a free-form mapping (env.kwargs): anything goes
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(f"--set {_short(item)}: {_unknown_key(here, part, list(hints))}")
        tp = hints[part]
        if not dataclasses.is_dataclass(tp) and tp is not dict and typing.get_origin(tp) is not dict:
            raise ConfigError(f"--set {_short(item)}: {_short(here)} is a value, not a section; "
                              f"use --set {here}=VALUE")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested mapping."""
    data = _deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {_short(item)}: expected section.key=value, e.g. --set algorithm.step_size=0.01")
        path, raw = item.split("=", 1)
        parts = [p.strip() for p in path.split(".")]
        if not all(parts):
            raise ConfigError(f"--set {_short(item)}: the key before '=' is empty or has an empty part; "
                              "expected section.key=value, e.g. --set algorithm.step_size=0.01")
        _override_target(item, parts)
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None)
            if isinstance(exc, (yaml.composer.ComposerError, yaml.constructor.ConstructorError)) and problem:
                raise ConfigError(f"--set {_short(item)}: {problem}") from None
            raise ConfigError(f"--set {_short(item)}: the value is not valid YAML (quote strings that contain "
                              "YAML syntax)") from None
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:  # absent, or an empty section in the file (`algorithm:`)
                child = node[part] = {}
            if not isinstance(child, dict):
                here = ".".join(parts[:depth + 1])
                raise ConfigError(f"--set {_short(item)}: {here} is {_short(child)} in the config, not a mapping; "
                                  "fix the config file")
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy(data):
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; 1 MB leaves room for long per-worker lists


def read_yaml(path: str) -> dict:
    """Read a YAML mapping; unreadable or malformed files raise a one-line ConfigError."""
    from apga.files import read_regular_file
    try:
        text = read_regular_file(os.path.expanduser(path), MAX_CONFIG_BYTES).decode()
    except FileNotFoundError:
        raise ConfigError(f"config file {_short(path)} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {_short(path)} is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {_short(path)}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or "syntax error").split())
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(source: str | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config from a YAML path or a mapping (None = all defaults), apply ``--set``-style
    overrides and validate. Raises ConfigError with a one-line message on bad input."""
    if isinstance(source, (str, os.PathLike)):
        data = resolve_paths(read_yaml(source), os.path.dirname(os.path.abspath(os.path.expanduser(source))))
    else:
        data = _deepcopy(source or {})
    return from_dict(apply_overrides(data, overrides or []))


def _protocol_class(a: AlgorithmConfig) -> type:
    """The protocol class named by algorithm.name, with algorithm.options checked by the class."""
    from apga.protocol.registry import protocol_class
    try:
        cls = protocol_class(a.name)
        a.options = cls.check_options(a.options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cls


def resolve_paths(data: dict, base_dir: str) -> dict:
    """Make a relative ``workers.compute_time.trace`` path in a config file relative to the file's
    folder (not to wherever apga runs), so the resolved config.yaml names the file for good. A
    path given with --set stays relative to the current directory, like any shell argument."""
    times = data.get("workers", {}).get("compute_time") if isinstance(data.get("workers"), dict) else None
    if isinstance(times, dict) and isinstance(times.get("trace"), str):
        path = os.path.expanduser(times["trace"])
        if path and not os.path.isabs(path):
            times["trace"] = os.path.join(base_dir, path)
    return data


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Semantic checks beyond types. Each failure names the key and the fix."""
    a, w, e, b = cfg.algorithm, cfg.workers, cfg.env, cfg.budget
    _require(0 <= cfg.seed <= MAX_SEED, "seed", f"must be >= 0 and <= 2^64 - 1 (the random streams' "
             f"key), got {cfg.seed}")
    _require(a.name in ALGORITHMS or ":" in a.name, "algorithm.name",
             f"unknown algorithm {_short(a.name)}{did_you_mean(a.name, ALGORITHMS)}; choose one of "
             f"{', '.join(ALGORITHMS)}, or your own protocol class as package.module:ClassName")
    protocol = _protocol_class(a)
    _require(math.isfinite(a.step_size) and a.step_size > 0, "algorithm.step_size", f"alpha must be > 0, got {a.step_size}")
    _require(0 < a.momentum <= 1, "algorithm.momentum", f"eta must be in (0, 1], got {a.momentum}")
    _require(a.batch_size >= 1, "algorithm.batch_size", f"M must be >= 1, got {a.batch_size}")
    _require(a.init_batch_size is None or a.init_batch_size >= 1, "algorithm.init_batch_size",
             f"M_init must be >= 1 (or null for batch_size), got {a.init_batch_size}")
    _require(a.aggregation in ("server", "allreduce"), "algorithm.aggregation",
             f"must be server or allreduce, got {_short(a.aggregation)}")
    _require(a.aggregation == "server" or protocol.supports_allreduce, "algorithm.aggregation",
             f"{protocol.__name__} has no AllReduce form; use server")
    _require(a.step_schedule in ("constant", "delay"), "algorithm.step_schedule",
             f"must be constant or delay, got {_short(a.step_schedule)}")
    _require(w.n >= 1, "workers.n", f"the number of workers must be >= 1, got {w.n}")
    _require(bool(e.id), "env.id", "give a Gymnasium id (e.g. CartPole-v1) or synthetic")
    _require(len(e.id) <= MAX_ENV_ID, "env.id", f"{_short(e.id)} is too long for an environment id "
             f"(more than {MAX_ENV_ID} characters); give a Gymnasium id such as Hopper-v5")
    _require(e.horizon >= 1, "env.horizon", f"H must be >= 1, got {e.horizon}")
    _require(0 < e.gamma <= 1, "env.gamma", f"gamma must be in (0, 1], got {e.gamma}")
    _require(len(e.per_worker) <= w.n, "env.per_worker", f"has {len(e.per_worker)} entries for {w.n} workers")
    _require(all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in cfg.policy.hidden),
             "policy.hidden", f"expected a list of layer sizes >= 1, got {_short(cfg.policy.hidden)}")
    _require(math.isfinite(cfg.policy.init_std) and cfg.policy.init_std > 0, "policy.init_std",
             f"must be a finite number > 0, got {cfg.policy.init_std}")
    _require(cfg.policy.rollout_batch >= 1, "policy.rollout_batch",
             f"must be >= 1, got {cfg.policy.rollout_batch}")
    _require(cfg.runtime.name in ("sim", "ray"), "runtime.name", f"must be sim or ray, got {_short(cfg.runtime.name)}")
    _require(cfg.runtime.streams in ("job", "round"), "runtime.streams",
             f"must be job or round, got {_short(cfg.runtime.streams)}")
    address = cfg.runtime.address
    _require(address is None or "://" not in address, "runtime.address",
             f"{_short(address)}: Ray Client addresses (ray://) are not supported; give HOST:PORT of the "
             "head (from `ray start --head`), auto, or null for a local run")
    _require(address is None or address == "auto" or re.fullmatch(r"\[?[\w.:%-]+\]?:\d{1,5}", address) is not None,
             "runtime.address", f"expected HOST:PORT of a running Ray head, auto, or null, got {_short(address)}")
    _require(cfg.runtime.max_restarts >= 0, "runtime.max_restarts", f"must be >= 0, got {cfg.runtime.max_restarts}")
    _require(math.isfinite(cfg.runtime.worker_timeout) and cfg.runtime.worker_timeout > 0, "runtime.worker_timeout",
             f"must be a finite number of seconds > 0, got {cfg.runtime.worker_timeout}")
    _require(cfg.runtime.processes >= 0, "runtime.processes",
             f"must be >= 0 (0 = one per core), got {cfg.runtime.processes}")
    _require(cfg.runtime.pool in ("local", "ray"), "runtime.pool",
             f"must be local or ray, got {_short(cfg.runtime.pool)}")
    _require(cfg.runtime.pool == "local" or cfg.runtime.name == "sim", "runtime.pool",
             "ray spreads the simulator's rollouts; runtime.name: ray runs its workers on Ray already (use pool: local)")
    _require(cfg.runtime.pool == "local" or e.id != "synthetic", "runtime.pool",
             "ray spreads Gymnasium rollouts; env.id synthetic has none to spread (use pool: local)")
    _require(cfg.runtime.pool == "local" or cfg.runtime.processes != 1, "runtime.pool",
             "ray with runtime.processes: 1 has no actor to use; set processes to 0 (every CPU of the "
             "cluster) or to the number of processes (this one plus processes - 1 actors)")
    _require(any(v is not None for v in (b.time, b.trajectories, b.iterations)), "budget",
             "set at least one of budget.time, budget.trajectories, budget.iterations")
    _require(b.time is None or (math.isfinite(b.time) and b.time > 0), "budget.time",
             f"must be a finite number of seconds > 0 (or null), got {b.time}")
    _require(b.trajectories is None or b.trajectories > 0, "budget.trajectories",
             f"must be > 0 (or null), got {b.trajectories}")
    _require(b.iterations is None or b.iterations > 0, "budget.iterations", f"must be > 0 (or null), got {b.iterations}")
    _require(cfg.eval.every >= 0, "eval.every", f"must be >= 0 (0 = never), got {cfg.eval.every}")
    _require(cfg.eval.episodes >= 1, "eval.episodes", f"must be >= 1, got {cfg.eval.episodes}")
    _require(cfg.checkpoint.every >= 1, "checkpoint.every",
             f"must be >= 1 (updates between checkpoints), got {cfg.checkpoint.every}")
    _check_parsed_specs(cfg)


def _check_parsed_specs(cfg: Config) -> None:
    """The specs that have a parser of their own are checked here too, so that every check on a
    config's values happens when the config is read: the time model (apga/runtime/timing.py; the
    policy size only scales sqrt_d, so 1 stands in for it) and the synthetic oracle's options.
    What needs a built environment (its spaces, its model) is checked when it is built, still
    before anything is written."""
    from apga.guards import check_memory
    from apga.runtime.timing import TimeModel
    check_memory(cfg)  # first: absurd sizes are refused before anything of that size is made
    w = cfg.workers
    TimeModel(w.compute_time, w.comm_time, w.allreduce_time, w.n, 1, cfg.seed)
    if cfg.env.id == "synthetic":
        from apga.oracle.synthetic import check_options
        check_options(cfg.env.kwargs)
