"""The reference op against an independent, loop-by-loop reading of the definition."""
import math

import pytest
import torch

from expressive_attention import expressive_attention, reference_attention
from expressive_attention.ops import expressive_weights


def loop_definition(q, k, v, keep, scale, variant, eps):
    """Row by row, key by key, in Python floats: a_ij = f(s_ij) / (eps + sum over kept keys)."""
    L, S = q.shape[0], k.shape[0]
    out = torch.zeros(L, v.shape[1], dtype=torch.float64)
    for i in range(L):
        fs = []
        for j in range(S):
            s = scale * float(q[i] @ k[j])
            f = s * s if variant == "squared" else s * s / (1 + s * s)
            fs.append(f if keep[i][j] else 0.0)
        z = eps + sum(fs)
        for j in range(S):
            if fs[j]:
                out[i] += (fs[j] / z) * v[j].double()
    return out


@pytest.mark.parametrize("variant", ["saturating", "squared"])
@pytest.mark.parametrize("masking", ["none", "causal", "bool"])
def test_reference_matches_loop_definition(variant, masking):
    g = torch.Generator().manual_seed(1)
    L, S, E = 5, 7, 4
    q, k, v = (torch.randn(n, E, generator=g, dtype=torch.float64) for n in (L, S, S))
    keep = torch.ones(L, S, dtype=torch.bool)
    kwargs = {}
    if masking == "causal":
        keep = keep.tril()
        kwargs["is_causal"] = True
    elif masking == "bool":
        keep = torch.rand(L, S, generator=g) > 0.4
        keep[2] = False  # a row with nothing to attend to
        kwargs["attn_mask"] = keep
    got = reference_attention(q, k, v, variant=variant, eps=1e-3, **kwargs)
    want = loop_definition(q, k, v, keep.tolist(), 1 / math.sqrt(E), variant, 1e-3)
    torch.testing.assert_close(got, want)


def test_masked_key_is_removed_not_squared():
    # A masked key that would dominate (huge antiparallel score) must have no effect at all.
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [-1000.0, 0.0]])
    v = torch.tensor([[1.0], [99.0]])
    out = expressive_attention(q, k, v, attn_mask=torch.tensor([[True, False]]), backend="reference")
    only_first = expressive_attention(q, k[:1], v[:1], backend="reference")
    torch.testing.assert_close(out, only_first)
    assert out.item() < 1.0  # eps keeps the single weight just below 1


def test_antiparallel_and_parallel_attend_orthogonal_suppressed():
    q = torch.tensor([[3.0, 0.0]])
    k = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])  # parallel, antiparallel, orthogonal
    a = expressive_weights(q, k, variant="squared")[0]
    assert a[0] == pytest.approx(a[1]) and a[0] > 0.49
    assert a[2] == 0.0


def test_empty_rows_give_zeros_and_finite_grads_even_with_eps_zero():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    for eps in (1e-6, 0.0):
        for backend in ("reference", "blocked"):
            out = expressive_attention(q, k, v, attn_mask=mask, eps=eps, backend=backend)
            assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            assert all(torch.isfinite(g).all() for g in grads)
            assert torch.equal(grads[0][..., 1, :], torch.zeros_like(grads[0][..., 1, :]))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = torch.randn(3, 5, 16), torch.randn(3, 6, 16), torch.randn(3, 6, 16)
    torch.testing.assert_close(
        expressive_attention(q, k, v, backend="reference"),
        expressive_attention(q, k, v, scale=0.25, backend="reference"),
    )
    assert not torch.allclose(
        expressive_attention(q, k, v, backend="reference"),
        expressive_attention(q, k, v, scale=1.0, backend="reference"),
    )


def test_causal_is_top_left_aligned_like_sdpa():
    # L < S: query i sees keys 0..i only (top-left), as SDPA's is_causal does.
    q, k, v = torch.randn(3, 4), torch.randn(6, 4), torch.randn(6, 2)
    got = expressive_attention(q, k, v, is_causal=True, backend="reference")
    want = expressive_attention(q, k, v, attn_mask=torch.ones(3, 6, dtype=torch.bool).tril(), backend="reference")
    torch.testing.assert_close(got, want)


def test_saturating_and_squared_differ_only_for_large_scores():
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    small = [expressive_attention(q * 0.05, k * 0.05, v, variant=var, backend="reference") for var in ("saturating", "squared")]
    large = [expressive_attention(q * 5, k * 5, v, variant=var, backend="reference") for var in ("saturating", "squared")]
    torch.testing.assert_close(small[0], small[1], atol=1e-3, rtol=1e-3)
    assert (large[0] - large[1]).abs().max() > 1e-2


def test_dropout_zeroes_and_rescales_weights():
    torch.manual_seed(0)
    L = S = 6
    q, k = torch.randn(1, 1, L, 8), torch.randn(1, 1, S, 8)
    eye = torch.eye(S).view(1, 1, S, S)  # value = identity: the output row *is* the weight row
    a = expressive_attention(q, k, eye, backend="reference")
    torch.manual_seed(3)
    d = expressive_attention(q, k, eye, dropout_p=0.5, backend="reference")
    dropped = d == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(d[~dropped], a[~dropped] / 0.5)
    torch.manual_seed(3)
    assert torch.equal(d, expressive_attention(q, k, eye, dropout_p=0.5))  # auto routes to the reference


@pytest.mark.parametrize("variant", ["saturating", "squared", "power", "exp_squared"])
@pytest.mark.parametrize("masking", ["causal", "bool"])
def test_masked_inf_key_does_not_poison_rows_that_never_see_it(variant, masking):
    # issue #24, defect 2: f(inf) * keep = inf * 0 = NaN made every row NaN; a masked key is selected away.
    q, k, v = torch.randn(3, 1, 1, 4, 3, generator=torch.Generator().manual_seed(0))
    k[0, 0, 2, 0] = float("inf")
    keep = torch.ones(4, 4, dtype=torch.bool).tril()  # rows 0 and 1 never see key 2
    kw = {"is_causal": True} if masking == "causal" else {"attn_mask": keep}
    out = expressive_attention(q, k, v, variant=variant, backend="reference", **kw)
    assert torch.isfinite(out[0, 0, :2]).all(), out
    clean = expressive_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :], variant=variant,
                                 backend="reference", is_causal=True)
    torch.testing.assert_close(out[..., :2, :], clean)


@pytest.mark.parametrize("variant", ["saturating", "squared", "power", "exp_squared"])
def test_weights_and_reference_take_zero_keys(variant):
    # found by the fuzzer (#24): the row maximum of "power" / "exp_squared" raised IndexError for S = 0
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 0, 4), torch.randn(2, 0, 5)
    assert expressive_weights(q, k, variant=variant).shape == (2, 3, 0)
    assert torch.equal(reference_attention(q, k, v, variant=variant), torch.zeros(2, 3, 5))
