"""The forget gate (`log_fgate`, issue #21): reference and blocked against the formula written out
row by row (float64), dpa against a hand-written softmax with log D, gradients (gradcheck, log_fgate
included), refusals by the other backends, argument checks, and "off" = today's output bit for bit."""
import math

import pytest
import torch
import torch.nn.functional as F

from expressive_attention.ops import BACKENDS, attention, blocked, expressive_attention
from expressive_attention.ops.reference import score_fn

from expressive_attention.ops.variants import default_instances  # noqa: E402

# every variant of the table at its default parameters (exp_odd included), plus power 6
VARIANTS = [*default_instances().values(), ("power", 6.0)]


def inputs(B=2, H=4, Hkv=2, L=7, E=5, seed=0, dtype=torch.float64, gate_bias=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, L, E, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, L, E, generator=g, dtype=dtype)
    log_fgate = F.logsigmoid(torch.randn(B, H, L, generator=g, dtype=dtype) + gate_bias)
    return q, k, v, log_fgate


def naive(q, k, v, log_fgate, variant, power, causal=True, mask=None, eps=1e-6):
    """a_ij = f(s_ij) D_ij / (eps + sum_l f(s_il) D_il), D_ij = prod_{t=j+1..i} exp(log_fgate_t)
    (for j > i: 1 / prod_{t=i+1..j}), one row at a time."""
    B, H, L, E = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                w = []
                for j in range(L):
                    allowed = (j <= i or not causal) and (mask is None or bool(mask[i, j]))
                    if not allowed:
                        w.append(torch.zeros((), dtype=torch.float64))
                        continue
                    s = (q[b, h, i] @ k[b, h // G, j]) / math.sqrt(E)
                    if j <= i:
                        d = torch.exp(log_fgate[b, h, j + 1:i + 1].sum())
                    else:
                        d = torch.exp(-log_fgate[b, h, i + 1:j + 1].sum())
                    w.append(score_fn(s, variant, power) * d)
                w = torch.stack(w)
                out[b, h, i] = (w / (eps + w.sum())) @ v[b, h // G]
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 query rows (the smallest), so a 40-row call runs three blocks."""
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 1)


@pytest.mark.parametrize("variant,power", VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_reference_and_blocked_equal_the_formula(variant, power, causal):
    q, k, v, lf = inputs()
    want = naive(q, k, v, lf, variant, power, causal)
    for backend in ("reference", "blocked", "auto"):
        out = expressive_attention(q, k, v, is_causal=causal, enable_gqa=True, variant=variant, power=power,
                                   backend=backend, log_fgate=lf)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


def test_bool_mask_and_empty_rows():
    q, k, v, lf = inputs(L=6)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[2] = False  # a row with nothing to attend to: zeros
    for variant, power in VARIANTS:
        want = naive(q, k, v, lf, variant, power, causal=False, mask=mask)
        for backend in ("reference", "blocked"):
            out = expressive_attention(q, k, v, mask, enable_gqa=True, variant=variant, power=power,
                                       backend=backend, log_fgate=lf)
            torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
            assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    # softmax: a row with nothing allowed gives what SDPA gives with the boolean mask alone
    out = attention(q, k, v, mask, enable_gqa=True, kind="dpa", log_fgate=lf)
    sdpa = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    assert torch.equal(out[:, :, 2], sdpa[:, :, 2])


@pytest.mark.parametrize("variant,power", VARIANTS)
def test_blocked_over_several_blocks_equals_reference(small_blocks, variant, power):
    q, k, v, lf = inputs(B=1, H=2, Hkv=1, L=40, E=8, seed=3)
    for causal in (True, False):
        kw = dict(is_causal=causal, enable_gqa=True, variant=variant, power=power, log_fgate=lf)
        ref = expressive_attention(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(expressive_attention(q, k, v, backend="blocked", **kw), ref,
                                   atol=1e-12, rtol=1e-10)
    # gradients through the checkpointed blocks, log_fgate's included
    args = [t.clone().requires_grad_() for t in (q, k, v, lf)]
    grads = []
    for backend in ("reference", "blocked"):
        out = expressive_attention(*args[:3], is_causal=True, enable_gqa=True, variant=variant, power=power,
                                   backend=backend, log_fgate=args[3])
        grads.append(torch.autograd.grad((out * out).sum(), args))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_dpa_equals_softmax_with_log_decay():
    q, k, v, lf = inputs()
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    c = lf.cumsum(-1)
    log_d = c[..., :, None] - c[..., None, :]
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    want = torch.softmax((s + log_d).masked_fill(~causal, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    out = attention(q, k, v, is_causal=True, enable_gqa=True, kind="dpa", log_fgate=lf)
    torch.testing.assert_close(out, want, atol=1e-13, rtol=1e-12)
    # a boolean mask is folded in like is_causal; a float mask is added
    assert torch.equal(attention(q, k, v, causal, enable_gqa=True, kind="dpa", log_fgate=lf), out)
    bias = torch.randn(7, 7, dtype=torch.float64)
    want = torch.softmax(s + log_d + bias, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(attention(q, k, v, bias, enable_gqa=True, kind="dpa", log_fgate=lf), want,
                               atol=1e-13, rtol=1e-12)


def test_zero_gates_are_the_plain_mechanism():
    q, k, v, _ = inputs()
    zero = torch.zeros(q.shape[:-1], dtype=q.dtype)  # log 1: nothing forgotten
    for variant, power in VARIANTS:
        kw = dict(is_causal=True, enable_gqa=True, variant=variant, power=power)
        torch.testing.assert_close(expressive_attention(q, k, v, log_fgate=zero, **kw),
                                   expressive_attention(q, k, v, **kw), atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(attention(q, k, v, is_causal=True, enable_gqa=True, kind="dpa", log_fgate=zero),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               atol=1e-13, rtol=1e-12)


def test_off_is_bit_identical():
    q, k, v, _ = inputs(dtype=torch.float32)
    for variant, power in VARIANTS:
        for backend in ("auto", "reference", "blocked"):
            kw = dict(is_causal=True, enable_gqa=True, variant=variant, power=power, backend=backend)
            assert torch.equal(expressive_attention(q, k, v, log_fgate=None, **kw), expressive_attention(q, k, v, **kw))
    assert torch.equal(attention(q, k, v, is_causal=True, enable_gqa=True, kind="dpa", log_fgate=None),
                       F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("variant,power", [("saturating", None), ("squared", None), ("power", 4.0),
                                           ("exp_squared", None)])
def test_gradcheck(backend, variant, power):
    q, k, v, lf = (t.clone().requires_grad_() for t in inputs(B=1, H=2, Hkv=1, L=4, E=3, seed=5))
    torch.autograd.gradcheck(
        lambda q, k, v, g: expressive_attention(q, k, v, is_causal=True, enable_gqa=True, variant=variant,
                                                power=power, backend=backend, log_fgate=g), (q, k, v, lf))


def test_gradcheck_dpa_and_broadcast_gate():
    q, k, v, lf = (t.clone().requires_grad_() for t in inputs(B=1, H=2, Hkv=1, L=4, E=3, seed=6))
    torch.autograd.gradcheck(
        lambda q, k, v, g: attention(q, k, v, is_causal=True, enable_gqa=True, kind="dpa", log_fgate=g),
        (q, k, v, lf))
    shared = lf[:, :1].detach().clone().requires_grad_()  # (B, 1, L): one gate for every head
    torch.autograd.gradcheck(
        lambda g: expressive_attention(q, k, v, is_causal=True, enable_gqa=True, log_fgate=g), (shared,))


def test_broadcast_and_3d_inputs():
    q, k, v, lf = inputs(B=1, H=2, Hkv=2)
    out = expressive_attention(q, k, v, is_causal=True, log_fgate=lf[:, :1])
    want = expressive_attention(q, k, v, is_causal=True, log_fgate=lf[:, :1].expand(1, 2, 7))
    assert torch.equal(out, want)
    out3 = expressive_attention(q[0], k[0], v[0], is_causal=True, log_fgate=lf[0])
    torch.testing.assert_close(out3, expressive_attention(q, k, v, is_causal=True, log_fgate=lf)[0])


def test_large_gates_stay_finite_in_float32():
    """Strong forgetting over long distances (log D in the hundreds, both signs without a causal
    mask) and large scores: finite, and rows still sum to at most 1."""
    q, k, v, _ = inputs(B=1, H=2, Hkv=2, L=64, E=8, dtype=torch.float32)
    lf = torch.full((1, 2, 64), -8.0)
    for variant, power in VARIANTS:
        for causal in (True, False):
            for backend in ("reference", "blocked"):
                out = expressive_attention(10 * q, k, v, is_causal=causal, variant=variant, power=power,
                                           backend=backend, log_fgate=lf)
                assert torch.isfinite(out).all(), (variant, causal, backend)


def test_other_backends_refuse_with_a_reason():
    q, k, v, lf = inputs(dtype=torch.float32)
    for name, b in BACKENDS.items():
        if name in ("reference", "blocked"):
            assert b.forget_gate
            continue
        with pytest.raises(ValueError, match="cannot run this call: a forget gate"):
            expressive_attention(q, k, v, is_causal=True, enable_gqa=True, variant="squared", backend=name,
                                 log_fgate=lf)


def test_auto_picks_a_backend_that_implements_it(monkeypatch):
    calls = []
    for name in ("reference", "blocked"):
        b = BACKENDS[name]
        monkeypatch.setitem(BACKENDS, name, type(b)(**{**b.__dict__, "run": (lambda run, n: lambda p: (
            calls.append(n), run(p))[1])(b.run, name)}))
    big = inputs(B=1, H=2, Hkv=2, L=80, E=8, dtype=torch.float32)  # 80 x 80 > 64 x 64 scores: blocked
    expressive_attention(*big[:3], is_causal=True, variant="squared", log_fgate=big[3])
    small = inputs(B=1, H=2, Hkv=2, L=8, E=8, dtype=torch.float32)
    expressive_attention(*small[:3], is_causal=True, variant="squared", log_fgate=small[3])
    assert calls == ["blocked", "reference"]


@pytest.mark.parametrize("bad,error,match", [
    ("not a tensor", TypeError, "log_fgate must be a torch.Tensor"),
    (torch.zeros(2, 4, 7, dtype=torch.long), TypeError, "floating-point"),
    (torch.zeros(2, 4, 6), ValueError, "not broadcastable"),
    (torch.zeros(3, 4, 7), ValueError, "not broadcastable"),
])
def test_argument_checks(bad, error, match):
    q, k, v, _ = inputs(dtype=torch.float32)
    for kind in ("ea", "dpa"):
        with pytest.raises(error, match=match):
            attention(q, k, v, is_causal=True, enable_gqa=True, kind=kind, log_fgate=bad)


def test_self_attention_only():
    q, k, v, lf = inputs(dtype=torch.float32)
    for kind in ("ea", "dpa"):
        with pytest.raises(ValueError, match="log_fgate is for self-attention"):
            attention(q[:, :, :5], k, v, enable_gqa=True, kind=kind, log_fgate=lf[..., :5])


def test_bf16_runs():
    q, k, v, lf = inputs(dtype=torch.bfloat16)
    for kind in ("ea", "dpa"):
        out = attention(q, k, v, is_causal=True, enable_gqa=True, kind=kind, log_fgate=lf.float())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("variant,power", VARIANTS)
def test_the_gated_weights_follow_the_variant_table(variant, power):
    """Every variant of the table, one gated form: f(s) D / (eps + sum f D) with f from the table, computed
    here without any rescaling (moderate scores), equals `gated_score_weights` (which rescales rows)."""
    from expressive_attention.ops.reference import gated_score_weights, log_decay
    from expressive_attention.ops.variants import VARIANT_TABLE

    q, k, v, lf = inputs(B=1, H=2, Hkv=2)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = torch.ones(7, 7, dtype=torch.bool).tril()
    f = VARIANT_TABLE[variant].f(s, power) * log_decay(lf).exp() * keep
    naive = f / (1e-6 + f.sum(-1, keepdim=True))
    torch.testing.assert_close(gated_score_weights(s, keep, log_decay(lf), variant=variant, power=power), naive,
                               atol=1e-14, rtol=1e-12)


def test_a_third_party_backend_refuses_the_gate_unless_it_says_so():
    from expressive_attention.ops import Backend
    from expressive_attention.ops.problem import normalise, with_log_fgate

    q, k, v, lf = inputs(dtype=torch.float32)
    p = with_log_fgate(normalise(q, k, v, None, 0.0, True, None, True, "saturating", 1e-6), lf, q, k)
    assert p.log_fgate.shape == (2, 4, 7)
    mine = Backend("mine", run=lambda p: None, supports=lambda p: None)
    assert "forget gate" in mine.unsupported(p)
    assert Backend("gated", run=lambda p: None, supports=lambda p: None, forget_gate=True).unsupported(p) is None
    assert mine.unsupported(normalise(q, k, v, None, 0.0, True, None, True, "saturating", 1e-6)) is None


def test_torch_func_grad_takes_the_autograd_path():
    q, k, v, lf = inputs(B=1, H=2, Hkv=1, L=5, E=3)
    for backend in ("reference", "blocked"):
        def loss(g):
            return expressive_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend, log_fgate=g).sum()

        g = lf.clone().requires_grad_()
        want = torch.autograd.grad(loss(g), g)[0]
        torch.testing.assert_close(torch.func.grad(loss)(lf), want, atol=1e-12, rtol=1e-10)


def test_blocked_has_no_double_backward():
    q, k, v, lf = (t.clone().requires_grad_() for t in inputs(B=1, H=2, Hkv=1, L=5, E=3))
    out = expressive_attention(q, k, v, is_causal=True, enable_gqa=True, backend="blocked", log_fgate=lf)
    (g,) = torch.autograd.grad(out.sum(), lf, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
