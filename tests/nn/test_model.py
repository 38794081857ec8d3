"""Modules: attention switch, block, DecoderLM, KV-cache generation."""
import pytest
import torch

from expressive_attention import expressive_attention
from expressive_attention.nn import DecoderLM, KVCache, LMConfig, MultiheadAttention


def model(seed=0, **kw):
    base = dict(vocab_size=23, context_length=48, d_model=32, n_layers=2, n_heads=4, init_std=0.2)
    base.update(kw)
    torch.manual_seed(seed)
    return DecoderLM(LMConfig(**base)).eval()


CONFIGS = [
    dict(kind="ea"), dict(kind="ea", variant="squared"), dict(kind="dpa"),
    dict(kind="ea", pos="rope", n_kv_heads=2), dict(kind="dpa", pos="rope", n_kv_heads=1),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_incremental_cache_logits_equal_full_forward(cfg):
    m = model(**cfg)
    idx = torch.randint(0, 23, (3, 20))
    full = m(idx)
    cache = m.new_cache("kv")
    parts = [m(idx[:, :7], cache=cache), m(idx[:, 7:8], cache=cache), m(idx[:, 8:15], cache=cache)]
    parts += [m(idx[:, t : t + 1], cache=cache) for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache[0].length == 20


@pytest.mark.parametrize("cfg", CONFIGS)
def test_generate_with_cache_equals_without(cfg):
    m = model(**cfg)
    idx = torch.randint(0, 23, (2, 6))
    a = m.generate(idx, 30, cache="kv")
    b = m.generate(idx, 30, cache=None)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = m.generate(idx, 30, temperature=1.0, top_k=5, cache="kv", generator=g1)
    s2 = m.generate(idx, 30, temperature=1.0, top_k=5, cache=None, generator=g2)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_causal(cfg):
    m = model(**cfg)
    idx = torch.randint(0, 23, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 23
    a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_ea_and_dpa_models_differ_only_in_attention_weights():
    ea, dpa = model(kind="ea"), model(kind="dpa")
    sd_ea, sd_dpa = ea.state_dict(), dpa.state_dict()
    assert sd_ea.keys() == sd_dpa.keys() and all(torch.equal(sd_ea[n], sd_dpa[n]) for n in sd_ea)
    idx = torch.randint(0, 23, (2, 16))
    assert not torch.allclose(ea(idx), dpa(idx), atol=1e-3)


def test_attention_module_matches_op_self_and_cross():
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4, 2, kind="ea", variant="squared")
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    for src, kw in ((x, dict(is_causal=True)), (ctx, {})):
        y = mha(x, context=None if src is x else src, **kw)
        q = mha.q_proj(x).view(2, 9, 4, 8).transpose(1, 2)
        k = mha.k_proj(src).view(2, -1, 2, 8).transpose(1, 2)
        v = mha.v_proj(src).view(2, -1, 2, 8).transpose(1, 2)
        o = expressive_attention(q, k, v, enable_gqa=True, variant="squared", backend="reference", **kw)
        torch.testing.assert_close(y, mha.out_proj(o.transpose(1, 2).reshape(2, 9, 32)), atol=1e-6, rtol=1e-5)


def test_module_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 8, 16)
    mha.eval()
    assert torch.equal(mha(x, is_causal=True), mha(x, is_causal=True))
    mha.train()
    assert not torch.equal(mha(x, is_causal=True), mha(x, is_causal=True))


def test_training_reduces_loss_for_both_kinds():
    for kind in ("ea", "dpa"):
        m = model(kind=kind, init_std=0.02).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        idx = torch.randint(0, 23, (8, 24))
        losses = []
        for _ in range(30):
            logits = m(idx[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 23), idx[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in m.parameters())
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0]


def test_kv_cache_grows_and_reports_size():
    c = KVCache()
    for _ in range(3):
        c.attend(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4),
                 lambda q, k, v, **kw: torch.zeros_like(q))
    assert c.length == 30 and c.k.shape[2] >= 30 and c.nbytes() == 30 * 2 * 2 * 4 * 4


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: LMConfig(vocab_size=10, pos="alibi"), "pos"),
        (lambda: LMConfig(vocab_size=0), "vocab_size"),
        (lambda: DecoderLM(LMConfig(vocab_size=10, kind="linear")), "kind"),
        (lambda: DecoderLM(LMConfig(vocab_size=10, variant="cubic")), "variant"),
        (lambda: DecoderLM(LMConfig(vocab_size=10, n_heads=4, n_kv_heads=3)), "n_kv_heads"),
        (lambda: DecoderLM(LMConfig(vocab_size=10, backend="nope")), "backend"),
        (lambda: DecoderLM(LMConfig(vocab_size=10, context_length=8))(torch.zeros(1, 9, dtype=torch.long)), "context_length"),
        (lambda: DecoderLM(LMConfig(vocab_size=10))(torch.zeros(1, 9)), "idx"),
        (lambda: DecoderLM(LMConfig(vocab_size=10)).new_cache("paged"), "cache kind"),
        (lambda: LMConfig.from_dict({"vocab_size": 3, "colour": 1}), "unknown LMConfig fields"),
    ],
)
def test_config_errors(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_qkv():
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 2, rope=None)
    x = torch.randn(2, 5, 16)
    q, k, v = mha.qkv(x)
    assert q.shape == (2, 2, 5, 8) and k.shape == v.shape == (2, 2, 5, 8)
    with pytest.raises(TypeError, match="attention"):  # the old name of kind is gone
        MultiheadAttention(16, 2, attention="dpa")
