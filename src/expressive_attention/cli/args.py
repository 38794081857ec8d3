"""Argument types shared by the `ea` subcommands (argparse `type=` callables)."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import TypeVar
from collections.abc import Callable, Iterable

T = TypeVar("T")


def positive_int(s: str) -> int:
    """An integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(s: str) -> float:
    """A float > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def nonnegative_float(s: str) -> float:
    """A float >= 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


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
