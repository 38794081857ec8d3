"""Argument types shared by the `ea` subcommands (argparse `type=` callables)."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import TypeVar
from collections.abc import Callable, Iterable

T = TypeVar("T")


def _number(convert: Callable[[str], T], what: str, ok: Callable[[T], bool], bound: str, name: str, doc: str):
    """An argparse type: `convert` the string (else "expected {what}") and require `ok` (else "must be {bound}")."""

    def parse(s: str) -> T:
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {v}")
        return v

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = doc
    return parse


positive_int = _number(int, "an integer", lambda v: v >= 1, ">= 1", "positive_int", "An integer >= 1.")
positive_float = _number(float, "a number", lambda v: v > 0, "> 0", "positive_float", "A float > 0.")
nonnegative_float = _number(float, "a number", lambda v: v >= 0, ">= 0", "nonnegative_float", "A float >= 0.")


def csv_of(item: Callable[[str], T] = str, choices: Iterable[str] | None = None) -> Callable[[str], list[T]]:
    """A non-empty comma-separated list, each element converted by `item` (and one of `choices`)."""
    allowed = tuple(choices) if choices is not None else None

    def parse(s: str) -> list[T]:
        raw = [x.strip() for x in s.split(",") if x.strip()]
        if not raw:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if allowed is not None:
            bad = [x for x in raw if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return [item(x) for x in raw]

    parse.__name__ = f"list of {getattr(item, '__name__', 'item')}"
    return parse


def deprecated(message: str) -> None:
    """An old spelling of a command line: a DeprecationWarning, and a note on stderr (where a CLI
    user sees it; Python hides DeprecationWarnings outside __main__ by default)."""
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    print(f"ea: {message}", file=sys.stderr)


def add_import_option(parser: argparse.ArgumentParser, where: str = "") -> None:
    """`--import MODULE` (repeatable, into args.imports): modules to import first, e.g. ones that
    register the user's own tasks; `where` says where else they are imported (e.g. " (in every worker)")."""
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help=f"import MODULE first{where}, e.g. one that registers your own tasks")
