"""Compare methods over seeds (and settings): plan, validate, run in parallel, aggregate, plot.

A compare config (YAML) describes settings x variants x seeds, each one ``apga.run.train`` run::

    base_file: ../quickstart.yaml      # or  base: {<a full train config mapping>}
    seeds: 5                           # N (seeds 0..N-1) or an explicit list [0, 3, 7]
    threshold: {fraction: 0.9}         # or a number (absolute return), or {value: X}
    baselines: [afedpg, sync_nigt]     # speed-ups are computed against these variants
    grid: {algorithm.step_size: [0.01, 0.1]}   # optional: expands EVERY variant (tuning)
    title: Rennala NIGT vs AFedPG
    settings:                          # optional (default: one setting named "default")
      sqrt: {workers.compute_time: sqrt, workers.comm_time: sqrt}
      slow:
        workers.comm_time: sqrt_d
        threshold: 500                 # a per-setting threshold
        variants: {afedpg: {algorithm.step_size: 0.01}}   # per-setting variant overrides
    variants:
      rennala_nigt: {algorithm.name: rennala_nigt, algorithm.step_size: 0.0625}
      afedpg: {algorithm: {name: afedpg, step_size: 0.03125}}
      sync_nigt: {algorithm.name: sync_nigt, grid: {algorithm.step_size: [0.1, 0.2]}}

Overrides are mappings in dotted form (``algorithm.step_size: 0.1``) or nested form (``algorithm:
{step_size: 0.1}``); nested mappings merge key by key, except the time specs
``workers.compute_time|comm_time|allreduce_time``, which are replaced whole. A run's config is
resolved in this order (later wins):

    base <- setting <- variant <- setting.variants[variant] <- grid point <- --set <- seed

Unlike `apga train`, a comparison defaults to ``runtime.streams: round`` (common random numbers:
with the same seed, methods whose rounds coincide draw the same trajectories, so per-seed
differences are the methods', not sampling noise); set ``runtime.streams: job`` to opt out.

Every resolved run config is validated (``apga.config.load_config`` plus the time model and the
environment id) before anything is written. Runs go to ``OUT/<setting>/<variant>/seed<k>/``,
laid out exactly as ``apga train`` writes them; a finished run with an unchanged config is
skipped, an unfinished one is resumed.

Threshold: ``{fraction: F}`` (default F = 0.9) = mean initial eval return + F x (best method's final
mean - initial), per setting, i.e. F of the best final return when the initial return is ~0 (and
still meaningful for negative returns); a number or ``{value: X}`` is an absolute return. Time to
threshold = the first evaluation at or above it. summary.md gives per method its median and IQM
over seeds and the paired (same seed) speed-up against each baseline, with 90 % bootstrap
intervals, and one sentence per setting saying what they support (``apga.stats``, which also
says how seeds that never reach the threshold are counted).

Outputs in OUT: comparison.png (eval return against simulated time, one panel per setting, mean
and 20-80 % band over seeds, the threshold dashed), comparison_trajectories.png and comparison_comms.png (the same
against trajectories used and vector communications), comparison.csv (every evaluation row),
summary.md and summary.json (final return, time to threshold, paired speed-ups), and with ``--pick``
picked.yaml (the best grid point per method).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any


from apga import config as cfgmod
from apga.errors import ConfigError


COMPARE_KEYS = ("base", "base_file", "seeds", "threshold", "baselines", "grid", "title", "settings", "variants")
SETTING_RESERVED = ("threshold", "variants")
VARIANT_RESERVED = ("grid",)
REPLACE_KEYS = {"workers.compute_time", "workers.comm_time", "workers.allreduce_time"}
DEFAULT_SETTING = "default"
DEFAULT_SEEDS = 5
DEFAULT_FRACTION = 0.9
COMPARE_STREAMS = "round"  # runtime.streams of every run unless the compare config sets it
PICK_METRICS = ("final", "auc")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,=+@-]*$")


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    setting: str
    variant: str  # expanded name (family, or family@key=value,... for a grid point)
    family: str  # the variant name as written under variants:
    seed: int
    cfg: Any  # apga.config.Config
    resolved: dict  # cfgmod.to_dict(cfg): what config.yaml of the run holds
    out_dir: str


@dataclass
class Plan:
    path: str
    out: str
    title: str
    seeds: list
    settings: list  # names, in config order
    variants: list  # expanded names, in config order
    families: dict  # expanded name -> family
    grid_points: dict  # expanded name -> {dotted key: value} ({} without a grid)
    thresholds: dict  # setting -> ("fraction", f) | ("value", v)
    baselines: list
    runs: list = field(default_factory=list)

    def runs_of(self, setting: str, variant: str) -> list:
        return [r for r in self.runs if r.setting == setting and r.variant == variant]


def _err(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _deep_set(target: dict, dotted: str, value: Any, prefix: str = "") -> None:
    parts = dotted.split(".")
    node = target
    walked = prefix
    for part in parts[:-1]:
        walked = f"{walked}.{part}" if walked else part
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None:
                raise ConfigError(f"{walked}: is a value, not a section (cannot set {dotted!r} under it)")
            child = node[part] = {}
        node = child
    key = parts[-1]
    full = f"{prefix}.{dotted}" if prefix else dotted
    if isinstance(value, dict) and isinstance(node.get(key), dict) and full not in REPLACE_KEYS:
        merge_overrides(node[key], value, full)
    else:
        node[key] = cfgmod._deepcopy(value)


def merge_overrides(target: dict, overrides: dict, prefix: str = "") -> dict:
    """Merge an overrides mapping (dotted or nested keys) into ``target`` in place."""
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            where = f"{prefix}.{key}" if prefix else repr(key)
            raise ConfigError(f"{where}: expected a config key such as algorithm.step_size")
        _deep_set(target, key, value, prefix)
    return target


def _mapping(value: Any, where: str, allow_none: bool = True) -> dict:
    if value is None and allow_none:
        return {}
    if not isinstance(value, dict):
        raise _err(where, f"expected a mapping, got {value!r}")
    return value


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or "@" in name:
        raise _err(where, f"{name!r} is not a usable name (letters, digits, _ . , = + -; it names a directory)")
    return name


def _parse_seeds(value: Any, where: str = "seeds") -> list:
    if isinstance(value, bool):
        raise _err(where, f"expected a number of seeds or a list of seeds, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise _err(where, f"the number of seeds must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value:
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
            raise _err(where, f"expected a list of integer seeds >= 0, got {value!r}")
        if len(set(value)) != len(value):
            raise _err(where, f"lists a seed twice: {value!r}")
        return list(value)
    raise _err(where, f"expected a number of seeds or a non-empty list of seeds, got {value!r}")


def _parse_threshold(value: Any, where: str):
    if value is None:
        return ("fraction", DEFAULT_FRACTION)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _err(where, f"must be a finite return, got {value!r}")
        return ("value", float(value))
    if isinstance(value, dict) and len(value) == 1:
        (kind, x), = value.items()
        if kind == "fraction":
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1:
                raise _err(f"{where}.fraction", f"must be a number in (0, 1], got {x!r}")
            return ("fraction", float(x))
        if kind == "value":
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise _err(f"{where}.value", f"must be a finite return, got {x!r}")
            return ("value", float(x))
    raise _err(where, f"expected a return value (a number), {{value: X}} or {{fraction: F}} with F in (0, 1], "
               f"got {value!r}")


def _parse_grid(value: Any, where: str) -> dict:
    grid = _mapping(value, where)
    out = {}
    for key, values in grid.items():
        if not isinstance(key, str) or not key:
            raise _err(where, f"expected dotted config keys, got {key!r}")
        if not isinstance(values, list) or not values:
            raise _err(f"{where}.{key}", f"expected a non-empty list of values, got {values!r}")
        out[key] = values
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(v))


def _grid_names(family: str, grid: dict) -> list:
    """(expanded name, {key: value}) for each point of the cartesian grid."""
    if not grid:
        return [(family, {})]
    keys = list(grid)
    shorts = [k.split(".")[-1] for k in keys]
    labels = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, keys)]
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = family + "@" + ",".join(f"{lab}={_fmt_value(v)}" for lab, v in zip(labels, combo))
        out.append((name, dict(zip(keys, combo))))
    return out


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key, "<missing>") != b.get(key, "<missing>"):
                return _first_difference(a.get(key, "<missing>"), b.get(key, "<missing>"),
                                         f"{prefix}.{key}" if prefix else str(key))
        return prefix
    return f"{prefix} {a!r} -> {b!r}"


def _deep_validate(cfg, where: str, checked: set) -> None:
    """What load_config cannot see: the time model, the synthetic options, the environment id."""
    key = (cfg.env.id, json.dumps(cfg.env.kwargs, sort_keys=True, default=str),
           json.dumps(cfgmod.to_dict(cfg.workers), sort_keys=True, default=str))
    if key in checked:
        return
    checked.add(key)
    try:
        dim = 1
        if cfg.env.id == "synthetic":
            from apga.oracle.synthetic import SyntheticOracle
            dim = SyntheticOracle.from_kwargs(cfg.workers.n, cfg.seed, cfg.env.kwargs).dim
        elif ":" not in cfg.env.id:
            import gymnasium
            if cfg.env.id not in gymnasium.registry:
                ids = [i for i in gymnasium.registry if not i.startswith(("ALE/", "GymV2", "phys2d", "tabular"))]
                raise ConfigError(f"env.id: unknown environment {cfg.env.id!r}{cfgmod.did_you_mean(cfg.env.id, ids)}")
        from apga.runtime.timing import TimeModel
        w = cfg.workers
        TimeModel(w.compute_time, w.comm_time, w.allreduce_time, w.n, dim, cfg.seed)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _with_compare_defaults(base: dict) -> dict:
    """A comparison pairs its methods: unless the config says otherwise, runtime.streams is
    ``round`` (common random numbers), not the ``job`` default of `apga train`."""
    runtime = base.get("runtime")
    if runtime is None or (isinstance(runtime, dict) and "streams" not in runtime):
        base["runtime"] = {**(runtime or {}), "streams": COMPARE_STREAMS}
    return base


def load_plan(path: str, out: str, overrides: list | None = None, seeds: int | None = None,
              only: list | None = None) -> Plan:
    """Read and validate a compare config; every run config is resolved and checked. Writes nothing."""
    data = cfgmod.read_yaml(path)
    unknown = [k for k in data if k not in COMPARE_KEYS]
    if unknown:
        k = str(unknown[0])
        raise ConfigError(f"{path}: unknown key {k!r}{cfgmod.did_you_mean(k, COMPARE_KEYS)}; "
                          f"a compare config has {', '.join(COMPARE_KEYS)}")
    where0 = path
    if ("base" in data) == ("base_file" in data):
        raise _err(where0, "give exactly one of base: (a train config mapping) or base_file: (a path "
                   "relative to this file)")
    if "base_file" in data:
        bf = data["base_file"]
        if not isinstance(bf, str) or not bf:
            raise _err(f"{where0}: base_file", f"expected a path, got {bf!r}")
        base_path = bf if os.path.isabs(bf) else os.path.join(os.path.dirname(os.path.abspath(path)), bf)
        try:
            base = cfgmod.read_yaml(base_path)
        except ConfigError as exc:
            raise ConfigError(f"{where0}: base_file: {exc}") from None
    else:
        base = _mapping(data["base"], f"{where0}: base", allow_none=True)

    seed_list = _parse_seeds(data.get("seeds", DEFAULT_SEEDS), f"{where0}: seeds")
    if seeds is not None:
        seed_list = _parse_seeds(seeds, "--seeds")
    title = data.get("title") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(title, str):
        raise _err(f"{where0}: title", f"expected a string, got {title!r}")
    top_grid = _parse_grid(data.get("grid"), f"{where0}: grid")
    default_threshold = _parse_threshold(data.get("threshold"), f"{where0}: threshold")

    variants_raw = _mapping(data.get("variants"), f"{where0}: variants", allow_none=False)
    if not variants_raw:
        raise _err(f"{where0}: variants", "give at least one variant (name -> overrides)")
    families, variant_overrides, variant_grids = [], {}, {}
    for name, ov in variants_raw.items():
        vw = f"{where0}: variants.{name}"
        _check_name(name, f"{where0}: variants")
        ov = dict(_mapping(ov, vw))
        grid = dict(top_grid)
        grid.update(_parse_grid(ov.pop("grid", None), f"{vw}.grid"))
        families.append(name)
        variant_overrides[name] = ov
        variant_grids[name] = grid

    settings_raw = data.get("settings")
    if settings_raw is None:
        settings_raw = {DEFAULT_SETTING: {}}
    settings_raw = _mapping(settings_raw, f"{where0}: settings", allow_none=False)
    if not settings_raw:
        raise _err(f"{where0}: settings", "give at least one setting, or leave settings: out")
    setting_overrides, setting_variant_ov, thresholds = {}, {}, {}
    for name, ov in settings_raw.items():
        sw = f"{where0}: settings.{name}"
        _check_name(name, f"{where0}: settings")
        if name == "logs":
            raise _err(f"{where0}: settings", "'logs' is reserved (OUT/logs/ holds the runs' stderr); rename it")
        ov = dict(_mapping(ov, sw))
        thresholds[name] = _parse_threshold(ov.pop("threshold"), f"{sw}.threshold") if "threshold" in ov \
            else default_threshold
        svo = _mapping(ov.pop("variants", None), f"{sw}.variants")
        for fam, fov in svo.items():
            if fam not in families:
                raise _err(f"{sw}.variants", f"unknown variant {fam!r}{cfgmod.did_you_mean(str(fam), families)}; "
                           f"the variants are {', '.join(families)}")
            _mapping(fov, f"{sw}.variants.{fam}")
        setting_overrides[name] = ov
        setting_variant_ov[name] = svo

    expanded, fam_of, points = [], {}, {}
    for fam in families:
        for name, point in _grid_names(fam, variant_grids[fam]):
            if name in fam_of:
                raise _err(f"{where0}: variants.{fam}.grid", f"two grid points share the name {name!r}")
            expanded.append(name)
            fam_of[name] = fam
            points[name] = point

    has_grid = any(points[v] for v in expanded)
    if "baselines" in data and data["baselines"] is not None:
        bl = data["baselines"]
        if isinstance(bl, str):
            bl = [bl]
        if not isinstance(bl, list):
            raise _err(f"{where0}: baselines", f"expected a list of variant names, got {bl!r}")
        baselines = []
        for b in bl:
            if b in fam_of:
                baselines.append(b)
            elif b in families and sum(f == b for f in fam_of.values()) == 1:
                baselines.append(next(v for v in expanded if fam_of[v] == b))
            else:
                raise _err(f"{where0}: baselines", f"{b!r} is not a variant{cfgmod.did_you_mean(str(b), expanded)}; "
                           f"choose among {', '.join(expanded)}")
    else:
        baselines = [] if has_grid else list(expanded)

    settings = list(settings_raw)
    selected_settings, selected_variants = settings, expanded
    if only:
        bad = [o for o in only if o not in settings and o not in fam_of and o not in families]
        if bad:
            raise ConfigError(f"--only {bad[0]!r}: not a setting or variant"
                              f"{cfgmod.did_you_mean(bad[0], settings + expanded + families)} "
                              f"(settings: {', '.join(settings)}; variants: {', '.join(expanded)})")
        if any(o in settings for o in only):
            selected_settings = [s for s in settings if s in only]
        if any(o in fam_of or o in families for o in only):
            selected_variants = [v for v in expanded if v in only or fam_of[v] in only]

    plan = Plan(path, out, title, seed_list, settings, expanded, fam_of, points, thresholds, baselines)
    checked: set = set()
    for s in settings:
        for v in expanded:
            fam = fam_of[v]
            where = f"{path}: setting {s!r}, variant {v!r}"
            try:
                d = _with_compare_defaults(cfgmod._deepcopy(base))
                merge_overrides(d, setting_overrides[s])
                merge_overrides(d, variant_overrides[fam])
                merge_overrides(d, setting_variant_ov[s].get(fam) or {})
                merge_overrides(d, points[v])
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            d = cfgmod.apply_overrides(d, overrides or [])
            for k in seed_list:
                d["seed"] = k
                try:
                    cfg = cfgmod.from_dict(cfgmod._deepcopy(d))
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                if cfg.eval.every < 1:
                    raise ConfigError(f"{where}: eval.every: a comparison needs evaluations; set eval.every >= 1")
                _deep_validate(cfg, where, checked)
                if s in selected_settings and v in selected_variants:
                    plan.runs.append(Run(s, v, fam, k, cfg, cfgmod.to_dict(cfg),
                                         os.path.join(out, s, v, f"seed{k}")))
    return plan
