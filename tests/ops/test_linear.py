"""backend="linear" (exact chunked linear form of EA-squared) equals the reference: values and grads."""
import pytest
import torch
from attention_inputs import assert_matches, make_qkv

from expressive_attention import expressive_attention
from expressive_attention.ops import choose_backend
from expressive_attention.ops.problem import normalise
from expressive_attention.ops.linear import linear_attention, linear_pays_off


def run_linear(q, k, v, chunk=None, attn_mask=None, is_causal=False, eps=1e-6, scale=None):
    """The linear backend with an explicit chunk size (the public op picks one from E)."""
    p = normalise(q, k, v, attn_mask, 0.0, is_causal, scale, q.shape[1] != k.shape[1], "squared", eps)
    return linear_attention(p, chunk=chunk)


def reference(q, k, v, attn_mask=None, is_causal=False, eps=1e-6, scale=None):
    return expressive_attention(
        q, k, v, attn_mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        variant="squared", eps=eps, backend="reference",
    )


def assert_same(out, ref, inputs, atol, rtol):
    assert_matches(out, ref, inputs, atol, rtol)


@pytest.mark.parametrize("L,chunk", [(1, 4), (1, None), (5, 4), (37, 8), (64, 16), (130, None), (9, 1)])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (3, 1)])
def test_causal_matches_reference(L, chunk, H, Hkv):
    q, k, v = make_qkv(2, H, Hkv, L, L, 8, 5)
    assert_same(run_linear(q, k, v, chunk, is_causal=True), reference(q, k, v, is_causal=True), (q, k, v), 1e-10, 1e-8)


@pytest.mark.parametrize("L,S,chunk", [(1, 1, 4), (37, 45, 8), (9, 130, None), (130, 3, 16)])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2)])
def test_bidirectional_matches_reference(L, S, chunk, H, Hkv):
    q, k, v = make_qkv(2, H, Hkv, L, S, 8, 6)
    assert_same(run_linear(q, k, v, chunk), reference(q, k, v), (q, k, v), 1e-10, 1e-8)


@pytest.mark.parametrize("mask_heads", ["one", "all"])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2)])
def test_key_padding_masks(mask_heads, H, Hkv):
    B, L, S = 3, 21, 30
    q, k, v = make_qkv(B, H, Hkv, L, S, 8, 4, spread=1.5)
    g = torch.Generator().manual_seed(7)
    m = torch.rand(B, 1 if mask_heads == "one" else H, 1, S, generator=g) > 0.4
    m[1] = False  # a batch entry with every key masked: zeros, no NaN
    out = run_linear(q, k, v, 8, attn_mask=m)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert_same(out, reference(q, k, v, attn_mask=m), (q, k, v), 1e-10, 1e-8)
    # also through the public op, with a 2-D (batch, key) mask broadcast like SDPA's
    pub = expressive_attention(q, k, v, m[:, :1], enable_gqa=H != Hkv, variant="squared", backend="linear")
    torch.testing.assert_close(pub, reference(q, k, v, attn_mask=m[:, :1]), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_eps_kept_exactly(eps):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 4, 3, spread=0.3)
    for causal in (True, False):
        assert_same(run_linear(q, k, v, 16, is_causal=causal, eps=eps),
                    reference(q, k, v, is_causal=causal, eps=eps), (q, k, v), 1e-10, 1e-8)


def test_custom_scale_and_large_scores():
    q, k, v = make_qkv(2, 2, 2, 50, 50, 8, 8, spread=4.0)
    assert_same(run_linear(q, k, v, 16, is_causal=True, scale=0.7),
                reference(q, k, v, is_causal=True, scale=0.7), (q, k, v), 1e-9, 1e-8)


def test_long_sequence_float64():
    """Long L in float64 on a small E: many chunks, the state summing thousands of keys."""
    q, k, v = make_qkv(1, 2, 1, 3000, 3000, 4, 4)
    out = expressive_attention(q, k, v, is_causal=True, enable_gqa=True, variant="squared", backend="linear")
    assert_same(out, reference(q, k, v, is_causal=True), (q, k, v), 1e-10, 1e-8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_against_float64(dtype, tol):
    """float32 / bf16 inputs (state accumulated in float32) vs the float64 reference."""
    q, k, v = make_qkv(2, 4, 2, 300, 300, 16, 16, dtype=dtype)
    out = expressive_attention(q, k, v, is_causal=True, enable_gqa=True, variant="squared", backend="linear")
    assert out.dtype == dtype
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(q64, k64, v64, is_causal=True)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), do)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == dtype
        scale = b.abs().max()
        assert (a.double() - b).abs().max() <= tol * 4 * scale


