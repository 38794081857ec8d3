"""Memory-lean blocked expressive attention in plain PyTorch (any device, any float dtype).

Queries are processed in row blocks, so no (L, S) matrix is ever held: the forward keeps one
(block, S) tile at a time and saves only the output and the per-row normaliser Z for backward,
which recomputes each tile. Causal calls skip the keys above the diagonal of each block.

The backward is flash-attention shaped. With a_ij = f_ij / Z_i and D_i = dO_i . O_i:

    dF_ij = (dO_i . v_j - D_i) / Z_i,   dS = f'(S) * dF,   dq = scale dS k,   dk = scale dS^T q,
    dv = a^T dO.

For the row-scaled variants ("power" and the exp-type ones: "exp_squared", "exp_odd"; see
ops/variants.py) each tile row is divided by the row's largest allowed f
(a tile holds every key of its rows), and eps by the same constant; backward recomputes the
same constant, so Z and f' are in the same units and the formulas above hold unchanged.

GQA is native: query heads are viewed as (Hkv, G) groups against one key/value head, and the G
heads of a group are stacked into one batched matmul against their key/value head.

The arithmetic of one block of rows lives in two functions of tensors, `_forward_tile` and
`_backward_tile`. They run as they are (the plain path: in-place element-wise ops, the causal mask
applied only to the keys past each row block's first row), or, for big calls where torch.compile
works, compiled by inductor (tile_compile.py; `EA_COMPILE`), which fuses the element-wise part
between the matmuls into one loop. See docs/blocked.md for when each path runs and what it costs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._functorch import fold_vmap
from .backend import Backend
from .blocked_gate import gated_blocked_attention
from .reference import compute_dtype, eps_over_r, row_scaled_f
from .tile_compile import run_tile, use_compiled
from .variants import EXP_VARIANTS, VARIANT_TABLE

if TYPE_CHECKING:
    from .problem import Problem

# The variants this backend implements: the two plain ones and "power" by their own code below, every
# exp-type variant of the table from its exponent x(s) and x'(s) (f = exp(x), f' = x' f).
PLAIN_VARIANTS = ("saturating", "squared")  # f and f' in place (`_f_and_grad`)
VARIANTS = (*PLAIN_VARIANTS, "power", *EXP_VARIANTS)
# Variants whose tile functions are compiled (see tile_compile.py); the row-scaled ones run plain.
COMPILED_VARIANTS = PLAIN_VARIANTS
# Elements per score tile (B * H * rows * S); 2**21 float32 values = 8 MiB.
TILE_ELEMENTS = 2**21


def _block_rows(n_bh: int, L: int, S: int) -> int:
    rows = TILE_ELEMENTS // max(1, n_bh * max(S, 1))
    rows = max(16, rows - rows % 16)
    return min(L, rows)


def _f_and_grad(s: Tensor, variant: str, need_grad: bool):
    """In place on the score tile `s`: returns f(s) (reusing s's storage) and, if need_grad, f'(s)."""
    if variant == "squared":
        fprime = 2.0 * s if need_grad else None
        return s.square_(), fprime
    # saturating: f = s^2 r with r = 1 / (1 + s^2). (Not 1 - r: that cancels to 0 in float32 for
    # |s| < ~1e-3, the typical score of a freshly initialised model.)
    if not need_grad:
        s2 = s.square_()
        return s2.div_(s2 + 1.0), None
    s2 = s.square()
    r = (s2 + 1.0).reciprocal_()
    return s2.mul_(r), s.mul_(r).mul_(r).mul_(2.0)  # f' = 2 s r^2


def _views(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: int):
    """q as (B, Hkv, G, L, E), k and v as they are (B, Hkv, S, *), mask (Bm, Hm', G', Lm, S) or None."""
    B, H, L, E = q.shape
    Hkv = k.shape[1]
    q5 = q.view(B, Hkv, groups, L, E)
    m5 = None
    if mask is not None:
        m5 = mask.reshape(mask.shape[0], Hkv, groups, *mask.shape[2:]) if mask.shape[1] == H else mask[:, :, None]
    return q5, k, v, m5


def _above_diagonal(rows: int, keys: int, device) -> Tensor:
    """(rows, keys) bool, True where key j >= row i: what causal attention removes from the keys
    after the first row's own key."""
    return torch.arange(keys, device=device) >= torch.arange(rows, device=device)[:, None]


def _weights(s: Tensor, drop: Tensor | None, diag: int | None, variant: str, power, need_grad: bool):
    """(f, f', eps_factor) of the score tile `s` (rows, S'), in place, with removed keys set to 0:
    those where `drop` (bool, broadcastable to s) is True and, when `diag` is not None (causal),
    those past the diagonal: row i sees keys j <= diag + i. For the row-scaled variants f and f'
    are divided by a per-row constant r (see reference.row_scaled_f) and log_r (rows, 1) is returned
    (eps / r goes into the normaliser); else it is None."""
    rows, keys = s.shape[-2], s.shape[-1]
    compiling = torch.compiler.is_compiling()  # traced by tile_compile: masks become one fused select
    removed = None
    if compiling or variant not in PLAIN_VARIANTS:  # the removed keys of the whole tile
        removed = drop
        if diag is not None:
            causal = torch.arange(keys, device=s.device) > torch.arange(rows, device=s.device)[:, None] + diag
            removed = causal if removed is None else removed | causal
    if variant in PLAIN_VARIANTS:
        f, fp = _f_and_grad(s, variant, need_grad)
        log_r = None
    else:
        f, fp, log_r = _scaled_f_and_grad(s, None if removed is None else ~removed, variant, power, need_grad)
    if removed is not None:
        return (*(None if t is None else torch.where(removed, 0.0, t) for t in (f, fp)), log_r)
    for t in (f, fp):  # the plain path: in place, and only the diagonal part of a causal tile
        if t is not None:
            if drop is not None:
                t.masked_fill_(drop, 0.0)
            if diag is not None and diag < keys - 1:
                t[..., diag + 1:].masked_fill_(_above_diagonal(rows, keys - diag - 1, s.device), 0.0)
    return f, fp, log_r


def _scaled_f_and_grad(s: Tensor, keep: Tensor | None, variant: str, power: float, need_grad: bool):
    """g = f / r and g' = f' / r for the row-rescaled variants, and log r (rows, 1)."""
    keep_b = None if keep is None else keep.expand(s.shape)
    g, log_r = row_scaled_f(s, keep_b, variant, power)
    fp = None
    if need_grad:
        entry = VARIANT_TABLE[variant]
        if entry.exp_type:  # d/ds exp(x(s) - M) = x'(s) g
            fp = entry.dexp(s).mul_(g)
        else:  # power: d/ds (|s| / m)^p = p g / s  (0 where s = 0 since p >= 1)
            m = (log_r / power).exp()
            fp = (s.abs() / m).pow(power - 1.0).mul_(torch.sign(s)).div_(m).mul_(power)
    return g, fp, log_r


def _scores(q: Tensor, k: Tensor, scale: float):
    """q (B, Hkv, G, r, E), k (B, Hkv, S', E) -> (q as (B, Hkv, G r, E), s (B, Hkv, G, r, S')): one plain
    batched matmul per key head, with the G query heads of its group stacked (no broadcast copies of k)."""
    B, Hkv, G, r, E = q.shape
    q4 = q.reshape(B, Hkv, G * r, E)
    return q4, torch.matmul(q4, k.transpose(-1, -2)).mul_(scale).view(B, Hkv, G, r, -1)


def _forward_tile(q, k, v, drop, diag, scale, eps, variant, power):
    """One block of query rows against keys [0, S'): q (B, Hkv, G, r, E), k/v (B, Hkv, S', *),
    drop / diag as in `_weights` -> (out (B, Hkv, G, r, Ev), z (B, Hkv, G, r, 1) the row normalisers)."""
    _, s = _scores(q, k, scale)  # (B, Hkv, G, r, S')
    f, _, log_r = _weights(s, drop, diag, variant, power, need_grad=False)
    z = f.sum(-1, keepdim=True)
    z = z.add_(eps) if log_r is None else z.add_(eps_over_r(eps, log_r))
    z = torch.where(z > 0, z, torch.ones_like(z))
    out = torch.matmul(f.flatten(2, 3), v).view(*z.shape[:-1], v.shape[-1])
    return out.div_(z), z


def _backward_tile(q, k, v, do, o, z, drop, diag, scale, variant, power):
    """The gradients from one block of rows (see the module docstring): q, k, v, drop, diag as in
    `_forward_tile`, do / o / z the rows' (B, Hkv, G, r, *) slices -> (dq (B, Hkv, G, r, E),
    dk (B, Hkv, S', E), dv (B, Hkv, S', Ev)) (dk and dv summed over the G query heads of a group)."""
    q4, s = _scores(q, k, scale)
    f, fp, _ = _weights(s, drop, diag, variant, power, need_grad=True)
    do4 = do.flatten(2, 3)  # (B, Hkv, G r, Ev)
    a = f.div_(z).flatten(2, 3)  # the attention weights of the tile, (B, Hkv, G r, S')
    dv = torch.matmul(a.transpose(-1, -2), do4)
    d = (do * o).sum(-1, keepdim=True)
    dp = torch.matmul(do4, v.transpose(-1, -2)).view(s.shape)
    ds = dp.sub_(d).mul_(fp).mul_(scale / z).flatten(2, 3)
    return torch.matmul(ds, k).view(q.shape), torch.matmul(ds.transpose(-1, -2), q4), dv


def _row_blocks(n_bh: int, L: int, S: int, is_causal: bool):
    """(i0, i1, send, diag) per block of query rows [i0, i1) that sees keys [0, send); causal blocks
    stop at the diagonal (diag = i0: row i0 + i sees keys j <= diag + i; None when not causal), and
    blocks with no key to see are skipped (their rows stay zero)."""
    rows = _block_rows(n_bh, L, S)
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        send = min(S, i1) if is_causal else S
        if send > 0:
            yield i0, i1, send, (i0 if is_causal else None)


def _drop(m5: Tensor | None, i0: int, i1: int, send: int) -> Tensor | None:
    """The masked-out keys of rows [i0, i1) x keys [0, send) (broadcastable to the tile), or None."""
    if m5 is None:
        return None
    return ~(m5[..., :send] if m5.shape[-2] == 1 else m5[..., i0:i1, :send])


def _compute_views(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: int):
    """The compute dtype and the 5-D views (`_views`) of q, k, v cast to it."""
    ct = compute_dtype(q.dtype)
    return ct, _views(q.to(ct), k.to(ct), v.to(ct), mask, groups)


class _BlockedEA(torch.autograd.Function):
    """(q, k, v, mask, ...) -> (out (B, H, L, Ev), z (B, Hkv, G, L, 1) the row normalisers).
    `compiled`: run the tile functions through torch.compile (decided by `blocked_attention`)."""

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale, variant, eps, groups, power=None, compiled=False):
        B, H, L, E = q.shape
        Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
        ct, (q5, kc, vc, m5) = _compute_views(q, k, v, mask, groups)
        out = torch.zeros(B, Hkv, groups, L, Ev, dtype=ct, device=q.device)
        z = torch.ones(B, Hkv, groups, L, 1, dtype=ct, device=q.device)
        for i0, i1, send, diag in _row_blocks(B * H, L, S, is_causal):
            out[..., i0:i1, :], z[..., i0:i1, :] = run_tile(
                _forward_tile, compiled, q5[..., i0:i1, :], kc[..., :send, :], vc[..., :send, :],
                _drop(m5, i0, i1, send), diag, scale, eps, variant, power)
        return out.view(B, H, L, Ev).to(q.dtype), z

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale, variant, eps, groups, power, compiled = inputs
        out, z = output
        ctx.mark_non_differentiable(z)
        ctx.save_for_backward(q, k, v, out, z, mask)
        ctx.args = (is_causal, scale, variant, eps, groups, power, compiled)

    @staticmethod
    def vmap(info, in_dims, *args):
        return fold_vmap(_BlockedEA.apply, info, in_dims, args, n_tensors=4, broadcast=(3,))

    @staticmethod
    def backward(ctx, dout, _dz):
        q, k, v, out, z, mask = ctx.saved_tensors
        dq, dk, dv = _BlockedBackward.apply(dout, q, k, v, out, z, mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None


class _BlockedBackward(torch.autograd.Function):
    """The backward as a function of its own, so torch.func can vmap it (per-sample gradients)."""

    @staticmethod
    def forward(dout, q, k, v, out, z, mask, is_causal, scale, variant, eps, groups, power=None, compiled=False):
        return _backward(dout, q, k, v, out, z, mask, is_causal, scale, variant, groups, power, compiled)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, *args):
        return fold_vmap(_BlockedBackward.apply, info, in_dims, args, n_tensors=7, broadcast=(6,))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the blocked backend's backward is not differentiable (no double backward); "
                           "use backend='reference' for higher-order gradients")


