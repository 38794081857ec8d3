"""The mechanisms an experiment compares: `kind` ("dpa" | "ea") and, for EA, a `variant`; each EA
variant is its own run, labelled "ea" (saturating, the default) or "ea-<variant>"."""
from __future__ import annotations

from collections.abc import Iterable

from ..ops import KINDS
from ..ops.problem import check_variant
from ..ops.variants import DEFAULT_VARIANT


def kind_label(kind: str, variant: str | None) -> str:
    """"dpa", "ea" (saturating) or "ea-<variant>": the name of a run's mechanism in tables and plots."""
    if kind == "dpa":
        return "dpa"
    return "ea" if variant in (None, DEFAULT_VARIANT) else f"ea-{variant}"


def kind_specs(kinds: Iterable[str], variants: Iterable[str]) -> list[tuple[str, str | None]]:
    """(kind, variant) of every run, in the order of `kinds`: dpa once, ea once per variant."""
    variants = tuple(variants)
    out: list[tuple[str, str | None]] = []
    for k in kinds:
        if k == "dpa":
            out.append(("dpa", None))
        elif k == "ea":
            for v in variants:
                check_variant(v)
                out.append(("ea", v))
        else:
            raise ValueError(f"kinds must be among {KINDS}, got {k!r}")
    if not out:
        raise ValueError(f"kinds must name at least one of {KINDS}")
    return out
