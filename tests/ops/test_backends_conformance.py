"""Every registered backend (and "auto") against the reference: values and gradients, masks, GQA,
dtypes and stride patterns. A backend that cannot run a case must refuse it with its reason (checked
here too), never return something else. (The Triton backend's kernels are run under its interpreter
in test_triton_ea.py; on plain CPU it refuses every case here.)"""
import itertools

import pytest
import torch
from attention_inputs import MASK_KINDS, assert_matches, make_qkv, mask_kwargs

from expressive_attention import expressive_attention
from expressive_attention.ops import BACKENDS, VARIANTS, fused_cpu  # every variant (power at its default degree)
from expressive_attention.ops.problem import normalise

ALL = [*BACKENDS, "auto"]  # every registered backend, and the policy


@pytest.fixture(scope="module", autouse=True)
def flex_eager():
    """flex through its eager path here (the same FlexAttention semantics without a torch.compile per shape;
    the compiled path is checked in test_flex.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EA_FLEX_COMPILE", "0")
        yield


@pytest.fixture(scope="module", autouse=True)
def kernel_loaded():
    """The fused CPU kernel loaded from the start (built if need be), so that every case here runs what a
    user gets: fused_cpu itself, and the linear form with its C++ feature helpers (the torch-op features
    are checked in test_linear_packed.py, both paths in test_linear_native.py)."""
    fused_cpu.load_extension()


def refusal(backend, q, k, v, variant, kw) -> "str | None":
    """Why `backend` cannot run this call (None: it can)."""
    if backend == "auto":
        return None
    p = normalise(q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False), None, q.shape[1] != k.shape[1],
                  variant, 1e-6)
    return BACKENDS[backend].unsupported(p)


def check(backend, q, k, v, variant, kw, atol, rtol):
    """`backend` matches the float64 reference on the same inputs, or refuses the call with its reason."""
    kw = dict(kw, enable_gqa=q.shape[1] != k.shape[1], variant=variant)
    reason = refusal(backend, q, k, v, variant, kw)
    if reason is not None:
        with pytest.raises(ValueError, match="cannot run this call"):
            expressive_attention(q, k, v, backend=backend, **kw)
        if q.requires_grad:  # a forward-only backend (flex on CPU) may take the call without gradients
            d = [t.detach() for t in (q, k, v)]
            if refusal(backend, *d, variant, kw) is None:
                assert "grad" in reason
                check(backend, *d, variant, kw, atol, rtol)
        return
    out = expressive_attention(q, k, v, backend=backend, **kw)
    assert out.dtype == q.dtype
    ref = expressive_attention(q, k, v, backend="reference", **kw)
    if q.requires_grad:
        assert_matches(out, ref, (q, k, v), atol, rtol)
    else:
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


SHAPES = [  # (L, S, E)
    (1, 1, 8), (7, 7, 16), (63, 63, 32), (130, 130, 64), (7, 130, 16), (130, 33, 8), (200, 300, 24),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("L,S,E", SHAPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_matches_reference_float64(backend, L, S, E, mask_kind):
    q, k, v = make_qkv(2, 4, 4, L, S, E, E)
    for variant in VARIANTS:
        check(backend, q, k, v, variant, mask_kwargs(mask_kind, 2, 4, L, S), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mask_kind,variant",
                         list(itertools.product(["none", "causal", "bool", "keypad", "causalpad"], VARIANTS)))
def test_gqa_and_value_dim(backend, mask_kind, variant):
    L = 70 if mask_kind in ("causal", "causalpad") else 90  # causal: also the square case the linear form needs
    q, k, v = make_qkv(2, 6, 2, 70, L, 16, 12)
    check(backend, q, k, v, variant, mask_kwargs(mask_kind, 2, 6, 70, L), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", ALL)
def test_float32_tolerance(backend):
    q, k, v = make_qkv(2, 4, 2, 129, 129, 32, 32, dtype=torch.float32)
    for variant in VARIANTS:
        check(backend, q, k, v, variant, {"is_causal": True}, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ALL)
def test_bfloat16_large_scores_no_overflow(backend):
    # |s| in the hundreds: s^2 ~ 1e5 overflows fp16 (and would lose bf16 range on sums); fp32 accumulation keeps it finite.
    q, k, v = make_qkv(1, 2, 2, 96, 96, 16, 16, dtype=torch.bfloat16, spread=12.0)
    for variant in VARIANTS:
        kw = dict(is_causal=True, variant=variant)
        if refusal(backend, q, k, v, variant, kw) is not None:
            continue  # refusals are checked in the float64 tests
        out = expressive_attention(q, k, v, backend=backend, **kw)
        ref = expressive_attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        s_max = (q.double() @ k.double().transpose(-1, -2)).abs().max() / 4
        assert s_max > 100
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        assert all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("backend", ALL)
def test_tiny_scores_float32(backend):
    # A freshly initialised model has |s| ~ 1e-4..1e-3: f must not cancel to zero in float32.
    q, k, v = make_qkv(2, 2, 2, 80, 80, 16, 16, dtype=torch.float32, spread=1e-3)
    for variant in VARIANTS:
        kw = dict(is_causal=True, variant=variant)
        if refusal(backend, q, k, v, variant, kw) is not None:
            continue
        out = expressive_attention(q, k, v, backend=backend, **kw)
        ref = expressive_attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ALL)
def test_float_masks_are_refused_for_every_variant(backend):
    # an additive float mask has no meaning once scores are squared (or exponentiated after squaring)
    q, k, v = make_qkv(1, 2, 2, 9, 11, 8, 8)
    for variant in VARIANTS:
        with pytest.raises(TypeError, match="additive float mask"):
            expressive_attention(q, k, v, attn_mask=torch.zeros(9, 11), variant=variant, backend=backend)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gradcheck_float64(backend):
    q, k, v = make_qkv(1, 2, 1, 6, 6, 4, 3)
    mask = torch.rand(1, 2, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    for variant in VARIANTS:
        for kw in ({"is_causal": True}, {"attn_mask": mask}, {}):
            if refusal(backend, q, k, v, variant, kw) is not None:
                continue
            fn = lambda q, k, v: expressive_attention(q, k, v, variant=variant, enable_gqa=True, backend=backend, **kw)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (q, k, v))


def test_blocked_uses_several_tiles(monkeypatch):
    # Force tiny tiles so block boundaries, causal skipping and tile-edge masks are all exercised.
    from expressive_attention.ops import blocked

    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 1)
    assert blocked._block_rows(8, 100, 100) == 16
    q, k, v = make_qkv(2, 4, 2, 100, 100, 8, 8)
    check("blocked", q, k, v, "squared", {"is_causal": True}, atol=1e-10, rtol=1e-8)
    q, k, v = make_qkv(2, 4, 4, 100, 37, 8, 8)
    check("blocked", q, k, v, "saturating", mask_kwargs("bool", 2, 4, 100, 37), atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------- stride patterns
# Regression: the fused CPU kernel handed a sequence axis of stride 0 (an expanded key) to the BLAS as a
# matrix with leading dimension 0 and returned wrong values without an error.

B, H, L, E = 2, 3, 9, 8
PATTERNS = ["contiguous", "transposed", "sliced", "channels_last", "expand_seq", "expand_heads", "expand_batch"]


def layout(t: torch.Tensor, pattern: str) -> torch.Tensor:
    """`t` (B, H, L, E) seen through another stride pattern (differentiable w.r.t. `t`)."""
    if pattern == "contiguous":
        return t
    if pattern == "transposed":  # (B, L, H, E) storage, as after a projection + view + transpose
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if pattern == "sliced":  # every other row and column of a wider buffer
        return _interleave(t)[:, :, ::2, ::2]
    if pattern == "channels_last":  # last-dim stride != 1
        return t.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    if pattern == "expand_seq":  # one row expanded along the sequence axis (stride 0)
        return t[:, :, :1].expand(B, H, L, E)
    if pattern == "expand_heads":
        return t[:, :1].expand(B, H, L, E)
    if pattern == "expand_batch":
        return t[:1].expand(B, H, L, E)
    raise ValueError(pattern)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, 2L, 2E) tensor holding `t` at even rows and columns (built differentiably)."""
    pad = torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)  # (B, H, L, 2E)
    return torch.stack([pad, torch.zeros_like(pad)], dim=-2).flatten(-3, -2)  # (B, H, 2L, 2E)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_stride_patterns_match_reference(backend, variant, which, pattern):
    leaves = make_qkv(B, H, H, L, L, E, E)
    args = [layout(t, pattern) if n == which else t for n, t in zip("qkv", leaves)]
    assert (pattern == "contiguous") == args["qkv".index(which)].is_contiguous()
    kw = dict(is_causal=True, variant=variant)
    if refusal(backend, *args, variant, kw) is not None:
        with pytest.raises(ValueError, match="cannot run this call"):
            expressive_attention(*args, backend=backend, **kw)
        return
    out = expressive_attention(*args, backend=backend, **kw)
    ref = expressive_attention(*args, backend="reference", **kw)
    assert_matches(out, ref, leaves, atol=1e-10, rtol=1e-8)


def test_issue_reproducer_expanded_key_or_value_fused_cpu():
    torch.manual_seed(0)
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8)
    for kk, vv in ((k, v), (v, k)):  # expanded key, then expanded value (which gave all zeros)
        out = expressive_attention(q, kk, vv, backend="fused_cpu")
        ref = expressive_attention(q, kk, vv, backend="reference")
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
