"""The symmetric degree-2 feature map of EA-squared's linear form, and the state it sums into.

(q.k)^2 = <phi(q), phi(k)> with the *packed* map

    phi(x) = [x_a^2 for a] ++ [sqrt(2) x_a x_b for a < b]            F = E (E+1) / 2 features

(the unpacked x (x) x has E^2, each off-diagonal product twice), in the order of
`feature_pairs(E)`: row a of the upper triangle, (a, a), (a, a+1), ..., (a, E-1), for a = 0..E-1.
They are built feature-major, phi^T (N, F, n), into a reused buffer, so that the rows of the
triangle are contiguous blocks: on one thread one broadcast multiply per row a; on several, the
full outer product and a row gather of its triangle (4 ops instead of E; see PackedFeatures).
(index_select along the feature dim of a row-major (N, n, F) layout was ~50x slower than a multiply
on this CPU, and writing strided blocks of it ~10x slower.)

The state of a run of keys is S = sum_j phi(k_j) [v_j, 1]^T, (N, F, Ev+1): the normaliser rides
along as the last column (the recurrent cache's layout). The chunk sweeps keep it as a `SplitState`:
the value part (N, F, Ev) and the normaliser's part as the Gram matrix (N, E, E). Their backward
takes the gradient through phi either by a wide GEMM on the state "unpacked" (`unpack_state`:
(N, E, E Ev), entry [a, (b, v)] = sum_j k_ja k_jb v_jv, symmetric in a, b) or on the packed state
(`PhiGrad`: the symmetric contraction of dphi = y S^T with x).

Native helpers: when the fused CPU kernel's extension is loaded (`ops/fused_cpu.py`; the linear backend
loads it for calls big enough to be worth its one-time build), the features and the gradient through
them are built by its C++ helpers (`csrc/linear_cpu.cpp`: one pass each, instead of E or 2 E small torch
ops) for plain float32/float64 CPU tensors in eager mode. Compilers, tracers, dispatch modes and
torch.func transforms see the torch ops below, which give the same values (tests/ops/test_linear_native.py).
`USE_NATIVE = False` turns the helpers off (for tests and measurements).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import fused_cpu
from ._functorch import plain_eager

SQRT2 = math.sqrt(2.0)
USE_NATIVE = True
_NATIVE_DTYPES = (torch.float32, torch.float64)


def native_helpers(x: Tensor, dtype: torch.dtype | None = None):
    """The loaded extension whose C++ helpers build the features for `x` (computed in `dtype`, default
    x's), or None (not loaded, turned off, or a tensor they do not take: not CPU, not float32/float64, or
    not plain eager). Never builds."""
    mod = fused_cpu.loaded_module()
    if (mod is None or not USE_NATIVE or (x.dtype if dtype is None else dtype) not in _NATIVE_DTYPES or not x.is_cpu
            or not plain_eager(x)):
        return None
    return mod


def n_features(E: int) -> int:
    """Length of the packed feature map: E (E+1) / 2."""
    return E * (E + 1) // 2


@functools.cache
def feature_pairs(E: int) -> tuple[tuple[int, int], ...]:
    """(a, b) with a <= b for each packed feature, in storage order: the upper triangle by rows."""
    return tuple((a, b) for a in range(E) for b in range(a, E))


def _row_starts(E: int) -> list[int]:
    """Offset of row a of the triangle (its diagonal feature (a, a)) in the packed features."""
    return [a * E - a * (a - 1) // 2 for a in range(E)]


@functools.lru_cache(maxsize=64)
def _tables(E: int, dtype: torch.dtype, device: torch.device):
    """diag (E,) long: packed index of (a, a); unpack (E*E,) long: packed index of (min(a, b), max(a, b));
    unweight (E*E, 1): 1 / the feature's weight (1 on the diagonal, 1/sqrt2 off it); rows (F,) long:
    a * E + b for each packed feature (a, b); weight (F, 1): 1 on the diagonal, sqrt2 off it."""
    starts = _row_starts(E)
    unpack = [starts[min(a, b)] + abs(b - a) for a in range(E) for b in range(E)]
    unweight = [1.0 if a == b else 1.0 / SQRT2 for a in range(E) for b in range(E)]
    return (torch.tensor(starts, dtype=torch.long, device=device),
            torch.tensor(unpack, dtype=torch.long, device=device),
            torch.tensor(unweight, dtype=dtype, device=device)[:, None],
            torch.tensor([a * E + b for a, b in feature_pairs(E)], dtype=torch.long, device=device),
            torch.tensor([1.0 if a == b else SQRT2 for a, b in feature_pairs(E)], dtype=dtype, device=device)[:, None])


class Buffers:
    """Named flat buffers reused across chunks (fresh multi-MB allocations per chunk are 3-5x slower
    on CPU than writing into the same memory: each is a fresh mapping, page-faulted on first use,
    when glibc's mmap threshold is low, as in the benchmarks' MALLOC_MMAP_THRESHOLD_=65536)."""

    def __init__(self):
        self._bufs: dict[str, Tensor] = {}

    def take(self, name: str, like: Tensor, *shape: int) -> Tensor:
        need = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[name] = like.new_empty(need)
        return buf[:need].view(*shape)


class PackedFeatures(Buffers):
    """x (N, n, E) -> phi(x) (N, n, F), a transposed view of a feature-major buffer (N, F, n) that is
    reused across calls (a result is valid until the next call).

    Two ways to build it, the same values: `by_rows` writes each row of the triangle with one
    multiply (E ops, the fewest flops: fastest on one thread); otherwise the full outer product is
    formed and its triangle gathered row-wise (4 ops of ~2x the elements: faster with several
    threads, where each op is a parallel region whose threads must all be scheduled, which on a
    busy machine costs more than the work). None: by_rows when torch runs on one thread."""

    def __init__(self, by_rows: bool | None = None):
        super().__init__()
        self.by_rows = by_rows

    def __call__(self, x: Tensor) -> Tensor:
        N, n, E = x.shape
        native = native_helpers(x)
        if native is not None:
            out = self.take("phi", x, N, n_features(E), n)
            native.linear_features(x, out)
            return out.transpose(1, 2)
        xt = self.take("xt", x, N, E, n)
        xt.copy_(x.transpose(1, 2))  # (N, E, n)
        out = self.take("phi", x, N, n_features(E), n)
        diag, _, _, rows, weight = _tables(E, x.dtype, x.device)
        if not (torch.get_num_threads() == 1 if self.by_rows is None else self.by_rows):
            full = self.take("full", x, N, E, E, n)
            torch.mul(xt[:, :, None], xt[:, None], out=full)  # (N, E, E, n)
            torch.index_select(full.view(N, E * E, n), 1, rows, out=out)  # the upper triangle
            return out.mul_(weight).transpose(1, 2)
        xst = torch.mul(xt, SQRT2, out=self.take("xst", x, N, E, n))
        for a, o in enumerate(_row_starts(E)):  # row a: sqrt2 x_a x_b for b = a..E-1 (diagonal fixed below)
            torch.mul(xst[:, a : a + 1], xt[:, a:], out=out[:, o : o + E - a])
        out.index_copy_(1, diag, torch.mul(xt, xt, out=xst))  # the diagonal terms x_a^2 carry weight 1, not sqrt2
        return out.transpose(1, 2)


class PhiGrad(Buffers):
    """The gradient through the packed features: given dphi^T (N, F, n) (feature-major, as
    S @ g^T gives it) and x (N, n, E), dx (N, n, E) with dx_a = 2 dphi_aa x_a + sqrt2 sum_{b != a}
    dphi_(min(a,b), max(a,b)) x_b, i.e. the symmetric E x E contraction of each row, E^2 work per row
    instead of the wide GEMM's 2 E^2 Ev on the unpacked state. By rows of the triangle: row a's block
    P_a (features (a, a..E-1)) gives dx_a += sum_b P_a[b] x_b and dx_b += P_a[b] x_a (the diagonal
    twice: 2 dphi_aa x_a): 2 E small ops. dphi^T is weighted in place (overwritten)."""

    def __call__(self, dphi_t: Tensor, x: Tensor) -> Tensor:
        N, n, E = x.shape
        native = native_helpers(x)
        if native is not None and dphi_t.is_contiguous():
            dx = self.take("dx", x, N, n, E)
            native.linear_feature_grad(dphi_t, x, dx)
            return dx
        _, _, _, _, weight = _tables(E, x.dtype, x.device)
        pw = dphi_t.mul_(weight)
        xt = self.take("xt", x, N, E, n)
        xt.copy_(x.transpose(1, 2))  # (N, E, n)
        rows = self.take("rows", x, N, E, n)  # sum_b P_a[b] x_b
        cols = self.take("cols", x, N, E, n).zero_()  # sum_a P_a[b] x_a
        tmp = self.take("tmp", x, N, E, n)
        for a, o in enumerate(_row_starts(E)):
            block = pw[:, o : o + E - a]  # (N, E-a, n)
            torch.sum(torch.mul(block, xt[:, a:], out=tmp[:, : E - a]), 1, out=rows[:, a])
            cols[:, a:].addcmul_(block, xt[:, a : a + 1])
        return cols.add_(rows).transpose(1, 2)


class OuterProducts(Buffers):
    """Row-wise outer products x (N, n, a), y (N, n, b) -> (N, n, a*b) in a reused buffer."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        N, n, a = x.shape
        b = y.shape[-1]
        out = self.take("outer", x, N, n, a, b)
        torch.mul(x[..., :, None], y[..., None, :], out=out)
        return out.view(N, n, a * b)


