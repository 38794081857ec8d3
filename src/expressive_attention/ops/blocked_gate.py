"""The blocked backend with a forget gate (`Problem.log_fgate`): one block of query rows at a time.

With D_ij = exp(C_i - C_j), C = cumsum(log_fgate), each tile's weights are g_ij / z_i with
g = f(s) D / r_i (r_i a per-row constant, exactly compensated in eps; see
reference.gated_score_weights) and z_i = eps / r_i + sum_j g_ij. The backward is flash-attention
shaped, as in blocked.py, with the gate's terms: with dF_ij = (dO_i . v_j - dO_i . O_i) / z_i,

    dS = dF * dg/ds,   dlogD = dF * g,   dC_i = sum_j dlogD_ij - sum_l dlogD_li,
    dlog_fgate_t = sum_{u >= t} dC_u      (C is a cumulative sum),

so no (L, S) buffer is kept: the forward saves O, z and log r per row, the backward recomputes each
tile. Variants without a dedicated form here, and calls under torch.func transforms, take the plain
autograd path instead (each block under activation checkpointing when there is more than one).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._functorch import under_functorch
from .reference import compute_dtype, gated_score_weights, repeat_kv

if TYPE_CHECKING:
    from .problem import Problem

FUSED_VARIANTS = ("saturating", "squared", "power", "exp_squared")  # with a hand-written backward here


def _keep(p_mask, is_causal: bool, i0: int, i1: int, send: int, device) -> Tensor | None:
    """The allowed keys [0, send) of rows [i0, i1) (bool, broadcastable to the tile), or None."""
    keep = None
    if is_causal:
        keep = torch.arange(send, device=device) <= torch.arange(i0, i1, device=device)[:, None]
    if p_mask is not None:
        m = p_mask[..., :send] if p_mask.shape[-2] == 1 else p_mask[..., i0:i1, :send]
        keep = m if keep is None else keep & m
    return keep


def _g(s: Tensor, keep: Tensor | None, log_d: Tensor, variant: str, power, log_r: Tensor | None, need_grad: bool):
    """(g, dg/ds or None, log_r) of a tile: g = f(s) D / r with removed keys 0; log_r (rows, 1) is
    computed when None (the row maximum, as in reference.gated_score_weights) and reused when given
    (backward: the same constant as the forward)."""
    x = log_d if keep is None else log_d.masked_fill_(~keep, float("-inf"))  # log_d is the tile's own
    if variant in ("saturating", "squared"):
        if log_r is None:
            log_r = x.amax(-1, keepdim=True).clamp_min(0.0)
        d = x.sub_(log_r).exp_()  # D / r; removed keys: 0
        if variant == "squared":  # g = s^2 d, g' = 2 s d
            gs = s.mul(d).mul_(2.0) if need_grad else None
            return d.mul_(s).mul_(s), gs, log_r
        s2 = s.square()  # saturating: g = s^2 r d, g' = 2 s r^2 d, r = 1 / (1 + s^2)
        rd = s2.add(1.0).reciprocal_()
        gs = None
        if need_grad:
            gs = rd.square().mul_(s).mul_(d).mul_(2.0)
        return s2.mul_(rd.mul_(d)), gs, log_r
    if variant == "power":
        a = s.abs()
        pos = a > 0 if keep is None else (a > 0) & keep
        safe = torch.where(pos, a, torch.ones_like(a))
        x = torch.where(pos, power * safe.log() + log_d, float("-inf"))
    else:  # exp_squared
        x = x.add_(s.square())
    if log_r is None:
        log_r = x.amax(-1, keepdim=True)
        log_r = torch.where(torch.isfinite(log_r), log_r, torch.zeros_like(log_r))  # an empty row
    g = x.sub_(log_r).exp_()
    gs = None
    if need_grad:
        gs = 2.0 * s * g if variant == "exp_squared" else torch.where(pos, power * g / torch.where(pos, s, safe), 0.0)
    return g, gs, log_r


class _GatedBlocked(torch.autograd.Function):
    """(q (B, H, L, E), k, v (B, H, S, *) repeated to the query heads, log_fgate (B, H, L), mask, the row
    blocks, ...) -> out."""

    @staticmethod
    def forward(ctx, q, k, v, log_fgate, mask, blocks, is_causal, scale, variant, eps, power):
        B, H, L, _ = q.shape
        c = log_fgate.cumsum(-1)
        out = q.new_zeros(B, H, L, v.shape[-1])
        z = q.new_ones(B, H, L, 1)
        log_r = q.new_zeros(B, H, L, 1)
        for i0, i1, send in blocks:
            keep = _keep(mask, is_causal, i0, i1, send, q.device)
            s = torch.matmul(q[..., i0:i1, :], k[..., :send, :].transpose(-1, -2)).mul_(scale)
            g, _, lr = _g(s, keep, c[..., i0:i1, None] - c[..., None, :send], variant, power, None, False)
            zb = g.sum(-1, keepdim=True).add_((-lr).exp().mul_(eps))
            zb = torch.where(zb > 0, zb, torch.ones_like(zb))
            out[..., i0:i1, :] = torch.matmul(g, v[..., :send, :]).div_(zb)
            z[..., i0:i1, :], log_r[..., i0:i1, :] = zb, lr
        ctx.save_for_backward(q, k, v, c, mask, out, z, log_r)
        ctx.args = (blocks, is_causal, scale, variant, power)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, c, mask, out, z, log_r = ctx.saved_tensors
        blocks, is_causal, scale, variant, power = ctx.args
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dc = torch.zeros_like(c)
        dout = dout.to(q.dtype)
        delta = (dout * out).sum(-1, keepdim=True)  # (B, H, L, 1)
        for i0, i1, send in blocks:
            keep = _keep(mask, is_causal, i0, i1, send, q.device)
            qb, kb, vb = q[..., i0:i1, :], k[..., :send, :], v[..., :send, :]
            s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)
            g, gs, _ = _g(s, keep, c[..., i0:i1, None] - c[..., None, :send], variant, power,
                          log_r[..., i0:i1, :], True)
            zb, dob = z[..., i0:i1, :], dout[..., i0:i1, :]
            dv[..., :send, :] += torch.matmul((g / zb).transpose(-1, -2), dob)
            df = torch.matmul(dob, vb.transpose(-1, -2)).sub_(delta[..., i0:i1, :]).div_(zb)
            dld = df * g  # d loss / d log D of the tile
            ds = df.mul_(gs).mul_(scale)
            dq[..., i0:i1, :] = torch.matmul(ds, kb)
            dk[..., :send, :] += torch.matmul(ds.transpose(-1, -2), qb)
            dc[..., i0:i1] += dld.sum(-1)
            dc[..., :send] -= dld.sum(-2)
        dlog_fgate = dc.flip(-1).cumsum(-1).flip(-1)  # C = cumsum(log_fgate): the reverse cumulative sum
        return dq, dk, dv, dlog_fgate, None, None, None, None, None, None, None


def _gated_block(q, k, v, c_rows, c_keys, keep, scale, variant, eps, power):
    """One block of query rows, plain autograd (the fallback path)."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    log_d = c_rows[..., :, None] - c_keys[..., None, :]
    a = gated_score_weights(s, keep, log_d, variant=variant, eps=eps, power=power)
    return torch.matmul(a, v)


