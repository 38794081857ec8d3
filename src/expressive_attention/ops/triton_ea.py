"""Triton expressive attention: flash-style forward and backward kernels (backend "triton").

For "saturating" and "squared" EA is simpler to fuse than softmax: f(s) >= 0 needs no running max,
so a query block just accumulates, over key blocks,

    acc += f(S) V,     z += rowsum f(S),      and at the end   O = acc / (eps + z).

Only Z = eps + z (one float per query row) is saved for backward, which recomputes each tile
(`_bwd_delta` first computes D):

    D_i = dO_i . O_i,   dF_ij = (dO_i . v_j - D_i) / Z_i,   dS = f'(S) * dF * scale,
    dq = dS k,   dk = dS^T q,   dv = (F / Z)^T dO.

"exp_squared" (f = exp(s^2), softmax of s^2) is flash attention's online softmax of x = s^2 over the
allowed keys: a running row maximum m (from 0, as the reference's clamp), f = exp(x - m), acc and z
rescaled by exp(m_old - m_new) when it grows, Z = eps exp(-m) + z (the reference's eps compensated by
the row constant). Z's slot then holds lse = m + log Z: backward recomputes a = exp(x - lse) and
dS = 2 s a (dO . v - D) scale.

Kernels: `_fwd` (grid: query blocks x H x B), `_fwd_decode` (decoding, L <= 16: key splits x Hkv x B,
the G x L rows of a key head in one tile; the splits' partial sums are added and divided after it),
`_bwd_dkdv` (key blocks x Hkv x B, loops over the
G query heads of its group, so GQA needs no atomics) and `_bwd_dq` (query blocks x H x B).
Scores, f, z and all accumulators are float32; the f V and dS k products feed the tensor cores
in the input dtype like flash-attention (f <= 1 for "saturating"; for "squared" in fp16, where f
can pass 65504, that product runs in tf32 instead). Masks remove keys (f := 0), causal is
top-left aligned, fully masked rows give zeros and zero gradients.

CPU: Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, and that
includes triton.language's own helpers (tl.zeros, tl.sum), decorated when triton is imported. So
the interpreter is on only when TRITON_INTERPRET=1 is set before triton is first imported; then
these kernels run on CPU tensors (slowly: for tests and debugging). `supports()` says so when the
mode does not allow a call. This module imports without triton; the backend then says why it
cannot run.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backend import Backend
from .cuda_policy import prefers_triton
from .problem import Problem

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # the backend's supports() says so; the kernels are never launched
    triton = tl = None

    def _jit(fn):
        return fn

KERNEL_VARIANTS = ("saturating", "squared", "exp_squared")  # the kernels' VARIANT branches
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- kernels
# Layouts: q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), o / do (B, H, L, Ev),
# mask uint8 (Bm, Hm, Lm, S) with stride 0 on size-1 dims, Z / D float32 (B*H, L).
# Head h reads key/value head h // G. DOT is the dtype tiles enter tl.dot in (`_dot_dtype`).

@_jit
def _load_tile(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c, DOT: tl.constexpr):
    """The (rows, cols) tile ptr[offs_r * s_r + offs_c * s_c] in dtype DOT, zero outside [0, n_r) x [0, n_c)."""
    return tl.load(ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c,
                   mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0).to(DOT)


@_jit
def _query_block(G, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    """This program's query block (grid: query blocks x H x B): block index, head h, batch b, its
    key/value head h // G, and the row / feature / value-feature offsets."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, h, b, h // G, offs_m, tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_EV)


@_jit
def _f_and_fprime(s, VARIANT: tl.constexpr):
    """f(s) and f'(s) of a float32 score tile for "saturating" / "squared". Saturating, with
    r = 1 / (1 + s^2): f = 1 - r (finite even when s^2 overflows), f' = 2 s r^2; squared: f = s^2,
    f' = 2 s. (Unused results are dropped by the compiler.)"""
    if VARIANT == "saturating":
        r = 1.0 / (1.0 + s * s)
        f = 1.0 - r
        fp = 2.0 * s * r * r
    else:
        f = s * s
        fp = 2.0 * s
    return f, fp


