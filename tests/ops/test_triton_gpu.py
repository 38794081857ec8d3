"""The Triton kernels (and the blocked fallback) compiled for and run on a real GPU, against the
reference (values and gradients). Collected only where CUDA is available (benchmarks/gpu_check.sh
runs it there; on CPU the same kernels are checked under Triton's interpreter in test_triton_ea.py)."""
import pytest
import torch
from attention_inputs import make_qkv, mask_kwargs

from expressive_attention import expressive_attention

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (the interpreter runs these kernels in test_triton_ea.py)",
                allow_module_level=True)


def _cuda(dtype, *tensors):
    return [t.detach().to("cuda", dtype).requires_grad_() for t in tensors]


def _check(q, k, v, tol, backend="triton", **kw):
    """`backend` on CUDA vs the float64 reference on the same (rounded) inputs: output and dq, dk, dv,
    max error <= tol * max(1, max |ref|)."""
    kw = dict(kw, enable_gqa=q.shape[1] != k.shape[1])
    out = expressive_attention(q, k, v, backend=backend, **kw)
    assert out.dtype == q.dtype and out.is_cuda
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = expressive_attention(*ref_in, backend="reference", **kw)
    do = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda",
                     dtype=torch.float64)
    got = (out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))
    want = (ref, *torch.autograd.grad(ref, ref_in, do))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: max error {err:.3g}"


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("variant", ["saturating", "squared", "exp_squared"])
@pytest.mark.parametrize("L,S,E", [(300, 300, 64), (1, 300, 128), (77, 300, 80), (300, 45, 128)])
def test_float32_causal_gqa(variant, L, S, E):
    q, k, v = _cuda(torch.float32, *make_qkv(2, 8, 2, L, S, E, E))
    _check(q, k, v, 1e-4, is_causal=True, variant=variant)


@pytest.mark.parametrize("mask_kind", ["bool", "keypad", "rows", "none"])
def test_float32_masks(mask_kind):
    q, k, v = _cuda(torch.float32, *make_qkv(2, 4, 4, 130, 200, 64, 64))
    kw = {n: (m.cuda() if isinstance(m, torch.Tensor) else m) for n, m in mask_kwargs(mask_kind, 2, 4, 130, 200).items()}
    _check(q, k, v, 1e-4, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["saturating", "squared", "exp_squared"])
def test_half_precision_large_scores(dtype, variant):
    # |s| in the hundreds: f and the sums must stay in float32
    q, k, v = _cuda(dtype, *make_qkv(2, 8, 8, 512, 512, 128, 128, spread=6.0))
    _check(q, k, v, 3e-2, is_causal=True, variant=variant)


def test_strided_layout_bf16():
    # (B, L, H, E) storage seen as (B, H, L, E), as after a projection + view + transpose
    base = [torch.randn(2, 256, 4, 64, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
            for i in range(3)]
    q, k, v = (t.transpose(1, 2) for t in _cuda(torch.bfloat16, *base))
    _check(q, k, v, 2e-2, is_causal=True)


def test_decode_through_auto_matches_reference():
    # one query row against a long KV cache (what `ea bench gpu` times), through backend="auto"
    q, k, v = _cuda(torch.bfloat16, *make_qkv(4, 8, 8, 1, 4097, 128, 128))
    _check(q, k, v, 2e-2, backend="auto")


@pytest.mark.parametrize("compile_mode", ["1", "0"])
def test_blocked_fallback_on_cuda(monkeypatch, compile_mode):
    # the blocked backend (what a GPU without Triton kernels runs): compiled tiles (inductor emits
    # Triton code for them) and the plain path
    from expressive_attention.ops import blocked, tile_compile

    monkeypatch.setenv("EA_COMPILE", compile_mode)
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 2**14)  # several row blocks
    q, k, v = _cuda(torch.float32, *make_qkv(2, 8, 2, 300, 300, 64, 64))
    _check(q, k, v, 1e-4, backend="blocked", is_causal=True)
    assert ("_backward_tile" in tile_compile.compile_seconds) == (compile_mode == "1")
