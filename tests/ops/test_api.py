"""The public API: SDPA-compatible layouts, the kind switch, errors that name the argument, compile."""
import pytest
import torch
import torch.nn.functional as F

from expressive_attention import attention, expressive_attention
from expressive_attention.ops import BACKENDS, choose_backend, fused_cpu
from expressive_attention.ops.problem import normalise


def qkv(*lead, L=9, S=11, E=8, Ev=8, Hkv=None):
    q = torch.randn(*lead, L, E)
    kv_lead = lead if Hkv is None else (*lead[:-1], Hkv)
    return q, torch.randn(*kv_lead, S, E), torch.randn(*kv_lead, S, Ev)


@pytest.mark.parametrize("mask_kind", [None, "causal", "bool"])
def test_kind_dpa_is_exactly_sdpa(mask_kind):
    q, k, v = qkv(2, 4, Hkv=2)
    kw = {}
    if mask_kind == "causal":
        kw["is_causal"] = True
    elif mask_kind == "bool":
        kw["attn_mask"] = torch.rand(2, 1, 9, 11) > 0.5
    got = attention(q, k, v, enable_gqa=True, kind="dpa", **kw)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    assert torch.equal(got, want)
    # the EA-only arguments at their defaults, passed explicitly, are accepted
    explicit = attention(q, k, v, enable_gqa=True, kind="dpa", variant="saturating", eps=1e-6, backend="auto",
                         power=None, **kw)
    assert torch.equal(explicit, want)


def test_kind_ea_is_expressive_attention():
    q, k, v = qkv(2, 3)
    assert torch.equal(attention(q, k, v, kind="ea", variant="squared"),
                       expressive_attention(q, k, v, variant="squared"))


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 2, 3)])
def test_layouts_match_per_head_computation(lead):
    q, k, v = qkv(*lead)
    mask = torch.rand(9, 11) > 0.3
    for backend in ("reference", "blocked"):
        out = expressive_attention(q, k, v, attn_mask=mask, backend=backend)
        assert out.shape == (*lead, 9, 8)
        flat = [expressive_attention(a, b, c, attn_mask=mask, backend="reference")
                for a, b, c in zip(q.reshape(-1, 9, 8), k.reshape(-1, 11, 8), v.reshape(-1, 11, 8))]
        torch.testing.assert_close(out.reshape(-1, 9, 8), torch.stack(flat), atol=1e-6, rtol=1e-5)


def test_mask_broadcasting_over_leading_dims():
    q, k, v = qkv(2, 2, 3)
    mask = torch.rand(2, 1, 1, 9, 11) > 0.3  # varies over the first batch dim only
    for backend in ("reference", "blocked"):
        out = expressive_attention(q, k, v, attn_mask=mask, backend=backend)
        for b in range(2):
            ref = expressive_attention(q[b], k[b], v[b], attn_mask=mask[b, 0, 0], backend="reference")
            torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=1e-5)


def test_auto_backend_choice():
    small = normalise(*qkv(1, 1), None, 0.0, False, None, False, "saturating", 1e-6)
    big = normalise(*qkv(1, 1, L=300, S=300), None, 0.0, True, None, False, "saturating", 1e-6)
    drop = normalise(*qkv(1, 1, L=300, S=300), None, 0.1, True, None, False, "saturating", 1e-6)

    fused = fused_cpu.is_available()
    assert choose_backend(small).name == ("fused_cpu" if fused else "reference")
    assert choose_backend(big).name == ("fused_cpu" if fused else "blocked")
    assert choose_backend(drop).name == "reference"


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda q, k, v: expressive_attention(q[0], k, v), ValueError, "same number of dims"),
        (lambda q, k, v: expressive_attention(q[0, 0, 0, :1], k[0, 0, 0, :1], v[0, 0, 0, :1]), ValueError, "query must have at least 2 dims"),
        (lambda q, k, v: expressive_attention(q, k[:, :2], v[:, :2]), ValueError, "enable_gqa"),
        (lambda q, k, v: expressive_attention(q, k[:, :3], v[:, :3], enable_gqa=True), ValueError, "multiple of the number of key/value heads"),
        (lambda q, k, v: expressive_attention(q, k[..., :4], v), ValueError, "embedding size E"),
        (lambda q, k, v: expressive_attention(q, k, v[..., :5, :]), ValueError, "same length S"),
        (lambda q, k, v: expressive_attention(q, k, v, attn_mask=torch.zeros(9, 11)), TypeError, "additive float mask"),
        (lambda q, k, v: expressive_attention(q, k, v, attn_mask=torch.ones(9, 11, dtype=torch.int64)), TypeError, "attn_mask must be a boolean"),
        (lambda q, k, v: expressive_attention(q, k, v, attn_mask=torch.ones(9, 10, dtype=torch.bool)), ValueError, "attn_mask of shape"),
        (lambda q, k, v: expressive_attention(q, k, v, attn_mask=torch.ones(9, 11, dtype=torch.bool), is_causal=True), ValueError, "not both"),
        (lambda q, k, v: expressive_attention(q, k, v, variant="cubic"), ValueError, "variant"),
        (lambda q, k, v: expressive_attention(q, k, v, backend="cuda-magic"), ValueError, "backend"),
        (lambda q, k, v: expressive_attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda q, k, v: expressive_attention(q, k, v, eps=-1.0), ValueError, "eps"),
        (lambda q, k, v: expressive_attention(q, k, v, scale=float("nan")), ValueError, "scale"),
        (lambda q, k, v: expressive_attention(q, k.double(), v), TypeError, "share a dtype"),
        (lambda q, k, v: expressive_attention(q.long(), k, v), TypeError, "query must be a floating-point"),
        (lambda q, k, v: expressive_attention(q, k, v, dropout_p=0.1, backend="blocked"), ValueError, "dropout"),
        (lambda q, k, v: attention(q, k, v, kind="softmax"), ValueError, "kind"),
        (lambda q, k, v: attention(q, k, v, kind="dpa", backend="blocked"), ValueError, "kind='ea' only"),
        (lambda q, k, v: attention(q, k, v, kind="dpa", variant="cubic"), ValueError, "variant='cubic' applies to kind='ea'"),
        (lambda q, k, v: attention(q, k, v, kind="dpa", variant="squared"), ValueError, "variant='squared' applies"),
        (lambda q, k, v: attention(q, k, v, kind="dpa", eps=5.0), ValueError, "eps=5.0 applies to kind='ea'"),
        (lambda q, k, v: attention(q, k, v, kind="dpa", eps=0), ValueError, "eps=0 applies to kind='ea'"),
        (lambda q, k, v: attention(q, k, v, kind="dpa", power=2.0), ValueError, "power=2.0 applies to kind='ea'"),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    q, k, v = qkv(2, 4)
    with pytest.raises(exc, match=words):
        call(q, k, v)