@_jit
def _keep(offs_m, offs_n, L, S, m_ptr, sml, sms, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Which (row, key) pairs of the tile take part: in range, causal (j <= i), allowed by the mask."""
    keep = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        mk = tl.load(m_ptr + offs_m[:, None] * sml + offs_n[None, :] * sms, mask=keep, other=0)
        keep = keep & (mk != 0)
    return keep


@_jit
def _exp_sq_tile(s, keep, m):
    """exp_squared on a float32 score tile: (f, m_new, alpha) with m_new = max(m, the row's largest
    allowed s^2), f = exp(s^2 - m_new) on the allowed keys (exp(-inf) = 0 on the others) and alpha =
    exp(m - m_new), by which the rows' earlier sums must be rescaled."""
    x = tl.where(keep, s * s, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return tl.exp(x - m_new[:, None]), m_new, tl.exp(m - m_new)


@_jit
def _exp_sq_grad(s, keep, lse, dp, dr, scale):
    """exp_squared's backward on a tile: the weights a = exp(s^2 - lse) and dS = 2 s a (dP - D) scale,
    both 0 on the keys not allowed (exp(-inf) there: s^2 - lse could overflow exp)."""
    a = tl.exp(tl.where(keep, s * s - lse[:, None], float("-inf")))
    return a, tl.where(keep, 2.0 * s * a * (dp - dr[:, None]) * scale, 0.0)


@_jit
def _tile_weights(s, keep, acc, z, mx, VARIANT: tl.constexpr):
    """The weights f of a float32 score tile (0 on the keys not allowed), with the running sums:
    for "exp_squared" f is relative to the running row maximum mx, and acc, z are first rescaled when
    it grows; the other variants leave acc, z, mx as they are. Returns (f, acc, z, mx)."""
    if VARIANT == "exp_squared":
        f, mx, alpha = _exp_sq_tile(s, keep, mx)
        acc = acc * alpha[:, None]
        z = z * alpha
    else:
        f, _ = _f_and_fprime(s, VARIANT)
        f = tl.where(keep, f, 0.0)
    return f, acc, z, mx


@_jit
def _tile_grads(s, keep, zr, dp, dr, scale, VARIANT: tl.constexpr):
    """The weights a = f / Z and dS = f'(s) (dP - D) / Z scale of a score tile, 0 on the keys not
    allowed; zr holds, per row, what the forward saved (Z, or lse for "exp_squared"). (An unused
    result is dropped by the compiler.)"""
    if VARIANT == "exp_squared":
        a, ds = _exp_sq_grad(s, keep, zr, dp, dr, scale)
    else:
        f, fp = _f_and_fprime(s, VARIANT)
        a = tl.where(keep, f / zr[:, None], 0.0)  # attention weights of the tile
        ds = tl.where(keep, (dp - dr[:, None]) / zr[:, None] * fp * scale, 0.0)
    return a, ds


@_jit
def _accumulate(acc, z, f, v, Q, F32_PV: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    """acc += f V and z += rowsum f for one tile (f float32, masked entries 0). f V feeds the tensor
    cores in the input dtype (Q's), or in tf32 when F32_PV (fp16 "squared", where f can pass 65504)."""
    if F32_PV:
        acc += tl.dot(f, v.to(tl.float32), input_precision="tf32")
    else:
        acc += tl.dot(f.to(Q.dtype.element_ty).to(DOT), v, input_precision=PRECISION)
    return acc, z + tl.sum(f, axis=1)


@_jit
def _normaliser(z, mx, eps, VARIANT: tl.constexpr):
    """(Z, what backward needs) per row from the row sums z (and exp_squared's row maxima mx):
    Z = eps + z, or eps exp(-mx) + z, := 1 when 0 (eps == 0 and nothing to attend to: 0 / 1); saved
    Z itself, or lse = mx + log Z for exp_squared."""
    if VARIANT == "exp_squared":
        z = z + eps * tl.exp(-mx)
    else:
        z = z + eps
    z = tl.where(z > 0, z, 1.0)
    saved = z
    if VARIANT == "exp_squared":
        saved = mx + tl.log(z)
    return z, saved


@_jit
def _fwd(Q, K, V, M, O, Z,
         sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve,
         smb, smh, sml, sms, sob, soh, sol, soe,
         H, G, L, S, E, EV, scale, eps,
         VARIANT: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
         F32_PV: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
         BLOCK_EV: tl.constexpr):
    pid_m, h, b, hk, offs_m, offs_e, offs_ev = _query_block(G, BLOCK_M, BLOCK_E, BLOCK_EV)
    row_ok = offs_m < L
    # (BLOCK_M, BLOCK_E)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_e, sql, sqe, L, E, DOT)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = M + b * smb + h * smh
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mx = tl.zeros((BLOCK_M,), dtype=tl.float32)  # exp_squared: the running row maximum of s^2
    end = S
    if CAUSAL:  # row i sees keys j <= i
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_e, sks, ske, S, E, DOT)  # (BLOCK_N, BLOCK_E)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N) fp32
        keep = _keep(offs_m, offs_n, L, S, m_base, sml, sms, CAUSAL, HAS_MASK)
        f, acc, z, mx = _tile_weights(s, keep, acc, z, mx, VARIANT)
        v = _load_tile(v_base, offs_n, offs_ev, svs, sve, S, EV, DOT)  # (BLOCK_N, BLOCK_EV)
        acc, z = _accumulate(acc, z, f, v, Q, F32_PV, PRECISION, DOT)
    z, saved = _normaliser(z, mx, eps, VARIANT)
    out = acc / z[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_ev[None, :] * soe,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_ev[None, :] < EV))
    tl.store(Z + (b * H + h) * L + offs_m, saved, mask=row_ok)


@_jit
def _fwd_decode(Q, K, V, M, PACC, PZ, PM,
                sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve,
                smb, smh, sml, sms,
                G, L, S, E, EV, CHUNK, scale,
                VARIANT: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                F32_PV: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_EV: tl.constexpr):
    """Decode (split-K, as flash-decoding): program (split, key head hk, batch b) takes the G x L
    query rows of hk (row r = query head hk G + r // L, position r % L; GQA reads K/V once) against
    keys [split CHUNK, (split + 1) CHUNK), and stores its partial acc = sum f v and z = sum f, in
    float32, to PACC (B, Hkv, NS, G L, EV) / PZ (B, Hkv, NS, G L). No running max for "saturating" /
    "squared": the partials are summed afterwards and divided once; for "exp_squared" acc and z are
    relative to the split's row maxima, stored to PM (as PZ), and the combine rescales them."""
    sp = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    ns = tl.num_programs(0)
    R = G * L
    offs_r = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_r < R
    h = hk * G + offs_r // L  # (BLOCK_M,) query head of each row
    i = offs_r % L  # its position
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sql + offs_e[None, :] * sqe,
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0).to(DOT)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mx = tl.zeros((BLOCK_M,), dtype=tl.float32)  # exp_squared: the running row maximum of s^2
    lo = sp * CHUNK
    hi = tl.minimum(S, lo + CHUNK)
    if CAUSAL:  # row i sees keys j <= i < L
        hi = tl.minimum(hi, L)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_e, sks, ske, hi, E, DOT)  # (BLOCK_N, BLOCK_E)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N) fp32
        keep = row_ok[:, None] & (offs_n[None, :] < hi)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= i[:, None])
        if HAS_MASK:
            mk = tl.load(M + b * smb + h[:, None] * smh + i[:, None] * sml + offs_n[None, :] * sms,
                         mask=keep, other=0)
            keep = keep & (mk != 0)
        f, acc, z, mx = _tile_weights(s, keep, acc, z, mx, VARIANT)
        v = _load_tile(v_base, offs_n, offs_ev, svs, sve, hi, EV, DOT)  # (BLOCK_N, BLOCK_EV)
        acc, z = _accumulate(acc, z, f, v, Q, F32_PV, PRECISION, DOT)
    part = (b * tl.num_programs(1) + hk) * ns + sp  # this program's slot
    tl.store(PACC + (part * R + offs_r[:, None]) * EV + offs_ev[None, :], acc,
             mask=row_ok[:, None] & (offs_ev[None, :] < EV))
    tl.store(PZ + part * R + offs_r, z, mask=row_ok)
    if VARIANT == "exp_squared":
        tl.store(PM + part * R + offs_r, mx, mask=row_ok)


