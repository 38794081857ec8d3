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
import dataclasses
import os

import pytest
from hypothesis import HealthCheck, event, example, given, settings

from expressive_attention import expressive_attention
from expressive_attention.ops import BACKENDS
from expressive_attention.ops.dispatch import refusal
from expressive_attention.ops.problem import normalise

from fuzz_calls import build, specs
from fuzz_oracle import S_GRAD, Oracle, run, s_bound

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("ci", max_examples=int(os.environ.get("EA_FUZZ_EXAMPLES", 500)), deadline=None,
                          derandomize=True, database=None, suppress_health_check=_SLOW, print_blob=True)
settings.register_profile("nightly", max_examples=int(os.environ.get("EA_FUZZ_EXAMPLES", 20000)), deadline=None,
                          suppress_health_check=_SLOW, print_blob=True)
PROFILE = settings.get_profile(os.environ.get("EA_FUZZ", "ci"))


def check_refusal(call, exc_type, message):
    with pytest.raises(exc_type) as info:
        call()
    assert str(info.value) == message


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
    # the problem as the backends see it: with gradients where this call takes them (flex refuses those on CPU)
    p_run = dataclasses.replace(p, q=p.q.detach().requires_grad_()) if grad else p
    for name in names:
        reason = None if name == "auto" else refusal(BACKENDS[name], p_run)
        event(f"{name}: {f'refused ({reason[:50]})' if reason else 'compared' if oracle else 'ran'}")
        if reason is not None:
            leaves = [t.detach().requires_grad_(grad) for t in args]
            check_refusal(lambda name=name: expressive_attention(*leaves, backend=name, **kw), ValueError,
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
    # flex on CPU in bfloat16: the inf in query row 34 turned row 33 into NaN (now computed in float32)
    call(groups=2, L=76, S=27, E=1, Ev=1, dtype="bfloat16", variant="squared", nonfinite="q:inf"),
    # defect 2: the reference gave NaN in rows 0, 1, which never see the inf key 2 (inf * 0)
    call(mask="causal", nonfinite="k:inf:6"),
    # the linear form had the same inf * 0 (k * keep, f * tril inside a causal chunk)
    call(L=6, S=6, variant="squared", mask="causal", nonfinite="k:inf:9"),
    call(L=6, S=6, variant="squared", mask="keypad", nonfinite="k:inf:0"),  # (key 0 is padding)
    # defect 1: large, nearly orthogonal q and k: the float32 linear form lost s^2 (now retried in float64)
    call(L=1, S=1, E=2, Ev=1, variant="squared", qk_exp=1, orth=4),
    call(L=70, S=70, E=8, variant="squared", mask="causal", qk_exp=1, orth=3),
    call(L=1, S=1, E=2, Ev=1, dtype="float64", variant="squared", orth=5),  # float64 at R = 1e10: 1e-10 off
    # a weight a ~ 5e-6 (eps dominates) with the linear form's absolute error c u R: dv's scale is sum |dO|
    call(L=1, S=1, E=6, Ev=1, dtype="float64", variant="squared", qk_exp=-1, orth=4, grad=True),
    # defect 3: E = 0 with exp_squared averages v (f(0) = 1), it gave zeros
    call(Hkv=2, groups=2, L=3, S=5, E=0, variant="exp_squared", mask="2d", grad=True),
    # the reference's row maximum raised IndexError for S = 0 (exp_squared, power)
    call(L=1, S=0, E=0, Ev=1, ndim=4, dtype="float64", variant="exp_squared", grad=True),
    # float16 GQA: the reference summed the groups' dk in float16, where one group's share overflowed
    call(B=2, groups=2, L=7, S=4, E=1, Ev=4, mask="keypad", dtype="float16", eps=0.0, qk_exp=-2, v_exp=2, grad=True,
         seed=30),
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
