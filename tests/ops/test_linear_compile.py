"""The linear form under torch.compile: one opaque custom op (expressive_attention::linear_fwd / linear_bwd)
instead of a traced chunk loop; values and gradients against the reference, and opcheck."""
import pytest
import torch
from attention_inputs import make_qkv

from expressive_attention import expressive_attention
from expressive_attention.ops import linear


def test_custom_ops_pass_opcheck():
    q, k, v = make_qkv(2, 4, 2, 37, 37, 5, 3, requires_grad=True)
    for causal, chunk in ((True, 16), (False, 16), (True, 0)):  # 0: the default chunk, chosen inside
        torch.library.opcheck(linear.linear_fwd, (q, k, v, causal, 0.4, 1e-6, chunk, 1))
    q, k, v = (t.detach() for t in (q, k, v))  # the backward op is not differentiable (no double backward)
    out, z = linear.linear_fwd(q, k, v, True, 0.4, 1e-6, 16, 2)
    dout = torch.randn_like(out)
    torch.library.opcheck(linear.linear_bwd, (dout, q, k, v, out, z, True, 0.4, 1e-6, 16, 2))


@pytest.mark.parametrize("case", ["causal", "bidirectional-cross", "causal+padding", "gqa-float32"])
def test_compiled_linear_matches_the_reference(case):
    dtype = torch.float32 if case == "gqa-float32" else torch.float64
    H, Hkv = (4, 2) if case == "gqa-float32" else (2, 2)
    L, S = (50, 70) if case == "bidirectional-cross" else (70, 70)
    q, k, v = make_qkv(2, H, Hkv, L, S, 6, 4, dtype=dtype, seed=3)
    kw = dict(variant="squared", enable_gqa=H != Hkv)
    if case.startswith("causal"):
        kw["is_causal"] = True
    if case == "causal+padding":
        keep = torch.ones(2, 1, 1, S, dtype=torch.bool)
        keep[0, ..., :9] = False  # left padding
        kw = dict(variant="squared", attn_mask=keep & torch.ones(L, S, dtype=torch.bool).tril())

    def f(q, k, v, backend):
        return expressive_attention(q, k, v, backend=backend, **kw)

    # fullgraph: the op is not traced into (a full mask's pattern check, mask_patterns.py, is not traceable:
    # a graph break there, before the op)
    compiled = torch.compile(f, backend="aot_eager", fullgraph="attn_mask" not in kw)
    got, want = compiled(q, k, v, "linear"), f(q, k, v, "reference")
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)
