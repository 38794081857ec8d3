"""The mechanisms an experiment compares: `kind` ("dpa" | "ea") and, for EA, a `variant`; each EA
variant is its own run. A run's mechanism has one name, its `label` ("dpa", "ea", "ea-squared",
"ea-power4", "ea[h2]+gate", ...), made by `mechanism_label` and nothing else; results records and
report rows store it as "label"."""
from __future__ import annotations

import math
from collections.abc import Iterable

from ..ops import KINDS
from ..ops.problem import check_variant
from ..ops.variants import DEFAULT_VARIANT, VARIANTS, variant_label
from ..ops.variants import parse_variant as _parse_variant


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


def parse_variant(spec: str) -> tuple[str, float | None]:
    """An EA variant as written on the command line -> (variant, power): a name of the variant table
    (ops/variants.py; "power" at degree 4) or "power<p>" (e.g. "power8")."""
    return _parse_variant(spec)


# ---------------------------------------------------------------- the levers of issue #21
# Each option is a list on the command line (`ea lm` and `ea ladder`), every value its own run:
#   --scales fixed,learned,learned@G   the score scale: 1/sqrt(E), times a learned per-head gain exp(g_h)
#                                      (g_h = 0 at init), or with g_h = G at init (learned sharpness:
#                                      G = 0.5 ln(beta_0) for exp(beta s^2); beta_0 = 0.1: G = -1.1513)
#   --gate off,on,on@B                 a data-dependent forget gate (FoX) in every layer; on@B: its bias
#                                      starts at B (sigmoid(B) per step at init; on = on@0 = 1/2)
#   --ea-heads all,M                   EA on the first M query heads of each EA layer, softmax on the rest
#   --layer-kinds all,ends,first,last,dpa-ea-ea-dpa
#                                      per-layer mechanism: ends = softmax in the first and the last layer,
#                                      first / last = softmax in that layer only, EA elsewhere; or one
#                                      ea/dpa per layer joined by "-"
LAYER_PATTERNS = ("ends", "first", "last")
GATES = ("off", "on")


def _value_after(spec: str, prefix: str) -> float | None:
    """The finite float of "<prefix>X" (e.g. "learned@-1.15" with prefix "learned@"), else None."""
    if not spec.startswith(prefix):
        return None
    try:
        x = float(spec[len(prefix):])
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def parse_scale(spec: str) -> tuple[bool, float]:
    """A --scales value -> (learn_scale, gain_init): "fixed", "learned" or "learned@G" (G the initial
    log gain g_h, a float)."""
    if spec == "fixed":
        return False, 0.0
    if spec == "learned":
        return True, 0.0
    if (g := _value_after(spec, "learned@")) is not None:
        return True, g
    raise ValueError(f"scales must be fixed, learned or learned@G (G the initial log gain, e.g. learned@-1.1513), "
                     f"got {spec!r}")


def parse_gate(spec: str) -> tuple[bool, float]:
    """A --gate value -> (forget_gate, gate_bias_init): "off", "on" (bias 0) or "on@B" (B a float)."""
    if spec in GATES:
        return spec == "on", 0.0
    if (b := _value_after(spec, "on@")) is not None:
        return True, b
    raise ValueError(f"gate must be off, on or on@B (B the gate's initial bias, e.g. on@4), got {spec!r}")


def parse_ea_heads(spec: str) -> int | None:
    """An --ea-heads value -> n_ea_heads: "all" (None: every head of an EA layer) or an int >= 0."""
    if spec == "all":
        return None
    try:
        m = int(spec)
    except ValueError:
        m = -1
    if m < 0:
        raise ValueError(f"ea-heads must be 'all' or a number of heads >= 0, got {spec!r}")
    return m


def parse_layer_kinds(spec: str) -> str | None:
    """A --layer-kinds value -> the pattern as stored in configs: None for "all" (every layer the
    run's kind), a named pattern (LAYER_PATTERNS), or "ea"/"dpa" per layer joined by "-"."""
    if spec == "all":
        return None
    if spec in LAYER_PATTERNS:
        return spec
    parts = spec.split("-")
    if not parts or any(p not in KINDS for p in parts):
        raise ValueError(f"layer-kinds must be all, one of {LAYER_PATTERNS}, or one of {KINDS} per layer joined "
                         f"by '-' (e.g. dpa-ea-ea-dpa), got {spec!r}")
    return spec


def resolve_layer_kinds(pattern: str | None, n_layers: int) -> tuple[str, ...] | None:
    """A layer-kinds pattern (see parse_layer_kinds) -> one kind per layer, or None for "all"."""
    if pattern is None:
        return None
    if pattern == "ends":
        if n_layers < 3:
            raise ValueError(f"layer-kinds 'ends' (softmax in the first and last layer) needs >= 3 layers, "
                             f"got {n_layers}; use first or last")
        return ("dpa",) + ("ea",) * (n_layers - 2) + ("dpa",)
    if pattern == "first":
        return ("dpa",) + ("ea",) * (n_layers - 1)
    if pattern == "last":
        return ("ea",) * (n_layers - 1) + ("dpa",)
    kinds = tuple(parse_layer_kinds(pattern).split("-"))
    if len(kinds) != n_layers:
        raise ValueError(f"layer-kinds {pattern!r} gives {len(kinds)} kinds for {n_layers} layers")
    return kinds


def mechanism_label(kind: str, variant: str | None = None, power: float | None = None, *,
                    n_ea_heads: int | None = None, layer_kinds: str | None = None, qk_norm: bool = False,
                    learn_scale: bool = False, gain_init: float = 0.0, forget_gate: bool = False,
                    gate_bias_init: float = 0.0) -> str:
    """A run's mechanism as one label, in tables, plots and records: "dpa", "ea" (saturating, the
    default variant) or "ea-<variant>" ("ea-power4": the power variant with its degree, 4 when None),
    then the options: "[h2]" (EA on 2 heads), "[ends]" / "[dpa-ea-ea-dpa]" (per-layer kinds),
    "+qknorm", "+gain" / "+gain@-1.15" (learned gain, its initial log gain when not 0), "+gate" / "+gate@4"
    (the forget gate, its initial bias when not 0)."""
    if kind == "dpa":
        label = "dpa"
    else:
        label = "ea" if variant in (None, DEFAULT_VARIANT) else f"ea-{variant_label(variant, power)}"
    if n_ea_heads is not None:
        label += f"[h{n_ea_heads}]"
    if layer_kinds is not None:
        label += f"[{layer_kinds}]"
    label += "+qknorm" if qk_norm else ""
    if learn_scale:
        label += "+gain" + (f"@{gain_init:g}" if gain_init else "")
    if forget_gate:
        label += "+gate" + (f"@{gate_bias_init:g}" if gate_bias_init else "")
    return label


# (colour, marker) of a mechanism's label in the plots: "dpa", then every EA variant of the table in its
# order ("ea" red, ...); other labels: matplotlib's next colour, a diamond
_EA_STYLES = [("tab:red", "s"), ("tab:orange", "^"), ("tab:green", "v"), ("tab:purple", "D"), ("tab:brown", "P"),
              ("tab:pink", "X"), ("tab:olive", "<"), ("tab:cyan", ">")]
PLOT_STYLE = {"dpa": ("tab:blue", "o"),
              **{mechanism_label("ea", v): _EA_STYLES[i % len(_EA_STYLES)] for i, v in enumerate(VARIANTS)}}
