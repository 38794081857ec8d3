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


def run(q, k, v, dtype, backend, kw, do):
    """Output and (dq, dk, dv) of `backend` on copies of q, k, v cast to `dtype`."""
    from expressive_attention import expressive_attention

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = expressive_attention(*leaves, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return [out, *grads]


def assert_as_accurate_as_fp32_reference(q, k, v, kw, rel_floor=2e-5, backend="fused_cpu"):
    """fp32 `backend` vs the float64 reference: error within the fp32 reference's own error (x10)
    or a small relative floor, for the output and every gradient. (For variant="exp_squared" the
    fp32 reference's own error is ~10x that of the other variants: exp(s^2) turns an error d in s
    into a relative error 2 s d.)"""
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(7))
    exact = run(q, k, v, torch.float64, "reference", kw, do)
    ref32 = run(q, k, v, torch.float32, "reference", kw, do)
    fast = run(q, k, v, torch.float32, backend, kw, do)
    for name, x, r, e in zip(("out", "dq", "dk", "dv"), fast, ref32, exact):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
        err = (x.double() - e).abs().max().item()
        tol = max(rel_floor * e.abs().max().item(), 10 * (r.double() - e).abs().max().item(), 1e-12)
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"
