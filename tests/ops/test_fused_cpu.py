"""The fused CPU kernel equals the reference (values and gradients) for each of its variants; auto falls
back without it."""
import math
import warnings

import pytest
import torch
from attention_inputs import assert_as_accurate_as_fp32_reference, make_qkv, mask_kwargs, run

from expressive_attention import expressive_attention
from expressive_attention.ops import choose_backend, fused_cpu, reference_attention
from expressive_attention.ops.problem import normalise, repeat_kv


@pytest.fixture(scope="module", autouse=True)
def built():
    # The first test on a fresh machine compiles the kernel (about a minute).
    assert fused_cpu.is_available(), f"fused CPU kernel did not build: {fused_cpu.build_error()}"


SHAPES = [  # (B, H, Hkv, L, S, E, Ev): odd sizes, S != L, GQA, > one 64-row / 512-key block
    (1, 1, 1, 1, 1, 8, 8),
    (2, 3, 3, 7, 7, 16, 16),
    (1, 2, 2, 63, 63, 32, 32),
    (1, 4, 2, 130, 70, 64, 64),
    (2, 2, 1, 7, 130, 8, 24),
    (1, 2, 1, 130, 600, 16, 16),
]


VARIANTS = fused_cpu.KERNEL_VARIANTS  # saturating, squared, exp_squared


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "keypad", "rows"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape, mask_kind, variant):
    B, H, Hkv, L, S, E, Ev = shape
    q, k, v = make_qkv(*shape, requires_grad=False)
    kw = dict(mask_kwargs(mask_kind, B, H, L, S), enable_gqa=H != Hkv, variant=variant)
    assert_as_accurate_as_fp32_reference(q, k, v, kw)


@pytest.mark.parametrize("variant", VARIANTS)
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
    for variant in VARIANTS:
        fn = lambda q, k, v: expressive_attention(q, k, v, attn_mask=m, enable_gqa=True,
                                                  variant=variant, backend="fused_cpu")
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_fully_masked_rows_give_zeros_and_finite_grads(eps, variant):
    B, H, L, S, E = 2, 2, 9, 20, 8
    q, k, v = (t.float().requires_grad_() for t in make_qkv(B, H, H, L, S, E, E, requires_grad=False))
    m = torch.rand(B, H, L, S, generator=torch.Generator().manual_seed(0)) > 0.5
    m[:, :, [0, 4]] = False
    out = expressive_attention(q, k, v, attn_mask=m, eps=eps, variant=variant, backend="fused_cpu")
    assert (out[:, :, [0, 4]] == 0).all()
    ref = reference_attention(q, k, v, m, eps=eps, variant=variant)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, [0, 4]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
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
        # exp_squared with |s| in the hundreds weighs each row's top key alone: dq and dk are ~0
        # (1e-14 in float64), where only an absolute floor makes sense
        bound = max(2e-2 * e.abs().max().item(), 1e-6)
        assert err <= bound, f"{name}: {err:.3g} vs max {e.abs().max():.3g}"


# ----------------------------------------------------------------------------- exp_squared's running maximum

def ramped_keys(S: int, E: int, top: float, last: bool):
    """q (1, 2, 68, E) and k, v (1, 1, S, E) with key norms ramping from 0.2 to `top` (towards the
    end when `last`, else towards the start): s^2 reaches ~top^2 * 10, past float64's exp range at
    top = 10, and the row maximum moves from one 512-key block to the next (or is met at once)."""
    q, k, v = make_qkv(1, 2, 1, 68, S, E, E, requires_grad=False)
    ramp = torch.linspace(0.2, top, S, dtype=torch.float64)
    return q, k * (ramp if last else ramp.flip(0))[:, None], v


