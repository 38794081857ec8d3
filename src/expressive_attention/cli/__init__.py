"""The `ea` command: one module per subcommand in this package.

Each module in SUBCOMMANDS exposes `add_parser(subparsers) -> argparse.ArgumentParser` whose parser
sets `func(args) -> int | None`. `args.command_line` holds the command as typed (`ea ...`), for reports.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# module (in this package) of each subcommand, in the order `ea --help` lists them
SUBCOMMANDS = ["bench", "ladder", "train", "geometry", "lm", "tasks", "info"]


def _modules():
    return [importlib.import_module(f"{__name__}.{name}") for name in SUBCOMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ea",
        description="Expressive attention: benchmarks, the complexity ladder and real-text runs.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _modules():
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user error (`errors.UserError`, e.g. a missing extra or a bad preset) is
    one line on stderr and exit status 2; Ctrl-C is one line saying how to resume, status 130."""
    from ..errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "ea " + shlex.join(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:  # a user's mistake or a missing extra: one line, no traceback
        print(f"ea {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", "")
        print(f"\nea {args.command}: interrupted. {hint}".rstrip(), file=sys.stderr)
        return 130


def version_line() -> str:
    import torch

    from .. import __version__

    return f"expressive-attention {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"
