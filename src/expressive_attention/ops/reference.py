"""The reference implementation of expressive attention: this file *is* the definition.

    s_ij = scale * q_i . k_j
    a_ij = f(s_ij) / (eps + sum_l f(s_il))        sum over the keys the mask allows
    out_i = sum_j a_ij v_j

    variant="saturating":  f(s) = s^2 / (1 + s^2)        the paper's EA (default)
    variant="squared":     f(s) = s^2
    variant="power":       f(s) = |s|^p, p = ``power``  (default 4; p = 2 is "squared")
    variant="exp_squared": f(s) = exp(s^2)               (softmax of s^2: even, exponential contrast)

All four are even in s (parallel and antiparallel keys attend, orthogonal ones are suppressed);
they differ in contrast, i.e. how much more a large score weighs than a small one. "power" and
"exp_squared" are computed stably: f is divided by a per-row constant r_i before summing (the
row's largest allowed f), and eps by the same constant, which leaves a_ij exactly unchanged and
keeps |s| in the hundreds (bf16 range) finite. The scale of s matters for "saturating" and
"exp_squared" (pass ``scale`` to sharpen or soften them); "power" is scale-invariant up to eps.

Masked keys are *removed* from the sum (their f is replaced by zero, selected rather than multiplied
so that an inf score of a masked key cannot turn into inf * 0 = NaN), never pushed to a large negative
score: squaring a large negative score would make the masked key the strongest one.
A row with nothing to attend to gives zeros. Scores are computed in float32 (or float64) so that
bf16/fp16 inputs with |s| in the hundreds do not overflow when squared.

Every fast backend is tested against this function. It materialises the (L, S) matrix; use
``backend="auto"`` for real work.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .backend import Backend

if TYPE_CHECKING:
    from .problem import Problem

VARIANTS = ("saturating", "squared", "power", "exp_squared")
DEFAULT_POWER = 4.0  # the degree of variant="power" when `power` is not given


def resolve_power(variant: str, power) -> float | None:
    """The degree p used by ``variant`` (None for variants without one); checks ``power``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "power":
        if power is not None:
            raise ValueError(f"power={power!r} applies to variant='power' only, got variant={variant!r}")
        return None
    if power is None:
        return DEFAULT_POWER
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (1.0 <= power <= 64.0):
        raise ValueError(f"power must be a number in [1, 64] (the degree p of |s|^p), got {power!r}")
    return float(power)


def score_fn(s: Tensor, variant: str, power: float | None = None) -> Tensor:
    """f(s): the un-normalised expressive attention weight of a score (the plain formula; the
    weights use a row-rescaled form of it for "power" and "exp_squared", see `score_weights`)."""
    p = resolve_power(variant, power)
    s2 = s * s
    if variant == "saturating":
        return s2 / (1.0 + s2)
    if variant == "squared":
        return s2
    if variant == "power":
        return s.abs().pow(p)
    return s2.exp()


def f_at_zero(variant: str, power: float | None = None) -> float:
    """f(0) of ``variant``: 0 for the polynomial ones, 1 for "exp_squared". With E = 0 every score is
    0, so the rows attend to nothing when f(0) = 0 and average v over the allowed keys otherwise."""
    return float(score_fn(torch.zeros((), dtype=torch.float64), variant, power))