def new_state(N: int, E: int, Ev: int, dtype: torch.dtype, device=None) -> Tensor:
    """An empty state (N, F, Ev+1): no keys seen yet."""
    return torch.zeros(N, n_features(E), Ev + 1, dtype=dtype, device=device)


def add_to_state(state: Tensor, x: Tensor, y: Tensor, phi: PackedFeatures | None = None) -> None:
    """state (N, F, Ev1) += phi(x)^T y for x (N, n, E), y (N, n, Ev1)."""
    state.baddbmm_((phi or PackedFeatures())(x).transpose(1, 2), y)  # (N, F, n) contiguous: a plain GEMM


def read_num(state: Tensor, q: Tensor, phi: PackedFeatures | None = None) -> Tensor:
    """phi(q)^T S for queries q (N, n, E) (already scaled): (N, n, Ev1), the last column the normaliser."""
    return torch.bmm((phi or PackedFeatures())(q), state)


def unpack_state(state: Tensor, E: int, out: Tensor | None = None) -> Tensor:
    """(N, F, Ev1) -> (N, E, E * Ev1) with entry [a, (b, v)] = sum_j x_ja x_jb y_jv (symmetric in a, b),
    written into `out` ((N, E * E, Ev1), e.g. a reused buffer) when given."""
    N, _, Ev1 = state.shape
    _, unpack, unweight, _, _ = _tables(E, state.dtype, state.device)
    out = torch.index_select(state, 1, unpack, out=out) if out is not None else state.index_select(1, unpack)
    return out.mul_(unweight).view(N, E, E * Ev1)


