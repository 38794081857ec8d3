"""The checked attention call every backend receives: `Problem`, built by `normalise`.

Public entry points accept SDPA's layouts: query (..., Hq, L, E), key (..., Hkv, S, E),
value (..., Hkv, S, Ev). `normalise` = tensor checks (`check_qkv`), scalar checks (`check_options`),
mask checks (`check_mask`), then reshaping to 4-D (`to_4d`, `mask_to_4d`). Backends only ever see
the 4-D `Problem`; a third-party backend (see dispatch.register_backend) takes it too.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .variants import VARIANTS, check_variant, f_at_zero, resolve_power

__all__ = ["Problem", "VARIANTS", "check_mask", "check_options", "check_qkv", "check_tensor", "check_variant",
           "compute_dtype", "mask_to_4d", "normalise", "repeat_kv", "to_4d"]
__all__ += ["check_log_fgate", "with_log_fgate"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and sums are accumulated in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, S, E) -> (B, Hkv * groups, S, E): query head h uses key/value head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@dataclass(slots=True)
class Problem:
    """A checked attention call in 4-D form.

    q (B, H, L, E); k (B, Hkv, S, E); v (B, Hkv, S, Ev) with H % Hkv == 0;
    mask None or bool (Bm, Hm, Lm, S) with Bm in {1, B}, Hm in {1, H}, Lm in {1, L}.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    is_causal: bool
    scale: float
    variant: str
    eps: float
    dropout_p: float
    out_shape: tuple[int, ...]
    power: float | None = None  # the degree of variant="power" (resolved), else None
    memo: dict | None = None  # what a backend works out once per call (e.g. the linear form's mask check)
    log_fgate: Tensor | None = None  # (B, H, L) per-step log forget gates (L == S), or None (see with_log_fgate)

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def is_empty(self) -> bool:
        """True when the output is empty or all zeros, and so are the gradients: some dim of B, H, L,
        S, Ev is 0, or E = 0 (every score is 0) with a variant whose f(0) = 0. (With f(0) != 0, as for
        "exp_squared", E = 0 gives every allowed key the same weight: the output averages v.)"""
        if 0 in self.q.shape[:-1] or 0 in self.k.shape[:-1] or self.v.shape[-1] == 0:
            return True
        return self.q.shape[-1] == 0 and f_at_zero(self.variant, self.power) == 0.0

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad
                                            or (self.log_fgate is not None and self.log_fgate.requires_grad))


def check_tensor(name: str, t) -> None:
    """`t` is a floating-point tensor with at least 2 dims."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")


def check_qkv(query, key, value, enable_gqa: bool) -> None:
    """query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev): types, dims, dtype, device;
    Hkv == Hq, or Hkv divides Hq with enable_gqa."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            "query, key and value must have the same number of dims, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError("query, key and value must be on the same device")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must have the same embedding size E, got {query.shape[-1]} and {key.shape[-1]}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same length S, got {key.shape[-2]} and {value.shape[-2]}"
        )
    if key.shape[:-2] != value.shape[:-2]:
        raise ValueError(
            f"key and value must have the same leading dims, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if enable_gqa:
        if query.dim() < 3:
            raise ValueError("enable_gqa needs a heads dim: query must be (..., H, L, E)")
        if query.shape[:-3] != key.shape[:-3]:
            raise ValueError(
                f"query and key batch dims differ: {tuple(query.shape[:-3])} vs {tuple(key.shape[:-3])}"
            )
        hq, hkv = query.shape[-3], key.shape[-3]
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(
                f"enable_gqa: the number of query heads ({hq}) must be a multiple of the number "
                f"of key/value heads ({hkv})"
            )
    elif query.shape[:-2] != key.shape[:-2]:
        raise ValueError(
            f"query and key leading (batch, heads) dims differ: {tuple(query.shape[:-2])} vs "
            f"{tuple(key.shape[:-2])} (pass enable_gqa=True for grouped-query attention)"
        )


def _is_real(x) -> bool:
    return type(x) is float or isinstance(x, numbers.Real)  # the abc check alone costs ~0.7 us


def check_finite_float(name: str, x, what: str = "") -> None:
    """`x` is a finite int or float (not a bool), else a ValueError naming `name` (``what``: a note after
    "a finite float", e.g. " (the initial log gain)")."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite float{what}, got {x!r}")


def check_options(dropout_p, scale, variant, eps) -> None:
    """The scalar arguments: dropout_p in [0, 1), scale None or finite, eps finite >= 0, a known variant."""
    if not _is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (not _is_real(scale) or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    if not _is_real(eps) or not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    check_variant(variant)


def check_mask(attn_mask, is_causal: bool, query: Tensor, S: int) -> None:
    """attn_mask: None, or a boolean tensor on query's device broadcastable to (..., L, S); not with is_causal."""
    if attn_mask is None:
        return
    if is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as in SDPA)")
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a boolean torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            f"attn_mask must be a boolean tensor (True = take part), got dtype {attn_mask.dtype}. "
            "An additive float mask has no meaning for expressive attention: the score is "
            "squared, so a large negative bias would make a masked key the strongest one. "
            "Convert it with `attn_mask = float_mask == 0` or build a boolean mask."
        )
    if attn_mask.device != query.device:
        raise ValueError("attn_mask must be on the same device as query")
    check_broadcastable("attn_mask", attn_mask, (*query.shape[:-1], S), "(..., L, S)")


