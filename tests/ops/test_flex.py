"""The `flex` backend (FlexAttention with score_mod = log f from the variant table) against the reference:
the forward on CPU for every variant, masks, GQA, odd lengths, dtypes, eps and rows with nothing to attend
to; the refusal of gradients on CPU; the compiled path; gradients on CUDA (skipped, with the reason, where
there is no CUDA device). The conformance suite runs it too (forward, detached inputs)."""
import pytest
import torch
from attention_inputs import MASK_KINDS, make_qkv, mask_kwargs

from expressive_attention import expressive_attention
from expressive_attention.ops import VARIANTS, choose_backend, flex
from expressive_attention.ops.problem import normalise

pytestmark = pytest.mark.skipif(flex.flex_attention is None, reason="this torch has no FlexAttention")


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("EA_FLEX_COMPILE", "0")  # the compiled path: test_compiled_matches_eager


def run(q, k, v, backend, **kw):
    with torch.no_grad():
        return expressive_attention(q, k, v, backend=backend, enable_gqa=q.shape[1] != k.shape[1], **kw)


SHAPES = [(1, 1, 8), (13, 29, 8), (130, 67, 16), (67, 200, 12)]  # (L, S, E): odd, past one 128-block


@pytest.mark.parametrize("L,S,E", SHAPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_forward_matches_reference_float64(L, S, E, mask_kind):
    if mask_kind.startswith("causal") and L != S:
        L = S
    q, k, v = make_qkv(2, 4, 2, L, S, E, E + 3, requires_grad=False)
    kw = mask_kwargs(mask_kind, 2, 4, L, S)
    for variant in VARIANTS:
        out = run(q, k, v, "flex", variant=variant, **kw)
        ref = run(q, k, v, "reference", variant=variant, **kw)
        assert out.dtype == q.dtype
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8, msg=lambda m, v=variant: f"{v}: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_forward_dtypes(dtype, tol):
    q, k, v = make_qkv(2, 4, 1, 97, 97, 32, 32, dtype=dtype, requires_grad=False)
    for variant in VARIANTS:
        for kw in ({"is_causal": True}, {}):
            out = run(q, k, v, "flex", variant=variant, **kw)
            ref = run(q.double(), k.double(), v.double(), "reference", variant=variant, **kw)
            assert out.dtype == dtype and torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_bfloat16_large_scores():
    q, k, v = make_qkv(1, 2, 2, 96, 96, 16, 16, dtype=torch.bfloat16, spread=12.0, requires_grad=False)
    for variant in VARIANTS:
        out = run(q, k, v, "flex", variant=variant, is_causal=True)
        ref = run(q.double(), k.double(), v.double(), "reference", variant=variant, is_causal=True)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.3, 50.0])
def test_eps_is_exact(eps):
    """softmax has no eps: the output is rescaled by sum f / (eps + sum f) from flex's lse."""
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, 8, spread=0.3, requires_grad=False)
    for variant in VARIANTS:
        out = run(q, k, v, "flex", variant=variant, eps=eps, is_causal=True)
        ref = run(q, k, v, "reference", variant=variant, eps=eps, is_causal=True)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-9)


def test_rows_with_nothing_to_attend_to_are_zero():
    q, k, v = make_qkv(2, 2, 2, 20, 30, 8, 8, requires_grad=False)
    mask = torch.rand(2, 2, 20, 30, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[:, :, 4] = False  # an empty row
    mask[1] = False  # a whole empty batch element
    q[0, 0, 7] = 0.0  # every score of a row is 0: every f(0) = 0 (log f = -inf), except exp-type (f = 1)
    for variant in VARIANTS:
        for eps in (0.0, 1e-6):
            out = run(q, k, v, "flex", variant=variant, attn_mask=mask, eps=eps)
            ref = run(q, k, v, "reference", variant=variant, attn_mask=mask, eps=eps)
            assert torch.isfinite(out).all()
            assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4])) and torch.equal(out[1], torch.zeros_like(out[1]))
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)


