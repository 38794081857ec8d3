"""The oracle of the backend fuzzer (tests/ops/test_fuzz_backends.py): the definition in float64, the
rounding error the reference itself makes on a call (the baselines of the tolerances), and the
comparison. See the test module's docstring for the property.
"""
from __future__ import annotations

import torch

from expressive_attention import expressive_attention
from expressive_attention.ops import expressive_weights, score_fn
from expressive_attention.ops.problem import normalise
from expressive_attention.ops.reference import causal_mask, compute_dtype, reference_attention, repeat_kv

C = 16.0  # a backend's error may be C times the baselines' (see Oracle.pairs)
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # of max|v|
U64_OVER_U32 = 2.0**-29
NUDGE = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~8 ulps and more
# Gradients are compared for calls with |s| <= S_GRAD: beyond it the float64 reference's own gradient
# (autograd through f(s) / (eps + sum f)) cancels catastrophically (saturating: f' = 2s/(1+s^2)^2 as a
# difference of terms ~1/s) and is no oracle; up to it f(s) stays finite in float64 for every variant.
S_GRAD = 20.0


def s_bound(p) -> float:
    """|scale| max|q| max|k| >= every |s_ij| (Cauchy-Schwarz with norms over E)."""
    if p.q.numel() == 0 or p.k.numel() == 0:
        return 0.0
    norms = [torch.linalg.vector_norm(t.detach().double(), dim=-1).max().item() for t in (p.q, p.k)]
    return abs(p.scale) * norms[0] * norms[1]


def run_definition(args, kw, dtype=torch.float64, grad=False, seed=0):
    """`run` of the definition itself: `reference_attention` on the checked 4-D problem with inputs cast to
    `dtype`, not through the dispatcher (whose shortcuts for empty and E = 0 calls every backend shares)."""
    leaves = [t.detach().to(dtype).requires_grad_(grad) for t in args]
    p = normalise(*leaves, kw["attn_mask"], 0.0, kw["is_causal"], kw["scale"], kw["enable_gqa"], kw["variant"],
                  kw["eps"], kw["power"])
    ct = compute_dtype(dtype)  # (GQA: the groups' gradients summed there, as the reference backend does)
    out = reference_attention(p.q, repeat_kv(p.k.to(ct), p.groups), repeat_kv(p.v.to(ct), p.groups), p.mask, 0.0,
                              p.is_causal, p.scale, variant=p.variant, eps=p.eps, power=p.power).reshape(p.out_shape)
    if not grad:
        return out, None
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, leaves, do, allow_unused=True)  # (q and k are unused when E = 0)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def gradient_scales(p, kw, out) -> list[float]:
    """The size of the terms each gradient (q, k, v) sums (every backward rounds those), which can be far
    above the gradient itself: with one key, out = f v / (eps + f) and d out/dq ~ eps is the difference
    of terms ~ (f'/z) |dO| |v| |k| scale. With T_ij = a_ij |f'/f|(s_ij) = |f'(s_ij)| / z_i:
    dq_i ~ scale sum_j T_ij |dO_i| (|v_j| + |o_i|) |k_j|, dk_j likewise with |q_i|, dv_j ~ sum_i |dO_i| (the
    weights' errors are absolute, of the row's normaliser: the linear form's c u R_i, docs/linear.md)."""
    q, k, v = p.q.detach().double(), repeat_kv(p.k, p.groups).detach().double(), repeat_kv(p.v, p.groups).detach().double()
    a = expressive_weights(q, k, p.mask, p.is_causal, p.scale, variant=p.variant,
                           eps=p.eps, power=p.power)  # (B, H, L, S)
    s = (p.scale * (q @ k.transpose(-2, -1))).requires_grad_()
    (dlogf,) = torch.autograd.grad(score_fn(s, p.variant, p.power).log().sum(), s)
    t = torch.where(a > 0, a * dlogf.abs(), 0.0).nan_to_num(0.0, 0.0, 0.0)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).reshape(
        *q.shape[:3], v.shape[-1]).norm(dim=-1)  # |dO_i| of `run`'s dO
    o, vn, qn, kn = out.double().reshape(do.shape + (-1,)).norm(dim=-1), v.norm(dim=-1), q.norm(dim=-1), k.norm(dim=-1)
    pair = t * do[..., None] * (vn[:, :, None, :] + o[..., None])  # (B, H, L, S)
    dq = abs(p.scale) * (pair * kn[:, :, None, :]).sum(-1)
    dk = abs(p.scale) * (pair * qn[..., None]).sum(-2) * p.groups
    dv = do.sum(-1) * p.groups  # sum_i a_ij |dO_i| <= sum_i |dO_i|: a weight's error counts against 1, not a_ij
    return [x.amax().item() if x.numel() else 0.0 for x in (dq, dk, dv)]


def run(args, kw, backend, dtype=None, grad=False, seed=0):
    """(output, grads of q, k, v or None) of one call; inputs cast to `dtype` (None: as they are)."""
    leaves = [(t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_(grad) for t in args]
    out = expressive_attention(*leaves, backend=backend, **kw)
    if not grad:
        return out, None
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, do)


