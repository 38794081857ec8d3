"""The fused CPU kernel's other schedules against the reference: the decode schedule (at most 16 query
rows against a long key axis, split over the keys when B x Hkv is smaller than the thread count) and
the backward split over query blocks (B x Hkv smaller than the thread count). Each runs with 1 and 2
threads and with forced split counts (more splits than keys included); values and gradients, masks,
GQA, strides, every kernel variant, float64 and float32. Then: `auto` reaches the decode schedule,
inference skips the custom op, and generate() gives the reference's tokens."""
import itertools

import pytest
import torch
from attention_inputs import assert_as_accurate_as_fp32_reference, assert_matches, make_qkv, mask_kwargs

from expressive_attention import expressive_attention
from expressive_attention.ops import choose_backend, fused_cpu
from expressive_attention.ops.problem import normalise

VARIANTS = fused_cpu.KERNEL_VARIANTS


@pytest.fixture
def ext():
    """The compiled kernel; split counts and the decode row limit are restored afterwards."""
    mod = fused_cpu._ext()
    threads = torch.get_num_threads()
    yield mod
    mod.set_splits(0, 0, 16)
    torch.set_num_threads(threads)


def check(q, k, v, kw, atol, rtol, grad=True):
    """fused_cpu == reference (float64 reference for float32 inputs: the kernel must be as close as
    float32 allows); with grad, all three gradients too; without, through the plain (no custom op) path."""
    kw = dict(kw, enable_gqa=q.shape[1] != k.shape[1])
    if grad:
        out = expressive_attention(q, k, v, backend="fused_cpu", **kw)
        ref = expressive_attention(q, k, v, backend="reference", **kw)
        assert_matches(out, ref, (q, k, v), atol, rtol)
    with torch.no_grad():
        out = expressive_attention(q, k, v, backend="fused_cpu", **kw)
        ref = expressive_attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- decode schedule

DECODE_SHAPES = [  # (B, H, Hkv, L, S, E, Ev): L <= 16; S = 1, S < L, S across the 1024-key block
    (1, 2, 2, 1, 1, 8, 8), (2, 3, 3, 1, 37, 16, 12), (1, 6, 2, 3, 2500, 16, 16), (2, 4, 1, 3, 5, 8, 4),
    (1, 1, 1, 16, 1030, 32, 32), (3, 4, 2, 7, 300, 24, 8),
]


@pytest.mark.parametrize("threads,splits", [(1, 0), (2, 0), (1, 3), (2, 8)])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "keypad", "rows"])
def test_decode_schedule_matches_reference_float64(ext, threads, splits, shape, mask_kind):
    B, H, Hkv, L, S, E, Ev = shape
    torch.set_num_threads(threads)
    ext.set_splits(splits, 0, 16)  # splits=8 with S=1 or 5: more splits than keys (empty ones)
    q, k, v = make_qkv(B, H, Hkv, L, S, E, Ev)
    for variant in VARIANTS:
        check(q, k, v, dict(mask_kwargs(mask_kind, B, H, L, S), variant=variant), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_schedule_float32(ext, threads):
    torch.set_num_threads(threads)
    q, k, v = make_qkv(4, 8, 2, 1, 4099, 64, 64, dtype=torch.float32)
    for variant, mask_kind in itertools.product(VARIANTS, ["none", "keypad"]):
        kw = dict(mask_kwargs(mask_kind, 4, 8, 1, 4099), variant=variant)
        check(q, k, v, kw, atol=2e-5, rtol=1e-4)
    ext.set_splits(5, 0, 16)
    check(q, k, v, {"variant": "saturating"}, atol=2e-5, rtol=1e-4, grad=False)


def test_decode_fully_masked_rows_give_zeros(ext):
    ext.set_splits(4, 0, 16)
    q, k, v = make_qkv(2, 4, 2, 3, 50, 8, 8, requires_grad=False)
    m = torch.ones(2, 4, 3, 50, dtype=torch.bool)
    m[1, 2, 1] = False  # one row sees nothing
    m[0, :, :, :] = False  # a whole batch entry sees nothing
    for eps, variant in itertools.product((0.0, 1e-6), VARIANTS):
        kw = dict(attn_mask=m, enable_gqa=True, eps=eps, variant=variant)
        out = expressive_attention(q, k, v, backend="fused_cpu", **kw)
        assert torch.isfinite(out).all()
        assert out[0].abs().max() == 0 and out[1, 2, 1].abs().max() == 0
        ref = expressive_attention(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)


def test_decode_on_kv_cache_views_and_strided_query(ext):
    # k/v as KVCache holds them (the first S rows of a bigger buffer); q from a (B, L, H, E) projection
    buf = torch.randn(2, 2, 4, 64, 16, dtype=torch.float64)
    k, v = buf[0, :, :, :40], buf[1, :, :, :40]
    q = torch.randn(2, 1, 8, 16, dtype=torch.float64).transpose(1, 2)  # (B, H, 1, E), strided heads
    for splits in (0, 3):
        ext.set_splits(splits, 0, 16)
        check(q, k, v, {"variant": "squared"}, atol=1e-10, rtol=1e-8, grad=False)


def test_decode_schedule_equals_the_standard_schedule(ext):
    # the same call through both schedules (decode_max_rows 0 turns the decode schedule off)
    q, k, v = make_qkv(1, 4, 2, 5, 700, 16, 16, requires_grad=False)
    for variant in VARIANTS:
        ext.set_splits(3, 0, 16)
        a = expressive_attention(q, k, v, enable_gqa=True, variant=variant, backend="fused_cpu")
        ext.set_splits(0, 0, 0)
        b = expressive_attention(q, k, v, enable_gqa=True, variant=variant, backend="fused_cpu")
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_set_splits_rejects_negative_values(ext):
    with pytest.raises(RuntimeError, match="must be >= 0"):
        ext.set_splits(-1, 0, 16)


# ----------------------------------------------------------------------------- backward split

@pytest.mark.parametrize("threads,splits", [(1, 0), (2, 0), (1, 2), (2, 3), (2, 50)])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "keypad"])
def test_backward_split_matches_reference(ext, threads, splits, mask_kind):
    # B x Hkv = 1 or 2 (< threads): split over query blocks (128 rows); 50 > the items there are
    torch.set_num_threads(threads)
    ext.set_splits(0, splits, 16)
    for B, H, Hkv, L, S in ((1, 1, 1, 300, 300), (1, 2, 1, 260, 130), (2, 1, 1, 40, 77)):
        q, k, v = make_qkv(B, H, Hkv, L, S, 16, 12)
        for variant in VARIANTS:
            check(q, k, v, dict(mask_kwargs(mask_kind, B, H, L, S), variant=variant), atol=1e-10, rtol=1e-8)