@_jit
def _bwd_dkdv(Q, K, V, M, DO, Z, D, DK, DV,
              sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve,
              smb, smh, sml, sms, sdb, sdh, sdl, sde,
              sdkb, sdkh, sdks, sdke, sdvb, sdvh, sdvs, sdve,
              H, G, L, S, E, EV, scale,
              VARIANT: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              PRECISION: tl.constexpr, DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_EV: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    col_ok = offs_n < S
    k = _load_tile(K + b * skb + hk * skh, offs_n, offs_e, sks, ske, S, E, DOT)  # (BLOCK_N, BLOCK_E)
    v = _load_tile(V + b * svb + hk * svh, offs_n, offs_ev, svs, sve, S, EV, DOT)  # (BLOCK_N, BLOCK_EV)
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), dtype=tl.float32)
    start = 0
    if CAUSAL:  # key j is seen by rows i >= j only
        start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        for m0 in range(start, L, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_e, sql, sqe, L, E, DOT)
            do = _load_tile(DO + b * sdb + h * sdh, offs_m, offs_ev, sdl, sde, L, EV, DOT)
            zr = tl.load(Z + (b * H + h) * L + offs_m, mask=row_ok, other=1.0)
            dr = tl.load(D + (b * H + h) * L + offs_m, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
            keep = _keep(offs_m, offs_n, L, S, M + b * smb + h * smh, sml, sms, CAUSAL, HAS_MASK)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dO_i . v_j
            a, ds = _tile_grads(s, keep, zr, dp, dr, scale, VARIANT)
            dv += tl.dot(tl.trans(a).to(Q.dtype.element_ty).to(DOT), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds).to(Q.dtype.element_ty).to(DOT), q, input_precision=PRECISION)
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_e[None, :] * sdke,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_e[None, :] < E))
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvs + offs_ev[None, :] * sdve,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_ev[None, :] < EV))