def test_saturating_raises():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, 8)
    with pytest.raises(ValueError, match="squared"):
        expressive_attention(q, k, v, is_causal=True, variant="saturating", backend="linear")


@pytest.mark.parametrize("kwargs,match", [
    (dict(attn_mask=torch.ones(16, 16, dtype=torch.bool).tril(1)), "key-padding"),  # not causal: one diagonal more
    (dict(is_causal=True, dropout_p=0.1), "dropout"),
])
def test_unsupported_calls_raise(kwargs, match):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, 8)
    with pytest.raises(ValueError, match=match):
        expressive_attention(q, k, v, variant="squared", backend="linear", **kwargs)


def test_causal_needs_square():
    q, k, v = make_qkv(1, 2, 2, 8, 16, 8, 8)
    with pytest.raises(ValueError, match="L == S"):
        expressive_attention(q, k, v, is_causal=True, variant="squared", backend="linear")


def test_auto_uses_linear_only_when_it_pays():
    def problem(L, E, variant, causal=True):
        q = torch.zeros(1, 1, L, E)
        return normalise(q, q, q, None, 0.0, causal, None, False, variant, 1e-6)

    long_sq = problem(32768, 16, "squared")
    assert linear_pays_off(long_sq)
    assert choose_backend(long_sq).name == "linear"
    assert choose_backend(problem(32768, 16, "saturating")).name != "linear"
    short = problem(256, 16, "squared")
    assert not linear_pays_off(short)
    assert choose_backend(short).name != "linear"


def test_non_contiguous_and_3d_inputs():
    """(B, T, H, E) projections transposed to (B, H, T, E), and unbatched (H, L, E) inputs."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 40, 2, 8, generator=g, dtype=torch.float64)  # (qkv, B, T, H, E)
    qt, kt, vt = (t.transpose(1, 2).requires_grad_() for t in x.unbind(0))  # (B, H, T, E), strided
    assert not qt.is_contiguous()
    out = expressive_attention(qt, kt, vt, is_causal=True, variant="squared", backend="linear")
    assert_same(out, reference(qt, kt, vt, is_causal=True), (qt, kt, vt), 1e-10, 1e-8)
    q3, k3, v3 = make_qkv(1, 2, 2, 33, 33, 8, 4)
    out3 = expressive_attention(q3[0], k3[0], v3[0], is_causal=True, variant="squared", backend="linear")
    assert out3.shape == (2, 33, 4)
    torch.testing.assert_close(out3, reference(q3, k3, v3, is_causal=True)[0], atol=1e-10, rtol=1e-8)


def test_crossover_uses_the_table_of_the_nearest_thread_count(monkeypatch):
    from expressive_attention.ops import linear

    monkeypatch.setattr(linear, "CROSSOVER_TRAIN", {1: {16: 1000, 32: 4000}, 4: {16: 3000, 32: 9000}})
    assert linear.crossover_length(16, True, threads=1) == 1000
    assert linear.crossover_length(16, True, threads=2) == 1000  # nearer to 1 than to 4
    assert linear.crossover_length(16, True, threads=3) == 3000
    assert linear.crossover_length(32, True, threads=16) == 9000
    assert linear.crossover_length(64, True, threads=1) == 4000 * 4  # ~E^2 beyond the table
    assert 1000 < linear.crossover_length(24, True, threads=1) < 4000  # geometric between measured E
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert linear.crossover_length(16, True) == 3000  # default: torch's current thread count
    finally:
        torch.set_num_threads(before)


def test_measured_crossover_tables_are_consistent():
    """Every measured thread count covers the same head dims in both tables, and the crossover grows with E."""
    from expressive_attention.ops import linear

    for tables in (linear.CROSSOVER_TRAIN, linear.CROSSOVER_INFER):
        assert 1 in tables
        for threads, table in tables.items():
            assert sorted(table) == sorted(linear.CROSSOVER_TRAIN[1]), threads
            lengths = [table[e] for e in sorted(table)]
            assert lengths == sorted(lengths) and lengths[0] > 0, (threads, table)
