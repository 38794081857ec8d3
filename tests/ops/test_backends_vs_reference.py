"""Every registered fast backend (here: blocked, and whatever "auto" picks) equals the reference."""
import itertools

import pytest
import torch

from expressive_attention import expressive_attention

BACKENDS = ["blocked", "auto"]


def make(B, H, Hkv, L, S, E, Ev, dtype, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (spread * torch.randn(B, H, L, E, generator=g, dtype=torch.float64)).to(dtype)
    k = (spread * torch.randn(B, Hkv, S, E, generator=g, dtype=torch.float64)).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def masks(kind, B, H, L, S, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "bool":  # per batch/head, with a fully masked row
        m = torch.rand(B, H, L, S, generator=g) > 0.3
        m[..., L // 2, :] = False
        return {"attn_mask": m}
    if kind == "keypad":  # (B, 1, 1, S) key padding, broadcast over heads and queries
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[0, ..., S - S // 3 :] = False
        return {"attn_mask": m}
    raise ValueError(kind)


def check(backend, B, H, Hkv, L, S, E, Ev, mask_kind, variant, dtype=torch.float64, atol=1e-10, rtol=1e-8, spread=1.0):
    q, k, v = make(B, H, Hkv, L, S, E, Ev, dtype, spread=spread)
    kw = dict(masks(mask_kind, B, H, L, S), enable_gqa=H != Hkv, variant=variant)
    out = expressive_attention(q, k, v, backend=backend, **kw)
    ref = expressive_attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    do = torch.randn_like(out)
    g_out = torch.autograd.grad(out, (q, k, v), do)
    g_ref = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, b in zip("qkv", g_out, g_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


SHAPES = [  # (L, S, E)
    (1, 1, 8), (7, 7, 16), (63, 63, 32), (130, 130, 64), (7, 130, 16), (130, 33, 8), (200, 300, 24),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S,E", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "keypad"])
def test_matches_reference_float64(backend, L, S, E, mask_kind):
    for variant in ("saturating", "squared"):
        check(backend, 2, 4, 4, L, S, E, E, mask_kind, variant)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind,variant", list(itertools.product(["none", "causal", "bool"], ["saturating", "squared"])))
def test_gqa_and_value_dim(backend, mask_kind, variant):
    check(backend, 2, 6, 2, 70, 90, 16, 12, mask_kind, variant)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_tolerance(backend):
    for variant in ("saturating", "squared"):
        check(backend, 2, 4, 2, 129, 129, 32, 32, "causal", variant, dtype=torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_large_scores_no_overflow(backend):
    # |s| in the hundreds: s^2 ~ 1e5 overflows fp16 (and would lose bf16 range on sums); fp32 accumulation keeps it finite.
    q, k, v = make(1, 2, 2, 96, 96, 16, 16, torch.bfloat16, spread=12.0)
    for variant in ("saturating", "squared"):
        out = expressive_attention(q, k, v, is_causal=True, variant=variant, backend=backend)
        ref = expressive_attention(q.double(), k.double(), v.double(), is_causal=True, variant=variant, backend="reference")
        s_max = (q.double() @ k.double().transpose(-1, -2)).abs().max() / 4
        assert s_max > 100
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        assert all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_scores_float32(backend):
    # A freshly initialised model has |s| ~ 1e-4..1e-3: f must not cancel to zero in float32.
    q, k, v = make(2, 2, 2, 80, 80, 16, 16, torch.float32, spread=1e-3)
    for variant in ("saturating", "squared"):
        out = expressive_attention(q, k, v, is_causal=True, variant=variant, backend=backend)
        ref = expressive_attention(q.double(), k.double(), v.double(), is_causal=True, variant=variant, backend="reference")
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_gradcheck_float64(backend):
    q, k, v = make(1, 2, 1, 5, 6, 4, 3, torch.float64)
    mask = torch.rand(1, 2, 5, 6) > 0.3
    for variant in ("saturating", "squared"):
        for kw in ({"is_causal": True}, {"attn_mask": mask}, {}):
            fn = lambda q, k, v: expressive_attention(q, k, v, variant=variant, enable_gqa=True, backend=backend, **kw)
            assert torch.autograd.gradcheck(fn, (q, k, v))


def test_blocked_uses_several_tiles(monkeypatch):
    # Force tiny tiles so block boundaries, causal skipping and tile-edge masks are all exercised.
    from expressive_attention.ops import blocked

    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 1)
    assert blocked._block_rows(8, 100, 100) == 16
    check("blocked", 2, 4, 2, 100, 100, 8, 8, "causal", "squared")
    check("blocked", 2, 4, 4, 100, 37, 8, 8, "bool", "saturating")
