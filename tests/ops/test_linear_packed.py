"""The packed degree-2 features of the linear form: (q.k)^2 = <phi(q), phi(k)> with E(E+1)/2 features,
both ways of building them, the packed state against the unpacked x (x) x one, and the linear backend
with odd and small head dims (values and gradients against the reference). All with the torch-op
features (the C++ helpers, which a loaded kernel would otherwise supply: test_linear_native.py)."""
import pytest
import torch
from attention_inputs import assert_matches, make_qkv

from expressive_attention import expressive_attention
from expressive_attention.ops import linear_features, linear_sweeps
from expressive_attention.ops.linear import linear_attention
from expressive_attention.ops.linear_features import (PackedFeatures, PhiGrad, SplitState, add_to_state, feature_pairs,
                                                      n_features, new_state, read_num, unpack_state)
from expressive_attention.ops.problem import normalise

E_VALUES = [1, 2, 3, 5, 8, 16, 33]


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    """The torch-op features and gradient, whether or not this process has loaded the kernel."""
    monkeypatch.setattr(linear_features, "USE_NATIVE", False)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """torch's thread count picks how phi is built (by rows on one thread, a row gather otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("E", E_VALUES)
def test_feature_pairs_cover_the_triangle_once(E):
    pairs = feature_pairs(E)
    assert len(pairs) == n_features(E) == E * (E + 1) // 2
    assert sorted(pairs) == [(a, b) for a in range(E) for b in range(a, E)]


@pytest.mark.parametrize("E", E_VALUES)
@pytest.mark.parametrize("by_rows", [True, False])
def test_phi_is_exact_and_packed(E, by_rows):
    g = torch.Generator().manual_seed(E)
    x, y = torch.randn(2, 3, 7, E, generator=g, dtype=torch.float64).unbind(0)
    phi = PackedFeatures(by_rows)
    px = phi(x).clone()
    py = phi(y)
    assert px.shape == (3, 7, n_features(E))
    torch.testing.assert_close((px * py).sum(-1), (x * y).sum(-1).square(), atol=1e-12, rtol=1e-12)
    # each feature is w x_a x_b, w = 1 on the diagonal and sqrt2 off it, in feature_pairs order
    a, b = (torch.tensor(c) for c in zip(*feature_pairs(E)))
    w = (a == b).double() + (a != b).double() * 2**0.5
    torch.testing.assert_close(px, w * x[..., a] * x[..., b], atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("E", [1, 3, 6])
def test_both_builds_agree_in_float32_and_reuse_buffers(E):
    x = torch.randn(4, 130, E, generator=torch.Generator().manual_seed(0))
    rows, gather = PackedFeatures(True), PackedFeatures(False)
    torch.testing.assert_close(rows(x), gather(x), atol=1e-6, rtol=1e-6)
    first = rows(x).data_ptr()
    assert rows(x[:, :50]).data_ptr() == first  # a smaller chunk reuses the buffer


@pytest.mark.parametrize("E", [1, 4, 7])
def test_packed_state_equals_the_unpacked_one(E):
    """S = sum phi(k) v'^T (packed, F rows) holds exactly the sums of the unpacked k (x) k map, and
    reading it gives sum_j (q.k_j)^2 v'_j."""
    g = torch.Generator().manual_seed(1)
    N, n, Ev1 = 3, 11, 4
    k, q = torch.randn(2, N, n, E, generator=g, dtype=torch.float64).unbind(0)
    v1 = torch.randn(N, n, Ev1, generator=g, dtype=torch.float64)
    state = new_state(N, E, Ev1 - 1, torch.float64)
    assert state.shape == (N, E * (E + 1) // 2, Ev1)
    add_to_state(state, k[:, :5], v1[:, :5])  # in two pieces: the state accumulates
    add_to_state(state, k[:, 5:], v1[:, 5:])
    unpacked = torch.einsum("nja,njb,njv->nabv", k, k, v1)  # (N, E, E, Ev1): phi = k (x) k
    torch.testing.assert_close(unpack_state(state, E), unpacked.reshape(N, E, E * Ev1), atol=1e-12, rtol=1e-12)
    f = torch.einsum("nie,nje->nij", q, k).square()
    torch.testing.assert_close(read_num(state, q), f @ v1, atol=1e-12, rtol=1e-12)


def reference(q, k, v, **kw):
    return expressive_attention(q, k, v, variant="squared", backend="reference", enable_gqa=q.shape[1] != k.shape[1], **kw)


def linear(q, k, v, **kw):
    return expressive_attention(q, k, v, variant="squared", backend="linear", enable_gqa=q.shape[1] != k.shape[1], **kw)


@pytest.mark.parametrize("E", [1, 3, 5, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_odd_and_small_E_float64(E, causal, threads):
    """L = 300 is not a multiple of the chunk (64..256) for any E."""
    q, k, v = make_qkv(2, 4, 2, 300, 300, E, 3, seed=E)
    assert_matches(linear(q, k, v, is_causal=causal), reference(q, k, v, is_causal=causal), (q, k, v), 1e-10, 1e-8)


@pytest.mark.parametrize("E", [3, 32])
def test_float32_against_float64_reference(E, threads):
    q, k, v = make_qkv(1, 2, 2, 333, 333, E, 8, dtype=torch.float32, seed=2)
    out = linear(q, k, v, is_causal=True)
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(q64, k64, v64, is_causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do.float()), torch.autograd.grad(ref, (q64, k64, v64), do)):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("E", [1, 2, 5, 9])
def test_phi_grad_is_the_gradient_of_the_packed_features(E):
    """PhiGrad(dphi^T, x) = d<dphi, phi(x)>/dx, from autograd of the explicit packed map."""
    g = torch.Generator().manual_seed(E)
    x = torch.randn(3, 7, E, generator=g, dtype=torch.float64, requires_grad=True)
    a, b = (torch.tensor(c) for c in zip(*feature_pairs(E)))
    w = (a == b).double() + (a != b).double() * 2**0.5
    phi = w * x[..., a] * x[..., b]
    dphi = torch.randn(phi.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(phi, x, dphi)
    got = PhiGrad()(dphi.transpose(1, 2).contiguous(), x.detach())
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("E", [1, 4, 7])
def test_split_state_holds_the_packed_state(E):
    """SplitState (sv, Gram matrix) <-> the packed (N, F, Ev+1) state, both ways, and the Gram matrix
    gives the normaliser: q^T gram q = sum_j (q.k_j)^2."""
    g = torch.Generator().manual_seed(2)
    N, n, Ev = 3, 11, 4
    k, q = torch.randn(2, N, n, E, generator=g, dtype=torch.float64).unbind(0)
    v = torch.randn(N, n, Ev, generator=g, dtype=torch.float64)
    packed = new_state(N, E, Ev, torch.float64)
    add_to_state(packed, k, torch.cat([v, torch.ones(N, n, 1, dtype=torch.float64)], -1))
    split = SplitState.zeros(N, E, Ev, torch.float64)
    split.add(k[:, :4], v[:, :4], PackedFeatures())
    split.add(k[:, 4:], v[:, 4:], PackedFeatures())
    back = torch.full_like(packed, float("nan"))
    split.write_packed(back)
    torch.testing.assert_close(back, packed, atol=1e-12, rtol=1e-12)
    again = SplitState.from_packed(packed, E)
    torch.testing.assert_close(again.sv, split.sv, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(again.gram, split.gram, atol=1e-12, rtol=1e-12)
    den = torch.einsum("nie,nef,nif->ni", q, split.gram, q)
    torch.testing.assert_close(den, torch.einsum("nie,nje->nij", q, k).square().sum(-1), atol=1e-12, rtol=1e-12)


@pytest.fixture(params=["wide", "packed"])
def phi_grad_path(request, monkeypatch):
    """The backward's gradient through phi: the wide GEMM on the unpacked state, or PhiGrad on the
    packed one (chosen by E; forced here so that both run on small shapes)."""
    monkeypatch.setattr(linear_sweeps, "PACKED_PHI_GRAD_FROM_E", 0 if request.param == "packed" else 10**9)
    return request.param


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("E,Ev", [(1, 2), (6, 3), (9, 9)])
def test_both_gradient_paths_match_the_reference(phi_grad_path, causal, E, Ev):
    """GQA, L not a multiple of the chunk, L != S when bidirectional, key padding with a fully masked
    batch entry (causal: as the full causal-and-padding mask): values and gradients in float64."""
    B, H, Hkv = 2, 4, 2
    L, S = (70, 70) if causal else (70, 45)
    q, k, v = make_qkv(B, H, Hkv, L, S, E, Ev, seed=E)
    keep = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[1] = False
    mask = keep & torch.ones(L, S, dtype=torch.bool).tril() if causal else keep  # causal: the padded-decoder mask
    p = normalise(q, k, v, mask, 0.0, False, None, True, "squared", 1e-6)
    out = linear_attention(p, chunk=16)
    assert_matches(out, reference(q, k, v, attn_mask=mask), (q, k, v), 1e-10, 1e-8)


@pytest.mark.parametrize("causal", [True, False])
def test_large_head_dim_float64(causal):
    """E = 48: the default path takes the gradient through phi on the packed state."""
    assert linear_sweeps.packed_phi_grad(48)
    q, k, v = make_qkv(1, 2, 1, 150, 150, 48, 5, seed=4, spread=0.5)
    assert_matches(linear(q, k, v, is_causal=causal), reference(q, k, v, is_causal=causal), (q, k, v), 1e-10, 1e-8)