def check_broadcastable(name: str, t: Tensor, target: tuple[int, ...], what: str) -> None:
    """`t` broadcasts to exactly `target` (described as `what` in the error), else a ValueError naming `name`."""
    try:
        if torch.broadcast_shapes(t.shape, target) != torch.Size(target):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} is not broadcastable to {what} = {target}") from None


# Scales up to this size skip the overflow check below (which reads q and k once).
SCALE_CHECKED_ABOVE = 1e4


def check_scores_fit(q: Tensor, k: Tensor, scale: float) -> None:
    """A huge `scale` makes s^2 (and its row sums) overflow the compute dtype, and every backend
    would return NaN. Bound |s_ij| <= |scale| max_i |q_i| max_j |k_j| (Cauchy-Schwarz) and refuse."""
    if abs(scale) <= SCALE_CHECKED_ABOVE or q.numel() == 0 or k.numel() == 0:
        return
    ct = compute_dtype(q.dtype)
    qn = torch.linalg.vector_norm(q.detach().to(ct), dim=-1).max().item()
    kn = torch.linalg.vector_norm(k.detach().to(ct), dim=-1).max().item()
    bound = abs(scale) * qn * kn
    limit = math.sqrt(torch.finfo(ct).max / max(1, k.shape[-2]))
    if not bound < limit:
        raise ValueError(
            f"scale={scale!r} is too large for these inputs: scores |scale * q.k| can reach {bound:.3g}, "
            f"and their squares (summed over {k.shape[-2]} keys) overflow {ct} (largest safe |s|: "
            f"{limit:.3g}), which would turn every output into NaN. Use a smaller scale (the default "
            "is 1/sqrt(E))."
        )