@_jit
def _bwd_dq(Q, K, V, M, DO, Z, D, DQ,
            sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve,
            smb, smh, sml, sms, sdb, sdh, sdl, sde, sdqb, sdqh, sdql, sdqe,
            H, G, L, S, E, EV, scale,
            VARIANT: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
            PRECISION: tl.constexpr, DOT: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
            BLOCK_EV: tl.constexpr):
    pid_m, h, b, hk, offs_m, offs_e, offs_ev = _query_block(G, BLOCK_M, BLOCK_E, BLOCK_EV)
    row_ok = offs_m < L
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_e, sql, sqe, L, E, DOT)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, offs_ev, sdl, sde, L, EV, DOT)
    zr = tl.load(Z + (b * H + h) * L + offs_m, mask=row_ok, other=1.0)
    dr = tl.load(D + (b * H + h) * L + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = M + b * smb + h * smh
    dq = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    end = S
    if CAUSAL:
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_e, sks, ske, S, E, DOT)
        v = _load_tile(v_base, offs_n, offs_ev, svs, sve, S, EV, DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        keep = _keep(offs_m, offs_n, L, S, m_base, sml, sms, CAUSAL, HAS_MASK)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        _, ds = _tile_grads(s, keep, zr, dp, dr, scale, VARIANT)
        dq += tl.dot(ds.to(Q.dtype.element_ty).to(DOT), k, input_precision=PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdql + offs_e[None, :] * sdqe,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_e[None, :] < E))


@_jit
def _bwd_delta(O, DO, D, sob, soh, sol, soe, sdb, sdh, sdl, sde, H, L, EV,
               BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr):
    # D_i = dO_i . O_i in float32, without float32 copies of dO and O.
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    ok = (offs_m[:, None] < L) & (offs_ev[None, :] < EV)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sol + offs_ev[None, :] * soe,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_ev[None, :] * sde,
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(D + (b * H + h) * L + offs_m, tl.sum(o * do, axis=1), mask=offs_m < L)


# ----------------------------------------------------------------------------- launching

def interpreter_enabled() -> bool:
    """True when these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 was set before
    triton was imported)."""
    return triton is not None and not isinstance(_fwd, triton.runtime.JITFunction)


def _strides(t: Tensor) -> tuple[int, ...]:
    """Strides with 0 on size-1 dims, so broadcast dims index the same element."""
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride()))


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _config(E: int, Ev: int, dtype: torch.dtype, has_mask: bool, backward: bool) -> dict:
    """Tile sizes. Under the interpreter: 16 (small tests then cross block edges). On GPU: chosen
    without a GPU (speed unmeasured) so that ptxas reports no or few register spills on sm_80 /
    sm_90 (`cuobjdump -res-usage`, see docs/kernels-triton.md): a mask tile costs registers, and
    fp32 tiles, multiplied on FMA units rather than tensor cores, need to be smaller."""
    if interpreter_enabled():
        return dict(BLOCK_M=16, BLOCK_N=16)
    d = max(E, Ev)
    if dtype == torch.float32:
        if d <= 64:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
        if d <= 128:
            return dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if backward:
        if d <= 64:
            return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if d <= 128 else 8, num_stages=1)
    if d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=32 if has_mask else 64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64 if d <= 128 else 32, BLOCK_N=32, num_warps=4, num_stages=1)