def test_backends_registered():
    assert {"reference", "blocked"} <= set(BACKENDS)


@pytest.mark.parametrize("backend", ["reference", "auto", "auto, kernel not loaded yet"])
def test_works_under_torch_compile(backend, monkeypatch):
    # "auto" while dynamo traces: the fused kernel only if loaded (no file checks traced), else blocked;
    # the eager call below may then run another backend, hence float32 tolerances across backends
    if backend.startswith("auto, "):
        monkeypatch.setitem(fused_cpu._STATE, "module", None)
        backend = "auto"
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, L=80, S=80, E=16, Ev=16))

    def f(q, k, v):
        return expressive_attention(q, k, v, is_causal=True, backend=backend).square().sum()

    compiled = torch.compile(f, backend="aot_eager" if backend == "auto" else "inductor", fullgraph=backend == "reference")
    got, want = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(got, (q, k, v))
    g2 = torch.autograd.grad(want, (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_third_party_backend_joins_the_table_and_auto(monkeypatch):
    from expressive_attention.ops import Backend, Problem, dispatch, reference_attention, register_backend
    from expressive_attention.ops.problem import normalise

    monkeypatch.setattr(dispatch, "BACKENDS", dict(dispatch.BACKENDS))  # leave the real table alone
    monkeypatch.setattr(dispatch, "_SHORTCUTS", list(dispatch._SHORTCUTS))  # (registering empties it)
    calls = []

    def run(p: Problem):
        calls.append(p.q.shape)
        k, v = (t.repeat_interleave(p.groups, dim=1) for t in (p.k, p.v))
        return reference_attention(p.q, k, v, p.mask, 0.0, p.is_causal, p.scale, variant=p.variant, eps=p.eps)

    mine = Backend("mine", run, lambda p: None if p.variant == "squared" else "squared only", priority=100,
                   prefer=lambda p: p.q.shape[-2] >= 8)
    register_backend(mine)
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    sq = normalise(q, k, k, None, 0.0, True, None, True, "squared", 1e-6)
    assert choose_backend(sq) is mine  # highest priority, supported, preferred
    assert choose_backend(normalise(q[..., :4, :], k[..., :4, :], k[..., :4, :], None, 0.0, True, None, True,
                                    "squared", 1e-6)) is not mine  # not preferred below L = 8
    assert choose_backend(normalise(q, k, k, None, 0.0, True, None, True, "saturating", 1e-6)) is not mine
    assert choose_backend(normalise(q, k, k, None, 0.1, True, None, True, "squared", 1e-6)).name == "reference"
    out = expressive_attention(q, k, k, is_causal=True, enable_gqa=True, variant="squared", backend="mine")
    ref = expressive_attention(q, k, k, is_causal=True, enable_gqa=True, variant="squared", backend="reference")
    torch.testing.assert_close(out, ref)
    assert calls == [torch.Size([1, 4, 8, 16])]
    with pytest.raises(ValueError, match="squared only"):
        expressive_attention(q, k, k, enable_gqa=True, backend="mine")
    with pytest.raises(ValueError, match="dropout"):
        expressive_attention(q, k, k, enable_gqa=True, variant="squared", dropout_p=0.1, backend="mine")
    with pytest.raises(ValueError, match="registered already"):
        register_backend(mine)
    with pytest.raises(ValueError, match="auto"):
        register_backend(Backend("auto", run, lambda p: None))
    register_backend(Backend("mine", run, lambda p: None, priority=-1), replace=True)
    assert dispatch.BACKENDS["mine"].priority == -1