def row_scaled_f(s: Tensor, keep: Tensor | None, variant: str, power: float | None):
    """(g, log_r) with f(s) = exp(log_r) * g for "power" / "exp_squared", so that g <= 1 on the
    keys ``keep`` (bool, shape of s) allows and g = 0 on the others; log_r (..., L, 1) is detached
    (any positive row constant gives the same weights). For "saturating" / "squared": (f(s), None)."""
    if variant in ("saturating", "squared"):
        return score_fn(s, variant), None
    if variant == "power":
        a = s.abs() if keep is None else s.abs().masked_fill(~keep, 0.0)
        m = a.amax(-1, keepdim=True).detach()
        m = torch.where(m > 0, m, torch.ones_like(m))  # a row of zeros: any constant will do
        return (a / m).pow(power), power * m.log()
    s2 = s * s  # exp_squared; masked keys -> exp(-inf) = 0 (never inf * 0)
    x = s2 if keep is None else s2.masked_fill(~keep, float("-inf"))
    m = x.amax(-1, keepdim=True).detach().clamp_min(0.0)  # an empty row: -inf -> 0
    return (x - m).exp(), m


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and sums are accumulated in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, S, E) -> (B, Hkv * groups, S, E): query head h uses key/value head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_mask(L: int, S: int, device=None) -> Tensor:
    """Top-left aligned causal mask, as in SDPA: query i sees keys j <= i. Shape (L, S)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def expressive_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    variant: str = "saturating",
    eps: float = 1e-6,
    power: float | None = None,
) -> Tensor:
    """Attention weights a (..., L, S) in the compute dtype. Inputs as in `reference_attention`."""
    E, L, S = query.shape[-1], query.shape[-2], key.shape[-2]
    scale = E**-0.5 if scale is None else scale
    ct = compute_dtype(query.dtype)
    s = scale * (query.to(ct) @ key.to(ct).transpose(-2, -1))  # (..., L, S)
    keep = causal_mask(L, S, query.device) if is_causal else None
    if attn_mask is not None:
        keep = attn_mask if keep is None else keep & attn_mask
    return score_weights(s, keep, variant=variant, eps=eps, power=power)


def score_weights(
    s: Tensor, keep: Tensor | None = None, *, variant: str = "saturating", eps: float = 1e-6,
    power: float | None = None,
) -> Tensor:
    """a = f(s) / (eps + sum_keep f(s)) from scores s (..., L, S); ``keep`` bool broadcastable to
    s (True = take part) or None. Masked keys get 0; a row with no key gets zeros."""
    p = resolve_power(variant, power)
    if s.shape[-1] == 0:  # no key (S = 0): no weight (and no row maximum to rescale by)
        return s.new_zeros(s.shape)
    if variant in ("saturating", "squared"):  # today's code path, unchanged
        f = score_fn(s, variant)
        if keep is not None:  # select, never multiply: f * 0 is NaN where a masked key's f is inf
            f = torch.where(keep, f, f.new_zeros(()))
        z = eps + f.sum(-1, keepdim=True)  # (..., L, 1)
    else:
        keep_b = None if keep is None else keep.expand(s.shape)
        g, log_r = row_scaled_f(s, keep_b, variant, p)
        f = g if keep is None else torch.where(keep, g, g.new_zeros(()))
        z = eps * (-log_r).exp() + f.sum(-1, keepdim=True)  # f / r and eps / r
    # eps > 0 keeps z positive; with eps == 0 an empty row would be 0/0: make it 0/1.
    z = torch.where(z > 0, z, torch.ones_like(z))
    return f / z


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    variant: str = "saturating",
    eps: float = 1e-6,
    power: float | None = None,
) -> Tensor:
    """Expressive attention, materialised. query (..., L, E), key (..., S, E), value (..., S, Ev).

    ``attn_mask`` is boolean, broadcastable to (..., L, S), True = take part. Key/value heads must
    already match the query heads (GQA expansion is done by the caller). Returns (..., L, Ev) in
    the dtype of ``query``.
    """
    a = expressive_weights(query, key, attn_mask, is_causal, scale, variant=variant, eps=eps, power=power)
    if dropout_p > 0.0:
        a = torch.nn.functional.dropout(a, p=dropout_p, training=True)
    return (a @ value.to(a.dtype)).to(query.dtype)


def reference_backend(p: "Problem") -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev). Key/value heads are repeated
    in the compute dtype, so that the backward sums the groups' gradients there (in float16 a group's
    share can overflow where the sum does not)."""
    ct = compute_dtype(p.q.dtype)
    return reference_attention(
        p.q, repeat_kv(p.k.to(ct), p.groups), repeat_kv(p.v.to(ct), p.groups), p.mask, p.dropout_p,
        p.is_causal, p.scale, variant=p.variant, eps=p.eps, power=p.power,
    )


# Priority 0: what "auto" runs when nothing faster applies (and for dropout, which only it implements).
BACKEND = Backend("reference", reference_backend, lambda p: None, priority=0, dropout=True,
                  description="materialised definition (the test oracle)")
