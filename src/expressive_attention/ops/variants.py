"""The variant table: the one place where EA's weight functions are defined.

    a_ij = f(s_ij) / (eps + sum_l f(s_il))      over the keys the mask allows (reference.py)

Each entry (`Variant`) holds everything that differs between variants:

    f(s, p)          the weight function (plain formula; p = the resolved `power`, None where unused)
    log_f(s, p)      log f, -inf where f = 0, with a finite gradient everywhere (the `flex` backend's
                     score_mod: EA = softmax(log f) up to eps)
    exponent, dexp   for the exponential ("exp-type") variants, f = exp(x(s)): x and x'. These are
                     normalised by the row's (running) maximum of x, like softmax (reference and
                     blocked divide by it; a flash kernel keeps it running); None for the others
    row_scaled       True when the weights are computed as f / r with r the row's largest allowed f
                     (every exp-type variant, and "power"), which leaves a_ij unchanged and keeps
                     large |s| finite; `rescaled(s, keep, p)` below does it
    linear           the linear (recurrent) form, if f has a finite feature map (a description)
    params           the keyword parameters the variant takes (("power",) for "power")
    paper            an EA variant in the paper's sense (even in s), or a control
    description      one line, shown by ``ea info`` and in error messages' neighbourhood

Every backend declares the variants it implements (`Backend(variants=...)`); dispatch refuses the
others with one message, and an unknown name raises `ValueError` listing the known ones wherever it
enters (`check_variant`: the op, the modules, the configs). To add a variant, see docs/architecture.md
("Add a variant"): one entry here, plus a branch in a kernel if a kernel is to run it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_POWER = 4.0  # the degree of variant="power" when `power` is not given
DEFAULT_VARIANT = "saturating"  # the paper's EA


@dataclass(frozen=True)
class Variant:
    name: str
    f: Callable[[Tensor, "float | None"], Tensor]
    log_f: Callable[[Tensor, "float | None"], Tensor]
    description: str
    exponent: Callable[[Tensor], Tensor] | None = None  # exp-type: f = exp(exponent(s)), running-max normalised
    dexp: Callable[[Tensor], Tensor] | None = None  # d exponent / ds
    row_scaled: bool = False  # weights computed as f / (the row's largest f); True for every exp-type variant
    linear: str | None = None  # the linear form, when f has a finite feature map
    params: tuple[str, ...] = ()  # keyword parameters ("power")
    paper: bool = True  # an EA variant of the paper (even in s); False: a control
    even: bool = True  # f(-s) = f(s)

    @property
    def exp_type(self) -> bool:
        """f = exp(x(s)): normalised by a running row maximum of x, as softmax is."""
        return self.exponent is not None

    def __post_init__(self):
        if self.exp_type and (self.dexp is None or not self.row_scaled):
            raise ValueError(f"variant {self.name!r}: an exp-type variant needs dexp and row_scaled=True")


def _safe_log(x: Tensor) -> Tensor:
    """log x for x >= 0: -inf where x == 0, and a zero (not NaN) gradient there (the inner where keeps
    log's 0/0 from reaching x)."""
    pos = x > 0
    return torch.where(pos, x, torch.ones_like(x)).log().masked_fill(~pos, float("-inf"))


def _power_p(p):
    return DEFAULT_POWER if p is None else p


VARIANT_TABLE: dict[str, Variant] = {v.name: v for v in (
    Variant(
        "saturating", f=lambda s, p: (s * s) / (1.0 + s * s),
        log_f=lambda s, p: _safe_log((s * s) / (1.0 + s * s)),  # one log: the score_mod's cost on CPU
        description="s^2/(1+s^2): the paper's EA (default); bounded, saturating contrast"),
    Variant(
        "squared", f=lambda s, p: s * s, log_f=lambda s, p: _safe_log(s * s),
        linear="degree-2 features: (q.k)^2 = <phi(q), phi(k)>, phi(x) = x (x) x",
        description="s^2: polynomial contrast; has an exact linear (recurrent) form"),
    Variant(
        "power", f=lambda s, p: s.abs().pow(_power_p(p)), log_f=lambda s, p: _power_p(p) * _safe_log(s.abs()),
        row_scaled=True, params=("power",),
        description="|s|^p (p = power, default 4; p = 2 is squared): sharper polynomial contrast, scale-invariant"),
    Variant(
        "exp_squared", f=lambda s, p: (s * s).exp(), log_f=lambda s, p: s * s,
        exponent=lambda s: s * s, dexp=lambda s: 2.0 * s, row_scaled=True,
        description="exp(s^2) = softmax of s^2: even, exponential contrast"),
    Variant(
        "exp_odd", f=lambda s, p: (s * s.abs()).exp(), log_f=lambda s, p: s * s.abs(),
        exponent=lambda s: s * s.abs(), dexp=lambda s: 2.0 * s.abs(), row_scaled=True, paper=False, even=False,
        description="exp(s|s|) = softmax of s|s|: the ODD control of exp_squared (same contrast, not even "
                    "in s; not an EA variant of the paper)"),
)}

VARIANTS: tuple[str, ...] = tuple(VARIANT_TABLE)
EXP_VARIANTS: tuple[str, ...] = tuple(n for n, v in VARIANT_TABLE.items() if v.exp_type)


def check_variant(variant) -> Variant:
    """The table's entry for `variant`; a ValueError listing the known names for anything else."""
    entry = VARIANT_TABLE.get(variant) if isinstance(variant, str) else None
    if entry is None:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return entry


def resolve_power(variant: str, power) -> float | None:
    """The degree p used by ``variant`` (None for variants without one); checks ``power``."""
    entry = check_variant(variant)
    if "power" not in entry.params:
        if power is not None:
            raise ValueError(f"power={power!r} applies to variant='power' only, got variant={variant!r}")
        return None
    if power is None:
        return DEFAULT_POWER
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (1.0 <= power <= 64.0):
        raise ValueError(f"power must be a number in [1, 64] (the degree p of |s|^p), got {power!r}")
    return float(power)


def f_at_zero(variant: str, power: float | None = None) -> float:
    """f(0) of ``variant``: 0 for the polynomial ones, 1 for "exp_squared". With E = 0 every score is
    0, so the rows attend to nothing when f(0) = 0 and average v over the allowed keys otherwise."""
    return float(VARIANT_TABLE[variant].f(torch.zeros((), dtype=torch.float64), resolve_power(variant, power)))


def variant_label(variant: str, power=None) -> str:
    """A variant with its parameters as one word: its name, or "power<p>" (e.g. "power4") for "power"."""
    p = resolve_power(variant, power)
    return variant if p is None else f"{variant}{p:g}"


def default_instances() -> dict[str, tuple[str, "float | None"]]:
    """Every variant of the table at its default parameters: label -> (variant, power), e.g.
    "power4" -> ("power", 4.0). (The named weight functions of the HF integration and the
    attention-statistics counterfactuals are made from it.)"""
    out = {}
    for name in VARIANT_TABLE:
        p = resolve_power(name, None)
        out[variant_label(name, p)] = (name, p)
    return out


def parse_variant(spec: str) -> tuple[str, "float | None"]:
    """A variant as written on a command line -> (variant, power): a name of the table, or a variant
    with a parameter and its value run together ("power8")."""
    if spec in VARIANT_TABLE:
        return spec, resolve_power(spec, None)
    for name, entry in VARIANT_TABLE.items():
        if "power" in entry.params and spec.startswith(name):
            try:
                degree = float(spec[len(name):])
            except ValueError:
                continue
            return name, resolve_power(name, degree)
    raise ValueError(f"variant must be one of {VARIANTS}, or power<p> (e.g. power8), got {spec!r}")


def check_variant_names(names, what: str = "variants") -> tuple[str, ...]:
    """`names` (an iterable of variant names, e.g. a backend's declaration) as a tuple, each in the table."""
    names = tuple(names)
    bad = [n for n in names if n not in VARIANT_TABLE]
    if bad:
        raise ValueError(f"{what} must be among {VARIANTS}, got unknown {bad}")
    return names


def rescaled(s: Tensor, keep: Tensor | None, variant: str, power: float | None):
    """(g, log_r) with f(s) = exp(log_r) * g for the row-scaled variants, so that g <= 1 on the keys
    ``keep`` (bool, shape of s) allows and g = 0 on the others; log_r (..., L, 1) is detached (any
    positive row constant gives the same weights; 0 for a row with no key). For the others:
    (f(s), None)."""
    entry = check_variant(variant)
    if not entry.row_scaled:
        return entry.f(s, power), None
    if entry.exp_type:  # masked keys -> exp(-inf) = 0 (never inf * 0)
        x = entry.exponent(s)
        if keep is not None:
            x = x.masked_fill(~keep, float("-inf"))
        m = x.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an empty row: -inf -> 0
        return (x - m).exp(), m
    if entry.name == "power":  # |s|^p / m^p with m the row's largest allowed |s|
        a = s.abs() if keep is None else s.abs().masked_fill(~keep, 0.0)
        m = a.amax(-1, keepdim=True).detach()
        m = torch.where(m > 0, m, torch.ones_like(m))  # a row of zeros: any constant will do
        return (a / m).pow(power), power * m.log()
    raise NotImplementedError(f"variant {variant!r} is row_scaled but has no rescaling rule in variants.rescaled")
