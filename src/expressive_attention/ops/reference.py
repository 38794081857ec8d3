"""The reference implementation of expressive attention: this file *is* the definition.

    s_ij = scale * q_i . k_j
    a_ij = f(s_ij) / (eps + sum_l f(s_il))        sum over the keys the mask allows
    out_i = sum_j a_ij v_j

    variant="saturating":  f(s) = s^2 / (1 + s^2)
    variant="squared":     f(s) = s^2

Masked keys are *removed* from the sum (multiplied by zero after f), never pushed to a large
negative score: squaring a large negative score would make the masked key the strongest one.
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

VARIANTS = ("saturating", "squared")


def score_fn(s: Tensor, variant: str) -> Tensor:
    """f(s): the un-normalised expressive attention weight of a score."""
    s2 = s * s
    if variant == "saturating":
        return s2 / (1.0 + s2)
    if variant == "squared":
        return s2
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


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
) -> Tensor:
    """Attention weights a (..., L, S) in the compute dtype. Inputs as in `reference_attention`."""
    E, L, S = query.shape[-1], query.shape[-2], key.shape[-2]
    scale = E**-0.5 if scale is None else scale
    ct = compute_dtype(query.dtype)
    s = scale * (query.to(ct) @ key.to(ct).transpose(-2, -1))  # (..., L, S)
    f = score_fn(s, variant)
    if is_causal:
        f = f * causal_mask(L, S, query.device)
    if attn_mask is not None:
        f = f * attn_mask
    z = eps + f.sum(-1, keepdim=True)  # (..., L, 1)
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
) -> Tensor:
    """Expressive attention, materialised. query (..., L, E), key (..., S, E), value (..., S, Ev).

    ``attn_mask`` is boolean, broadcastable to (..., L, S), True = take part. Key/value heads must
    already match the query heads (GQA expansion is done by the caller). Returns (..., L, Ev) in
    the dtype of ``query``.
    """
    a = expressive_weights(query, key, attn_mask, is_causal, scale, variant=variant, eps=eps)
    if dropout_p > 0.0:
        a = torch.nn.functional.dropout(a, p=dropout_p, training=True)
    return (a @ value.to(a.dtype)).to(query.dtype)


def reference_backend(p: "Problem") -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev)."""
    return reference_attention(
        p.q, repeat_kv(p.k, p.groups), repeat_kv(p.v, p.groups), p.mask, p.dropout_p,
        p.is_causal, p.scale, variant=p.variant, eps=p.eps,
    )


# Priority 0: what "auto" runs when nothing faster applies (and for dropout, which only it implements).
BACKEND = Backend("reference", reference_backend, lambda p: None, priority=0, dropout=True,
                  description="materialised definition (the test oracle)")