def test_cpu_refuses_gradients_with_the_reason():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, 8)
    with pytest.raises(ValueError, match="flex.*no backward on CPU.*torch.no_grad"):
        expressive_attention(q, k, v, backend="flex")
    out = run(q, k, v, "flex")  # the forward runs without gradients, on the same tensors
    torch.testing.assert_close(out, run(q, k, v, "reference"), atol=1e-10, rtol=1e-8)


def test_auto_never_picks_flex_on_cpu():
    q, k, v = make_qkv(1, 4, 4, 512, 512, 32, 32, dtype=torch.float32, requires_grad=False)
    for variant in VARIANTS:
        with torch.no_grad():
            p = normalise(q, k, v, None, 0.0, True, None, False, variant, 1e-6)
            assert choose_backend(p).name != "flex"


def test_score_mod_is_the_tables_log_f():
    s = torch.linspace(-3, 3, 13, dtype=torch.float64)
    from expressive_attention.ops.variants import VARIANT_TABLE

    for variant, entry in VARIANT_TABLE.items():
        mod = flex.score_mod_for(variant, 4.0 if entry.params else None)
        torch.testing.assert_close(mod(s, 0, 0, 0, 0), entry.log_f(s, 4.0 if entry.params else None))


@pytest.mark.slow
def test_compiled_matches_eager(monkeypatch):
    """The default path (torch.compile'd flex; one shape, one variant per kind of score_mod)."""
    monkeypatch.setenv("EA_FLEX_COMPILE", "1")
    q, k, v = make_qkv(1, 2, 1, 70, 70, 16, 16, dtype=torch.float32, requires_grad=False)
    mask = torch.rand(1, 2, 70, 70, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[:, :, 3] = False  # an empty row
    for variant, kw in (("saturating", {"is_causal": True}), ("exp_odd", {"attn_mask": mask}),
                        ("squared", {"eps": 0.0, "is_causal": True})):
        out = run(q, k, v, "flex", variant=variant, **kw)
        ref = run(q.double(), k.double(), v.double(), "reference", variant=variant, **kw)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex's backward runs on CUDA only (no CUDA device here)")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_gradients_match_reference(variant, monkeypatch):
    monkeypatch.setenv("EA_FLEX_COMPILE", "1")
    q, k, v = (t.detach().cuda().float().requires_grad_() for t in make_qkv(2, 4, 2, 130, 130, 32, 32))
    with torch.no_grad():
        q[0, 0, 3] = 0.0  # s = 0 on a whole row: log f = -inf, the gradient must stay finite
    mask = torch.rand(2, 1, 130, 130, device="cuda") > 0.3
    mask[:, :, 5] = False  # an empty row
    # (the boolean mask for two variants only: each (variant, mask) pair is one more compile in gpu_check's budget)
    for kw in ({"is_causal": True}, *([{"attn_mask": mask}] if variant in ("saturating", "exp_odd") else [])):
        outs = [expressive_attention(q, k, v, variant=variant, backend=b, enable_gqa=True, **kw)
                for b in ("flex", "reference")]
        do = torch.randn_like(outs[0])
        ga = torch.autograd.grad(outs[0], (q, k, v), do)
        gb = torch.autograd.grad(outs[1], (q, k, v), do)
        torch.testing.assert_close(outs[0], outs[1], atol=2e-4, rtol=1e-3)
        for a, b in zip(ga, gb):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)


def _fake_cuda_problem(variant="saturating", L=2048, grad=True):
    """What cuda_policy reads of a Problem, as if its tensors were on CUDA (no GPU here)."""
    from types import SimpleNamespace

    q = SimpleNamespace(is_cuda=True, shape=(1, 4, L, 64), device=torch.device("cuda", 0), dtype=torch.bfloat16)
    return SimpleNamespace(q=q, variant=variant, requires_grad=grad)


