"""The `apga` command. Each subcommand lives in apga/commands/<name>.py and provides
``add_parser(subparsers)`` and ``run(args) -> int``; this file only wires them up."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from apga.errors import ApgaError, Terminated

COMMANDS = ["train", "evaluate", "compare", "theory", "predict", "bench"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2, no usage dump
        sys.stderr.write(f"apga: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


MAX_ERROR_CHARS = 1000
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM}


def one_line(message: str) -> str:
    """An error message as one line of bounded length: whatever value a message quotes (a 10 MB
    env id...), the user sees one readable line."""
    text = " ".join(message.split())
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        text = f"{text[:half]} [... {len(text) - 2 * half} characters cut ...] {text[-half:]}"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="apga",
        description="Asynchronous policy-gradient aggregation: Rennala NIGT, Malenia NIGT, AFedPG and "
        "synchronous NIGT on an exact simulator of heterogeneous workers, or on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"apga.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"apga.commands.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from apga.guards import matplotlib_config_dir
    matplotlib_config_dir()  # nothing under $HOME: matplotlib would put its font cache there
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ApgaError as exc:
        sys.stderr.write(f"apga: error: {one_line(str(exc))}\n")
        return 2
    except KeyboardInterrupt as exc:
        hint = {"train": "; continue with `apga train --resume DIR`",
                "compare": "; run the same command again to resume"}.get(args.command, "")
        terminated = isinstance(exc, Terminated)
        sys.stderr.write(f"apga: {'terminated' if terminated else 'interrupted'}{hint}\n")
        return 143 if terminated else 130
    except BrokenPipeError:
        # Whoever read our stdout has gone (`apga compare ... | head`): what was written is
        # complete on disk; stop quietly, without a second error when Python flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno not in _WRITE_ERRORS:
            raise
        # A write refused (no room, read-only, no permission) or a broken disk: the files are whole
        # (atomic writes, cut-back logs), so this is an error to report, not a crash.
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"apga: error: {one_line(where + (exc.strerror or str(exc)))}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