def _backward(dout, q, k, v, out, z, mask, is_causal, scale, variant, groups, power=None, compiled=False):
    """(dq, dk, dv) of `_BlockedEA`; see the module docstring."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    ct, (q5, kc, vc, m5) = _compute_views(q, k, v, mask, groups)
    do5 = dout.to(ct).reshape(B, Hkv, groups, L, Ev)
    o5 = out.to(ct).view(B, Hkv, groups, L, Ev)
    dq = torch.zeros(B, Hkv, groups, L, E, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, S, E, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, S, Ev, dtype=ct, device=q.device)
    for i0, i1, send, diag in _row_blocks(B * H, L, S, is_causal):
        dq_b, dk_b, dv_b = run_tile(
            _backward_tile, compiled, q5[..., i0:i1, :], kc[..., :send, :], vc[..., :send, :],
            do5[..., i0:i1, :], o5[..., i0:i1, :], z[..., i0:i1, :], _drop(m5, i0, i1, send), diag, scale,
            variant, power)
        dq[..., i0:i1, :] = dq_b
        dk[:, :, :send] += dk_b
        dv[:, :, :send] += dv_b
    dq = dq.view(B, H, L, E).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def blocked_attention(p: "Problem") -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev)."""
    B, H, L, _ = p.q.shape
    if p.log_fgate is not None:  # the forget gate: blocked_gate.py, in the same row blocks
        blocks = [(i0, i1, send) for i0, i1, send, _ in _row_blocks(B * H, L, p.k.shape[-2], p.is_causal)]
        return gated_blocked_attention(p, blocks)
    compiled = p.variant in COMPILED_VARIANTS and use_compiled(B * H * L * p.k.shape[-2], p.q, p.k, p.v)
    return _BlockedEA.apply(p.q, p.k, p.v, p.mask, p.is_causal, p.scale, p.variant, p.eps, p.groups, p.power,
                            compiled)[0]


def _not_tiny(p: "Problem") -> bool:
    """Below 64 x 64 scores the reference's few big ops beat the block loop's Python overhead."""
    return p.q.shape[-2] * p.k.shape[-2] > 64 * 64


BACKEND = Backend("blocked", blocked_attention, lambda p: None, priority=10, prefer=_not_tiny, variants=VARIANTS,
                  description="query-blocked PyTorch, O(block x S) memory, recomputing backward",
                  forget_gate=True)