def test_cuda_policy_table_and_self_check(monkeypatch):
    """auto on CUDA: triton where the table says so and its self-check passes, else flex (placeholder table)."""
    from types import SimpleNamespace

    from expressive_attention.ops import cuda_policy, triton_ea

    triton = SimpleNamespace(unsupported=lambda p: None, run=triton_ea.triton_attention)
    monkeypatch.setattr(cuda_policy, "_CHECKED", {})
    monkeypatch.setattr(cuda_policy, "_run_self_check", lambda d, v, t, run: (True, ""))
    assert cuda_policy.CUDA_TABLE == {} and cuda_policy.DEFAULT == "triton"  # the placeholder, until measured
    assert cuda_policy.prefers_triton(_fake_cuda_problem(), triton)
    monkeypatch.setattr(cuda_policy, "CUDA_TABLE", {("saturating", "fwdbwd"): ((4096, "triton"), (16384, "flex"))})
    assert cuda_policy.prefers_triton(_fake_cuda_problem(L=4096), triton)
    assert not cuda_policy.prefers_triton(_fake_cuda_problem(L=8192), triton)
    assert cuda_policy.prefers_triton(_fake_cuda_problem(L=8192, grad=False), triton)  # no fwd entry: the default
    # a failing self-check: flex, with one warning naming it, and the verdict cached
    calls = []
    monkeypatch.setattr(cuda_policy, "_run_self_check",
                        lambda d, v, t, run: calls.append((v, run)) or (False, "dq differs"))
    with pytest.warns(RuntimeWarning, match="self-check.*exp_squared.*dq differs.*'flex'"):
        assert not cuda_policy.prefers_triton(_fake_cuda_problem("exp_squared"), triton)
    assert not cuda_policy.prefers_triton(_fake_cuda_problem("exp_squared"), triton)
    assert calls == [("exp_squared", triton_ea.triton_attention)]  # the check runs the backend's own kernels
    # a call triton cannot run never asks the check
    cannot = SimpleNamespace(unsupported=lambda p: "no exp_odd", run=triton_ea.triton_attention)
    assert not cuda_policy.prefers_triton(_fake_cuda_problem("exp_odd"), cannot) and len(calls) == 1
    # the triton backend's own prefer rule is this one, with itself
    monkeypatch.setattr(cuda_policy, "_CHECKED", {})
    monkeypatch.setattr(cuda_policy, "CUDA_TABLE", {})
    monkeypatch.setattr(cuda_policy, "_run_self_check", lambda d, v, t, run: calls.append((v, run)) or (True, ""))
    monkeypatch.setattr(triton_ea, "BACKEND", SimpleNamespace(unsupported=lambda p: None, run=triton_ea.triton_attention))
    assert triton_ea._prefer(_fake_cuda_problem("squared")) and calls[-1] == ("squared", triton_ea.triton_attention)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto's CUDA choice needs a CUDA device (none here)")
def test_cuda_auto_picks_triton_or_flex_and_matches_reference():
    q, k, v = (t.detach().cuda().requires_grad_() for t in make_qkv(1, 4, 2, 300, 300, 64, 64, dtype=torch.bfloat16))
    for variant in VARIANTS:
        p = normalise(q, k, v, None, 0.0, True, None, True, variant, 1e-6)
        assert choose_backend(p).name in ("triton", "flex")
        out = expressive_attention(q, k, v, is_causal=True, variant=variant, enable_gqa=True)
        ref = expressive_attention(q.double(), k.double(), v.double(), is_causal=True, variant=variant,
                                   enable_gqa=True, backend="reference")
        torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_ea_info_reports_flex_and_the_variant_table():
    from expressive_attention.info import report

    out = report()
    flex_line = next(line for line in out.splitlines() if line.strip().startswith("flex "))
    assert "available" in flex_line and "forward only" in flex_line and "variants: all" in flex_line
    assert "exp_odd" in out and "control, not EA" in out
    fused = next(line for line in out.splitlines() if line.strip().startswith("fused_cpu "))
    assert "variants: saturating,squared,exp_squared" in fused
