"""The reference implementation of expressive attention: this file *is* the definition.

    s_ij = scale * q_i . k_j
    a_ij = f(s_ij) / (eps + sum_l f(s_il))        sum over the keys the mask allows
    out_i = sum_j a_ij v_j

    variant="saturating":  f(s) = s^2 / (1 + s^2)        the paper's EA (default)
    variant="squared":     f(s) = s^2
    variant="power":       f(s) = |s|^p, p = ``power``  (default 4; p = 2 is "squared")
    variant="exp_squared": f(s) = exp(s^2)               (softmax of s^2: even, exponential contrast)
    variant="exp_odd":     f(s) = exp(s |s|)             (the odd control of exp_squared; not EA)

The functions themselves live in one table, ops/variants.py (`VARIANT_TABLE`); this file applies them.
The first four are even in s (parallel and antiparallel keys attend, orthogonal ones are suppressed);
they differ in contrast, i.e. how much more a large score weighs than a small one. "exp_odd" has
exp_squared's contrast but is odd in s (a control for a study of what evenness costs or buys). The
row-scaled variants ("power", "exp_squared", "exp_odd") are computed stably: f is divided by a per-row
constant r_i before summing (the row's largest allowed f), and eps by the same constant, which leaves
a_ij exactly unchanged and keeps |s| in the hundreds (bf16 range) finite. (For "exp_odd", whose f can
be tiny, eps is not negligible: a row whose allowed scores are all very negative has sum f < eps and
attends weakly, as the definition says.) The scale of s matters for "saturating" and the exp-type
variants (pass ``scale`` to sharpen or soften them); "power" is scale-invariant up to eps.

Masked keys are *removed* from the sum (their f is replaced by zero, selected rather than multiplied
so that an inf score of a masked key cannot turn into inf * 0 = NaN), never pushed to a large negative
score: squaring a large negative score would make the masked key the strongest one.
A row with nothing to attend to gives zeros. Scores are computed in float32 (or float64) so that
bf16/fp16 inputs with |s| in the hundreds do not overflow when squared.

Every fast backend is tested against this function. It materialises the (L, S) matrix; use
``backend="auto"`` for real work.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .backend import Backend
from .problem import Problem, compute_dtype, repeat_kv
from .variants import DEFAULT_POWER, VARIANT_TABLE, VARIANTS, check_variant, rescaled, resolve_power

__all__ = ["DEFAULT_POWER", "VARIANTS", "check_variant", "compute_dtype", "expressive_weights", "reference_attention",
           "resolve_power", "row_scaled_f", "score_fn", "score_weights"]


def score_fn(s: Tensor, variant: str, power: float | None = None) -> Tensor:
    """f(s): the un-normalised expressive attention weight of a score (the plain formula, from the
    variant table; the weights use a row-rescaled form of it for the row-scaled variants, see
    `score_weights`)."""
    p = resolve_power(variant, power)
    return VARIANT_TABLE[variant].f(s, p)


def row_scaled_f(s: Tensor, keep: Tensor | None, variant: str, power: float | None):
    """(g, log_r) with f(s) = exp(log_r) * g for the row-scaled variants ("power" and the exp-type
    ones), so that g <= 1 on the keys ``keep`` (bool, shape of s) allows and g = 0 on the others;
    log_r (..., L, 1) is detached (any positive row constant gives the same weights). For the others
    ("saturating", "squared"): (f(s), None). See variants.rescaled."""
    return rescaled(s, keep, variant, power)


def eps_over_r(eps: float, log_r: Tensor) -> Tensor:
    """eps / r = eps exp(-log_r) without 0 * inf (eps = 0 with a very negative log_r, possible for
    "exp_odd" where every allowed score is negative); inf (then every weight of the row is 0) where
    eps > 0 dwarfs the row's f by more than the dtype's range."""
    if eps > 0:
        return (math.log(eps) - log_r).exp()
    return torch.zeros_like(log_r)


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
    if not VARIANT_TABLE[variant].row_scaled:  # saturating, squared
        f = score_fn(s, variant, p)
        if keep is not None:  # select, never multiply: f * 0 is NaN where a masked key's f is inf
            f = torch.where(keep, f, f.new_zeros(()))
        z = eps + f.sum(-1, keepdim=True)  # (..., L, 1)
    else:
        keep_b = None if keep is None else keep.expand(s.shape)
        g, log_r = row_scaled_f(s, keep_b, variant, p)
        f = g if keep is None else torch.where(keep, g, g.new_zeros(()))
        z = eps_over_r(eps, log_r) + f.sum(-1, keepdim=True)  # f / r and eps / r
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
    if p.log_fgate is not None:
        return gated_reference_attention(p)
    ct = compute_dtype(p.q.dtype)
    return reference_attention(
        p.q, repeat_kv(p.k.to(ct), p.groups), repeat_kv(p.v.to(ct), p.groups), p.mask, p.dropout_p,
        p.is_causal, p.scale, variant=p.variant, eps=p.eps, power=p.power,
    )


# Priority 0: what "auto" runs when nothing faster applies (and for dropout, which only it implements).
# variants=None: every entry of the variant table (it computes from the table's own functions).
BACKEND = Backend("reference", reference_backend, lambda p: None, priority=0, dropout=True, variants=None,
                  description="materialised definition (the test oracle)", forget_gate=True)


# ---------------------------------------------------------------- the forget gate (issue #21)


def log_decay(log_fgate: Tensor, rows: slice | None = None, keys: slice | None = None) -> Tensor:
    """log D (..., L', S') from per-step log forget gates (..., L): log D_ij = C_i - C_j with
    C = cumsum(log_fgate) (so D_ij = prod_{t=j+1..i} exp(log_fgate_t)); ``rows`` / ``keys`` pick
    the query rows and keys (default: all). Computed in the dtype of ``log_fgate``."""
    c = log_fgate.cumsum(-1)
    cr = c if rows is None else c[..., rows]
    ck = c if keys is None else c[..., keys]
    return cr[..., :, None] - ck[..., None, :]


def gated_score_weights(
    s: Tensor, keep: Tensor | None, log_d: Tensor, *, variant: str = "saturating", eps: float = 1e-6,
    power: float | None = None,
) -> Tensor:
    """a_ij = f(s_ij) D_ij / (eps + sum_keep f(s_il) D_il) from scores s (..., L, S), ``keep`` (bool,
    broadcastable to s, or None) and ``log_d`` = log D (broadcastable to s, finite).

    Computed stably: each row is divided by a constant r_i (and eps with it), which leaves the
    weights exactly unchanged. Variants that are not row-scaled ("saturating", "squared"): D is
    multiplied in as exp(log D - m_i), m_i = max(0, the row's largest allowed log D) (so causal rows,
    where log D <= 0 and the diagonal has log D = 0, use D itself); the row-scaled ones ("power", the
    exp-type ones): log D is added to log f (the variant table's log_f) before the row maximum. Removed keys never meet inf * 0. A row with
    no key gets zeros."""
    p = resolve_power(variant, power)
    entry = VARIANT_TABLE[variant]
    log_d = log_d.expand(s.shape)
    keep_b = None if keep is None else keep.expand(s.shape)
    if not entry.row_scaled:  # bounded polynomial f: D multiplied in, as exp(log D - m_i)
        x = log_d if keep_b is None else log_d.masked_fill(~keep_b, float("-inf"))
        log_r = x.amax(-1, keepdim=True).detach().clamp_min(0.0)  # an empty row: -inf -> 0
        f = entry.f(s, p) * (x - log_r).exp()
        if keep_b is not None:  # select, never multiply: f * 0 is NaN where a removed key's f is inf
            f = torch.where(keep_b, f, f.new_zeros(()))
    else:  # log f + log D (log f = -inf where f = 0, with a finite gradient), less its row maximum
        x = entry.log_f(s, p) + log_d
        if keep_b is not None:
            x = x.masked_fill(~keep_b, float("-inf"))
        log_r = x.amax(-1, keepdim=True).detach()
        log_r = torch.where(torch.isfinite(log_r), log_r, torch.zeros_like(log_r))  # an empty row
        f = (x - log_r).exp()
    z = eps_over_r(eps, log_r) + f.sum(-1, keepdim=True)
    z = torch.where(z > 0, z, torch.ones_like(z))
    return f / z


def gated_reference_attention(p: "Problem") -> Tensor:
    """The reference with a forget gate (``p.log_fgate`` (B, H, L), L == S): materialised."""
    ct = compute_dtype(p.q.dtype)
    q, k, v = p.q, repeat_kv(p.k.to(ct), p.groups), repeat_kv(p.v.to(ct), p.groups)  # (as reference_backend)
    L, S = q.shape[-2], k.shape[-2]
    s = p.scale * (q.to(ct) @ k.to(ct).transpose(-2, -1))
    keep = causal_mask(L, S, q.device) if p.is_causal else None
    if p.mask is not None:
        keep = p.mask if keep is None else keep & p.mask
    a = gated_score_weights(s, keep, log_decay(p.log_fgate.to(ct)), variant=p.variant, eps=p.eps, power=p.power)
    if p.dropout_p > 0.0:
        a = torch.nn.functional.dropout(a, p=p.dropout_p, training=True)
    return (a @ v.to(ct)).to(q.dtype)