@pytest.mark.parametrize("top", [3.0, 10.0])
@pytest.mark.parametrize("last", [True, False])
def test_exp_squared_rescaling_across_blocks_and_splits(top, last):
    """Values and gradients (float64, 1e-10) with the row maximum in the first or the last key block,
    through the forward (3 blocks of 512 keys), the decode schedule with 1 and 3 key splits and the
    backward split, causal and with a mask, including scores whose exp(s^2) overflows float64."""
    ext = fused_cpu._ext()
    q, k, v = ramped_keys(1100, 16, top, last)
    mask = torch.rand(1, 2, 68, 1100, generator=torch.Generator().manual_seed(5)) > 0.2
    mask[0, 1, 3] = False
    try:
        for splits, rows in ((0, slice(None)), (3, slice(0, 3)), (1, slice(0, 3))):
            ext.set_splits(splits, splits, 16)
            qq = q[:, :, rows].clone()
            for kw in ({"is_causal": False}, {"attn_mask": mask[:, :, rows]}):
                kw = dict(kw, variant="exp_squared", enable_gqa=True)
                do = torch.randn(1, 2, qq.shape[2], 16, dtype=torch.float64)
                got = run(qq, k, v, torch.float64, "fused_cpu", kw, do)
                want = run(qq, k, v, torch.float64, "reference", kw, do)
                for name, x, e in zip(("out", "dq", "dk", "dv"), got, want):
                    assert torch.isfinite(x).all(), name
                    torch.testing.assert_close(x, e, atol=1e-10, rtol=1e-8, msg=lambda m: f"{name}: {m}")
    finally:
        ext.set_splits(0, 0, 16)


def test_exp_squared_saves_the_log_normaliser():
    """For exp_squared the Z slot holds lse_i = log(eps + sum_j exp(s_ij^2)) (the row maximum and the
    normaliser in one number: backward recomputes a = exp(s^2 - lse)); an empty row gets log(eps), or
    0 with eps = 0 (Z := 1), in the standard and the decode schedule."""
    for L in (40, 3):  # the standard schedule, the decode schedule
        q, k, v = make_qkv(1, 2, 2, L, 300, 16, 16, requires_grad=False, spread=2.0)
        m = torch.rand(1, 2, L, 300, generator=torch.Generator().manual_seed(1)) > 0.5
        m[0, 0, 1] = False
        for eps in (1e-6, 0.0):
            _, z = fused_cpu.fused_cpu_fwd(q, k, v, m[:, :, :, :], False, 0.25, "exp_squared", eps)
            s2 = ((q @ k.transpose(-1, -2)) * 0.25).square().masked_fill(~m, float("-inf"))
            want = torch.logaddexp(s2.logsumexp(-1), torch.tensor(eps, dtype=torch.float64).log())
            want[0, 0, 1] = math.log(eps) if eps > 0 else 0.0
            torch.testing.assert_close(z, want, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates_like_the_reference(dtype):
    """A NaN in one query row gives NaN in that row only, as in the reference (the float32 exp of
    exp_squared must not clamp NaN into a finite weight)."""
    q, k, v = (t.to(dtype) for t in make_qkv(1, 2, 2, 70, 90, 16, 16, requires_grad=False))
    q[0, 1, 5, 3] = float("nan")
    for variant in VARIANTS:
        out = expressive_attention(q, k, v, is_causal=True, variant=variant, backend="fused_cpu")
        ref = expressive_attention(q, k, v, is_causal=True, variant=variant, backend="reference")
        assert torch.equal(out.isnan(), ref.isnan()) and out[0, 1, 5].isnan().all(), variant
        assert out.isnan().sum() == out.shape[-1], variant


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
    torch.library.opcheck(fused_cpu.fused_cpu_fwd, (q, k, v, m, False, 0.3, "saturating", 1e-6))
    torch.library.opcheck(fused_cpu.fused_cpu_fwd, (q, k, v, None, True, 0.3, "squared", 0.0))
    torch.library.opcheck(fused_cpu.fused_cpu_fwd, (q, k, v, m, True, 0.3, "exp_squared", 1e-6))
    with pytest.raises(RuntimeError, match="variant must be"):
        fused_cpu.fused_cpu_fwd(q, k, v, None, True, 0.3, "power", 1e-6)

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
