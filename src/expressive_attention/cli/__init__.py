"""The `ea` command: one module per subcommand in this package.

Each module in SUBCOMMANDS exposes `add_parser(subparsers) -> argparse.ArgumentParser` whose parser
sets `func(args) -> int | None`; it may also expose `legacy_argv(argv) -> argv`, which rewrites an old
spelling of its arguments (with a DeprecationWarning) before parsing. `args.command_line` holds the
command as typed (`ea ...`), for reports.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# module (in this package) of each subcommand, in the order `ea --help` lists them
SUBCOMMANDS = ["bench", "ladder", "geometry", "lm", "tasks"]


def _modules():
    return [importlib.import_module(f"{__name__}.{name}") for name in SUBCOMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ea",
        description="Expressive attention: benchmarks, the complexity ladder and real-text runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _modules():
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        mod = importlib.import_module(f"{__name__}.{argv[0]}")
        if hasattr(mod, "legacy_argv"):
            argv = [argv[0], *mod.legacy_argv(argv[1:])]
    args = build_parser().parse_args(argv)
    args.command_line = "ea " + shlex.join(argv)
    return int(args.func(args) or 0)
