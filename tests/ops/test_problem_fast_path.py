"""`normalise`'s fast path for the common 4-D call (`problem._normalise_4d`): it builds the same
`Problem` as the general path, and every bad input reaches the general path's error unchanged."""
import pytest
import torch

from expressive_attention import expressive_attention
from expressive_attention.ops import problem
from expressive_attention.ops.problem import normalise
from call_cases import B, BAD, VALID, VALID_GENERAL_ONLY, Ev, H, L, S, E, call_args, random_mask

def _general(monkeypatch, a):
    """normalise with the fast path switched off."""
    with monkeypatch.context() as mp:
        mp.setattr(problem, "_normalise_4d", lambda *args: None)
        return normalise(**a)


def _same_problem(p, r):
    assert all(a is b for a, b in zip((p.q, p.k, p.v), (r.q, r.k, r.v)))  # 4-D inputs are not reshaped
    assert (p.mask is None) == (r.mask is None)
    if p.mask is not None:
        assert p.mask.shape == r.mask.shape and torch.equal(p.mask, r.mask)
    for field in ("is_causal", "scale", "variant", "eps", "dropout_p", "out_shape", "power"):
        got, want = getattr(p, field), getattr(r, field)
        assert got == want and type(got) is type(want), field
    assert (p.is_empty, p.groups, p.requires_grad) == (r.is_empty, r.groups, r.requires_grad)


@pytest.mark.parametrize("case", list(VALID))
def test_fast_path_builds_the_general_problem(case, monkeypatch):
    a = call_args(**VALID[case])
    fast = problem._normalise_4d(**a)
    assert fast is not None, "the common 4-D call should take the fast path"
    _same_problem(fast, _general(monkeypatch, a))
    _same_problem(normalise(**a), fast)


@pytest.mark.parametrize("case", list(VALID_GENERAL_ONLY))
def test_other_layouts_take_the_general_path(case):
    a = call_args(**VALID_GENERAL_ONLY[case])
    assert problem._normalise_4d(**a) is None
    assert normalise(**a).q.dim() == 4


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_the_general_paths_error(case, monkeypatch):
    a = call_args(**BAD[case])
    with pytest.raises((TypeError, ValueError)) as general:
        _general(monkeypatch, a)
    with pytest.raises(general.type) as got:
        normalise(**a)
    assert str(got.value) == str(general.value)


def test_public_call_results_equal_the_general_path(monkeypatch):
    """Values and gradients through `expressive_attention` (auto), fast path vs general path."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, L, E, generator=g, requires_grad=True)
    k = torch.randn(B, 2, S, E, generator=g, requires_grad=True)
    v = torch.randn(B, 2, S, Ev, generator=g, requires_grad=True)
    mask = random_mask(B, 1, L, S)

    def run():
        out = expressive_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    fast = run()
    monkeypatch.setattr(problem, "_normalise_4d", lambda *args: None)
    for a, b in zip(fast, run()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
