"""The public functional API: `expressive_attention` (mirrors SDPA) and `attention` (one switch)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .dispatch import run_backend, try_shortcut
from .problem import normalise

KINDS = ("ea", "dpa")  # the one switch: expressive attention or dot-product attention (SDPA)


def expressive_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    variant: str = "saturating",
    eps: float = 1e-6,
    backend: str = "auto",
    power: float | None = None,
) -> Tensor:
    """Expressive attention (Gros, arXiv 2407.18601), a drop-in for `F.scaled_dot_product_attention`.

    Computes, with ``s = scale * q . k`` and the sum over the keys the mask allows::

        out_i = sum_j a_ij v_j,   a_ij = f(s_ij) / (eps + sum_l f(s_il))
        f(s) = s^2 / (1 + s^2)  (variant="saturating", default)   or   s^2  (variant="squared")
        f(s) = |s|^p  (variant="power", p = ``power``, default 4)   or   exp(s^2)  (variant="exp_squared")
        f(s) = exp(s |s|)  (variant="exp_odd": the odd control of exp_squared, not EA in the paper's sense)

    (the variants are the table in ops/variants.py; an unknown name raises ValueError listing them)

    Args mirror SDPA: query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev);
    ``attn_mask`` boolean broadcastable to (..., L, S), True = take part (a float mask raises
    TypeError: an additive bias has no meaning once scores are squared); ``is_causal`` masks
    keys j > i, aligned top-left when L != S, like SDPA; ``scale`` defaults to 1/sqrt(E);
    ``dropout_p`` drops attention weights (always applied when > 0, as in SDPA);
    ``enable_gqa`` lets Hkv divide Hq. Rows with no key to attend to return zeros.

    ``backend``: "auto" (fastest supported), "reference", "blocked", or any registered backend
    (a backend that does not implement ``variant`` says so; "auto" then picks one that does).
    Returns (..., Hq, L, Ev) in the dtype of ``query``.
    """
    if type(backend) is str and backend == "auto":  # a decode step's fast lane (ops/dispatch.try_shortcut)
        out = try_shortcut(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power)
        if out is not None:
            return out
    p = normalise(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    out = run_backend(backend, p)
    return out if out.dim() == len(p.out_shape) else out.reshape(p.out_shape)  # 4-D in: already its shape


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    kind: str = "ea",
    variant: str = "saturating",
    eps: float = 1e-6,
    backend: str = "auto",
    power: float | None = None,
) -> Tensor:
    """One switch between mechanisms: ``kind="ea"`` is `expressive_attention`, ``kind="dpa"`` is
    exactly `torch.nn.functional.scaled_dot_product_attention` (``variant``/``eps``/``backend``/
    ``power`` then do not apply and must stay at their defaults)."""
    if kind == "ea":
        return expressive_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            variant=variant, eps=eps, backend=backend, power=power,
        )
    if kind == "dpa":
        if backend != "auto":
            raise ValueError(f"backend={backend!r} applies to kind='ea' only; kind='dpa' runs SDPA")
        if power is not None:
            raise ValueError(f"power={power!r} applies to kind='ea' (variant='power') only")
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
