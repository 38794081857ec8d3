"""The three argument checks of a call agree (issue #23, item 5): `problem.normalise`'s general path,
its fast path for the common 4-D call (`problem._normalise_4d`) and "auto"'s decode shortcut
(`fused_cpu.decode_shortcut`, reached through `dispatch.try_shortcut`), on every case of
tests/support/call_cases.py. A fast path returns None for any call it does not take (then the general
path's result or error applies); where it takes one it gives the general path's `Problem` (or, for
the shortcut, its output), and where it refuses a bad call itself it raises the general path's error."""
import inspect
from contextlib import contextmanager

import pytest
import torch
from call_cases import B, BAD, VALID, VALID_GENERAL_ONLY, Ev, H, L, S, E, call_args, random_mask

from expressive_attention import expressive_attention
from expressive_attention.ops import choose_backend, dispatch, functional, fused_cpu, problem
from expressive_attention.ops.dispatch import try_shortcut

CASES = {**{f"valid: {k}": v for k, v in VALID.items()},
         **{f"valid, general path only: {k}": v for k, v in VALID_GENERAL_ONLY.items()},
         **{f"bad: {k}": v for k, v in BAD.items()}}
# the valid calls (L = 3 query rows) that the decode shortcut leaves to the general path
NOT_SHORTCUT = {"int scale, int dropout, int eps", "dropout", "variant power", "S = 0", "E = 0", "requires grad"}
ORDER = tuple(inspect.signature(problem.normalise).parameters)  # query ... power: one order for all three


@pytest.fixture(scope="module", autouse=True)
def built():
    assert fused_cpu.is_available(), f"fused CPU kernel did not build: {fused_cpu.build_error()}"


def _outcome(fn):
    """("value", what fn returned) or ("error", its exception type, its message)."""
    try:
        return ("value", fn())
    except (TypeError, ValueError) as e:
        return ("error", type(e), str(e))


@contextmanager
def _general_only(monkeypatch):
    """Neither fast path runs: normalise's general path, then "auto"'s table."""
    with monkeypatch.context() as mp:
        mp.setattr(problem, "_normalise_4d", lambda *args: None)
        mp.setattr(dispatch, "_SHORTCUTS", [])
        yield


def _same_problem(p, r):
    for a, b in zip((p.q, p.k, p.v), (r.q, r.k, r.v)):  # the same views of the caller's tensors
        assert (a.shape, a.stride(), a.data_ptr(), a.dtype) == (b.shape, b.stride(), b.data_ptr(), b.dtype)
    assert (p.mask is None) == (r.mask is None)
    if p.mask is not None:
        assert p.mask.shape == r.mask.shape and torch.equal(p.mask, r.mask)
    for field in ("is_causal", "scale", "variant", "eps", "dropout_p", "out_shape", "power", "log_fgate"):
        got, want = getattr(p, field), getattr(r, field)
        assert got == want and type(got) is type(want), field
    assert (p.is_empty, p.groups, p.requires_grad) == (r.is_empty, r.groups, r.requires_grad)


def _same_result(got, want):
    assert got[0] == want[0], (got, want)
    if got[0] == "error":
        assert got[1:] == want[1:]
    else:
        assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1])


def test_the_three_share_one_argument_order():
    """The fast paths are called positionally (a keyword call costs a decode step microseconds): the
    same names in the same order as `expressive_attention`'s (whose `backend` and `log_fgate` they lack)."""
    assert ORDER == tuple(inspect.signature(problem._normalise_4d).parameters)
    assert ORDER == tuple(inspect.signature(fused_cpu.decode_shortcut).parameters)
    public = [n for n in inspect.signature(expressive_attention).parameters if n not in ("backend", "log_fgate")]
    assert ORDER == tuple(public)
    src = inspect.getsource(functional.expressive_attention)
    assert f"try_shortcut({', '.join(ORDER)})" in src and f"normalise({', '.join(ORDER)})" in src


@pytest.mark.parametrize("case", list(CASES))
def test_normalise_fast_path_and_decode_shortcut_agree(case, monkeypatch):
    a = call_args(**CASES[case])
    with _general_only(monkeypatch):
        general = _outcome(lambda: problem.normalise(**a))
        torch.manual_seed(0)  # the same dropout draws for every call
        general_out = _outcome(lambda: expressive_attention(**a))
    if case.startswith("bad"):
        assert general[0] == "error" and general_out[1:] == general[1:]
    else:
        assert general[0] == "value" and general_out[0] == "value"

    # 1. normalise's fast path: None, the general Problem, or the general error
    fast = _outcome(lambda: problem._normalise_4d(**a))
    if case.startswith("valid: "):
        assert fast[0] == "value" and fast[1] is not None, "the common 4-D call should take the fast path"
    if case.startswith("valid, general"):
        assert fast == ("value", None)
    if fast[0] == "error":
        assert fast[1:] == general[1:]
    elif fast[1] is not None:
        _same_problem(fast[1], general[1])
        assert fast[1].q is a["query"] and fast[1].k is a["key"] and fast[1].v is a["value"]  # not reshaped
    both = _outcome(lambda: problem.normalise(**a))  # the fast path, then the general one
    if general[0] == "error":
        assert both[1:] == general[1:]
    else:
        _same_problem(both[1], general[1])

    # 2. the decode shortcut: None for every call it does not take (it never raises), else the output the
    # general path gives, from the backend "auto" chooses there
    taken = try_shortcut(*(a[name] for name in ORDER))
    valid_taken = case.startswith("valid: ") and case.removeprefix("valid: ") not in NOT_SHORTCUT
    assert (taken is not None) == valid_taken
    if taken is not None:
        assert choose_backend(general[1]) is dispatch.BACKENDS["fused_cpu"]
        _same_result(("value", taken), general_out)

    # 3. the public call, both fast paths on: the general path's output or error
    torch.manual_seed(0)
    _same_result(_outcome(lambda: expressive_attention(**a)), general_out)


def test_public_call_gradients_equal_the_general_path(monkeypatch):
    """Values and gradients through `expressive_attention` (auto), fast paths vs general path."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, L, E, generator=g, requires_grad=True)
    k = torch.randn(B, 2, S, E, generator=g, requires_grad=True)
    v = torch.randn(B, 2, S, Ev, generator=g, requires_grad=True)
    mask = random_mask(B, 1, L, S)

    def run():
        out = expressive_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    fast = run()
    with _general_only(monkeypatch):
        general = run()
    for a, b in zip(fast, general):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
