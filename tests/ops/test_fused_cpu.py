"""The fused CPU kernel equals the reference (values and gradients); auto falls back without it."""
import warnings

import pytest
import torch
from attention_inputs import make_qkv, mask_kwargs

from expressive_attention import expressive_attention
from expressive_attention.ops import choose_backend, fused_cpu, reference_attention
from expressive_attention.ops.problem import normalise, repeat_kv


@pytest.fixture(scope="module", autouse=True)
def built():
    # The first test on a fresh machine compiles the kernel (about a minute).
    assert fused_cpu.is_available(), f"fused CPU kernel did not build: {fused_cpu.build_error()}"


def run(q, k, v, dtype, backend, kw, do):
    """Output and (dq, dk, dv) of `backend` on copies of q, k, v cast to `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = expressive_attention(*leaves, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return [out, *grads]


def assert_as_accurate_as_fp32_reference(q, k, v, kw, rel_floor=2e-5):
    """fp32 fused vs the float64 reference: error within the fp32 reference's own error (x10)
    or a small relative floor, for the output and every gradient."""
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(7))
    exact = run(q, k, v, torch.float64, "reference", kw, do)
    ref32 = run(q, k, v, torch.float32, "reference", kw, do)
    fused = run(q, k, v, torch.float32, "fused_cpu", kw, do)
    for name, x, r, e in zip(("out", "dq", "dk", "dv"), fused, ref32, exact):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
        err = (x.double() - e).abs().max().item()
        tol = max(rel_floor * e.abs().max().item(), 10 * (r.double() - e).abs().max().item(), 1e-12)
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


SHAPES = [  # (B, H, Hkv, L, S, E, Ev): odd sizes, S != L, GQA, > one 64-row / 512-key block
    (1, 1, 1, 1, 1, 8, 8),
    (2, 3, 3, 7, 7, 16, 16),
    (1, 2, 2, 63, 63, 32, 32),
    (1, 4, 2, 130, 70, 64, 64),
    (2, 2, 1, 7, 130, 8, 24),
    (1, 2, 1, 130, 600, 16, 16),
]


@pytest.mark.parametrize("variant", ["saturating", "squared"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "keypad", "rows"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape, mask_kind, variant):
    B, H, Hkv, L, S, E, Ev = shape
    q, k, v = make_qkv(*shape, requires_grad=False)
    kw = dict(mask_kwargs(mask_kind, B, H, L, S), enable_gqa=H != Hkv, variant=variant)
    assert_as_accurate_as_fp32_reference(q, k, v, kw)


@pytest.mark.parametrize("variant", ["saturating", "squared"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool"])
def test_float64_matches_reference_tightly(mask_kind, variant):
    B, H, Hkv, L, S, E, Ev = 2, 4, 2, 70, 130, 16, 8
    q, k, v = make_qkv(B, H, Hkv, L, S, E, Ev, requires_grad=False)
    kw = dict(mask_kwargs(mask_kind, B, H, L, S), enable_gqa=True, variant=variant)
    do = torch.randn(B, H, L, Ev, dtype=torch.float64)
    for x, e in zip(run(q, k, v, torch.float64, "fused_cpu", kw, do),
                    run(q, k, v, torch.float64, "reference", kw, do)):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, e, atol=1e-11, rtol=1e-9)


def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 5, 6, 4, 3, requires_grad=False))
    m = torch.rand(1, 1, 5, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    for variant in ("saturating", "squared"):
        fn = lambda q, k, v: expressive_attention(q, k, v, attn_mask=m, enable_gqa=True,
                                                  variant=variant, backend="fused_cpu")
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_fully_masked_rows_give_zeros_and_finite_grads(eps):
    B, H, L, S, E = 2, 2, 9, 20, 8
    q, k, v = (t.float().requires_grad_() for t in make_qkv(B, H, H, L, S, E, E, requires_grad=False))
    m = torch.rand(B, H, L, S, generator=torch.Generator().manual_seed(0)) > 0.5
    m[:, :, [0, 4]] = False
    out = expressive_attention(q, k, v, attn_mask=m, eps=eps, backend="fused_cpu")
    assert (out[:, :, [0, 4]] == 0).all()
    torch.testing.assert_close(out, reference_attention(q, k, v, m, eps=eps), atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, [0, 4]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["saturating", "squared"])
@pytest.mark.parametrize("spread", [1.0, 8.0])
def test_low_precision_large_scores(dtype, variant, spread):
    """With spread 8, |s| reaches the hundreds (fp16 would overflow squaring it): scores are
    squared in fp32, no inf/NaN, and the result equals the reference evaluated in float64 on the
    same rounded inputs up to the rounding of the outputs."""
    B, H, Hkv, L, S, E, Ev = 1, 4, 2, 70, 90, 16, 16
    q, k, v = (t.to(dtype).double() for t in make_qkv(B, H, Hkv, L, S, E, Ev, spread=spread, requires_grad=False))
    kw = dict(is_causal=True, enable_gqa=True, variant=variant)
    s_max = (q @ repeat_kv(k, 2).transpose(-1, -2)).abs().max().item() / E**0.5
    if spread > 1:
        assert s_max > 256  # the regime where fp16 scores would overflow when squared
    do = torch.randn(B, H, L, Ev, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fused = run(q, k, v, dtype, "fused_cpu", kw, do)
    exact = run(q, k, v, torch.float64, "reference", kw, do.to(dtype).double())
    for name, x, e in zip(("out", "dq", "dk", "dv"), fused, exact):
        assert x.dtype == dtype and torch.isfinite(x).all(), name
        err = (x.double() - e).abs().max().item()
        assert err <= 2e-2 * e.abs().max().item(), f"{name}: {err:.3g} vs max {e.abs().max():.3g}"


def test_strided_inputs_and_gqa_via_public_api():
    """(B, L, H, E) tensors transposed to (B, H, L, E): rows strided, no copies needed."""
    B, L, S, H, Hkv, E = 2, 70, 90, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, H, E, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, E, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, E, generator=g).transpose(1, 2).requires_grad_()
    out = expressive_attention(q, k, v, is_causal=True, enable_gqa=True, backend="fused_cpu")
    ref = reference_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    do = torch.randn(out.shape, generator=g)  # seeded: the global RNG depends on which tests ran before
    # float32 against float32: causal row 0 attends to one key, where f / (eps + f) amplifies rounding
    # (max |diff| beyond rtol over 30 seeds of `do`: 1.1e-5, so atol 1e-5 failed for some)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


def test_auto_prefers_fused_cpu_on_cpu():
    q, k, v = make_qkv(1, 2, 2, 100, 100, 16, 16, requires_grad=False)
    p = normalise(q.float(), k.float(), v.float(), None, 0.0, True, None, False, "saturating", 1e-6)
    assert choose_backend(p).name == "fused_cpu"
    p.dropout_p = 0.1
    assert choose_backend(p).name == "reference"
    assert "dropout" in fused_cpu.BACKEND.unsupported(p)


def test_unavailable_extension_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setattr(fused_cpu, "_STATE", {"module": None, "error": None, "warned": False})
    monkeypatch.setattr(fused_cpu, "_build", broken_build)
    q, k, v = (t.float() for t in make_qkv(1, 2, 2, 100, 100, 16, 16, requires_grad=False))
    with pytest.warns(RuntimeWarning, match="fused CPU kernel could not be built.*no C\\+\\+ compiler"):
        out = expressive_attention(q, k, v, is_causal=True)
    p = normalise(q, k, v, None, 0.0, True, None, False, "saturating", 1e-6)
    assert choose_backend(p).name == "blocked"
    torch.testing.assert_close(out, reference_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        expressive_attention(q, k, v, is_causal=True)
        assert not fused_cpu.is_available()
    with pytest.raises(ValueError, match="fused_cpu.*no C\\+\\+ compiler"):
        expressive_attention(q, k, v, backend="fused_cpu")


def test_build_dir_is_keyed_and_relocatable(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = fused_cpu.build_dir()
    assert d.parent == tmp_path / "expressive_attention" and d.name.startswith("ea_cpu_")
    monkeypatch.setattr(fused_cpu, "CFLAGS", fused_cpu.CFLAGS + ("-DCHANGED",))
    assert fused_cpu.build_dir() != d


def test_unsupported_inputs_give_reasons():
    q, k, v = make_qkv(1, 1, 1, 70, 70, 8, 8, requires_grad=False)
    p = normalise(q, k, v, None, 0.0, False, None, False, "saturating", 1e-6)
    p.q = p.q.to("meta")
    assert "CPU" in fused_cpu.supports(p)
    p.q = q.to(torch.int64)  # dtypes beyond the supported ones are declined with a reason
    assert "dtype" in fused_cpu.supports(p)


def test_custom_op_opcheck_and_compile():
    q, k, v = (t.float().requires_grad_() for t in make_qkv(1, 2, 1, 9, 11, 8, 8, requires_grad=False))
    m = torch.rand(1, 1, 9, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    torch.library.opcheck(fused_cpu.fused_cpu_fwd, (q, k, v, m, False, 0.3, True, 1e-6))
    torch.library.opcheck(fused_cpu.fused_cpu_fwd, (q, k, v, None, True, 0.3, False, 0.0))

    def f(q, k, v):
        return expressive_attention(q, k, v, is_causal=True, enable_gqa=True, backend="fused_cpu")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(f(q, k, v).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_aten_gemm_fallback_matches_blas_path():
    """The path used when libtorch exports no BLAS gemm gives the same results."""
    ext = fused_cpu.load_extension()
    assert ext.has_blas()  # the x86 wheels export MKL's sgemm_/dgemm_
    B, H, Hkv, L, S, E, Ev = 1, 2, 1, 70, 90, 16, 8
    q, k, v = make_qkv(B, H, Hkv, L, S, E, Ev, requires_grad=False)
    kw = dict(mask_kwargs("bool", B, H, L, S), enable_gqa=True)
    do = torch.randn(B, H, L, Ev, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        blas = run(q, k, v, dtype, "fused_cpu", kw, do)
        ext.set_force_aten_gemm(True)
        try:
            aten = run(q, k, v, dtype, "fused_cpu", kw, do)
        finally:
            ext.set_force_aten_gemm(False)
        for a, b in zip(aten, blas):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