class SplitState:
    """The state as the chunked form keeps it: the value part sv (N, F, Ev) = sum_j phi(k_j) v_j^T and
    the normaliser's part as the Gram matrix gram (N, E, E) = sum_j k_j k_j^T, so that
    den_i = sum_j (q_i.k_j)^2 = q_i^T gram q_i costs E^2 per row. (The packed state's (Ev+1)-th column
    holds the same sums as features: one more column in every F-row GEMM, which MKL ran 1.4-1.5x
    slower with Ev+1 = 33 or 65 columns than with 32 or 64, one thread.)"""

    def __init__(self, sv: Tensor, gram: Tensor):
        self.sv, self.gram = sv, gram

    @classmethod
    def zeros(cls, N: int, E: int, Ev: int, dtype: torch.dtype, device=None) -> "SplitState":
        return cls(torch.zeros(N, n_features(E), Ev, dtype=dtype, device=device),
                   torch.zeros(N, E, E, dtype=dtype, device=device))

    def __getitem__(self, heads: slice) -> "SplitState":
        """The state of some heads: views, so that updating them updates this state."""
        return SplitState(self.sv[heads], self.gram[heads])

    @classmethod
    def from_packed(cls, state: Tensor, E: int) -> "SplitState":
        """From a packed state (N, F, Ev+1) (copies)."""
        N = state.shape[0]
        _, unpack, unweight, _, _ = _tables(E, state.dtype, state.device)
        gram = state[..., -1].index_select(1, unpack).mul_(unweight[:, 0]).view(N, E, E)
        return cls(state[..., :-1].contiguous(), gram)

    def write_packed(self, state: Tensor) -> None:
        """Into a packed state (N, F, Ev+1): sv, and the Gram matrix as the features' sums."""
        N, E, _ = self.gram.shape
        _, _, _, rows, weight = _tables(E, state.dtype, state.device)
        state[..., :-1] = self.sv
        state[..., -1] = self.gram.reshape(N, E * E).index_select(1, rows).mul_(weight[:, 0])

    def add(self, x: Tensor, y: Tensor, phi: "PackedFeatures") -> None:
        """Keys x (N, n, E) with values y (N, n, Ev): sv += phi(x)^T y, gram += x^T x."""
        self.sv.baddbmm_(phi(x).transpose(1, 2), y)  # (N, F, n) contiguous: a plain GEMM
        self.gram.baddbmm_(x.transpose(1, 2), x)


def with_ones(v: Tensor) -> Tensor:
    """v (..., Ev) -> (..., Ev+1) with a ones column: the normaliser rides along in the state."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
