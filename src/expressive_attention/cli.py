"""The `ea` command. Each subcommand lives in its own module exposing
`add_parser(subparsers) -> argparse.ArgumentParser` whose parser sets `func(args) -> int | None`."""
from __future__ import annotations

import argparse
import importlib
import sys

# module path (relative to this package) of each subcommand, in the order `ea --help` lists them
SUBCOMMANDS = [
    "benchmarks_cli",
    "ladder_cli",
    "lm_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ea",
        description="Expressive attention: benchmarks, the complexity ladder and real-text runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{mod}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