def test_backward_split_float32(ext):
    torch.set_num_threads(2)
    q, k, v = make_qkv(1, 2, 1, 520, 520, 32, 32, dtype=torch.float32)
    check(q, k, v, {"is_causal": True}, atol=2e-5, rtol=1e-4)
    for variant in VARIANTS:  # exp_squared's float32 error is larger: judged against the reference's own
        assert_as_accurate_as_fp32_reference(q, k, v, {"is_causal": True, "variant": variant, "enable_gqa": True})


# ----------------------------------------------------------------------------- dispatch and models

def test_auto_runs_decode_calls_on_the_fused_kernel(ext):
    for variant in VARIANTS:  # squared: the linear form never pays off for one query row
        p = normalise(torch.randn(1, 8, 1, 16), torch.randn(1, 2, 4096, 16), torch.randn(1, 2, 4096, 16),
                      None, 0.0, False, None, True, variant, 1e-6)
        assert choose_backend(p).name == "fused_cpu"


def test_inference_skips_the_custom_op(ext, monkeypatch):
    def op(*args):
        raise AssertionError("custom op called")

    monkeypatch.setattr(fused_cpu, "fused_cpu_fwd", op)
    q, k, v = make_qkv(1, 2, 2, 1, 64, 8, 8)
    with torch.no_grad():
        expressive_attention(q, k, v, backend="fused_cpu")  # the kernel itself
    with torch.inference_mode():
        expressive_attention(q.detach(), k.detach(), v.detach(), backend="fused_cpu")
    with pytest.raises(AssertionError, match="custom op called"):
        expressive_attention(q, k, v, backend="fused_cpu")  # gradients: through the op


def test_compile_without_grad_keeps_the_custom_op(ext):
    q, k, v = make_qkv(1, 4, 2, 1, 50, 8, 8, dtype=torch.float32, requires_grad=False)

    def f(q, k, v):
        return expressive_attention(q, k, v, enable_gqa=True, backend="fused_cpu")

    with torch.no_grad():
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
        torch.testing.assert_close(out, f(q, k, v))
        # a tracer (make_fx's dispatch mode) must record the op, not run the kernel behind its back
        from torch.fx.experimental.proxy_tensor import make_fx

        assert "fused_cpu_fwd" in make_fx(f)(q, k, v).code


@pytest.mark.parametrize("n_kv_heads,variant", [(None, "saturating"), (2, "saturating"), (2, "exp_squared")])
def test_generate_with_the_decode_schedule_matches_reference(ext, n_kv_heads, variant):
    from expressive_attention.nn import DecoderLM, LMConfig

    torch.manual_seed(0)
    cfg = dict(vocab_size=50, context_length=64, d_model=64, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2,
               variant=variant)
    fast = DecoderLM(LMConfig(**cfg, backend="fused_cpu")).double().eval()  # float64: no near-ties
    ref = DecoderLM(LMConfig(**cfg, backend="reference")).double().eval()
    ref.load_state_dict(fast.state_dict())
    prompt = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    for splits in (0, 3):
        ext.set_splits(splits, 0, 16)
        a = fast.generate(prompt, 30)
        b = ref.generate(prompt, 30)
        assert torch.equal(a, b)