def _precision(dtype: torch.dtype):
    """fp32 inputs follow torch's matmul TF32 switch (off by default: exact fp32 products)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _dot_dtype(dtype: torch.dtype):
    """The dtype tiles enter tl.dot in: the input dtype, except bf16 under the interpreter, whose
    bf16 dot is wrong in Triton 3.9 (it multiplies the raw uint16 storage); there the bf16 values
    are widened to fp32 first: the same products as a bf16 MMA with fp32 accumulation."""
    if dtype == torch.bfloat16 and interpreter_enabled():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32}[dtype]


def _mask_args(mask: Tensor | None, q: Tensor):
    if mask is None:
        return q, (0, 0, 0, 0)
    m = mask.view(torch.uint8)  # same bytes as bool, a plain integer pointer in the kernel
    return m, _strides(m)


def _forward(q, k, v, mask, is_causal, scale, variant, eps):
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    if L <= DECODE_MAX_L and H // Hkv * L <= DECODE_MAX_ROWS:  # a few rows: split the key axis instead
        return _forward_decode(q, k, v, mask, is_causal, scale, variant, eps)
    out = torch.empty(B, H, L, Ev, dtype=q.dtype, device=q.device)
    z = torch.empty(B * H, L, dtype=torch.float32, device=q.device)
    m, ms = _mask_args(mask, q)
    cfg = _config(E, Ev, q.dtype, mask is not None, backward=False)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), H, B)
    _fwd[grid](
        q, k, v, m, out, z, *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        H, H // Hkv, L, S, E, Ev, scale, eps,
        VARIANT=variant, CAUSAL=is_causal, HAS_MASK=mask is not None,
        F32_PV=variant == "squared" and q.dtype == torch.float16, PRECISION=_precision(q.dtype),
        DOT=_dot_dtype(q.dtype), BLOCK_E=_pow2(E), BLOCK_EV=_pow2(Ev), **cfg,
    )
    return out, z


# Calls with at most this many query rows, G x L of them at most DECODE_MAX_ROWS, use `_fwd_decode`.
DECODE_MAX_L = 16
DECODE_MAX_ROWS = 64


def _decode_splits(B: int, Hkv: int, keys: int, block_n: int, device: torch.device) -> int:
    """Key splits: enough programs for about two per SM (one per CPU thread under the interpreter,
    at most 4), never more splits than key blocks."""
    if device.type == "cuda":
        want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        want = 4
    return max(1, min(triton.cdiv(want, B * Hkv), triton.cdiv(keys, block_n)))


def _forward_decode(q, k, v, mask, is_causal, scale, variant, eps, splits=None):
    """The decode forward: partial sums per key split (`_fwd_decode`), summed and divided here."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    G, R = H // Hkv, H // Hkv * L
    keys = min(S, L) if is_causal else S
    block_n = 16 if interpreter_enabled() else (64 if max(E, Ev) <= 64 else 32)
    ns = splits or _decode_splits(B, Hkv, keys, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(keys, ns), block_n) * block_n  # a whole number of key blocks
    pacc = torch.empty(B, Hkv, ns, R, Ev, dtype=torch.float32, device=q.device)
    pz = torch.empty(B, Hkv, ns, R, dtype=torch.float32, device=q.device)
    exp_sq = variant == "exp_squared"
    pm = torch.empty_like(pz) if exp_sq else pz  # the splits' row maxima (exp_squared only)
    m, ms = _mask_args(mask, q)
    extra = {} if interpreter_enabled() else dict(num_warps=4, num_stages=2)
    _fwd_decode[(ns, Hkv, B)](
        q, k, v, m, pacc, pz, pm, *q.stride(), *k.stride(), *v.stride(), *ms,
        G, L, S, E, Ev, chunk, scale,
        VARIANT=variant, CAUSAL=is_causal, HAS_MASK=mask is not None,
        F32_PV=variant == "squared" and q.dtype == torch.float16, PRECISION=_precision(q.dtype),
        DOT=_dot_dtype(q.dtype), BLOCK_M=_pow2(R), BLOCK_N=block_n, BLOCK_E=_pow2(E), BLOCK_EV=_pow2(Ev),
        **extra,
    )
    if exp_sq:  # rescale each split to the rows' largest maximum, then as below with eps exp(-max)
        mx = pm.amax(2, keepdim=True)
        w = (pm - mx).exp()  # (B, Hkv, ns, R)
        pacc, pz, mx = pacc * w[..., None], pz * w, mx.squeeze(2)
        z = pz.sum(2) + eps * (-mx).exp()
    else:
        z = pz.sum(2) + eps  # (B, Hkv, R): rows (g, i) of query head hk G + g
    z = torch.where(z > 0, z, torch.ones_like(z))  # eps == 0 and nothing to attend to: 0 / 1
    out = (pacc.sum(2) / z[..., None]).view(B, H, L, Ev).to(q.dtype)
    saved = mx + z.log() if exp_sq else z  # what backward reads (see `_normaliser`)
    return out, saved.view(B * H, L)


