"""`apga train CONFIG.yaml --out DIR [--set section.key=value ...]` and `apga train --resume DIR`."""
from __future__ import annotations

import argparse
import os

from apga.errors import ApgaError

EPILOG = """\
examples:
  apga train configs/quickstart.yaml --out runs/quick
  apga train configs/quickstart.yaml --out runs/q2 --set algorithm.name=malenia_nigt --set seed=1
  apga train --resume runs/quick
  apga train --resume runs/quick --set budget.iterations=300     # continue a finished run further

Config sections (see apga/config.py for every key and its default): seed, env, policy, algorithm,
workers, runtime, budget, eval, checkpoint. Outputs in DIR: config.yaml (resolved), metrics.csv
(one row per model update), tb/ (TensorBoard), checkpoint.npz, policy_final.safetensors and
policy_best.safetensors (apga.load_policy, apga evaluate), summary.json, returns.png.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one configuration (simulator by default)",
                       description="Train a policy with one algorithm on one configuration.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (omit with --resume)")
    p.add_argument("--out", help="run directory to create (must not exist or be empty, unless --force)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; VALUE is parsed as YAML; repeatable")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint "
                   "(with --set budget.KEY=VALUE: up to a new budget, also after it finished)")
    p.add_argument("--force", action="store_true", help="overwrite the apga run files in an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        return _run(args)
    except ApgaError as exc:  # the CLI prints the message as one line: keep it one line
        text = str(exc)
        if "\n" in text or "\r" in text:
            raise type(exc)(" ".join(text.split())) from None
        raise


def _run(args) -> int:
    from apga import config as cfgmod

    # apga.run imports torch (hundreds of MB): bad input is refused before that
    if args.resume:
        from apga.run import resume
        if args.config or args.out or args.force:
            raise ApgaError("--resume DIR takes no CONFIG, --out or --force: the run's own config.yaml is used "
                            "(--set budget.KEY=VALUE may change the budget)")
        result = resume(args.resume, progress=not args.quiet, budget=args.overrides)
    else:
        if not args.config:
            raise ApgaError("give a CONFIG file (e.g. configs/quickstart.yaml) or --resume DIR")
        if not args.out:
            raise ApgaError("--out DIR is required: where to write metrics, checkpoints and plots")
        cfg = cfgmod.load_config(args.config, args.overrides)
        from apga.run import train
        result = train(cfg, args.out, force=args.force, progress=not args.quiet)
    s = result.summary
    final = s["final_eval_return"]
    print(f"done: {s['iterations']} updates, {s['trajectories']} trajectories, time {s['time']:.6g} s, "
          f"final eval return {final if final is None else f'{final:.4g}'}")
    print(f"outputs: {os.path.join(result.out_dir, 'metrics.csv')}, {os.path.join(result.out_dir, 'returns.png')}")
    return 0
