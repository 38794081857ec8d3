"""The linear form's native feature helpers (csrc/linear_cpu.cpp, in the fused CPU kernel's extension):
the features and the gradient through them against the torch-op path on odd shapes and strided inputs,
the linear backend with them against the reference (values and gradients, one and several workers), and
when they are used: loaded kernel, plain float32/float64 CPU tensors in eager mode, USE_NATIVE."""
import pytest
import torch
from attention_inputs import assert_matches, make_qkv
from torch.utils.flop_counter import FlopCounterMode

from expressive_attention import expressive_attention
from expressive_attention.ops import fused_cpu, linear_features, linear_sweeps
from expressive_attention.ops.linear import linear_attention
from expressive_attention.ops.linear_features import PackedFeatures, PhiGrad, feature_pairs, n_features, native_helpers
from expressive_attention.ops.problem import normalise

SHAPES = [(1, 1, 1), (2, 5, 3), (3, 130, 17), (2, 64, 48), (1, 7, 64)]  # (N, n, E): n across the 64-row blocks


@pytest.fixture(scope="module")
def kernel():
    mod = fused_cpu.load_extension()
    assert mod is not None, f"the fused CPU kernel did not build: {fused_cpu.build_error()}"
    return mod


@pytest.fixture(params=[False, True], ids=["torch-ops", "native"])
def native(request, kernel, monkeypatch):
    """Run the linear form with the helpers off or on (the kernel loaded either way)."""
    monkeypatch.setattr(linear_features, "USE_NATIVE", request.param)
    return request.param