def _backward(q, k, v, mask, out, z, dout, is_causal, scale, variant):
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    m, ms = _mask_args(mask, q)
    cfg = _config(E, Ev, q.dtype, mask is not None, backward=True)
    d = torch.empty(B * H, L, dtype=torch.float32, device=q.device)  # D_i = dO_i . O_i
    rows = 16 if interpreter_enabled() else 64
    _bwd_delta[(triton.cdiv(L, rows), H, B)](
        out, dout, d, *out.stride(), *dout.stride(), H, L, Ev, BLOCK_M=rows, BLOCK_EV=_pow2(Ev))
    consts = dict(VARIANT=variant, CAUSAL=is_causal, HAS_MASK=mask is not None,
                  PRECISION=_precision(q.dtype), DOT=_dot_dtype(q.dtype),
                  BLOCK_E=_pow2(E), BLOCK_EV=_pow2(Ev), **cfg)
    common = (*q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride())
    _bwd_dkdv[(triton.cdiv(S, cfg["BLOCK_N"]), Hkv, B)](
        q, k, v, m, dout, z, d, dk, dv, *common, *dk.stride(), *dv.stride(),
        H, H // Hkv, L, S, E, Ev, scale, **consts,
    )
    _bwd_dq[(triton.cdiv(L, cfg["BLOCK_M"]), H, B)](
        q, k, v, m, dout, z, d, dq, *common, *dq.stride(),
        H, H // Hkv, L, S, E, Ev, scale, **consts,
    )
    return dq, dk, dv


def _on_device(t: Tensor):
    """Launch on the tensor's GPU (not the current one); no-op for CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _TritonEA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale, variant, eps):
        with _on_device(q):
            out, z = _forward(q, k, v, mask, is_causal, scale, variant, eps)
        ctx.save_for_backward(q, k, v, mask, out, z)
        ctx.args = (is_causal, scale, variant)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, mask, out, z = ctx.saved_tensors
        with _on_device(q):
            dq, dk, dv = _backward(q, k, v, mask, out, z, dout, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def triton_attention(p: Problem) -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev)."""
    return _TritonEA.apply(p.q, p.k, p.v, p.mask, p.is_causal, p.scale, p.variant, p.eps)


def supports(p: Problem) -> "str | None":
    if triton is None:
        return "triton is not installed (pip install 'expressive-attention[triton]')"
    if p.q.dtype not in DTYPES:
        return f"dtype {p.q.dtype} is not supported (float16, bfloat16, float32)"
    E, Ev = p.q.shape[-1], p.v.shape[-1]
    if max(E, Ev) > MAX_HEAD_DIM:
        return f"head dims E={E}, Ev={Ev}: at most {MAX_HEAD_DIM} are supported"
    if max(p.q.shape[0], p.q.shape[1]) > 65535:  # CUDA grid dims y and z
        return f"batch {p.q.shape[0]} and heads {p.q.shape[1]} must each be <= 65535"
    dev = p.q.device.type
    if dev != "cuda" and not (dev == "cpu" and interpreter_enabled()):
        return (f"tensors are on {dev}: the Triton kernels need CUDA tensors (or CPU tensors "
                "with TRITON_INTERPRET=1 set before triton is imported: the slow interpreter)")
    return None


def _prefer(p: Problem) -> bool:
    return prefers_triton(p, BACKEND)  # the measured table and the self-check (cuda_policy.py)


# "auto" takes it on CUDA only, where cuda_policy.prefers_triton holds (else flex): Triton's CPU interpreter
# (TRITON_INTERPRET=1) is for tests, never "auto".
BACKEND = Backend(
    "triton", triton_attention, supports, priority=30, prefer=_prefer, functorch=False,
    variants=KERNEL_VARIANTS,
    description="Triton flash-style kernels (CUDA; CPU via TRITON_INTERPRET=1)",
)
