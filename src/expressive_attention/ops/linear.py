"""Exact linear-time expressive attention for the squared variant (backend="linear").

With s = scale q.k, the squared variant's weight is f = s^2 = <phi(scale q), phi(k)> with the packed
degree-2 feature map phi(x) = [x_a^2] ++ [sqrt2 x_a x_b, a < b] (F = E(E+1)/2 features; see
linear_features.py). So EA-squared *is* linear attention with a polynomial feature map, exactly:

    num_i = sum_{j<=i} f_ij [v_j, 1] = phi(q_i)^T S_i,   S_i = sum_{j<=i} phi(k_j) [v_j, 1]^T
    out_i = num_i[:Ev] / (eps + num_i[Ev])

The value gets a column of ones so that the normaliser rides along in the same state
S (F x (Ev+1)): the packed state of the recurrent cache and of `add_to_state` / `read_state`. The
chunked forms (linear_sweeps.py) keep it split instead, as sv = S[:, :Ev] and the normaliser's column
as the Gram matrix sum_j k_j k_j^T (E x E; `SplitState`), so that every F-row GEMM has Ev columns.
Causal: chunks of C rows; inside a chunk the quadratic form (s^2 masked by tril), across chunks the
running state. Time O(L (C E + E^2 Ev)), memory O(L): backward recomputes the chunk features
instead of keeping them (the sweeps and the gradient formulas: linear_sweeps.py).

The saturating variant f = s^2/(1+s^2) has no finite feature map: this backend refuses it.
Key-padding masks (bool, shape (B|1, H|Hkv|1, 1, S)) zero the masked keys, which is exact
(f = (q.0)^2 = 0). A full (L, S) mask runs when it is exactly key padding repeated over the rows,
or (L == S) exactly causal AND key padding, the mask every padded decoder batch has (Hugging Face
models, MultiheadAttention with a causal attn_mask): `mask_form` recognises it (mask_patterns.py);
any other full mask is refused and runs on a quadratic backend.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from . import fused_cpu
from ._functorch import fold_vmap, plain_eager, transform_active
from .backend import Backend
from .problem import Problem
from .mask_patterns import key_padding_of
from . import linear_sweeps
from .linear_features import (PackedFeatures, SplitState, add_to_state, n_features, native_helpers, new_state, read_num,
                              with_ones)
from .reference import compute_dtype, repeat_kv

__all__ = ["BACKEND", "add_to_state", "causal_forward", "chunk_for", "default_chunk", "linear_attention", "linear_pays_off",
           "new_state", "read_state", "supports", "with_ones"]


def default_chunk(E: int, native: bool = False) -> int:
    """Chunk rows: E^2 / 2 clamped to [64, 128]; with the native feature helpers (`native`) 64 from
    E = 48 on. The state costs ~14 F Ev flops per row (fwd+bwd) whatever the chunk; the chunk adds
    ~14 C E per row inside it, buffers of C F floats (phi) and per-chunk Python overhead. With torch-op
    features (one thread, fwd+bwd, B=4, H=4, L=4096, 3 interleaved repeats, load ~4.5): C = 64 / 128 / 256
    took 1089 / 986 / 1025 ms at E=32 and 4506 / 4296 / 4269 ms at E=64. With the native helpers (29 Nov
    2026, quiet machine, median of 4, fwd+bwd / forward only, C = 32 / 64 / 128): E=64, L=4096, one
    thread 2129 / 2209 / 2249 and 559 / 565 / 634 ms, two threads 1110 / 1072 / 1143 and 307 / 299 / 311
    ms (the F x 64 feature block stays in cache: the state update ran at 90 GFLOP/s with 64 rows, 78 with
    128); E=32 mixed (one thread 412 / 370 / 404, two 356 / 255 / 232): 128 kept below E=48. C = 64 also
    halves the phi buffers (E=64, forward only: the fixed ~25 MB over SDPA's at B=4, H=4)."""
    if native and E >= 48:
        return 64
    return int(min(128, max(64, E * E // 2)))


def chunk_for(q: Tensor) -> int:
    """`default_chunk` for queries q (..., E), with the native helpers if they will build its features
    (computed in q's compute dtype)."""
    return default_chunk(q.shape[-1], native_helpers(q, compute_dtype(q.dtype)) is not None)


def supports(p: Problem) -> "str | None":
    """None when the linear backend can run `p`, else the reason."""
    L, S = p.q.shape[2], p.k.shape[2]
    if p.is_causal and L != S:
        return f"is_causal needs L == S in the linear backend, got L={L}, S={S}"
    form = mask_form(p)
    return form if isinstance(form, str) else None


def mask_form(p: Problem) -> "tuple[bool, Tensor | None] | str":
    """How the linear form runs `p`: (causal, keep) with keep bool (Bm, Hm, S) or None (no padding),
    or the reason it cannot. A key-padding mask (Lm = 1) is taken as it is; a full (L, S) mask only
    when it is exactly key padding, or (L == S) exactly causal plus key padding (ops/mask_patterns.py).
    That check reads the mask once per call: its result is kept on `p`."""
    if p.mask is None:
        return p.is_causal, None
    if p.mask.shape[2] == 1:
        return p.is_causal, p.mask[:, :, 0, :]
    if p.memo is None:
        p.memo = {}
    form = p.memo.get("linear_mask_form")
    if form is None:
        L, S = p.q.shape[2], p.k.shape[2]
        form = (
            "the linear backend takes key-padding masks (shape (B|1, H|1, 1, S)) and full masks that are "
            "exactly key padding or exactly causal (L == S, top-left) plus key padding; this mask is neither "
            "(it needs a quadratic backend)"
        )
        for causal in (True, False) if L == S else (False,):
            keep = key_padding_of(p.mask, causal)
            if keep is not None:
                form = (causal, keep)
                break
        p.memo["linear_mask_form"] = form
    return form


# ----------------------------------------------------------------------------------------------
# building blocks on 3-D tensors: N = B * Hkv heads, G query heads per key/value head.


def read_state(state: Tensor, q: Tensor, eps: float, phi: PackedFeatures | None = None) -> Tensor:
    """Attention of queries q (N, n, E) (already scaled) on the keys summarised in `state`
    (N, F, Ev+1): out (N, n, Ev) = phi(q)^T S[:, :Ev] / (eps + phi(q)^T S[:, Ev])."""
    return normalise_rows(read_num(state, q, phi), state.shape[-1] - 1, eps)[0]


def normalise_rows(num: Tensor, Ev: int, eps: float):
    """num (..., Ev+1) -> (out (..., Ev), z (..., 1)) with z = eps + den, z <= 0 -> 1 (reference)."""
    z = num[..., Ev:] + eps
    z = torch.where(z > 0, z, torch.ones_like(z))
    return num[..., :Ev] / z, z


def causal_forward(q: Tensor, k: Tensor, v: Tensor, state: Tensor, eps: float, chunk: int, scale: float,
                   workers: int | None = None):
    """Causal linear EA over n tokens that follow the tokens summarised in the packed `state`
    (N, F, Ev+1), updated in place (the recurrent cache's prefill).

    q (N, G, n, E) queries (multiplied by `scale` chunk by chunk); k (N, n, E); v (N, n, Ev).
    workers: threads the N heads are split over (None: `linear_sweeps.head_workers`).
    Returns out (N, G, n, Ev), z (N, G, n, 1).
    """
    st = SplitState.from_packed(state, q.shape[-1])
    if workers is None:
        N, G, n, E = q.shape
        workers = linear_sweeps.head_workers(N, (G + 1) * n * n_features(E) * v.shape[-1])
    out, z = linear_sweeps.causal_forward(q, k, v, st, eps, chunk, scale, workers)
    st.write_packed(state)
    return out, z


# Accuracy (docs/linear.md, "Accuracy"; measured by benchmarks/linear_error_bound.py). The feature form
# sums terms of size up to |q|^2 |k|^2 into s^2, so the part of row i that goes through the state has a
# rounding error, relative to max |v|, of at most c u R_i with
#     R_i = scale^2 |q_i|^2 sum_{j in the state of row i} |k_j|^2 / z_i,   z_i = eps + sum_{j seen} s_ij^2
# (for one key R = (|q||k|/|s|)^2), c <= 2.1 measured, u = 2^-24 in float32; the keys of a causal row's own
# chunk go through the quadratic form (s computed first), as accurate as the reference. A float32 call
# whose largest R_i exceeds this is recomputed in float64 (forward and backward): its error stays below
# c u FP64_RETRY_ABOVE ~ 6e-5 of max |v|. Where even float64 misses its bound (`beyond_float64`: float64
# inputs with R above this, float32 ones above ~2.7e11), the call runs on the blocked (quadratic) backend
# (plain eager calls; under torch.compile or a torch.func transform the float64 retry is all).
FP64_RETRY_ABOVE = 512.0


def cancellation_ratio(q3: Tensor, k3: Tensor, z: Tensor, is_causal: bool, scale: float, chunk: int,
                       prior: Tensor | None = None) -> Tensor:
    """R_i (N, G, L) of the rows of q3 (N, G, L, E) against keys k3 (N, S, E) (masked keys zeroed) with
    normalisers z (N, G, L, 1), for the sweeps of `chunk` rows (see FP64_RETRY_ABOVE). ``prior`` (N,): the
    sum of |k_j|^2 of keys already in the state before k3 (the recurrent cache's), or None. A row whose
    eps + den was <= 0 (z set to 1, as for a row that sees no key) but whose state holds a nonzero key
    counts as infinitely ill-conditioned."""
    kn = torch.linalg.vector_norm(k3, dim=-1).square_()  # (N, S) (one pass, no (N, S, E) temporary)
    if is_causal:  # the state of row i: the keys before its chunk
        starts = torch.arange(q3.shape[2], device=kn.device) // chunk * chunk
        seen = torch.cat([kn.new_zeros(kn.shape[0], 1), kn.cumsum(-1)], -1)[:, starts]
    else:
        seen = kn.sum(-1, keepdim=True)
    if prior is not None:
        seen = seen + prior[:, None]
    b = torch.linalg.vector_norm(q3, dim=-1).square_().mul_(scale * scale).mul_(seen[:, None, :])
    z = z.squeeze(-1)
    return b / torch.where(z == 1, 0.0, z)  # (b = 0: 0 / 0 = NaN, not above the bound)


def needs_float64(q3: Tensor, k3: Tensor, z: Tensor, is_causal: bool, scale: float, chunk: int) -> bool:
    """Whether a float32 result (normalisers z) may be wrong by more than the bound: any R_i > FP64_RETRY_ABOVE."""
    if z.dtype != torch.float32 or z.numel() == 0:
        return False
    return bool((cancellation_ratio(q3, k3, z, is_causal, scale, chunk) > FP64_RETRY_ABOVE).any())


_RETRIED = threading.local()  # .flag: the forward this thread just ran was retried in float64


def beyond_float64(q: Tensor, k: Tensor, z: Tensor, is_causal: bool, scale: float, chunk: int) -> bool:
    """Whether even the float64 form misses the bound: R_i > FP64_RETRY_ABOVE for float64 inputs, or
    > FP64_RETRY_ABOVE * u32 / u64 (~2.7e11: |s| < 2e-6 |q||k| for every key in a row's state) for inputs
    that were retried in float64. q (B, H, L, E), k (B, Hkv, S, E) as the sweeps got them, z (N, G, L, 1)."""
    if z.numel() == 0:
        return False
    B, H, L, E = q.shape
    N, ct = B * k.shape[1], compute_dtype(q.dtype)  # (float32 holds R up to the limit: no float64 copies)
    q3, k3 = q.detach().to(ct).reshape(N, H // k.shape[1], L, E), k.detach().to(ct).reshape(N, -1, E)
    limit = FP64_RETRY_ABOVE * (1.0 if ct == torch.float64 else 2.0**29)
    return bool((cancellation_ratio(q3, k3, z.to(ct), is_causal, scale, chunk) > limit).any())


class _LinearEA(torch.autograd.Function):
    """q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) -> (B, H, L, Ev); saves only inputs,
    output and normaliser."""

    @staticmethod
    def _prepare(q, k, v, ct=None):
        """Views in `ct` (default: the compute dtype; copies only for a cast or a strided input):
        q3 (N, G, L, E), k3 (N, S, E), v3 (N, S, Ev) with N = B * Hkv. (Scaling and the ones column are
        applied chunk by chunk.)"""
        B, H, L, E = q.shape
        Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
        N, ct = B * Hkv, ct or compute_dtype(q.dtype)
        return q.to(ct).reshape(N, H // Hkv, L, E), k.to(ct).reshape(N, S, E), v.to(ct).reshape(N, S, Ev)

    @staticmethod
    def _sweep(q, k, v, is_causal, scale, eps, chunk, workers, ct=None):
        """(out (N, G, L, Ev), z (N, G, L, 1)) computed in `ct`."""
        q3, k3, v3 = _LinearEA._prepare(q, k, v, ct)
        if is_causal:
            state = SplitState.zeros(q3.shape[0], q3.shape[-1], v3.shape[-1], k3.dtype, k3.device)
            out, z = linear_sweeps.causal_forward(q3, k3, v3, state, eps, chunk, scale, workers)
        else:
            out, z = linear_sweeps.full_forward(q3, k3, v3, eps, chunk, scale, workers)
        if needs_float64(q3, k3, z, is_causal, scale, chunk):  # cancellation: again in float64, stored in float32
            _RETRIED.flag = True
            out, z = (t.float() for t in _LinearEA._sweep(q, k, v, is_causal, scale, eps, chunk, workers, torch.float64))
        return out, z

    @staticmethod
    def forward(q, k, v, is_causal, scale, eps, chunk, workers):
        B, H, L, E = q.shape
        out, z = _LinearEA._sweep(q, k, v, is_causal, scale, eps, chunk, workers)
        return out.view(B, H, L, -1).to(q.dtype), out, z  # the compute-dtype out and z: for backward

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, is_causal, scale, eps, chunk, workers = inputs
        _, out, z = output
        ctx.mark_non_differentiable(out, z)
        ctx.save_for_backward(q, k, v, out, z)
        ctx.args = (is_causal, scale, eps, chunk, workers)

    @staticmethod
    def vmap(info, in_dims, *args):
        return fold_vmap(_LinearEA.apply, info, in_dims, args, n_tensors=3)

    @staticmethod
    def backward(ctx, dout, _dout_ct, _dz):
        q, k, v, out, z = ctx.saved_tensors
        dq, dk, dv = _LinearBackward.apply(dout, q, k, v, out, z, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


class _LinearBackward(torch.autograd.Function):
    """The backward as a function of its own, so torch.func can vmap it (per-sample gradients)."""

    @staticmethod
    def forward(dout, q, k, v, out, z, is_causal, scale, eps, chunk, workers):
        B, H, L, E = q.shape
        Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
        q3, k3, v3 = _LinearEA._prepare(q, k, v)
        if needs_float64(q3, k3, z, is_causal, scale, chunk):  # (z is accurate here: R_i as it truly is)
            q3, k3, v3 = _LinearEA._prepare(q, k, v, torch.float64)
            out, z = out.double(), z.double()
        do = dout.to(q3.dtype).reshape(B * Hkv, H // Hkv, L, Ev)
        dqs, dk, dv = linear_sweeps.backward(q3, k3, v3, out, z, do, chunk, is_causal, scale, workers)
        dq = dqs.mul_(scale).view(B, H, L, E).to(q.dtype)
        return dq, dk.view(B, Hkv, S, E).to(k.dtype), dv.view(B, Hkv, S, Ev).to(v.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, *args):
        return fold_vmap(_LinearBackward.apply, info, in_dims, args, n_tensors=6)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the linear backend's backward is not differentiable (no double backward); "
                           "use backend='reference' for higher-order gradients")


# ---- the same forward and backward as torch custom ops, for torch.compile: the compiler sees one opaque op
# instead of tracing the chunk loop (benchmarks/bench_linear_compile.py, E=32, B=2, H=2, fwd+bwd: first
# call 16.0 -> 1.5 s with aot_eager at L=1k, later calls 1.56x -> 1.02x eager's time; see docs/linear.md);
# inside, the ops run eagerly, with the C++ feature helpers. chunk = 0: `default_chunk`, decided when the
# op runs.

@torch.library.custom_op("expressive_attention::linear_fwd", mutates_args=())
def linear_fwd(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, eps: float, chunk: int,
               workers: int) -> tuple[Tensor, Tensor]:
    """(out (N, G, L, Ev), z (N, G, L, 1)) in the compute dtype, N = B * Hkv, G = H / Hkv."""
    if chunk == 0:
        chunk = chunk_for(q)
    _, out, z = _LinearEA.forward(q, k, v, is_causal, scale, eps, chunk, workers)
    return out, z


@linear_fwd.register_fake
def _(q, k, v, is_causal, scale, eps, chunk, workers):
    B, H, L, _ = q.shape
    N, G, ct = B * k.shape[1], H // k.shape[1], compute_dtype(q.dtype)
    return q.new_empty(N, G, L, v.shape[-1], dtype=ct), q.new_empty(N, G, L, 1, dtype=ct)


@torch.library.custom_op("expressive_attention::linear_bwd", mutates_args=())
def linear_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, z: Tensor, is_causal: bool,
               scale: float, eps: float, chunk: int, workers: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) given dout (N, G, L, Ev), the gradient of the forward's `out`."""
    if chunk == 0:
        chunk = chunk_for(q)
    return _LinearBackward.forward(dout, q, k, v, out, z, is_causal, scale, eps, chunk, workers)


@linear_bwd.register_fake
def _(dout, q, k, v, out, z, is_causal, scale, eps, chunk, workers):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup_context(ctx, inputs, output):
    q, k, v, is_causal, scale, eps, chunk, workers = inputs
    out, z = output
    ctx.save_for_backward(q, k, v, out, z)
    ctx.args = (is_causal, scale, eps, chunk, workers)


def _op_backward(ctx, dout, _dz):
    q, k, v, out, z = ctx.saved_tensors
    dq, dk, dv = linear_bwd(dout.contiguous(), q, k, v, out, z, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


linear_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


def linear_attention(p: Problem, chunk: int | None = None, workers: int | None = None) -> Tensor:
    """Backend entry point: a checked 4-D `Problem` (see `supports`) -> output (B, H, L, Ev).
    chunk: rows per chunk (None: `default_chunk`); workers: threads the B * Hkv heads are split over,
    forward and backward (None: `linear_sweeps.head_workers`: torch's thread count, at most B * Hkv, and 1 for
    calls with too little work per head to gain; `linear_sweeps.over_heads`)."""
    reason = BACKEND.unsupported(p)
    if reason is not None:
        raise ValueError(f"backend='linear' cannot run this call: {reason}")
    q, k, v = p.q, p.k, p.v
    is_causal, keep = mask_form(p)  # (a checked problem: not a reason)
    if keep is not None:  # (Bm, Hm, S)
        if keep.shape[1] != 1 and p.groups > 1:  # per-query-head padding: one state per query head
            k, v = repeat_kv(k, p.groups), repeat_kv(v, p.groups)
        k = torch.where(keep[..., None], k, 0.0)  # a masked key scores (q.0)^2 = 0: exactly removed (an inf one too)
    if q.is_cpu and plain_eager(q) and fused_cpu.worth_building(p):
        fused_cpu.load_extension()  # its C++ feature helpers (linear_features.native_helpers); None: torch ops
    compiling = torch.compiler.is_compiling()
    if chunk is None:  # (under a compiler: decided inside the op, where the helpers are known)
        chunk = 0 if compiling else chunk_for(q)
    else:
        chunk = int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
    if workers is None:
        (B, H, L, E), (Hkv, S, Ev) = q.shape, (k.shape[1], k.shape[2], v.shape[-1])
        workers = linear_sweeps.head_workers(B * Hkv, (H // Hkv * L + S) * n_features(E) * Ev)
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if compiling:
        out, _ = linear_fwd(q, k, v, is_causal, p.scale, p.eps, chunk, workers)
        B, H, L, _ = q.shape
        return out.view(B, H, L, -1).to(q.dtype)
    _RETRIED.flag = False
    out, _, z = _LinearEA.apply(q, k, v, is_causal, p.scale, p.eps, chunk, workers)
    if ((q.dtype == torch.float64 or _RETRIED.flag) and plain_eager(q, k, v) and not transform_active()
            and beyond_float64(q, k, z, is_causal, p.scale, chunk)):
        from . import blocked  # (the quadratic form: s first, then f(s); no cancellation)
        return blocked.BACKEND.run(p)
    return out


# Sequence length above which backend="auto" runs the linear form on CPU, by torch's thread count
# (the table measured at the nearest count is used) and head dim E, for causal forward+backward
# (calls that need gradients) and forward only. Measured on the project's 2-core AVX2 CPU (torch
# 2.13.0, B=4, H=4, float32) against the fastest quadratic EA backend (fused_cpu), by
# `python benchmarks/bench_long.py --threads T --rounds 5`: its crossover estimate (median over L of
# L * t_linear / t_quadratic), rounded to 256; see docs/linear.md for the tables and the commands.
# These: the native feature helpers (csrc/linear_cpu.cpp), the split state, reused buffers, the heads
# split over the threads; quiet machine, 29 Nov 2026 21:30-21:57 UTC, medians of 5 rounds at L = 1024,
# 2048 (E=16), 2048, 3072 (E=32), 4096, 6144 (E=64). Before the helpers: one thread 1280 / 2304 / 6656
# (training), 1536 / 2304 / 6912 (forward only); two threads 1792 / 2816 / 8192 and 2048 / 3072 / 7936.
# Two threads, E=16: re-measured (22:13-22:16 UTC) after small calls stopped splitting the heads
# (linear_sweeps.SPLIT_MIN_WORK): ~1104 / ~1438, they were ~1689 / ~2580 with the split. E=64: re-measured
# (22:26-22:39 UTC) with the 64-row chunk (`default_chunk`): one thread ~5085 / ~5119, two ~5599 / ~5494;
# with 128 rows they were ~5522 / ~5684 and ~5938 / ~5810.
CROSSOVER_TRAIN = {1: {16: 1024, 32: 1792, 64: 5120}, 2: {16: 1024, 32: 2048, 64: 5632}}
CROSSOVER_INFER = {1: {16: 1024, 32: 1792, 64: 5120}, 2: {16: 1536, 32: 2560, 64: 5376}}


def crossover_length(E: int, train: bool, threads: int | None = None) -> float:
    """The measured crossover for E at `threads` (None: torch.get_num_threads()) from the table of
    the nearest measured thread count; geometric interpolation between measured E, ~E^2 beyond."""
    tables = CROSSOVER_TRAIN if train else CROSSOVER_INFER
    threads = torch.get_num_threads() if threads is None else threads
    table = tables[min(tables, key=lambda t: (abs(t - threads), t))]
    Es = sorted(table)
    if E <= Es[0]:
        return table[Es[0]] * E / Es[0]
    if E >= Es[-1]:
        return table[Es[-1]] * (E / Es[-1]) ** 2
    hi = next(e for e in Es if e >= E)
    lo = Es[Es.index(hi) - 1]
    t = math.log(E / lo) / math.log(hi / lo)
    return table[lo] * (table[hi] / table[lo]) ** t


def linear_pays_off(p: Problem) -> bool:
    """The `backend="auto"` rule: EA-squared on CPU, long enough that the linear form is faster.
    (On GPU the crossover is unmeasured, so "auto" keeps the quadratic kernels there.) The length
    is checked first, so that a full mask is inspected (`mask_form`) only for calls that are long
    enough for the linear form to be chosen; supports() (which builds a reason string) only then."""
    if p.variant != "squared" or not p.q.is_cpu:
        return False
    L, S, E = p.q.shape[2], p.k.shape[2], p.q.shape[3]
    # causal: quadratic work ~ L^2/2; bidirectional ~ L*S vs linear ~ (L + S): effective length
    bidirectional = 4.0 * L * S / (L + S)
    threshold = crossover_length(E, p.requires_grad)
    if min(L, bidirectional) < threshold or supports(p) is not None:  # (L <= 4LS/(L+S) when L == S)
        return False
    return (L if mask_form(p)[0] else bidirectional) >= threshold


BACKEND = Backend(
    "linear", linear_attention, supports, priority=40, prefer=linear_pays_off, variants=("squared",),
    description="exact chunked linear form of variant='squared' (O(L) time and memory)",
)
