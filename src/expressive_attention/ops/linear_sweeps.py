"""The chunk loops of EA-squared's linear form (backend="linear"): forward and backward, causal and not.

On 3-D tensors: N = B * Hkv heads, G query heads per key/value head; q (N, G, L, E) unscaled (each
chunk of rows is multiplied by `scale` into a reused buffer), k (N, S, E), v (N, S, Ev). The state is
a `SplitState`: sv = sum_j phi(k_j) v_j^T (N, F, Ev) and gram = sum_j k_j k_j^T (N, E, E), so that

    num_i = sum_{j<=i} f_ij v_j = phi(q_i)^T sv_i,      den_i = sum_{j<=i} f_ij = q_i^T gram_i q_i,
    out_i = num_i / (eps + den_i)        (a row with eps + den <= 0 divides by 1, as the reference)

Causal: chunks of C rows; inside a chunk the quadratic form (s^2 masked by tril), across chunks the
running state. The backward recomputes the chunk features instead of keeping them, in two sweeps:
forward order for dq (which needs the prefix state), reverse order for dk/dv (which need the suffix
sums dsv = sum_{later i} phi(q_i) gv_i^T and dgram = sum_{later i} gz_i q_i q_i^T). With
gv_i = dO_i / Z_i and gz_i = -(dO_i . O_i) / Z_i (the gradients w.r.t. num_i and den_i):

    inside a chunk:  dF = gv v^T + gz 1^T,  ds = 2 s dF (masked),  dq += ds k, dk += ds^T q, dv += F^T gv
    across chunks:   dq_i = 2 (q_i (x) gv_i) . sv^(a,(b,v)) + 2 gz_i gram q_i,
                     dk_j = 2 (k_j (x) v_j) . dsv^(a,(b,v)) + 2 dgram k_j,   dv_j = phi(k_j)^T dsv

where sv^(a,(b,v)) = sum_j k_ja k_jb v_jv is the packed state unpacked (symmetric in a, b): the
gradient of phi as one wide GEMM, or (E >= PACKED_PHI_GRAD_FROM_E) on the packed state: dphi = y sv^T
(N, F, n), then the symmetric contraction of each row (`PhiGrad`). Every per-chunk temporary lives in a buffer reused across chunks
(`Buffers`): a fresh multi-MB tensor per chunk is a fresh mapping, page-faulted on first use, which
made the whole call ~1.7x slower under the benchmarks' MALLOC_MMAP_THRESHOLD_=65536.

Threads: the heads are independent, so with torch on T threads the sweeps split the N heads into T
contiguous slices, each run by a worker thread with torch on one thread (`over_heads`): one barrier
per call instead of one per op.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable

import torch
from torch import Tensor

from ._functorch import plain_eager
from .linear_features import Buffers, OuterProducts, PackedFeatures, PhiGrad, SplitState, native_helpers, unpack_state


def causal_tril(n: int, dtype, device) -> Tensor:
    return torch.ones(n, n, dtype=dtype, device=device).tril()


def _scaled_rows(q: Tensor, scale: float, c0: int, c1: int, ws: Buffers) -> Tensor:
    """Query rows c0:c1 of q (N, G, L, E) times scale, in a reused buffer: (N, G * n, E)."""
    N, G, _, E = q.shape
    return torch.mul(q[:, :, c0:c1], scale, out=ws.take("q", q, N, G, c1 - c0, E)).view(N, G * (c1 - c0), E)


def _scores(qc: Tensor, kc: Tensor, ws: Buffers) -> Tensor:
    """s = qc kc^T (N, G * n, n) in a reused buffer."""
    return torch.bmm(qc, kc.transpose(1, 2), out=ws.take("s", qc, qc.shape[0], qc.shape[1], kc.shape[1]))


def _gram_rows(qc: Tensor, gram: Tensor, ws: Buffers) -> Tensor:
    """qc gram (N, n, E) in a reused buffer (gram is symmetric: also gram qc per row)."""
    return torch.bmm(qc, gram, out=ws.take("qK", qc, *qc.shape))


def _normalise_into(num: Tensor, den: Tensor, eps: float, out: Tensor, zs: Tensor) -> None:
    """out (N, G, n, Ev) = num / z, zs (N, G, n, 1) = z, with z = eps + den, z <= 0 -> 1 (the reference's
    rule for rows that see no key); num (N, G * n, Ev), den (N, G * n)."""
    z = den.add_(eps)
    z = torch.where(z > 0, z, torch.ones_like(z)).view(zs.shape)
    zs.copy_(z)
    torch.div(num.view(out.shape), z, out=out)


# Below this much state work per head ((G L + S) F Ev multiply-adds: every query row reads the state,
# every key row updates it) the heads are not split: the split's fixed costs (one more thread issuing
# every op of the sweep, the GIL they share) outweigh the work. Measured with the native helpers (2 threads,
# B=4, H=4, fwd+bwd, median of 7, split / unsplit): quiet machine E=16 L=1024 (4.5M) 38.9 / 24.3 ms,
# L=2048 61.9 / 45.2, L=4096 (17.8M) 112 / 88, E=32 L=2048 (69M) 135 / 124, L=4096 256 / 254, E=64 L=4096
# 1272 / 1299; with one other busy process E=16 L=1024 66.0 / 69.6, L=4096 188 / 219, E=32 L=4096 445 / 859
# (a second loaded run, E=16: L=1024 40.1 / 42.7, L=2048 80.8 / 82.9, L=4096 156.5 / 165.5).
SPLIT_MIN_WORK = 2**24


def head_workers(N: int, work_per_head: float | None = None) -> int:
    """How many threads the sweeps split the N = B * Hkv heads over by default: torch's thread count, at
    most N (see `over_heads`); 1 when `work_per_head` (the state's multiply-adds per head, (G L + S) F Ev)
    is below SPLIT_MIN_WORK."""
    if work_per_head is not None and work_per_head < SPLIT_MIN_WORK:
        return 1
    return max(1, min(torch.get_num_threads(), N))


_pool: "ThreadPoolExecutor | None" = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new one when needed."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _submit(work: Callable[[slice], None], slices: list) -> list:
    """Futures of work(h) for each slice, on the module's worker threads (kept between calls: a fresh
    thread's first torch op initialises OpenMP and MKL for it, ~1-2 ms a call under load)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < len(slices):
            if _pool is not None:
                _pool.shutdown(wait=False)  # (what it runs still completes)
            _pool, _pool_size = ThreadPoolExecutor(len(slices), thread_name_prefix="ea-linear"), len(slices)
        return [_pool.submit(work, h) for h in slices]


# In a head-split worker phi is built by rows (E ops a build) only from this head dim on; below it by the
# full outer product and a row gather (4 ops of ~2x the elements). Each op takes the GIL, which all the
# workers share: with E ops a build the Python side of the small ops, not the work, limited the split.
# Measured (quiet machine, 2 threads, B=4, H=4, fwd+bwd, 2 alternating processes each, unsplit / split
# by rows / split by gather): E=16, L=16384: 500 / 840-877 / 549-593 ms; E=32, L=4096: 400-407 /
# 447-462 / 378-379 ms; E=64, L=4096: 1991-2050 / 1618-1740 / 1969-2068 ms.
SPLIT_ROWS_FROM_E = 48
_worker = threading.local()  # .active: this thread runs a slice of heads for over_heads


def _phi_builder(E: int) -> PackedFeatures:
    """The feature builder for this thread: PackedFeatures' own rule (by rows on one torch thread), but
    in a head-split worker by rows only from E = SPLIT_ROWS_FROM_E."""
    return PackedFeatures(E >= SPLIT_ROWS_FROM_E if getattr(_worker, "active", False) else None)


def over_heads(run: Callable[[slice], None], N: int, workers: int, *tensors: Tensor) -> None:
    """Run `run(h)` on `workers` contiguous slices h that cover range(N) (the heads: each head's sweep is
    independent of the others), each slice in a thread of its own in which torch runs on one thread;
    workers <= 1: `run(slice(0, N))` in the calling thread, with torch's threads splitting each op.

    Why: a chunk sweep is thousands of small ops (tens to hundreds of microseconds each), and with
    torch's threads every op is a parallel region whose threads meet at a barrier; on a busy machine each
    barrier waits for a descheduled thread (profile of E=32, L=4096 fwd+bwd at 2 threads, load ~2.5:
    2.7-4.8 s against 0.9-1.1 s on one thread, elementwise ops ~1 ms each instead of ~30 us). Split by
    heads, each thread runs the one-thread schedule with no barrier at all (docs/linear.md, "Threads").
    On a quiet machine the gain is smaller (2 threads: E=32 ~6%, E=64 ~17%; E=16 loses ~10%): every
    worker issues all the ops of a sweep, and the Python side of each op holds the GIL they share.
    The results are those of the unsplit sweep, head by head.

    torch.set_num_threads is per thread for the running thread but also sets the count that threads
    started later begin with: the workers set 1 and restore the caller's count when done. The caller's
    inference mode is carried into the workers, which build no autograd graph.
    Under a compiler, a torch_dispatch mode (e.g. FLOP counting) or a torch.func transform of `tensors`,
    all of them per thread, the heads are not split."""
    workers = min(workers, N)
    if workers <= 1 or not plain_eager(*tensors):
        run(slice(0, N))
        return
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()

    def work(h: slice) -> None:
        torch.get_num_threads()  # a fresh thread takes torch's settings now, not at its first op
        torch.set_num_threads(1)
        _worker.active = True
        try:
            with torch.inference_mode(inference), torch.no_grad():
                run(h)
        finally:
            _worker.active = False
            torch.set_num_threads(threads)

    bounds = [N * i // workers for i in range(workers + 1)]
    for f in _submit(work, [slice(a, b) for a, b in zip(bounds, bounds[1:])]):
        f.result()


def causal_forward(q: Tensor, k: Tensor, v: Tensor, st: SplitState, eps: float, chunk: int, scale: float,
                   workers: int = 1):
    """Causal linear EA over the L tokens that follow those summarised in `st` (updated in place), the
    heads split over `workers` threads (`over_heads`). Returns out (N, G, L, Ev), z (N, G, L, 1)."""
    N, G, L, _ = q.shape
    out = q.new_empty(N, G, L, v.shape[-1])
    zs = q.new_empty(N, G, L, 1)
    over_heads(lambda h: _causal_forward(q[h], k[h], v[h], st[h], eps, chunk, scale, out[h], zs[h]), N, workers, q, k, v)
    return out, zs


@torch.no_grad()
def _causal_forward(q, k, v, st: SplitState, eps, chunk, scale, out: Tensor, zs: Tensor) -> None:
    N, G, L, E = q.shape
    Ev = v.shape[-1]
    ws, phi = Buffers(), _phi_builder(E)
    future = causal_tril(min(chunk, L), torch.bool, q.device).logical_not_()  # keys after the row
    for c0 in range(0, L, chunk):
        c1 = min(L, c0 + chunk)
        n = c1 - c0
        qc = _scaled_rows(q, scale, c0, c1, ws)
        kc, vc = k[:, c0:c1], v[:, c0:c1]
        f = _scores(qc, kc, ws).square_()
        f.view(N, G, n, n).masked_fill_(future[:n, :n], 0.0)  # (not * 0: a later inf key must not give NaN)
        num = torch.bmm(f, vc, out=ws.take("num", q, N, G * n, Ev))
        num.baddbmm_(phi(qc), st.sv)
        den = f.sum(-1).add_(_gram_rows(qc, st.gram, ws).mul_(qc).sum(-1))  # (N, G*n)
        st.add(kc, vc, phi)
        _normalise_into(num, den, eps, out[:, :, c0:c1], zs[:, :, c0:c1])


@torch.no_grad()
def global_state(k: Tensor, v: Tensor, chunk: int) -> SplitState:
    """The state of all keys: sv = sum_j phi(k_j) v_j^T, gram = sum_j k_j k_j^T."""
    N, S, E = k.shape
    st = SplitState.zeros(N, E, v.shape[-1], k.dtype, k.device)
    phi = _phi_builder(E)
    for c0 in range(0, S, chunk):
        st.add(k[:, c0 : c0 + chunk], v[:, c0 : c0 + chunk], phi)
    return st


def full_forward(q: Tensor, k: Tensor, v: Tensor, eps: float, chunk: int, scale: float, workers: int = 1):
    """Non-causal: every query sees every key through one global state (per head; the heads split over
    `workers` threads). Returns out (N, G, L, Ev), z (N, G, L, 1)."""
    N, G, L, _ = q.shape
    out = q.new_empty(N, G, L, v.shape[-1])
    zs = q.new_empty(N, G, L, 1)
    over_heads(lambda h: _full_forward(q[h], k[h], v[h], eps, chunk, scale, out[h], zs[h]), N, workers, q, k, v)
    return out, zs


@torch.no_grad()
def _full_forward(q, k, v, eps, chunk, scale, out: Tensor, zs: Tensor) -> None:
    N, G, L, E = q.shape
    Ev = v.shape[-1]
    st = global_state(k, v, chunk)
    ws, phi = Buffers(), _phi_builder(E)
    for c0 in range(0, L, chunk):
        c1 = min(L, c0 + chunk)
        qc = _scaled_rows(q, scale, c0, c1, ws)
        num = torch.bmm(phi(qc), st.sv, out=ws.take("num", q, N, qc.shape[1], Ev))
        den = _gram_rows(qc, st.gram, ws).mul_(qc).sum(-1)
        _normalise_into(num, den, eps, out[:, :, c0:c1], zs[:, :, c0:c1])


class _BackwardBuffers(Buffers):
    """The backward's buffers, with those of the outer products and of the gradient through phi."""

    def __init__(self):
        super().__init__()
        self.outer, self.phi_grad = OuterProducts(), PhiGrad()


class _Grads:
    """gv = dO / Z (N, G * n, Ev) and gz = -(dO . O) / Z (N, G * n, 1) of rows c0:c1, in reused buffers."""

    def __init__(self, do: Tensor, o: Tensor, z: Tensor, ws: Buffers):
        self.do, self.o, self.z, self.ws = do, o, z, ws

    def __call__(self, c0: int, c1: int) -> tuple[Tensor, Tensor]:
        N, G, _, Ev = self.do.shape
        n = c1 - c0
        do, o, z = self.do[:, :, c0:c1], self.o[:, :, c0:c1], self.z[:, :, c0:c1]
        gz = torch.mul(do, o, out=self.ws.take("gz_t", do, N, G, n, Ev)).sum(-1, keepdim=True).div_(z).neg_()
        gv = torch.div(do, z, out=self.ws.take("gv", do, N, G, n, Ev))
        return gv.view(N, G * n, Ev), gz.view(N, G * n, 1)


# From this head dim on, the backward takes the gradient through phi on the packed state (torch ops); with
# the native helpers, at every head dim.
PACKED_PHI_GRAD_FROM_E = 48


def packed_phi_grad(E: int, native: bool = False) -> bool:
    """Whether the gradient through phi is taken on the packed state (dphi = y sv^T, then `PhiGrad`:
    half the GEMM flops, plus the E^2-per-row contraction) rather than by the wide GEMM on the unpacked
    state. With torch ops the contraction is 2 E memory-bound small ops; measured (one thread, causal
    fwd+bwd, B=4, H=4, median of 5 interleaved repeats, wide / packed): E=16 L=4096 313 / 355 ms; E=32
    L=4096 994 / 1020 ms; E=64 L=2048 (3 repeats) 2422 / 2144 ms. With the native helpers (`native`:
    one pass in C++) packed wins at every E: E=16 L=8192 295 / 273 ms, E=32 L=4096 475 / 378 ms
    (one thread, median of 5, 29 Nov 2026)."""
    return native or E >= PACKED_PHI_GRAD_FROM_E


def _state_grad(x: Tensor, y: Tensor, w: Tensor | None, st: SplitState, ws: Buffers, name: str) -> Tensor:
    """The gradient w.r.t. x (N, n, E) of sum_i <y_i, num_i> + w_i den_i through a state, into buffer
    `name`: for queries (x = q, y = gv, w = gz; st = the prefix state) or keys (x = k, y = v, w = 1;
    st = the suffix sums of the gradients): 2 (x (x) y) . sv^(a,(b,v)) + 2 w (x gram)."""
    N, n, E = x.shape
    out = ws.take(name, x, N, n, E)
    xg = _gram_rows(x, st.gram, ws)
    if w is not None:
        xg.mul_(w)
    if packed_phi_grad(E, native_helpers(x) is not None):
        dphi_t = torch.bmm(st.sv, y.transpose(1, 2), out=ws.take("dphi", x, N, st.sv.shape[1], n))  # (N, F, n)
        return torch.add(ws.phi_grad(dphi_t, x), xg, alpha=2.0, out=out)
    unpacked = unpack_state(st.sv, E, out=ws.take("unpacked", x, N, E * E, y.shape[-1]))  # (N, E, E*Ev)
    return torch.bmm(ws.outer(x, y), unpacked.transpose(1, 2), out=out).add_(xg).mul_(2.0)


def backward(q, k, v, o, z, do, chunk, is_causal, scale, workers: int = 1):
    """Gradients w.r.t. the scaled queries q * scale (N, G, L, E), k (N, S, E) and v (N, S, Ev), the heads
    split over `workers` threads (`over_heads`)."""
    N = q.shape[0]
    dqs, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    over_heads(lambda h: _backward(q[h], k[h], v[h], o[h], z[h], do[h], chunk, is_causal, scale, dqs[h], dk[h], dv[h]),
               N, workers, q, k, v, do)
    return dqs, dk, dv


@torch.no_grad()
def _backward(q, k, v, o, z, do, chunk, is_causal, scale, dqs: Tensor, dk: Tensor, dv: Tensor) -> None:
    N, G, L, E = q.shape
    S, Ev = k.shape[1], v.shape[-1]
    ws, phi = _BackwardBuffers(), _phi_builder(E)
    grads = _Grads(do, o, z, ws)

    def add_grads(dst: SplitState, qc: Tensor, gv: Tensor, gz: Tensor) -> None:
        """dsv += phi(qc)^T gv, dgram += (gz qc)^T qc."""
        dst.sv.baddbmm_(phi(qc).transpose(1, 2), gv)
        dst.gram.baddbmm_(torch.mul(qc, gz, out=ws.take("qgz", qc, *qc.shape)).transpose(1, 2), qc)

    dst = SplitState.zeros(N, E, Ev, k.dtype, k.device)
    if not is_causal:
        st = global_state(k, v, chunk)
        for c0 in range(0, L, chunk):
            c1 = min(L, c0 + chunk)
            qc, (gv, gz) = _scaled_rows(q, scale, c0, c1, ws), grads(c0, c1)
            dqs[:, :, c0:c1] = _state_grad(qc, gv, gz, st, ws, "dq").view(N, G, c1 - c0, E)
            add_grads(dst, qc, gv, gz)
        for c0 in range(0, S, chunk):
            kc, vc = k[:, c0 : c0 + chunk], v[:, c0 : c0 + chunk]
            dk[:, c0 : c0 + chunk] = _state_grad(kc, vc, None, dst, ws, "dk")
            torch.bmm(phi(kc), dst.sv, out=dv[:, c0 : c0 + chunk])
        return

    tril = causal_tril(min(chunk, L), q.dtype, q.device)
    # sweep 1, forward order: the quadratic part inside each chunk, and dq from the prefix state
    st = SplitState.zeros(N, E, Ev, k.dtype, k.device)
    for c0 in range(0, L, chunk):
        c1 = min(L, c0 + chunk)
        n = c1 - c0
        qc, (gv, gz) = _scaled_rows(q, scale, c0, c1, ws), grads(c0, c1)
        kc, vc = k[:, c0:c1], v[:, c0:c1]
        m = tril[:n, :n]
        s = _scores(qc, kc, ws)  # (N, G*n, n)
        ds = torch.bmm(gv, vc.transpose(1, 2), out=ws.take("ds", q, N, G * n, n)).add_(gz)  # dF
        ds.view(N, G, n, n).mul_(m).mul_(s.view(N, G, n, n)).mul_(2.0)  # dF * f'(s), masked
        f = s.square_()
        f.view(N, G, n, n).mul_(m)
        dv[:, c0:c1] += torch.bmm(f.transpose(1, 2), gv, out=ws.take("dv_c", q, N, n, Ev))
        dk[:, c0:c1] += torch.bmm(ds.transpose(1, 2), qc, out=ws.take("dk_c", q, N, n, E))
        if c0 > 0:
            dq = _state_grad(qc, gv, gz, st, ws, "dq").baddbmm_(ds, kc)
        else:
            dq = torch.bmm(ds, kc, out=ws.take("dq", q, N, G * n, E))
        dqs[:, :, c0:c1] = dq.view(N, G, n, E)
        st.add(kc, vc, phi)
    # sweep 2, reverse order: keys of chunk c reach the queries of later chunks through dst
    starts = list(range(0, L, chunk))
    for c0 in reversed(starts):
        c1 = min(L, c0 + chunk)
        kc, vc = k[:, c0:c1], v[:, c0:c1]
        if c0 != starts[-1]:
            dk[:, c0:c1] += _state_grad(kc, vc, None, dst, ws, "dk")
            dv[:, c0:c1] += torch.bmm(phi(kc), dst.sv, out=ws.take("dv_c", q, N, c1 - c0, Ev))
        if c0 > 0:
            qc, (gv, gz) = _scaled_rows(q, scale, c0, c1, ws), grads(c0, c1)
            add_grads(dst, qc, gv, gz)