def _strided(N, n, E, dtype, seed):
    """x (N, n, E) whose rows are strided (a slice of wider rows), as a chunk's k[:, c0:c1] is."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, n, E + 3, generator=g, dtype=torch.float64).to(dtype)[..., 1 : E + 1]


def _both(fn, monkeypatch):
    """fn() with the torch-op path, then with the helpers."""
    monkeypatch.setattr(linear_features, "USE_NATIVE", False)
    a = fn()
    monkeypatch.setattr(linear_features, "USE_NATIVE", True)
    return a, fn()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("N,n,E", SHAPES)
def test_helpers_match_the_torch_ops(kernel, monkeypatch, threads, dtype, tol, N, n, E):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # at::parallel_for over the heads
    try:
        x = _strided(N, n, E, dtype, seed=E)
        assert not x.is_contiguous() or N * n == 1
        dphi = torch.randn(N, n_features(E), n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        feats = _both(lambda: PackedFeatures()(x).clone(), monkeypatch)
        grads = _both(lambda: PhiGrad()(dphi.clone(), x).clone(), monkeypatch)
    finally:
        torch.set_num_threads(before)
    for torch_ops, helper in (feats, grads):
        assert not torch.equal(helper, torch.zeros_like(helper)) or N * n * E == 1
        torch.testing.assert_close(helper, torch_ops, atol=tol, rtol=tol)
    assert feats[1].shape == (N, n, n_features(E))
    # the helper does not overwrite dphi (the torch ops weight it in place; their caller never reads it again)
    assert torch.equal(dphi, torch.randn(N, n_features(E), n, generator=torch.Generator().manual_seed(1),
                                         dtype=torch.float64).to(dtype))


def test_gradient_helper_is_the_autograd_gradient(kernel):
    """dx = d/dx sum <dphi, phi(x)>, by autograd through phi written out: w_ab x_a x_b per feature_pairs."""
    E = 9
    x = _strided(3, 70, E, torch.float64, seed=3)
    dphi = torch.randn(3, n_features(E), 70, dtype=torch.float64)
    out = torch.empty(3, 70, E, dtype=torch.float64)
    kernel.linear_feature_grad(dphi, x, out)
    a, b = (torch.tensor(c) for c in zip(*feature_pairs(E)))
    w = (a == b).double() + (a != b).double() * 2**0.5
    xr = x.detach().clone().requires_grad_()
    (w * xr[..., a] * xr[..., b] * dphi.transpose(1, 2)).sum().backward()
    torch.testing.assert_close(out, xr.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.linear_features(torch.zeros(2, 3), torch.zeros(2, 1, 3)), "x must be \\(N, n, E\\)"),
    (lambda m: m.linear_features(torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 10, 3)), "float32 or float64"),
    (lambda m: m.linear_features(torch.zeros(2, 3, 4), torch.zeros(2, 9, 3)), "out must be \\(N, E\\(E\\+1\\)/2, n\\)"),
    (lambda m: m.linear_features(torch.zeros(2, 3, 4), torch.zeros(2, 3, 10).transpose(1, 2)), "out must be"),
    (lambda m: m.linear_features(torch.zeros(2, 3, 4), torch.zeros(2, 10, 3, dtype=torch.float64)), "out must have x's dtype"),
    (lambda m: m.linear_feature_grad(torch.zeros(2, 10, 3), torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)), "out must have x's shape"),
    (lambda m: m.linear_feature_grad(torch.zeros(2, 9, 3), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), "dphi must be"),
])
def test_helpers_name_the_bad_argument(kernel, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(kernel)


def test_when_the_helpers_are_used(kernel, monkeypatch):
    x = torch.randn(2, 5, 4)
    assert native_helpers(x) is kernel
    assert native_helpers(x.double()) is kernel
    assert native_helpers(x.bfloat16()) is None  # (the linear form computes in float32 anyway)
    with FlopCounterMode(display=False):  # a dispatch mode must see the torch ops
        assert native_helpers(x) is None
    monkeypatch.setattr(linear_features, "USE_NATIVE", False)
    assert native_helpers(x) is None
    monkeypatch.setattr(linear_features, "USE_NATIVE", True)
    monkeypatch.setitem(fused_cpu._STATE, "module", None)  # not loaded: never builds from here
    assert native_helpers(x) is None


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("E,Ev", [(1, 2), (5, 3), (33, 7)])
@pytest.mark.parametrize("workers", [1, 2])
def test_linear_backend_matches_the_reference(native, causal, E, Ev, workers):
    """GQA, key padding with a fully masked batch entry, L not a multiple of the chunk, L != S when
    bidirectional; float64 values and gradients, heads unsplit and split over 2 workers."""
    B, H, Hkv = 2, 4, 2
    L, S = (70, 70) if causal else (70, 45)
    q, k, v = make_qkv(B, H, Hkv, L, S, E, Ev, seed=E)
    keep = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[1] = False
    mask = keep & torch.ones(L, S, dtype=torch.bool).tril() if causal else keep
    p = normalise(q, k, v, mask, 0.0, False, None, True, "squared", 1e-6)
    out = linear_attention(p, chunk=16, workers=workers)
    ref = expressive_attention(q, k, v, attn_mask=mask, enable_gqa=True, variant="squared", backend="reference")
    assert_matches(out, ref, (q, k, v), 1e-10, 1e-8)


def test_float32_native_against_float64(kernel):
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, 64, seed=2, spread=0.7)
    ref = expressive_attention(q, k, v, is_causal=True, variant="squared", backend="reference")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = expressive_attention(q32, k32, v32, is_causal=True, variant="squared", backend="linear")
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    out.sum().backward()
    ref.sum().backward()
    for a, b in zip((q32, k32, v32), (q, k, v)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-3, rtol=2e-3)


def test_with_the_helpers_the_gradient_is_taken_on_the_packed_state():
    assert linear_sweeps.packed_phi_grad(16, native=True)
    assert not linear_sweeps.packed_phi_grad(16, native=False)
    assert linear_sweeps.packed_phi_grad(linear_sweeps.PACKED_PHI_GRAD_FROM_E, native=False)


def test_a_big_enough_call_loads_the_kernel(kernel, monkeypatch):
    """backend="linear" loads the extension (its cached build here) for calls worth its build."""
    monkeypatch.setattr(fused_cpu, "_STATE", {"module": None, "error": None, "warned": False})
    monkeypatch.setattr(fused_cpu, "MIN_WORK_TO_BUILD", 10**18)
    monkeypatch.setattr(fused_cpu, "is_built", lambda: False)
    q, k, v = make_qkv(1, 1, 1, 20, 20, 4, 4, requires_grad=False)
    expressive_attention(q, k, v, is_causal=True, variant="squared", backend="linear")
    assert fused_cpu._STATE["module"] is None  # too small: no build started
    monkeypatch.setattr(fused_cpu, "MIN_WORK_TO_BUILD", 0)
    expressive_attention(q, k, v, is_causal=True, variant="squared", backend="linear")
    assert fused_cpu._STATE["module"] is not None


def test_recurrent_prefill_and_steps_match_the_reference(native):
    """The recurrent cache's path: prefill (`causal_forward` on the packed state), then one token at a time
    (`add_to_state`, `read_state`), each row against the reference's causal output, float64."""
    from expressive_attention.ops.linear import causal_forward, read_state
    from expressive_attention.ops.linear_features import add_to_state, new_state, with_ones

    N, L, E, Ev, prompt = 3, 40, 6, 5, 25
    q, k, v = (t.detach() for t in make_qkv(1, N, N, L, L, E, Ev, seed=5))
    ref = expressive_attention(q, k, v, is_causal=True, variant="squared", backend="reference")[0]  # (N, L, Ev)
    q3, k3, v3, scale = q[0], k[0], v[0], E**-0.5
    state = new_state(N, E, Ev, torch.float64)
    out, _ = causal_forward(q3[:, None, :prompt], k3[:, :prompt], v3[:, :prompt], state, 1e-6, 16, scale)
    torch.testing.assert_close(out[:, 0], ref[:, :prompt], atol=1e-10, rtol=1e-8)
    for t in range(prompt, L):
        add_to_state(state, k3[:, t : t + 1], with_ones(v3[:, t : t + 1]))
        step = read_state(state, q3[:, t : t + 1] * scale, 1e-6)
        torch.testing.assert_close(step[:, 0], ref[:, t], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("use_native", [False, True])
def test_the_chunk_follows_the_feature_path(kernel, monkeypatch, use_native):
    """With the helpers the chunk is 64 rows from E = 48 on (128 with torch ops); below 48 the same."""
    from expressive_attention.ops import linear

    assert linear.default_chunk(64, native=True) == linear.default_chunk(48, native=True) == 64
    assert linear.default_chunk(64) == 128 and linear.default_chunk(32, native=True) == linear.default_chunk(32) == 128
    monkeypatch.setattr(linear_features, "USE_NATIVE", use_native)
    chunks = []
    real = linear_sweeps.causal_forward
    monkeypatch.setattr(linear_sweeps, "causal_forward", lambda *a: chunks.append(a[5]) or real(*a))
    for dtype in (torch.float32, torch.bfloat16):  # bf16 is computed in float32: the helpers take it
        q, k, v = make_qkv(1, 1, 1, 8, 8, 64, 4, dtype=dtype, requires_grad=False)
        expressive_attention(q, k, v, is_causal=True, variant="squared", backend="linear")
    assert chunks == [64, 64] if use_native else [128, 128]