def clean_elements(p) -> torch.Tensor:
    """(B, H, L, Ev) bool: the output elements no non-finite input reaches (see the module docstring)."""
    q, k, v = p.q, repeat_kv(p.k, p.groups), repeat_kv(p.v, p.groups)
    keep = torch.ones(*q.shape[:3], k.shape[2], dtype=torch.bool)
    if p.is_causal:
        keep = keep & causal_mask(q.shape[2], k.shape[2])
    if p.mask is not None:
        keep = keep & p.mask
    row_bad = (keep & ~k.isfinite().all(-1)[:, :, None, :]).any(-1) | ~q.isfinite().all(-1)
    col_bad = ~v.isfinite().all(-2)  # (B, H, Ev): 0 * inf = NaN in any weighted sum over the keys
    return ~row_bad[..., None] & ~col_bad[:, :, None, :]


def assert_agrees(got, exact, noise, clean, scale, floor, what):
    """|got - exact| <= C * noise + floor * scale on the clean elements whose exact value the dtype can
    hold (an fp16 gradient may overflow). `noise` (the baselines' error, shaped like got) is taken as its
    largest value per row (the last dim) for an output (`clean` given: rows are independent), over the
    whole tensor for a gradient (`clean` None: every key mixes every row)."""
    per_row = clean is not None
    clean = (torch.ones(got.shape, dtype=torch.bool) if clean is None else clean) & (
        exact.double().abs() <= torch.finfo(got.dtype).max)
    got, exact = got.double(), exact.double()
    err = (got - exact).abs()
    noise = torch.where(clean & noise.isfinite(), noise, 0.0)
    est = noise.amax(-1, keepdim=True) if per_row else noise.amax()
    tol = C * est + floor * scale
    bad = clean & ~(err <= tol)
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} element(s) off, e.g. at {i}: got {got[i].item()!r}, "
                             f"exact {exact[i].item()!r}, tolerance {tol.expand(err.shape)[i].item():.3g}")


class Oracle:
    """The float64 reference on a call's inputs, the baseline run(s) and the scales of the tolerances."""

    def __init__(self, p, args, kw, grad):
        self.args, self.kw, self.grad, self.dtype = args, kw, grad, args[0].dtype
        self.exact = run_definition(args, kw, torch.float64, grad)
        self.low = torch.float32 if self.dtype == torch.float64 else self.dtype  # the baselines' precision
        self.ratio = U64_OVER_U32 if self.dtype == torch.float64 else 1.0
        self.base = run_definition(args, kw, self.low, grad)
        self.nudged = None
        self.frame = p.q.shape[:3] + (p.v.shape[-1],)
        self.clean = clean_elements(p)
        v = repeat_kv(p.v, p.groups).double()
        v = torch.where(v.isfinite(), v.abs(), 0.0).flatten(2)
        self.scale = torch.cat([v, v.new_zeros(*v.shape[:2], 1)], -1).amax(-1)[..., None, None]  # (B, H, 1, 1)
        if grad:
            self.natural = gradient_scales(p, kw, self.exact[0])

    def pairs(self):
        """The baselines, pairs of runs (a, b) and a ratio: |a - b| * ratio is rounding error the comparison
        allows for. Both are the reference's, a stable algorithm, so they measure how sensitive the call is
        to rounding, never how unstable a backend is: the reference in the low precision against the
        exact answer (times `ratio`), and the reference against itself on inputs nudged by a few ulps
        (NUDGE): the rounding noise of results that cancel (one key: out = f v / (eps + f), d out/dq ~ eps),
        which one run can miss by luck or by saturating."""
        if self.nudged is None:
            g = torch.Generator().manual_seed(3)
            self.nudged = [(t.detach().double() * (1 + NUDGE[self.dtype] * torch.randn(t.shape, generator=g,
                            dtype=torch.float64))).to(self.dtype) for t in self.args]
            self.ref_nudged = run_definition(self.nudged, self.kw, self.dtype, self.grad)
        ref = self.exact if self.dtype == torch.float64 else self.base
        return [((self.base, self.exact), self.ratio), ((self.ref_nudged, ref), 1.0)]

    def check(self, name, out, grads):
        pairs = self.pairs()
        f = self.frame

        def noise(i, j=None):
            pick = (lambda r: r[i]) if j is None else (lambda r: r[i][j])
            return torch.stack([r * (pick(a).double() - pick(b).double()).abs() for (a, b), r in pairs]).amax(0)

        assert_agrees(out.reshape(f), self.exact[0].reshape(f), noise(0).reshape(f), self.clean, self.scale,
                      FLOOR[self.dtype], f"{name}: output")
        for i, t in enumerate("qkv" if self.grad else ""):
            g, ge = grads[i], self.exact[1][i]
            if g.numel():
                gscale = max(ge.abs().amax().item(), self.natural[i])
                assert_agrees(g, ge, noise(1, i), None, gscale, FLOOR[self.dtype], f"{name}: d{t}")
