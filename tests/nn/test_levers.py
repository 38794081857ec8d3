"""The levers of issue #21 in the modules: hybrid heads (n_ea_heads), the forget gate, the learned
gain's initial value, per-layer kinds in DecoderLM; "off" changes nothing, bit for bit."""
import math

import pytest
import torch
import torch.nn.functional as F

from expressive_attention import expressive_attention
from expressive_attention.nn import DecoderLM, LMConfig, MultiheadAttention
from expressive_attention.ops import attention


def mha(seed=0, **kw):
    torch.manual_seed(seed)
    return MultiheadAttention(32, 4, 2, **kw).double()


def x(B=2, T=6, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("variant", ["saturating", "exp_squared", "power"])
def test_hybrid_heads_equal_ea_on_the_first_heads_and_sdpa_on_the_rest(variant):
    m = mha(n_ea_heads=2, variant=variant)
    q, k, v = m.qkv(x())
    out = m.attend(q, k, v, is_causal=True)
    ea = expressive_attention(q[:, :2], k[:, :1], v[:, :1], is_causal=True, enable_gqa=True, variant=variant)
    sm = F.scaled_dot_product_attention(q[:, 2:], k[:, 1:], v[:, 1:], is_causal=True, enable_gqa=True)
    assert torch.equal(out, torch.cat([ea, sm], dim=1))
    # the whole module: out_proj of that
    y = m(x(), is_causal=True)
    want = m.out_proj(torch.cat([ea, sm], 1).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(y, want, atol=1e-14, rtol=0)


def test_hybrid_heads_with_a_per_head_mask():
    m = mha(n_ea_heads=2)
    q, k, v = m.qkv(x())
    mask = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    out = m.attend(q, k, v, attn_mask=mask)
    ea = expressive_attention(q[:, :2], k[:, :1], v[:, :1], mask[:, :2], enable_gqa=True)
    sm = F.scaled_dot_product_attention(q[:, 2:], k[:, 1:], v[:, 1:], mask[:, 2:], enable_gqa=True)
    assert torch.equal(out, torch.cat([ea, sm], dim=1))


def test_hybrid_heads_at_the_ends_and_off_are_the_plain_mechanisms():
    inp = x()
    plain_ea, plain_dpa = mha(kind="ea")(inp, is_causal=True), mha(kind="dpa")(inp, is_causal=True)
    assert torch.equal(mha(n_ea_heads=None)(inp, is_causal=True), plain_ea)
    assert torch.equal(mha(n_ea_heads=4)(inp, is_causal=True), plain_ea)
    assert torch.equal(mha(n_ea_heads=0)(inp, is_causal=True), plain_dpa)


def test_options_off_are_bit_identical_and_add_no_parameters():
    inp = x()
    plain = mha()
    off = mha(n_ea_heads=None, forget_gate=False, gain_init=0.0)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in off.named_parameters()]
    assert torch.equal(plain(inp, is_causal=True), off(inp, is_causal=True))
    torch.manual_seed(0)
    a = DecoderLM(LMConfig(vocab_size=11, n_kv_heads=2))
    torch.manual_seed(0)
    b = DecoderLM(LMConfig(vocab_size=11, n_kv_heads=2, gain_init=0.0, n_ea_heads=None, layer_kinds=None,
                           forget_gate=False))
    ids = torch.randint(0, 11, (2, 9))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("kind", ["ea", "dpa"])
def test_forget_gate_equals_the_op_with_logsigmoid_gates(kind):
    m = mha(kind=kind, forget_gate=True)
    assert m.fgate_proj.out_features == 4 and torch.equal(m.fgate_proj.bias, torch.zeros(4))
    inp = x()
    q, k, v = m.qkv(inp)
    lf = F.logsigmoid(m.fgate_proj(inp)).transpose(1, 2)  # (B, H, T)
    want = attention(q, k, v, is_causal=True, enable_gqa=True, kind=kind, log_fgate=lf)
    y = m(inp, is_causal=True)
    torch.testing.assert_close(y, m.out_proj(want.transpose(1, 2).reshape(2, 6, 32)), atol=1e-14, rtol=0)
    (y * y).sum().backward()
    assert m.fgate_proj.weight.grad.abs().sum() > 0 and m.fgate_proj.bias.grad.abs().sum() > 0


def test_forget_gate_with_hybrid_heads():
    m = mha(forget_gate=True, n_ea_heads=2, variant="exp_squared")
    inp = x()
    q, k, v = m.qkv(inp)
    lf = m.log_fgate(inp)
    out = m.attend(q, k, v, is_causal=True, log_fgate=lf)
    ea = expressive_attention(q[:, :2], k[:, :1], v[:, :1], is_causal=True, enable_gqa=True,
                              variant="exp_squared", log_fgate=lf[:, :2])
    sm = attention(q[:, 2:], k[:, 1:], v[:, 1:], is_causal=True, enable_gqa=True, kind="dpa", log_fgate=lf[:, 2:])
    assert torch.equal(out, torch.cat([ea, sm], dim=1))


def test_forget_gate_refuses_cross_attention_and_caches():
    m = mha(forget_gate=True)
    with pytest.raises(ValueError, match="self-attention only"):
        m(x(), context=x(seed=3))
    lm = DecoderLM(LMConfig(vocab_size=11, forget_gate=True))
    with pytest.raises(ValueError, match="no decoding cache"):
        lm.generate(torch.zeros(1, 2, dtype=torch.long), 3)  # cache="kv" by default
    with pytest.raises(ValueError, match="no decoding cache"):
        lm.new_cache()
    out = lm.generate(torch.zeros(1, 2, dtype=torch.long), 3, cache="auto")  # auto: no cache
    assert torch.equal(out, lm.generate(torch.zeros(1, 2, dtype=torch.long), 3, cache=None))


def test_gain_init():
    g0 = 0.5 * math.log(0.1)  # exp_squared: beta = exp(2 g) = 0.1
    m = mha(learn_scale=True, gain_init=g0, variant="exp_squared")
    assert torch.allclose(m.log_gain, torch.full((4,), g0, dtype=torch.float64))
    inp = x()
    q, k, v = m.qkv(inp)
    plain = mha(variant="exp_squared")
    q0, k0, _ = plain.qkv(inp)
    # scores of the gained module = exp(g0) * plain scores, i.e. s^2 scaled by beta = 0.1
    torch.testing.assert_close(q, q0 * math.exp(g0))
    assert mha(learn_scale=True).log_gain.abs().sum() == 0


@pytest.mark.parametrize("kw,match", [
    (dict(n_ea_heads=1), "multiple of the GQA group size"),
    (dict(n_ea_heads=5), r"in \[0, n_heads=4\]"),
    (dict(n_ea_heads=-1), r"in \[0, n_heads=4\]"),
    (dict(n_ea_heads=2.0), "must be None or an int"),
    (dict(kind="dpa", n_ea_heads=2), "applies to kind='ea'"),
    (dict(gain_init=-1.0), "initial log gain of learn_scale"),
    (dict(learn_scale=True, gain_init=float("inf")), "finite"),
    (dict(gate_bias_init=4.0), "initial bias of forget_gate=True"),
    (dict(forget_gate=True, gate_bias_init=float("nan")), "gate_bias_init must be a finite float"),
])
def test_module_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiheadAttention(32, 4, 2, **kw)


def test_layer_kinds_in_the_model():
    cfg = LMConfig(vocab_size=11, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, variant="power", power=6.0,
                   layer_kinds=["dpa", "ea", "ea", "dpa"], n_ea_heads=2)
    assert cfg.layer_kinds == ("dpa", "ea", "ea", "dpa")
    lm = DecoderLM(cfg)
    got = [(b.attn.kind, b.attn.n_ea_heads, b.attn.power) for b in lm.blocks]
    assert got == [("dpa", None, None), ("ea", 2, 6.0), ("ea", 2, 6.0), ("dpa", None, None)]
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    # a dpa layer of a mixed model computes exactly what a dpa model's layer does
    torch.manual_seed(0)
    a = DecoderLM(LMConfig(vocab_size=11, n_layers=2, kind="dpa"))
    torch.manual_seed(0)
    b = DecoderLM(LMConfig(vocab_size=11, n_layers=2, layer_kinds=("dpa", "dpa")))
    ids = torch.randint(0, 11, (2, 9))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("kw,match", [
    (dict(layer_kinds=("ea",)), "one kind per layer"),
    (dict(layer_kinds=("ea", "softmax")), "must be among"),
    (dict(layer_kinds="ea-dpa"), "sequence of kinds"),
    (dict(kind="dpa", n_ea_heads=2), "applies to EA layers"),
    (dict(n_kv_heads=2, n_ea_heads=1), "multiple of the GQA group size"),
    (dict(gain_init=0.5), "initial log gain"),
    (dict(gate_bias_init=4.0), "initial bias of forget_gate"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(vocab_size=11, n_layers=2, **kw)


def test_training_step_with_every_lever():
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=13, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, pos="rope",
                   variant="exp_squared", learn_scale=True, gain_init=-1.1513, n_ea_heads=2,
                   layer_kinds=("dpa", "ea", "ea"), forget_gate=True)
    lm = DecoderLM(cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    ids = torch.randint(0, 13, (4, 16))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(lm(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_recurrent_cache_refuses_hybrid_and_gated_models():
    for kw in (dict(n_ea_heads=2), dict(forget_gate=True)):
        lm = DecoderLM(LMConfig(vocab_size=11, variant="squared", **kw))
        with pytest.raises(ValueError):
            lm.new_cache("recurrent")
        from expressive_attention.nn.recurrent import RecurrentEAState

        assert RecurrentEAState.state_bytes(lm.cfg, 100) is None


def test_gate_bias_init_sets_the_gate_at_init_and_survives_the_model_init():
    m = mha(forget_gate=True, gate_bias_init=4.0)
    assert torch.equal(m.fgate_proj.bias, torch.full((4,), 4.0, dtype=torch.float64))
    inp = x()
    g = m.log_fgate(inp).exp()  # sigmoid(w.x + 4): every step keeps most of the past at init (bias 0: ~1/2)
    assert g.min() > 0.9 and g.mean() > 0.97
    assert 0.3 < mha(forget_gate=True).log_fgate(inp).exp().mean() < 0.7
    lm = DecoderLM(LMConfig(vocab_size=11, n_layers=2, forget_gate=True, gate_bias_init=4.0))
    assert all(torch.equal(b.attn.fgate_proj.bias, torch.full((4,), 4.0)) for b in lm.blocks)
    torch.manual_seed(0)
    a = DecoderLM(LMConfig(vocab_size=11, n_layers=2, forget_gate=True))
    torch.manual_seed(0)
    b = DecoderLM(LMConfig(vocab_size=11, n_layers=2, forget_gate=True, gate_bias_init=4.0))
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:  # the same weights but the gate's bias (no random numbers drawn for it)
        assert torch.equal(sa[name], sb[name]) == (not name.endswith("fgate_proj.bias")), name
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a(ids), b(ids))  # a gate that halves the past vs one that keeps it