def _gated_autograd(p: "Problem", q, k, v, lf, blocks) -> Tensor:
    """The fallback: plain autograd per block, each under activation checkpointing when there is
    more than one (backward then recomputes one (block, S) tile at a time)."""
    from torch.utils.checkpoint import checkpoint

    c = lf.cumsum(-1)  # (B, H, L): log D_ij = c_i - c_j
    grad = p.requires_grad and len(blocks) > 1  # one block: its tile is all there is to keep anyway
    outs = []  # with L == S every block has keys to see, so the blocks cover every row
    for i0, i1, send in blocks:
        args = (q[..., i0:i1, :], k[..., :send, :], v[..., :send, :], c[..., i0:i1], c[..., :send],
                _keep(p.mask, p.is_causal, i0, i1, send, q.device), p.scale, p.variant, p.eps, p.power)
        outs.append(checkpoint(_gated_block, *args, use_reentrant=False) if grad else _gated_block(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def gated_blocked_attention(p: "Problem", blocks: list[tuple[int, int, int]]) -> Tensor:
    """Backend entry point (blocked, with ``p.log_fgate``): a checked 4-D `Problem` -> (B, H, L, Ev),
    ``blocks`` the (i0, i1, send) of blocked.py's row blocks (query rows [i0, i1) see keys [0, send)).
    GQA: k and v are repeated to the query heads (O(S) memory, no (L, S) buffer)."""
    ct = compute_dtype(p.q.dtype)
    q, k, v = p.q.to(ct), repeat_kv(p.k, p.groups).to(ct), repeat_kv(p.v, p.groups).to(ct)
    lf = p.log_fgate.to(ct)
    if p.variant not in FUSED_VARIANTS or under_functorch(p.q, p.k, p.v, p.log_fgate):
        out = _gated_autograd(p, q, k, v, lf, blocks)
    else:
        lf = lf.expand(q.shape[:-1])
        out = _GatedBlocked.apply(q, k, v, lf, p.mask, blocks, p.is_causal, p.scale, p.variant, p.eps, p.power)
    return out.to(p.q.dtype)