def to_4d(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(..., H, L, E) -> (B, H, L, E) views, B the product of the leading dims (1 when there are none)."""
    if query.dim() == 4:  # already (B, H, L, E): no reshape (a few us each, a decode step's budget)
        return query, key, value
    if query.dim() == 2:
        return query[None, None], key[None, None], value[None, None]
    if query.dim() == 3:
        return query[None], key[None], value[None]
    n = math.prod(query.shape[:-3])  # explicit: with an empty dim, reshape(-1, ...) would be ambiguous
    return (query.reshape(n, *query.shape[-3:]), key.reshape(n, *key.shape[-3:]),
            value.reshape(n, *value.shape[-3:]))


def mask_to_4d(attn_mask: Tensor | None, query: Tensor, S: int) -> Tensor | None:
    """A checked mask -> bool (Bm, Hm, Lm, S) with Bm in {1, B}, Hm in {1, H}, Lm in {1, L} (expanded view)."""
    if attn_mask is None:
        return None
    m = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[None]
    elif m.dim() > 4:
        if all(d == 1 for d in m.shape[:-3]):
            m = m.reshape(1, *m.shape[-3:])
        else:
            m = m.expand(*query.shape[:-3], *m.shape[-3:]).reshape(math.prod(query.shape[:-3]), *m.shape[-3:])
    return m.expand(*m.shape[:-1], S)


def _resolved_scale(scale, E: int) -> float:
    # E == 0: every score is 0 whatever the scale (see Problem.is_empty); 1.0 avoids 0**-0.5
    return float((E**-0.5 if E > 0 else 1.0) if scale is None else scale)


def normalise(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power=None
) -> Problem:
    """Validate the arguments of `expressive_attention` and bring them into `Problem` form."""
    p = _normalise_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power)
    if p is not None:
        return p
    check_qkv(query, key, value, enable_gqa)
    check_options(dropout_p, scale, variant, eps)
    power = resolve_power(variant, power)
    S, E = key.shape[-2], query.shape[-1]
    check_mask(attn_mask, is_causal, query, S)
    q, k, v = to_4d(query, key, value)
    if scale is not None:
        check_scores_fit(q, k, float(scale))
    return Problem(
        q=q,
        k=k,
        v=v,
        mask=mask_to_4d(attn_mask, query, S),
        is_causal=bool(is_causal),
        scale=_resolved_scale(scale, E),
        variant=variant,
        eps=float(eps),
        dropout_p=float(dropout_p),
        out_shape=(*query.shape[:-1], value.shape[-1]),
        power=power,
    )


def _normalise_4d(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power
) -> Problem | None:
    """`normalise` for the common call (a decode step pays for every tensor attribute it reads):
    4-D q/k/v of one floating dtype and device with matching shapes, and no mask or a 4-D boolean
    mask (Bm, Hm, Lm, S) on that device. Returns the same `Problem` as the general path, or None for
    any other call (including every invalid one, which the general path then rejects with its
    message); the scalar arguments go through the same checks as there."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
            and query.dim() == 4 and key.dim() == 4 and value.dim() == 4):
        return None
    dtype, device = query.dtype, query.device
    if not (key.dtype == dtype and value.dtype == dtype and query.is_floating_point()
            and key.device == device and value.device == device):
        return None
    B, H, L, E = query.shape
    Bk, Hk, S, Ek = key.shape
    Bv, Hv, Sv, Ev = value.shape
    if not (Bk == B and Bv == B and Hv == Hk and Sv == S and Ek == E
            and ((Hk > 0 and H % Hk == 0) if enable_gqa else Hk == H)):
        return None
    if attn_mask is not None:
        if is_causal or not (isinstance(attn_mask, Tensor) and attn_mask.dim() == 4
                             and attn_mask.dtype == torch.bool and attn_mask.device == device):
            return None
        Bm, Hm, Lm, Sm = attn_mask.shape
        if not (Sm == S and Bm in (1, B) and Hm in (1, H) and Lm in (1, L)):
            return None
    check_options(dropout_p, scale, variant, eps)
    power = resolve_power(variant, power)
    if scale is not None:
        check_scores_fit(query, key, float(scale))
    return Problem(q=query, k=key, v=value, mask=attn_mask, is_causal=bool(is_causal), scale=_resolved_scale(scale, E),
                   variant=variant, eps=float(eps), dropout_p=float(dropout_p), out_shape=(B, H, L, Ev), power=power)


def check_log_fgate(log_fgate, query: Tensor, key: Tensor) -> None:
    """``log_fgate``: a floating-point tensor on query's device, broadcastable to query's (..., Hq, L)
    (per-step log forget gates), for self-attention: L == S."""
    if not isinstance(log_fgate, Tensor):
        raise TypeError(f"log_fgate must be a torch.Tensor or None, got {type(log_fgate).__name__}")
    if not log_fgate.is_floating_point():
        raise TypeError(f"log_fgate must be a floating-point tensor, got dtype {log_fgate.dtype}")
    if log_fgate.device != query.device:
        raise ValueError("log_fgate must be on the same device as query")
    L, S = query.shape[-2], key.shape[-2]
    if L != S:
        raise ValueError(f"log_fgate is for self-attention: it needs as many queries as keys, got L={L}, S={S}")
    check_broadcastable("log_fgate", log_fgate, tuple(query.shape[:-1]), "query's (..., Hq, L)")


def log_fgate_to_3d(log_fgate: Tensor, query: Tensor) -> Tensor:
    """A checked ``log_fgate`` -> (B, H, L), B and H as `to_4d` makes them for ``query``."""
    g = log_fgate.expand(query.shape[:-1])
    if g.dim() == 1:
        return g[None, None]
    if g.dim() == 2:
        return g[None]
    if g.dim() == 3:
        return g
    return g.reshape(math.prod(g.shape[:-2]), *g.shape[-2:])


def with_log_fgate(p: Problem, log_fgate, query: Tensor, key: Tensor) -> Problem:
    """`p` with its forget gate (checked, 3-D); ``log_fgate`` None leaves `p` as it is."""
    if log_fgate is None:
        return p
    check_log_fgate(log_fgate, query, key)
    p.log_fgate = log_fgate_to_3d(log_fgate, query)
    return p
