"""Argument types shared by the `ea` subcommands (argparse `type=` callables)."""
from __future__ import annotations

import argparse
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


def add_import_option(parser: argparse.ArgumentParser, where: str = "") -> None:
    """`--import MODULE` (repeatable, into args.imports): modules to import first, e.g. ones that
    register the user's own tasks; `where` says where else they are imported (e.g. " (in every worker)")."""
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help=f"import MODULE first{where}, e.g. one that registers your own tasks")


def add_lever_options(parser: argparse.ArgumentParser) -> None:
    """The options of issue #21, shared by `ea lm` and `ea ladder`: comma-separated lists, every value
    its own run (crossed with each other and with --kinds/--variants; see experiments/kinds.py)."""
    parser.add_argument("--scales", type=csv_of(), default=None,
                        help="score scale, each its own run: fixed (1/sqrt(E)), learned (times a learned per-head "
                             "gain exp(g_h), g_h = 0 at init), learned@G (g_h = G at init; with exp_squared, "
                             "exp(beta s^2) with beta = exp(2 g_h): learned@-1.1513 starts at beta = 0.1) "
                             "(default: fixed)")
    parser.add_argument("--gate", type=csv_of(), default=None,
                        help="forget gate (Forgetting Transformer) in every layer, for dpa and ea alike: off, on "
                             "(bias 0 at init: 1/2 per step), on@B (bias B at init: sigmoid(B) per step, e.g. on@4 "
                             "= 0.982), or a list such as off,on,on@4, each its own run (default: off)")
    parser.add_argument("--ea-heads", type=csv_of(), default=None,
                        help="EA runs only: all (every head EA) or M (EA on the first M query heads of each EA "
                             "layer, softmax on the rest; a multiple of heads / kv heads), e.g. all,2 "
                             "(default: all)")
    parser.add_argument("--layer-kinds", type=csv_of(), default=None,
                        help="EA runs only: all (every layer EA), ends (softmax in the first and the last layer), "
                             "first / last (softmax in that layer), or one of ea/dpa per layer joined by '-', "
                             "e.g. dpa-ea-ea-dpa (default: all)")


def lever_options(args) -> dict[str, list[dict]]:
    """The lever flags as RunConfig overrides per lever ({} = off), for presets' `levers`; only the
    flags given. Raises argparse-friendly ValueError on a bad value."""
    from ..experiments.kinds import parse_ea_heads, parse_gate, parse_layer_kinds, parse_scale

    def scale(s):
        learn, g = parse_scale(s)
        return {} if not learn else ({"learn_scale": True} | ({"gain_init": g} if g else {}))

    def gate(s):
        on, b = parse_gate(s)
        return {} if not on else ({"forget_gate": True} | ({"gate_bias_init": b} if b else {}))

    out: dict[str, list[dict]] = {}
    if args.scales is not None:
        out["scale"] = [scale(s) for s in args.scales]
    if args.gate is not None:
        out["gate"] = [gate(g) for g in args.gate]
    if args.ea_heads is not None:
        out["ea_heads"] = [{} if (m := parse_ea_heads(h)) is None else {"n_ea_heads": m} for h in args.ea_heads]
    if args.layer_kinds is not None:
        out["layer_kinds"] = [{} if (k := parse_layer_kinds(s)) is None else {"layer_kinds": k}
                              for s in args.layer_kinds]
    return out
