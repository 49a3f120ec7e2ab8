"""Compare methods over seeds (and settings): plan, validate, run in parallel, aggregate, plot.

A compare config (YAML) describes settings x variants x seeds, each one ``apga.training.train`` run::

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

Every resolved run config is validated (``apga.config.load_config`` plus the time model and the
environment id) before anything is written. Runs go to ``OUT/<setting>/<variant>/seed<k>/``,
laid out exactly as ``apga train`` writes them; a finished run with an unchanged config is
skipped, an unfinished one is resumed.

Threshold: ``{fraction: F}`` (default F = 0.9) = mean initial eval return + F x (best method's final
mean - initial), per setting, i.e. F of the best final return when the initial return is ~0 (and
still meaningful for negative returns); a number or ``{value: X}`` is an absolute return. Time to
threshold = the first evaluation at or above it; speed-up vs B = B's mean time / the method's.

Outputs in OUT: comparison.png (eval return against simulated time, one panel per setting, mean
and 20-80 % band over seeds), comparison_trajectories.png and comparison_comms.png (the same
against trajectories used and vector communications), comparison.csv (every evaluation row),
summary.md and summary.json (final return, time to threshold, speed-ups), and with ``--pick``
picked.yaml (the best grid point per method).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import sys
import textwrap
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from apga import config as cfgmod
from apga.errors import ApgaError, ConfigError

COMPARE_KEYS = ("base", "base_file", "seeds", "threshold", "baselines", "grid", "title", "settings", "variants")
SETTING_RESERVED = ("threshold", "variants")
VARIANT_RESERVED = ("grid",)
REPLACE_KEYS = {"workers.compute_time", "workers.comm_time", "workers.allreduce_time"}
DEFAULT_SETTING = "default"
DEFAULT_SEEDS = 5
DEFAULT_FRACTION = 0.9
PICK_METRICS = ("final", "auc")
AXES = (("time", "simulated seconds", "comparison.png"),
        ("trajectories", "trajectories used", "comparison_trajectories.png"),
        ("vector_comms", "vector communications", "comparison_comms.png"))
CSV_COLUMNS = ["setting", "variant", "seed", "time", "trajectories", "vector_comms", "eval_return"]
GRID_POINTS = 400
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
    from apga.guards import check_memory
    try:
        check_memory(cfg)  # first: the synthetic oracle below allocates n x dim
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
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
                d = cfgmod._deepcopy(base)
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


# --------------------------------------------------------------------------------------------
# run states and execution
# --------------------------------------------------------------------------------------------

def _normalise(d: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(d, sort_keys=True))


def run_state(run: Run) -> tuple[str, str]:
    """('new' | 'finished' | 'resume' | 'changed', detail) for the run's directory."""
    cfg_path = os.path.join(run.out_dir, "config.yaml")
    if not os.path.isdir(run.out_dir) or not os.listdir(run.out_dir):
        return "new", ""
    if not os.path.exists(cfg_path):
        return "new", ""
    try:
        old = cfgmod.read_yaml(cfg_path)
    except ConfigError as exc:
        return "changed", f"unreadable config.yaml ({exc})"
    try:
        old = cfgmod.with_defaults(old)  # keys added to the schema since the run are no change
    except ConfigError:
        pass  # e.g. a key removed since: the comparison below names it
    new = _normalise(run.resolved)
    if _normalise(old) != new:
        return "changed", _first_difference(_normalise(old), new)
    try:
        with open(os.path.join(run.out_dir, "summary.json")) as f:
            status = json.load(f).get("status")
    except (OSError, ValueError):
        status = None
    if status == "finished":
        return "finished", ""
    return "resume", ""


