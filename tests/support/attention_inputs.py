"""Shared builders for the attention tests: inputs (q, k, v), masks as keyword arguments, and the
values-and-gradients comparison against the reference. (Importable as `attention_inputs`: pytest's
`pythonpath` setting puts tests/support on sys.path.)"""
from __future__ import annotations

import torch

MASK_KINDS = ("none", "causal", "bool", "keypad", "rows", "causalpad")


def make_qkv(B, H, Hkv, L, S, E, Ev, dtype=torch.float64, seed=0, spread=1.0, requires_grad=True):
    """q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), drawn in float64 then cast (so every dtype
    sees the same numbers); q and k scaled by `spread` (spread 12 gives |s| in the hundreds)."""
    g = torch.Generator().manual_seed(seed)
    q = (spread * torch.randn(B, H, L, E, generator=g, dtype=torch.float64)).to(dtype)
    k = (spread * torch.randn(B, Hkv, S, E, generator=g, dtype=torch.float64)).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def mask_kwargs(kind: str, B: int, H: int, L: int, S: int, seed: int = 0) -> dict:
    """Keyword arguments for one masking mode:
    none; causal (is_causal); bool (per batch/head, one fully masked row); keypad ((B, 1, 1, S) key
    padding); rows ((L, S), some query rows fully masked); causalpad ((B, 1, L, S) bool: causal, top-left,
    AND left key padding, as a padded decoder batch has: the linear form runs it as causal when L == S)."""
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "bool":
        m = torch.rand(B, H, L, S, generator=g) > 0.3
        m[..., L // 2, :] = False
        return {"attn_mask": m}
    if kind == "keypad":
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[0, ..., S - S // 3 :] = False
        return {"attn_mask": m}
    if kind == "causalpad":
        keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
        keep[0, ..., : S // 4] = False  # batch 0 left-padded: its first rows see no key
        return {"attn_mask": torch.ones(L, S, dtype=torch.bool).tril() & keep}
    if kind == "rows":
        return {"attn_mask": (torch.rand(L, 1, generator=g) > 0.3).expand(L, S)}
    raise ValueError(f"unknown mask kind {kind!r}")


def grads(out: torch.Tensor, inputs, seed: int = 1):
    """d(out . dO)/d(inputs) for a fixed random dO."""
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, do)


def assert_matches(out, ref, inputs, atol, rtol):
    """Values and the gradients w.r.t. `inputs` (q, k, v) agree within atol/rtol."""
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for name, a, b in zip("qkv", grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")
