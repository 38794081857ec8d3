"""Memory-lean blocked expressive attention in plain PyTorch (any device, any float dtype).

Queries are processed in row blocks, so no (L, S) matrix is ever held: the forward keeps one
(block, S) tile at a time and saves only the output and the per-row normaliser Z for backward,
which recomputes each tile. Causal calls skip the keys above the diagonal of each block.

The backward is flash-attention shaped. With a_ij = f_ij / Z_i and D_i = dO_i . O_i:

    dF_ij = (dO_i . v_j - D_i) / Z_i,   dS = f'(S) * dF,   dq = scale dS k,   dk = scale dS^T q,
    dv = a^T dO.

For variant="power" / "exp_squared" each tile row is divided by the row's largest allowed f
(a tile holds every key of its rows), and eps by the same constant; backward recomputes the
same constant, so Z and f' are in the same units and the formulas above hold unchanged.

GQA is native: query heads are viewed as (Hkv, G) groups against one key/value head.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._functorch import fold_vmap
from .backend import Backend
from .reference import compute_dtype, row_scaled_f

if TYPE_CHECKING:
    from .problem import Problem

# Elements per score tile (B * H * rows * S); 2**21 float32 values = 8 MiB.
TILE_ELEMENTS = 2**21


def _block_rows(n_bh: int, L: int, S: int) -> int:
    rows = TILE_ELEMENTS // max(1, n_bh * max(S, 1))
    rows = max(16, rows - rows % 16)
    return min(L, rows)


def _f_and_grad(s: Tensor, variant: str, need_grad: bool):
    """In place on the score tile `s`: returns f(s) (reusing s's storage) and optionally f'(s)."""
    if variant == "squared":
        fprime = 2.0 * s if need_grad else None
        return s.square_(), fprime
    # saturating: f = s^2 * r with r = 1 / (1 + s^2),  f' = 2 s r^2. (Not 1 - r: that cancels to 0
    # in float32 for |s| < ~1e-3, the typical score of a freshly initialised model.)
    s2 = s.square()
    r = (s2 + 1.0).reciprocal_()
    fprime = s.mul_(2.0).mul_(r).mul_(r) if need_grad else None
    return s2.mul_(r), fprime


def _views(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: int):
    """5-D views: q (B, Hkv, G, L, E), k/v (B, Hkv, 1, S, *), mask (Bm, Hm', G', Lm, S) or None."""
    B, H, L, E = q.shape
    Hkv = k.shape[1]
    q5 = q.view(B, Hkv, groups, L, E)
    k5, v5 = k[:, :, None], v[:, :, None]
    m5 = None
    if mask is not None:
        m5 = mask.reshape(mask.shape[0], Hkv, groups, *mask.shape[2:]) if mask.shape[1] == H else mask[:, :, None]
    return q5, k5, v5, m5


def _tile(q5, k5, m5, i0, i1, send, scale, variant, power, is_causal, need_grad):
    """Rows [i0, i1) x keys [0, send): (f, f', eps_factor) with masked keys zeroed. For "power" and
    "exp_squared" f and f' are divided by a per-row constant r (see reference.row_scaled_f) and
    eps_factor (rows, 1) = 1 / r multiplies eps in the normaliser; else eps_factor is None."""
    s = torch.matmul(q5[..., i0:i1, :], k5[..., :send, :].transpose(-1, -2)).mul_(scale)
    keep = None
    if m5 is not None:
        keep = m5[..., :send] if m5.shape[-2] == 1 else m5[..., i0:i1, :send]
    if is_causal and send > i0:
        diag = torch.ones(i1 - i0, send - i0, dtype=torch.bool, device=s.device).tril()
        causal = torch.ones(i1 - i0, send, dtype=torch.bool, device=s.device)
        causal[:, i0:] = diag
        keep = causal if keep is None else keep & causal
    if variant in ("saturating", "squared"):
        f, fp = _f_and_grad(s, variant, need_grad)
        eps_factor = None
    else:
        f, fp, eps_factor = _scaled_f_and_grad(s, keep, variant, power, need_grad)
    if keep is not None:
        f = f.masked_fill_(~keep, 0.0)
        if fp is not None:
            fp = fp.masked_fill_(~keep, 0.0)
    return f, fp, eps_factor


def _scaled_f_and_grad(s: Tensor, keep: Tensor | None, variant: str, power: float, need_grad: bool):
    """g = f / r and g' = f' / r for the row-rescaled variants, and 1 / r (rows, 1)."""
    keep_b = None if keep is None else keep.expand(s.shape)
    g, log_r = row_scaled_f(s, keep_b, variant, power)
    fp = None
    if need_grad:
        if variant == "power":  # d/ds (|s| / m)^p = p g / s  (0 where s = 0 since p >= 1)
            m = (log_r / power).exp()
            fp = (s.abs() / m).pow(power - 1.0).mul_(torch.sign(s)).div_(m).mul_(power)
        else:  # exp_squared: d/ds exp(s^2 - M) = 2 s g
            fp = s.mul(g).mul_(2.0)
    return g, fp, (-log_r).exp()


def _row_blocks(n_bh: int, L: int, S: int, is_causal: bool):
    """(i0, i1, send) per block of query rows [i0, i1) that sees keys [0, send); causal blocks stop at
    the diagonal, and blocks with no key to see are skipped (their rows stay zero)."""
    rows = _block_rows(n_bh, L, S)
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        send = min(S, i1) if is_causal else S
        if send > 0:
            yield i0, i1, send


def _compute_views(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: int):
    """The compute dtype and the 5-D views (`_views`) of q, k, v cast to it."""
    ct = compute_dtype(q.dtype)
    return ct, _views(q.to(ct), k.to(ct), v.to(ct), mask, groups)


class _BlockedEA(torch.autograd.Function):
    """(q, k, v, mask, ...) -> (out (B, H, L, Ev), z (B, Hkv, G, L, 1) the row normalisers)."""

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale, variant, eps, groups, power=None):
        B, H, L, E = q.shape
        Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
        ct, (q5, k5, v5, m5) = _compute_views(q, k, v, mask, groups)
        out = torch.zeros(B, Hkv, groups, L, Ev, dtype=ct, device=q.device)
        z = torch.ones(B, Hkv, groups, L, 1, dtype=ct, device=q.device)
        for i0, i1, send in _row_blocks(B * H, L, S, is_causal):
            f, _, eps_factor = _tile(q5, k5, m5, i0, i1, send, scale, variant, power, is_causal, False)
            zb = f.sum(-1, keepdim=True)
            zb = zb.add_(eps) if eps_factor is None else zb.add_(eps_factor.mul_(eps))
            zb = torch.where(zb > 0, zb, torch.ones_like(zb))
            out[..., i0:i1, :] = torch.matmul(f, v5[..., :send, :]).div_(zb)
            z[..., i0:i1, :] = zb
        return out.view(B, H, L, Ev).to(q.dtype), z

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale, variant, eps, groups, power = inputs
        out, z = output
        ctx.mark_non_differentiable(z)
        ctx.save_for_backward(q, k, v, out, z, mask)
        ctx.args = (is_causal, scale, variant, eps, groups, power)

    @staticmethod
    def vmap(info, in_dims, *args):
        return fold_vmap(_BlockedEA.apply, info, in_dims, args, n_tensors=4, broadcast=(3,))

    @staticmethod
    def backward(ctx, dout, _dz):
        q, k, v, out, z, mask = ctx.saved_tensors
        dq, dk, dv = _BlockedBackward.apply(dout, q, k, v, out, z, mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


class _BlockedBackward(torch.autograd.Function):
    """The backward as a function of its own, so torch.func can vmap it (per-sample gradients)."""

    @staticmethod
    def forward(dout, q, k, v, out, z, mask, is_causal, scale, variant, eps, groups, power=None):
        return _backward(dout, q, k, v, out, z, mask, is_causal, scale, variant, groups, power)

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


def _backward(dout, q, k, v, out, z, mask, is_causal, scale, variant, groups, power=None):
    """(dq, dk, dv) of `_BlockedEA`; see the module docstring."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    ct, (q5, k5, v5, m5) = _compute_views(q, k, v, mask, groups)
    do5 = dout.to(ct).reshape(B, Hkv, groups, L, Ev)
    o5 = out.to(ct).view(B, Hkv, groups, L, Ev)
    dq = torch.zeros(B, Hkv, groups, L, E, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, S, E, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, S, Ev, dtype=ct, device=q.device)
    for i0, i1, send in _row_blocks(B * H, L, S, is_causal):
        f, fp, _ = _tile(q5, k5, m5, i0, i1, send, scale, variant, power, is_causal, True)
        zb = z[..., i0:i1, :]
        do_b = do5[..., i0:i1, :]
        a = f.div_(zb)  # attention weights of the tile
        dv[:, :, :send] += torch.matmul(a.transpose(-1, -2), do_b).sum(2)
        d_i = (do_b * o5[..., i0:i1, :]).sum(-1, keepdim=True)
        ds = torch.matmul(do_b, v5[..., :send, :].transpose(-1, -2)).sub_(d_i).div_(zb)
        ds = ds.mul_(fp).mul_(scale)
        dq[..., i0:i1, :] = torch.matmul(ds, k5[..., :send, :])
        dk[:, :, :send] += torch.matmul(ds.transpose(-1, -2), q5[..., i0:i1, :]).sum(2)
    dq = dq.view(B, H, L, E).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def blocked_attention(p: "Problem") -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev)."""
    return _BlockedEA.apply(p.q, p.k, p.v, p.mask, p.is_causal, p.scale, p.variant, p.eps, p.groups, p.power)[0]


def _not_tiny(p: "Problem") -> bool:
    """Below 64 x 64 scores the reference's few big ops beat the block loop's Python overhead."""
    return p.q.shape[-2] * p.k.shape[-2] > 64 * 64


BACKEND = Backend("blocked", blocked_attention, lambda p: None, priority=10, prefer=_not_tiny,
                  description="query-blocked PyTorch, O(block x S) memory, recomputing backward")