def _child_init() -> None:
    """Children ignore Ctrl-C (the terminal sends it to the whole group): the parent stops them."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from apga.guards import die_with_parent
    die_with_parent()  # a parent killed by SIGKILL or SIGHUP takes its workers with it


def _stop_children(executor) -> None:
    """Terminate the pool's processes now; their runs resume from the last checkpoint next time."""
    for proc in list(getattr(executor, "_processes", {}).values()):
        try:
            proc.terminate()
        except Exception:  # noqa: BLE001 - already gone
            pass
    executor.shutdown(wait=False, cancel_futures=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _execute(task: tuple) -> tuple:
    """Child process: run (or resume) one run quietly; stdout/stderr go to the task's log file."""
    mode, out_dir, data, log_path = task
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        try:
            import torch
            torch.set_num_threads(1)
        except ImportError:  # pragma: no cover
            pass
        from apga import training
        if mode == "resume":
            result = training.resume(out_dir, progress=False)
        else:
            result = training.train(cfgmod.from_dict(data), out_dir, force=True, progress=False)
        return ("ok", result.summary, "")
    except ApgaError as exc:
        return ("error", str(exc), "")
    except BaseException as exc:  # noqa: BLE001 - report any crash of one run, keep the others going
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        return ("error", f"{type(exc).__name__}: {exc}", tb)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _last_row(metrics_path: str) -> dict | None:
    try:
        with open(metrics_path, "rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    if not lines or len(lines[-1].split(",")) != len(header) or lines[-1].startswith(header[0]):
        return None
    cells = dict(zip(header, lines[-1].split(",")))
    try:
        return {k: float(v) if v else math.nan for k, v in cells.items()}
    except ValueError:
        return None


def run_fraction(run: Run, not_before: float = 0.0) -> float:
    """How far a run is through its budget, from the last line of its metrics.csv."""
    path = os.path.join(run.out_dir, "metrics.csv")
    try:
        if os.path.getmtime(path) < not_before:
            return 0.0
    except OSError:
        return 0.0
    row = _last_row(path)
    if row is None:
        return 0.0
    from apga.training import budget_progress
    done = budget_progress(run.cfg.budget, row.get("time", 0.0), row.get("trajectories", 0.0), row.get("iteration", 0.0))
    return float(min(1.0, done))


class OverallProgress:
    """ONE bar for the whole comparison (tqdm on a terminal, else a plain line every 5 % and per run)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar, self.next_mark = None, 0.05
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="compare", unit="run", file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}<{remaining}{postfix}]")

    def update(self, done: float, finished: int, running: int, failed: int, event: str | None = None) -> None:
        if not self.enabled:
            return
        frac = done / self.total if self.total else 1.0
        if self.bar is not None:
            self.bar.n = round(done, 2)
            self.bar.set_postfix_str(f"{finished} done, {running} running" + (f", {failed} failed" if failed else ""),
                                     refresh=True)
            if event and "failed" in event:
                self.bar.write(event, file=sys.stderr)
        elif event or frac >= self.next_mark:
            msg = f"compare: {frac:6.1%}  {finished}/{self.total} runs done, {running} running"
            if failed:
                msg += f", {failed} failed"
            if event:
                msg += f"  ({event})"
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
            while self.next_mark <= frac:
                self.next_mark += 0.05

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(plan: Plan, jobs: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Run every unfinished run of the plan in parallel processes. Returns {'skipped', 'ran', 'failed'}."""
    states = [(run, *run_state(run)) for run in plan.runs]
    changed = [(r, d) for r, st, d in states if st == "changed"]
    if changed and not force:
        r, d = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ApgaError(f"{r.out_dir} holds a run of a different config ({d}){more}: pass --force to rerun "
                        "such runs, or choose another --out")
    todo = [(r, st) for r, st, _ in states if st != "finished"]
    skipped = len(states) - len(todo)
    report = {"skipped": skipped, "ran": 0, "failed": []}
    if not todo:
        return report
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    bar = OverallProgress(len(states), progress)
    done_frac = {id(r): 1.0 for r, st, _ in states if st == "finished"}
    start = time.time()
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    finished, failed = skipped, []
    import signal
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    executor = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_child_init)
    try:
        futures = {}
        for r, st in todo:
            mode = "resume" if st == "resume" else "train"
            log = os.path.join(plan.out, "logs", r.setting, r.variant, f"seed{r.seed}.log")
            futures[executor.submit(_execute, (mode, r.out_dir, r.resolved, log))] = (r, st)
        pending = set(futures)
        bar.update(skipped, finished, 0, 0)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            events = []
            for fut in done:
                r, st = futures[fut]
                try:
                    status, payload, _tb = fut.result()
                except Exception as exc:  # the worker process died
                    status, payload = "error", f"worker process failed: {type(exc).__name__}: {exc}"
                name = f"{r.setting}/{r.variant}/seed{r.seed}"
                if status == "ok":
                    finished += 1
                    report["ran"] += 1
                    done_frac[id(r)] = 1.0
                    events.append(f"{name} finished")
                else:
                    failed.append((r, payload))
                    done_frac[id(r)] = 1.0
                    events.append(f"{name} failed: {payload}")
            running = 0
            for fut in pending:
                if fut.running():  # (includes the few tasks already queued to a worker)
                    r, st = futures[fut]
                    done_frac[id(r)] = run_fraction(r, 0.0 if st == "resume" else start - 1.0)
                    running += 1
            running = min(running, jobs)
            total = sum(done_frac.values())
            for ev in events or [None]:
                bar.update(total, finished, running, len(failed), ev)
    except KeyboardInterrupt:
        _stop_children(executor)
        bar.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    report["failed"] = failed
    return report


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

def _eval_rows(out_dir: str) -> dict:
    from apga.training import read_metrics
    m = read_metrics(out_dir)
    ok = ~np.isnan(m["eval_return"])
    return {k: m[k][ok] for k in ("time", "trajectories", "vector_comms", "eval_return")}


def collect(plan: Plan) -> dict:
    """{(setting, variant): [(seed, eval rows)]} for every finished run of the FULL plan whose config matches."""
    out = {}
    for run in plan.runs:
        state, _ = run_state(run)
        if state != "finished":
            continue
        rows = _eval_rows(run.out_dir)
        if len(rows["eval_return"]) == 0:
            continue
        out.setdefault((run.setting, run.variant), []).append((run.seed, rows))
    return out


def step_hold(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The last value at or before each grid point (the first value before the first x)."""
    idx = np.searchsorted(xs, grid, side="right") - 1
    return ys[np.clip(idx, 0, len(ys) - 1)]


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


ROBUSTNESS_FRACTIONS = (0.5, 0.75)  # summary.md also times these fractions of the way


def _median_time(values: list) -> float | None:
    """Median over all seeds with "never reached" counted as infinitely late (None if that is)."""
    if not values:
        return None
    m = float(np.median([math.inf if t is None else t for t in values]))
    return None if math.isinf(m) else m


def _first_hits(results_sv: list, threshold: float, keys=("time",)) -> dict:
    """{key: per seed, the value of ``key`` at the first evaluation at or above ``threshold``
    (None if no evaluation reached it)}."""
    out = {key: [] for key in keys}
    for _, rows in results_sv:
        hit = np.nonzero(rows["eval_return"] >= threshold)[0]
        for key in keys:
            out[key].append(float(rows[key][hit[0]]) if len(hit) else None)
    return out


def summarise(plan: Plan, results: dict) -> dict:
    """The numbers of summary.md / summary.json, per setting and variant."""
    out = {"config": plan.path, "title": plan.title, "seeds": plan.seeds, "baselines": plan.baselines,
           "settings": {}}
    for s in plan.settings:
        present = [v for v in plan.variants if (s, v) in results]
        if not present:
            continue
        runs = [rows for v in present for _, rows in results[(s, v)]]
        initial = float(np.mean([rows["eval_return"][0] for rows in runs]))
        t_common = float(min(rows["time"][-1] for rows in runs))
        stats = {}
        for v in present:
            finals = np.array([rows["eval_return"][-1] for _, rows in results[(s, v)]])
            aucs = []
            for _, rows in results[(s, v)]:
                if t_common > 0:
                    g = np.linspace(0.0, t_common, GRID_POINTS + 1)
                    aucs.append(float(np.mean(step_hold(rows["time"], rows["eval_return"], g))))
                else:
                    aucs.append(float(rows["eval_return"][0]))
            stats[v] = {"seeds": [k for k, _ in results[(s, v)]],
                        "final": {"mean": float(finals.mean()), "std": float(finals.std()),
                                  "p20": float(np.percentile(finals, 20)), "p80": float(np.percentile(finals, 80)),
                                  "values": [float(x) for x in finals]},
                        "auc": {"mean": float(np.mean(aucs)), "values": aucs}}
        best_v = max(present, key=lambda v: stats[v]["final"]["mean"])
        best = stats[best_v]["final"]["mean"]
        kind, x = plan.thresholds[s]
        threshold = initial + x * (best - initial) if kind == "fraction" else x
        for v in present:
            reach = _first_hits(results[(s, v)], threshold, ("time", "trajectories", "vector_comms"))
            stats[v]["to_threshold"] = {
                "reached": sum(t is not None for t in reach["time"]), "n": len(reach["time"]),
                **{key: {"mean": _mean_or_none(vals), "values": vals} for key, vals in reach.items()}}
            stats[v]["to_threshold"]["time"]["median"] = _median_time(reach["time"])
            if kind == "fraction":  # the same timing a little lower on the curve: robustness
                stats[v]["robustness"] = {}
                for f in sorted(set(ROBUSTNESS_FRACTIONS) | {x}):
                    ts = _first_hits(results[(s, v)], initial + f * (best - initial))["time"]
                    stats[v]["robustness"][repr(f)] = {
                        "threshold": initial + f * (best - initial), "values": ts, "mean": _mean_or_none(ts),
                        "median": _median_time(ts), "reached": sum(t is not None for t in ts)}
            stats[v]["end_time"] = float(min(rows["time"][-1] for _, rows in results[(s, v)]))
        for v in present:
            sp = {}
            mine = stats[v]["to_threshold"]["time"]["mean"]
            for b in plan.baselines:
                if b not in stats:
                    continue
                theirs = stats[b]["to_threshold"]["time"]["mean"]
                if mine is None or mine <= 0:
                    sp[b] = {"ratio": None, "bound": None}
                elif theirs is None:
                    sp[b] = {"ratio": None, "bound": stats[b]["end_time"] / mine}  # speed-up > bound
                else:
                    sp[b] = {"ratio": theirs / mine, "bound": None}
            stats[v]["speedup"] = sp
        out["settings"][s] = {"threshold": threshold, "threshold_rule": {kind: x}, "initial_return": initial,
                              "best_variant": best_v, "best_final_mean": best, "auc_horizon": t_common,
                              "variants": stats}
    return out


def pick(plan: Plan, summary: dict, metric: str) -> dict:
    """Per setting and family: the grid point with the best mean final (or AUC) eval return."""
    key = "final" if metric == "final" else "auc"
    chosen, scores = {}, {}
    for s, st in summary["settings"].items():
        for fam in dict.fromkeys(plan.families.values()):
            cands = [v for v in plan.variants if plan.families[v] == fam and v in st["variants"]]
            if not cands:
                continue
            best = max(cands, key=lambda v: st["variants"][v][key]["mean"])
            chosen.setdefault(s, {})[fam] = best
            scores.setdefault(s, {})[fam] = {v: st["variants"][v][key]["mean"] for v in cands}
    return {"metric": metric, "chosen": chosen, "scores": scores}


def _num(x, fmt=".4g") -> str:
    return "—" if x is None else format(x, fmt)


def write_csv(plan: Plan, results: dict, path: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in plan.settings:
        for v in plan.variants:
            for seed, rows in results.get((s, v), []):
                for i in range(len(rows["eval_return"])):
                    w.writerow([s, v, seed, repr(float(rows["time"][i])), int(rows["trajectories"][i]),
                                int(rows["vector_comms"][i]), repr(float(rows["eval_return"][i]))])
    from apga.files import atomic_write_text
    atomic_write_text(path, buf.getvalue())


def plot(plan: Plan, results: dict, out: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from apga.files import atomic_write_bytes

    settings = [s for s in plan.settings if any((s, v) in results for v in plan.variants)]
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(plan.variants)}
    paths = []
    for axis, label, fname in AXES:
        ncol = min(3, max(1, len(settings)))
        nrow = math.ceil(len(settings) / ncol) if settings else 1
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
        for ax in axes.flat[len(settings):]:
            ax.set_visible(False)
        for ax, s in zip(axes.flat, settings):
            present = [v for v in plan.variants if (s, v) in results]
            xmax = max(float(rows[axis][-1]) for v in present for _, rows in results[(s, v)])
            grid = np.linspace(0.0, xmax if xmax > 0 else 1.0, GRID_POINTS + 1)
            for v in present:
                seeds = results[(s, v)]
                end = max(float(rows[axis][-1]) for _, rows in seeds)
                xs = np.union1d(grid[grid < end], [end])  # the method's own end point: its final evaluations
                curves = np.stack([step_hold(rows[axis], rows["eval_return"], xs) for _, rows in seeds])
                mean = curves.mean(axis=0)
                lo, hi = np.percentile(curves, 20, axis=0), np.percentile(curves, 80, axis=0)
                ax.plot(xs, mean, color=colours[v], lw=1.6, label=f"{v} ({len(seeds)} seeds)")
                ax.fill_between(xs, lo, hi, color=colours[v], alpha=0.2, lw=0)
            ax.set_title(s if len(plan.settings) > 1 or s != DEFAULT_SETTING else textwrap.fill(plan.title, 57),
                         fontsize=10)
            ax.set_xlabel(label)
            ax.set_ylabel("eval return")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if len(plan.settings) > 1 or plan.settings[0] != DEFAULT_SETTING:
            # about 11 characters per inch of figure width at this font size: wrap, never cut
            fig.suptitle(textwrap.fill(f"{plan.title}: mean and 20-80 % band over seeds", int(11 * 5.2 * ncol)),
                         fontsize=11)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        path = os.path.join(out, fname)
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def write_summary_md(plan: Plan, summary: dict, picked: dict | None, path: str, missing: list) -> None:
    L = [f"# {plan.title}", "",
         f"Compare config `{plan.path}`; seeds {', '.join(map(str, plan.seeds))}; "
         f"runs in `<setting>/<variant>/seed<k>/`.", "",
         "- **final return**: the last evaluation of each run; mean over seeds and the 20 % / 80 % percentiles.",
         "- **time to threshold**: the first simulated time at which an evaluation reached the threshold, "
         "mean over the seeds that reached it (reached = how many); **median**: over all seeds, a seed "
         "that never reached it counting as infinitely late (— if that is the median).",
         "- **speed-up vs B**: B's mean time to threshold / this method's; `>x`: B never reached the threshold "
         "within its budget, so the speed-up is at least x; —: not defined (a method did not reach it).",
         "- **AUC**: the mean eval return over [0, T] (step-wise hold), T = the shortest run of the setting.", "",
         "Figures: [comparison.png](comparison.png) (against time), "
         "[comparison_trajectories.png](comparison_trajectories.png), "
         "[comparison_comms.png](comparison_comms.png); every evaluation: [comparison.csv](comparison.csv).", ""]
    for s, st in summary["settings"].items():
        rule = st["threshold_rule"]
        if "fraction" in rule:
            why = (f"{rule['fraction']:.0%} of the way from the mean initial return {st['initial_return']:.4g} "
                   f"to the best final mean {st['best_final_mean']:.4g} ({st['best_variant']})")
        else:
            why = "set in the config"
        L += [f"## {s}", "", f"Threshold: **{st['threshold']:.4g}** ({why}).", ""]
        bls = [b for b in plan.baselines if b in st["variants"]]
        head = ["method", "seeds", "final mean", "20 %", "80 %", "AUC", "time to threshold", "median", "reached"]
        head += [f"speed-up vs {b}" for b in bls]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v, vs in st["variants"].items():
            tt = vs["to_threshold"]
            row = [f"`{v}`", str(len(vs["seeds"])), _num(vs["final"]["mean"]), _num(vs["final"]["p20"]),
                   _num(vs["final"]["p80"]), _num(vs["auc"]["mean"]), _num(tt["time"]["mean"]),
                   _num(tt["time"].get("median")), f"{tt['reached']}/{tt['n']}"]
            for b in bls:
                sp = vs["speedup"].get(b, {})
                if sp.get("ratio") is not None:
                    row.append(_num(sp["ratio"], ".3g"))
                elif sp.get("bound") is not None and sp["bound"] > 1:  # a bound below 1 says nothing useful
                    row.append(f">{sp['bound']:.3g}")
                else:
                    row.append("—")
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        rob = {v: vs["robustness"] for v, vs in st["variants"].items() if "robustness" in vs}
        if rob:
            first = next(iter(rob.values()))
            fracs = list(first)
            L += ["Time to other fractions of the way (robustness of the timing): mean over the seeds "
                  "that reached it (reached) / median over all seeds.", "",
                  "| method | " + " | ".join(f"{float(f) * 100:g} % ({first[f]['threshold']:.4g})" for f in fracs) + " |",
                  "|---|" + "---|" * len(fracs)]
            for v, r in rob.items():
                L.append(f"| `{v}` | " + " | ".join(
                    f"{_num(r[f]['mean'])} ({r[f]['reached']}/{len(r[f]['values'])}) / {_num(r[f]['median'])}"
                    for f in fracs) + " |")
            L.append("")
        if picked and s in picked["chosen"]:
            L += [f"Tuning ({picked['metric']} eval return, mean over seeds; **picked** in bold):", "",
                  "| method | candidate | score |", "|---|---|---|"]
            for fam, cands in picked["scores"][s].items():
                for v, score in cands.items():
                    mark = f"**{v}**" if picked["chosen"][s][fam] == v else v
                    L.append(f"| `{fam}` | {mark} | {_num(score)} |")
            L.append("")
    if missing:
        L += ["## Not included", "", "Runs not finished (not run yet, failed, or filtered with --only):", ""]
        L += [f"- `{m}`" for m in missing]
        L.append("")
    from apga.files import atomic_write_text
    atomic_write_text(path, "\n".join(L))


def write_picked(plan: Plan, picked: dict, path: str) -> None:
    doc = {"settings": {}}
    for s, fams in picked["chosen"].items():
        doc["settings"][s] = {"variants": {fam: dict(plan.grid_points[v]) for fam, v in fams.items()}}
    head = (f"# Picked by `apga compare {plan.path} --pick {picked['metric']}`: per setting and method the grid\n"
            f"# point with the best mean {picked['metric']} eval return over seeds {plan.seeds}.\n"
            "# Paste each setting's `variants:` block under the same setting of a compare config\n"
            "# (settings.<name>.variants.<method>: the tuned overrides). Scores: summary.md.\n")
    from apga.files import atomic_write_text
    atomic_write_text(path, head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))


def report(plan: Plan, pick_metric: str | None = None) -> dict:
    """Aggregate the finished runs into the output files. Returns {name: path}."""
    results = collect(plan)
    if not results:
        raise ApgaError(f"no finished runs under {plan.out} to compare")
    summary = summarise(plan, results)
    picked = pick(plan, summary, pick_metric) if pick_metric else None
    missing = [f"{r.setting}/{r.variant}/seed{r.seed}" for r in plan.runs
               if not any(k == r.seed for k, _ in results.get((r.setting, r.variant), []))]
    from apga.files import atomic_write_text
    paths = {}
    paths["csv"] = os.path.join(plan.out, "comparison.csv")
    write_csv(plan, results, paths["csv"])
    figs = plot(plan, results, plan.out)
    paths["plot"], paths["plot_trajectories"], paths["plot_comms"] = figs
    paths["summary"] = os.path.join(plan.out, "summary.md")
    write_summary_md(plan, summary, picked, paths["summary"], missing)
    if picked:
        summary["picked"] = picked
        paths["picked"] = os.path.join(plan.out, "picked.yaml")
        write_picked(plan, picked, paths["picked"])
    paths["summary_json"] = os.path.join(plan.out, "summary.json")
    atomic_write_text(paths["summary_json"], json.dumps(summary, indent=2) + "\n")
    return paths


def compare(path: str, out: str, seeds: int | None = None, jobs: int | None = None, overrides: list | None = None,
            only: list | None = None, force: bool = False, pick_metric: str | None = None,
            progress: bool = True) -> tuple[dict, dict]:
    """Python API of `apga compare`: validate, run, aggregate. Returns (run report, output paths)."""
    if pick_metric is not None and pick_metric not in PICK_METRICS:
        raise ApgaError(f"--pick {pick_metric!r}: choose one of {', '.join(PICK_METRICS)}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ApgaError(f"--out {out!r} exists and is not a directory")
    plan = load_plan(path, out, overrides, seeds, only)
    run_report = execute(plan, jobs, force, progress)
    paths = report(load_plan(path, out, overrides, seeds), pick_metric)
    return run_report, paths
