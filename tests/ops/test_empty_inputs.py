"""Empty inputs (a 0-sized B, H, L, S, E or Ev; 3-D and 4-D) behave as SDPA does on every backend:
an empty output for L, Ev, B or H = 0, zeros for S = 0 (no key to attend to), zero gradients of the
inputs' shapes. E = 0 follows EA's definition: every score is 0 and f(0) = 0, so the output is zeros
(SDPA's softmax of zeros averages v instead), except for "exp_squared", where f(0) = 1 and the output
averages v as SDPA's does. Regression: reshape errors, a division by zero for E = 0, zeros for
exp_squared at E = 0 (issue #24, defect 3)."""
import pytest
import torch
import torch.nn.functional as F

from expressive_attention import expressive_attention

# (q shape, k shape, v shape): 4-D and 3-D, each dim 0 in turn
SHAPES = {
    "L=0": ((2, 3, 0, 8), (2, 3, 5, 8), (2, 3, 5, 8)),
    "S=0": ((2, 3, 4, 8), (2, 3, 0, 8), (2, 3, 0, 8)),
    "E=0": ((2, 3, 4, 0), (2, 3, 5, 0), (2, 3, 5, 8)),
    "Ev=0": ((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 0)),
    "B=0": ((0, 3, 4, 8), (0, 3, 5, 8), (0, 3, 5, 8)),
    "H=0": ((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8)),
    "3d L=0": ((3, 0, 8), (3, 5, 8), (3, 5, 8)),
    "3d S=0": ((3, 4, 8), (3, 0, 8), (3, 0, 8)),
    "3d B=0": ((0, 4, 8), (0, 5, 8), (0, 5, 8)),
    "5d L=0": ((2, 2, 3, 0, 8), (2, 2, 3, 5, 8), (2, 2, 3, 5, 8)),
}
CASES = [(b, v) for b in ("auto", "reference", "blocked", "fused_cpu") for v in ("saturating", "squared")]
CASES += [("linear", "squared")]


def _leaves(shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


@pytest.mark.parametrize("backend,variant", CASES)
@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("masked", ["none", "causal", "mask"])
def test_empty_inputs_like_sdpa(backend, variant, name, masked):
    shapes = SHAPES[name]
    q, k, v = _leaves(shapes)
    L, S = shapes[0][-2], shapes[1][-2]
    kw = {}
    if masked == "causal":
        kw["is_causal"] = True
        if backend == "linear" and L != S:  # refused for any size, empty or not
            with pytest.raises(ValueError, match="needs L == S"):
                expressive_attention(q, k, v, variant=variant, backend=backend, **kw)
            return
    elif masked == "mask":
        if backend == "linear":
            kw["attn_mask"] = torch.ones(1, S, dtype=torch.bool)  # key padding only
        else:
            kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool).tril()
    out = expressive_attention(q, k, v, variant=variant, backend=backend, **kw)
    ref_shape = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), **kw).shape
    assert out.shape == ref_shape and out.dtype == q.dtype
    assert (out == 0).all()  # empty, or nothing to attend to
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), allow_unused=False)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and (g == 0).all()


def test_empty_rows_match_reference_values_on_the_rest():
    # A batch with an empty dim elsewhere still gives the reference's values where it has any.
    q, k, v = _leaves(((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 8)))
    a = expressive_attention(q, k, v, backend="fused_cpu")
    b = expressive_attention(q, k, v, backend="reference")
    torch.testing.assert_close(a, b)


def test_gqa_with_empty_heads_of_keys_is_an_error():
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 0, 3, 8)
    with pytest.raises(ValueError, match="multiple of the number"):
        expressive_attention(q, k, k, enable_gqa=True)


@pytest.mark.parametrize("backend", ["auto", "reference", "blocked", "fused_cpu", "linear"])
@pytest.mark.parametrize("scale", [1e30, -1e25, 1e19])
def test_huge_scale_is_a_clear_error_not_nan(backend, scale):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match="scale=.* too large"):
        expressive_attention(q, k, v, scale=scale, variant="squared", backend=backend)


def test_large_but_safe_scale_is_finite_and_matches_reference():
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    for backend in ("blocked", "fused_cpu"):
        for variant in ("saturating", "exp_squared"):  # exp_squared: s^2 ~ 1e12, one key per row
            out = expressive_attention(q, k, v, scale=1e6, variant=variant, backend=backend)
            assert torch.isfinite(out).all()
            ref = expressive_attention(q, k, v, scale=1e6, variant=variant, backend="reference")
            torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", ["auto", "reference", "blocked", "fused_cpu"])
@pytest.mark.parametrize("masked", ["none", "causal", "mask"])
def test_e0_exp_squared_averages_v_like_sdpa(backend, masked):
    # f(0) = exp(0) = 1: every allowed key weighs the same, so (eps = 0) the output is SDPA's mean of v
    q, k, v = _leaves(((2, 3, 4, 0), (2, 3, 5, 0), (2, 3, 5, 6)))
    kw = {"is_causal": True} if masked == "causal" else {}
    if masked == "mask":
        m = torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.5
        m[:, 0] = True  # (a row with no key: SDPA gives NaN, EA zeros)
        kw["attn_mask"] = m
    out = expressive_attention(q, k, v, variant="exp_squared", eps=0.0, backend=backend, **kw)
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want)
    assert out.abs().sum() > 0
    do = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, v, do)
    torch.testing.assert_close(dv, torch.autograd.grad(want, v, do)[0])
    # eps > 0 weighs each of the n allowed keys 1 / (eps + n)
    out_eps = expressive_attention(q, k, v, variant="exp_squared", eps=0.5, backend=backend, **kw)
    n = (kw["attn_mask"] if masked == "mask" else torch.ones(4, 5, dtype=torch.bool).tril(
        ) if masked == "causal" else torch.ones(4, 5, dtype=torch.bool)).sum(-1, keepdim=True)
    torch.testing.assert_close(out_eps, want * n / (0.5 + n))


@pytest.mark.parametrize("variant", ["saturating", "squared", "power"])
def test_e0_polynomial_variants_stay_zero(variant):
    q, k, v = _leaves(((1, 2, 3, 0), (1, 2, 4, 0), (1, 2, 4, 5)))
    assert (expressive_attention(q, k, v, variant=variant) == 0).all()
