"""Property-based fuzzing of every registered backend against the reference (issue #24).

For a random call (shapes with 0 and 1, GQA, layouts, masks, dtypes, variants, options, |s| up to ~1e4,
keys nearly orthogonal to the queries, inf/nan entries: fuzz_calls.py), every backend in `BACKENDS` (read
at run time: new backends and variants are fuzzed without touching this file) and "auto" must either

* refuse it with ``ValueError("backend=<name> cannot run this call: <reason>")``, <reason> being what its
  ``unsupported(problem)`` says (triton on a machine without CUDA, linear for a non-squared variant, ...);
  an invalid call must be refused by every backend with the reference's own error; or
* return SDPA's shape (..., Hq, L, Ev) in the query's dtype and, on every *clean* output element, agree
  with the definition (`reference_attention` in float64 on the same, upcast inputs; not through the
  dispatcher). An element (row i, value column c) is clean when q_i, every key row that row i may see and
  column c of v over all keys are finite; the others may be anything (a non-finite input may poison the
  rows that see it, never the others). Tolerance: C times the rounding error the *reference* makes on
  this call (in the call's precision, or float32 times 2^-29 for float64 calls; and its change when the
  inputs are nudged by a few ulps), plus a floor per dtype (FLOOR, of max|v|). The baselines are the
  reference's, a stable algorithm: they measure how sensitive the call is to rounding, and excuse no
  instability of a backend (the float32 linear form on nearly orthogonal q, k fails without its retry).
* Gradients (q, k, v) are compared the same way, for the calls drawn with ``grad``, finite inputs and
  |s| <= S_GRAD, with the floor relative to the size of the terms they sum (`gradient_scales`).

Budget: the "ci" profile (the default; derandomized, no database) runs 500 examples, ~25 s on one core.
``EA_FUZZ=nightly`` (``make fuzz``) runs a random search with hypothesis's database in .hypothesis/;
EA_FUZZ_EXAMPLES sets the count of either. A failure found there goes into EXAMPLES below.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings

from expressive_attention import expressive_attention
from expressive_attention.ops import BACKENDS, expressive_weights, score_fn
from expressive_attention.ops.problem import normalise
from expressive_attention.ops.reference import causal_mask, reference_attention, repeat_kv

from fuzz_calls import build, specs

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("ci", max_examples=int(os.environ.get("EA_FUZZ_EXAMPLES", 500)), deadline=None,
                          derandomize=True, database=None, suppress_health_check=_SLOW, print_blob=True)
settings.register_profile("nightly", max_examples=int(os.environ.get("EA_FUZZ_EXAMPLES", 20000)), deadline=None,
                          suppress_health_check=_SLOW, print_blob=True)
PROFILE = settings.get_profile(os.environ.get("EA_FUZZ", "ci"))

C = 16.0  # a backend's error may be C times the baselines' (see Oracle.bases)
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
    out = reference_attention(p.q, repeat_kv(p.k, p.groups), repeat_kv(p.v, p.groups), p.mask, 0.0, p.is_causal,
                              p.scale, variant=p.variant, eps=p.eps, power=p.power).reshape(p.out_shape)
    if not grad:
        return out, None
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, leaves, do, allow_unused=True)  # (q and k are unused when E = 0)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def gradient_scales(p, kw, out) -> list[float]:
    """The size of the terms each gradient (q, k, v) sums (every backward rounds those), which can be far
    above the gradient itself: with one key, out = f v / (eps + f) and d out/dq ~ eps is the difference
    of terms ~ (f'/z) |dO| |v| |k| scale. With T_ij = a_ij |f'/f|(s_ij) = |f'(s_ij)| / z_i:
    dq_i ~ scale sum_j T_ij |dO_i| (|v_j| + |o_i|) |k_j|, dk_j likewise with |q_i|, dv_j ~ sum_i a_ij |dO_i|."""
    q, k, v = p.q.detach().double(), repeat_kv(p.k, p.groups).detach().double(), repeat_kv(p.v, p.groups).detach().double()
    a = expressive_weights(q, k, None if p.mask is None else p.mask, p.is_causal, p.scale, variant=p.variant,
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
    dv = (a * do[..., None]).sum(-2) * p.groups
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


def check_refusal(call, exc_type, message):
    with pytest.raises(exc_type) as info:
        call()
    assert str(info.value) == message


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


def check(spec: dict) -> None:
    args, kw = build(spec)
    names = ["auto", *BACKENDS]
    try:
        p = normalise(*args, kw["attn_mask"], kw["dropout_p"], kw["is_causal"], kw["scale"], kw["enable_gqa"],
                      kw["variant"], kw["eps"], kw["power"])
    except (ValueError, TypeError) as e:  # invalid call: every backend gives the reference's error
        event("invalid call")
        for name in names:
            check_refusal(lambda name=name: expressive_attention(*args, backend=name, **kw), type(e), str(e))
        return
    dtype = args[0].dtype
    grad = spec["grad"] and not spec["dropout"] and all(bool(t.isfinite().all()) for t in args) and s_bound(p) <= S_GRAD
    want_shape = (*args[0].shape[:-1], args[2].shape[-1])  # SDPA's: (..., Hq, L, Ev)
    oracle = None if spec["dropout"] or 0 in want_shape else Oracle(p, args, kw, grad)
    event("gradients compared" if oracle and grad else "values only")
    for name in names:
        reason = None if name == "auto" else BACKENDS[name].unsupported(p)
        event(f"{name}: {f'refused ({reason[:50]})' if reason else 'compared' if oracle else 'ran'}")
        if reason is not None:
            check_refusal(lambda name=name: expressive_attention(*args, backend=name, **kw), ValueError,
                          f"backend={name!r} cannot run this call: {reason}")
            continue
        out, grads = run(args, kw, name, None, grad)
        assert tuple(out.shape) == tuple(want_shape) and out.dtype == dtype, (name, out.shape, want_shape, out.dtype)
        if oracle is not None:
            oracle.check(name, out, grads)


def call(**kw) -> dict:
    """A spec (fuzz_calls.specs) from a small base call and the fields that differ."""
    return {"B": 1, "Hkv": 1, "groups": 1, "L": 4, "S": 4, "E": 3, "Ev": 3, "ndim": 4,
            "layouts": ("contiguous",) * 3, "mask": "none", "dtype": "float32", "variant": "saturating", "power": None,
            "scale": None, "eps": 1e-06, "qk_exp": 0, "v_exp": 0, "orth": 0, "nonfinite": None, "dropout": False, "grad": False,
            "seed": 0, **kw}


# Regression cases: the probe and what the fuzzer found, kept as explicit calls.
EXAMPLES = [
    # defect 2: the reference gave NaN in rows 0, 1, which never see the inf key 2 (inf * 0)
    call(mask="causal", nonfinite="k:inf:6"),
    # the linear form had the same inf * 0 (k * keep, f * tril inside a causal chunk)
    call(L=6, S=6, variant="squared", mask="causal", nonfinite="k:inf:9"),
    call(L=6, S=6, variant="squared", mask="keypad", nonfinite="k:inf:0"),  # (key 0 is padding)
    # defect 1: large, nearly orthogonal q and k: the float32 linear form lost s^2 (now retried in float64)
    call(L=1, S=1, E=2, Ev=1, variant="squared", qk_exp=1, orth=4),
    call(L=70, S=70, E=8, variant="squared", mask="causal", qk_exp=1, orth=3),
    # defect 3: E = 0 with exp_squared averages v (f(0) = 1), it gave zeros
    call(Hkv=2, groups=2, L=3, S=5, E=0, variant="exp_squared", mask="2d", grad=True),
    # the reference's row maximum raised IndexError for S = 0 (exp_squared, power)
    call(L=1, S=0, E=0, Ev=1, ndim=4, dtype="float64", variant="exp_squared", grad=True),
    # tolerances: one key, so d out/dq ~ eps is a difference of terms ~f'/f (gradient_scales); v's rows
    # all equal (expanded): the same in dq; float64, float32 and bfloat16
    call(B=0, L=2, S=2, E=2, Ev=1, ndim=3, layouts=("contiguous", "contiguous", "expanded"), dtype="float64", grad=True),
    call(L=1, S=1, E=1, Ev=4, scale=3.0, grad=True, seed=178),
    call(L=1, S=1, E=1, Ev=1, dtype="bfloat16", grad=True),
    call(Hkv=2, L=1, S=1, E=1, Ev=1, ndim=3, dtype="float64", variant="squared", grad=True),
]


def _with_examples(f):
    for spec in EXAMPLES:
        f = example(spec=spec)(f)
    return f


@settings(PROFILE)
@given(spec=specs())
@_with_examples
def test_backends_agree_with_reference(spec):
    check(spec)
