"""The public functional API: `expressive_attention` (mirrors SDPA) and `attention` (one switch)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .dispatch import run_backend, try_shortcut
from .problem import check_log_fgate, normalise, with_log_fgate

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
    log_fgate: Tensor | None = None,
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

    ``log_fgate`` (optional; Forgetting Transformer, arXiv 2503.02130): per-step log forget gates,
    a float tensor broadcastable to (..., Hq, L), values <= 0 (e.g. ``F.logsigmoid(w . x_t + b)``),
    for self-attention (L == S). The weights become::

        a_ij = f(s_ij) D_ij / (eps + sum_l f(s_il) D_il),   D_ij = exp(C_i - C_j),  C = cumsum(log_fgate)

    i.e. D_ij = prod_{t=j+1..i} exp(log_fgate_t), a data-dependent decay with distance. Meant for
    causal masks (with a non-causal mask, keys j > i get D_ij >= 1; computed stably all the same).
    Gradients flow to ``log_fgate``. Implemented by the "reference" and "blocked" backends (the
    others refuse it; "auto" picks one of these two).
    Returns (..., Hq, L, Ev) in the dtype of ``query``.
    """
    if log_fgate is None and type(backend) is str and backend == "auto":  # a decode step's fast lane
        out = try_shortcut(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power)
        if out is not None:
            return out
    p = normalise(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power)
    if log_fgate is not None:
        p = with_log_fgate(p, log_fgate, query, key)
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
    log_fgate: Tensor | None = None,
) -> Tensor:
    """One switch between mechanisms: ``kind="ea"`` is `expressive_attention`, ``kind="dpa"`` is
    exactly `torch.nn.functional.scaled_dot_product_attention` (``variant``/``eps``/``backend``/
    ``power`` then do not apply and must stay at their defaults: any other value raises ValueError).

    ``log_fgate`` (see `expressive_attention`) works for both: for ``kind="dpa"`` it is SDPA with
    the float mask log D_ij where a key is allowed and -inf elsewhere (the Forgetting Transformer's
    softmax(s + log D)); ``attn_mask`` (bool or float) and ``is_causal`` are folded into it."""
    if kind == "ea":
        return expressive_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            variant=variant, eps=eps, backend=backend, power=power, log_fgate=log_fgate,
        )
    if kind == "dpa":
        if backend != "auto":
            raise ValueError(f"backend={backend!r} applies to kind='ea' only; kind='dpa' runs SDPA")
        if power is not None:
            raise ValueError(f"power={power!r} applies to kind='ea' (variant='power') only")
        if variant != "saturating":
            raise ValueError(f"variant={variant!r} applies to kind='ea' only; kind='dpa' runs SDPA")
        if type(eps) is not float or eps != 1e-6:  # (1e-6 is the default: a call that passes it is fine)
            raise ValueError(f"eps={eps!r} applies to kind='ea' only; kind='dpa' runs SDPA")
        if log_fgate is not None:
            attn_mask, is_causal = gated_sdpa_mask(query, key, attn_mask, is_causal, log_fgate), False
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def gated_sdpa_mask(query: Tensor, key: Tensor, attn_mask, is_causal: bool, log_fgate: Tensor) -> Tensor:
    """SDPA's float mask for softmax with a forget gate: log D_ij (see `expressive_attention`) where
    key j is allowed (by ``is_causal`` / a bool ``attn_mask``; a float ``attn_mask`` is added), -inf
    elsewhere; shape (..., Hq, L, S), in query's dtype (log D is computed in float32 or float64)."""
    import torch

    from .reference import compute_dtype, log_decay

    check_log_fgate(log_fgate, query, key)
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as in SDPA)")
    ct = compute_dtype(query.dtype)
    bias = log_decay(log_fgate.expand(query.shape[:-1]).to(ct))  # (..., Hq, L, S)
    L, S = query.shape[-2], key.shape[-2]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        bias = bias.masked_fill(~keep, float("-inf"))
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = bias + attn_mask.to(ct)
    return bias.to(query.dtype)
