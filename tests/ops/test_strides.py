"""Every CPU backend gives the reference's values and gradients for any stride pattern of q, k, v.

Regression: the fused CPU kernel handed a sequence axis of stride 0 (an expanded key) to the BLAS as a
matrix with leading dimension 0 and returned wrong values without an error. (The Triton backend is
checked under its interpreter in test_triton_ea.py.)
"""
import pytest
import torch

from expressive_attention import expressive_attention

B, H, L, E = 2, 3, 9, 8

PATTERNS = ["contiguous", "transposed", "sliced", "channels_last", "expand_seq", "expand_heads", "expand_batch"]

# backend -> the variants it runs (linear is the exact form of the squared variant only)
CASES = [(b, v) for b in ("blocked", "fused_cpu", "auto") for v in ("saturating", "squared")] + [("linear", "squared")]


def layout(t: torch.Tensor, pattern: str) -> torch.Tensor:
    """`t` (B, H, L, E) seen through another stride pattern (differentiable w.r.t. `t`)."""
    if pattern == "contiguous":
        return t
    if pattern == "transposed":  # (B, L, H, E) storage, as after a projection + view + transpose
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if pattern == "sliced":  # every other row and column of a wider buffer
        wide = _interleave(t)
        return wide[:, :, ::2, ::2]
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


@pytest.mark.parametrize("backend,variant", CASES)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_stride_patterns_match_reference(backend, variant, which, pattern):
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(B, H, L, E, generator=g, dtype=torch.float64) for n in "qkv"}
    do = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)

    def run(name):
        leaves = [base[n].clone().requires_grad_() for n in "qkv"]
        args = [layout(t, pattern) if n == which else t for n, t in zip("qkv", leaves)]
        assert (pattern == "contiguous") == args["qkv".index(which)].is_contiguous()
        out = expressive_attention(*args, is_causal=True, variant=variant, backend=name)
        return out, torch.autograd.grad(out, leaves, do)

    out, grads = run(backend)
    ref, ref_grads = run("reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    for n, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"d{n}: {m}")


def test_issue_reproducer_expanded_key_or_value_fused_cpu():
    torch.manual_seed(0)
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8)
    for kk, vv in ((k, v), (v, k)):  # expanded key, then expanded value (which gave all zeros)
        out = expressive_attention(q, kk, vv, backend="fused_cpu")
        ref = expressive_attention(q, kk, vv, backend="reference")
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
