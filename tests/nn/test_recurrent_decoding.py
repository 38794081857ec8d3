"""Recurrent EA-squared decoding (cache="recurrent") gives the tokens and logits of full forward passes."""
import pytest
import torch

from expressive_attention.nn import CACHE_KINDS, DecoderLM, KVCache, LMConfig, choose_cache_kind
from expressive_attention.nn.recurrent import RecurrentEAState


def model(pos="learned", n_kv_heads=None, variant="squared", kind="ea", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    # init_std large enough that scores are of order one: EA then differs clearly from uniform weights
    cfg = LMConfig(vocab_size=17, context_length=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                   pos=pos, kind=kind, variant=variant, init_std=0.3)
    return DecoderLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("pos,n_kv_heads", [("learned", None), ("rope", 2), ("rope", 1)])
def test_same_tokens_and_logits_as_full_forward(pos, n_kv_heads):
    m = model(pos, n_kv_heads)
    idx = torch.randint(0, 17, (3, 9), generator=torch.Generator().manual_seed(1))
    rec = m.generate(idx, 24, cache="recurrent")
    full = m.generate(idx, 24, cache=None)
    assert torch.equal(rec, full)
    assert torch.equal(rec, m.generate(idx, 24, cache="kv"))
    with torch.no_grad():
        ref = m(rec)  # (B, T, V) one full forward pass
        caches = m.new_cache("recurrent")
        parts = [m(rec[:, :9], cache=caches)]  # prefill with the chunked linear form
        parts += [m(rec[:, t : t + 1], cache=caches) for t in range(9, rec.shape[1])]  # O(1) steps
        got = torch.cat(parts, dim=1)
    assert caches[0].length == rec.shape[1]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert (ref.std(-1) > 0.5).all()  # the check is not trivially passed by flat logits


def test_float64_prefill_in_uneven_pieces_matches():
    m = model("rope", 2, dtype=torch.float64)
    idx = torch.randint(0, 17, (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(idx)
        caches = m.new_cache("recurrent")
        got = torch.cat([m(idx[:, a:b], cache=caches) for a, b in [(0, 1), (1, 40), (40, 41), (41, 90)]], dim=1)
    torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-11)


def test_state_size_is_constant_and_reported():
    m = model(n_kv_heads=2)
    caches = m.new_cache("recurrent")
    E = 32 // 4
    with torch.no_grad():
        m(torch.zeros(2, 5, dtype=torch.long), cache=caches)
        size = caches[0].nbytes()
        assert size == 2 * 2 * (E * (E + 1) // 2) * (E + 1) * 4  # (B * Hkv, E(E+1)/2 packed features, Ev+1) float32
        m(torch.zeros(2, 50, dtype=torch.long), cache=caches)
        assert caches[0].nbytes() == size
    assert RecurrentEAState.state_bytes(m.cfg, 10) == RecurrentEAState.state_bytes(m.cfg, 10**6) == 2 * size // 2


def test_auto_cache_choice():
    sq = model().cfg
    E = sq.d_model // sq.n_heads
    crossover = (E + 1) ** 2 / 4  # recurrent E(E+1)/2 x (E+1) floats vs KV 2 E per token: 20.25 tokens
    assert CACHE_KINDS["recurrent"] is RecurrentEAState
    assert choose_cache_kind(sq, int(crossover)) == "kv"
    assert choose_cache_kind(sq, int(crossover) + 1) == "recurrent"
    assert RecurrentEAState.state_bytes(sq, crossover + 1) < KVCache.state_bytes(sq, crossover + 1)
    assert choose_cache_kind(model(variant="saturating").cfg, 10**6) == "kv"
    assert choose_cache_kind(model(kind="dpa").cfg, 10**6) == "kv"
    m = model()
    idx = torch.randint(0, 17, (1, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(m.generate(idx, 8, cache="auto"), m.generate(idx, 8, cache=None))


@pytest.mark.parametrize("variant,kind", [("saturating", "ea"), ("squared", "dpa")])
def test_recurrent_needs_ea_squared(variant, kind):
    m = model(variant=variant, kind=kind)
    with pytest.raises(ValueError, match="squared"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), 2, cache="recurrent")


def test_recurrent_refuses_gradients():
    m = model().train()
    with pytest.raises(RuntimeError, match="inference"):
        m(torch.zeros(1, 3, dtype=torch.long), cache=m.new_cache("recurrent"))


def test_cache_kinds_follow_the_protocols(monkeypatch):
    from expressive_attention.nn import CacheKind, DecodingCache, register_cache_kind
    from expressive_attention.nn import cache as cache_mod

    m = model()
    for name, kind in CACHE_KINDS.items():
        assert isinstance(kind, CacheKind)
        assert all(isinstance(c, DecodingCache) for c in m.new_cache(name))
    with pytest.raises(TypeError, match="for_layer"):
        register_cache_kind("bad", object)

    class Counting(KVCache):  # a third-party kind: the KV cache, counting its calls
        calls = 0

        def attend(self, q, k, v, attend_fn):
            Counting.calls += 1
            return super().attend(q, k, v, attend_fn)

        @staticmethod
        def state_bytes(cfg, total_len):
            return 1  # smaller than anything: "auto" must pick it

    monkeypatch.setattr(cache_mod, "CACHE_KINDS", dict(CACHE_KINDS))
    from expressive_attention.nn import model as model_mod

    monkeypatch.setattr(model_mod, "CACHE_KINDS", cache_mod.CACHE_KINDS)
    register_cache_kind("counting", Counting)
    idx = torch.zeros(1, 3, dtype=torch.long)
    out = m.generate(idx, 2, cache="auto")
    assert Counting.calls == 2 * len(m.blocks)
    torch.testing.assert_close(out, m.generate(idx, 2, cache="kv"))


@pytest.mark.parametrize("head_dim,n_kv_heads", [(5, 2), (3, 1), (1, None)])
def test_packed_state_with_odd_head_dims_matches_full_forward(head_dim, n_kv_heads):
    """The packed E(E+1)/2-feature state for odd E: prefill + one-token steps equal a full forward."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=17, context_length=96, d_model=4 * head_dim, n_layers=2, n_heads=4,
                   n_kv_heads=n_kv_heads, pos="learned", kind="ea", variant="squared", init_std=0.3)
    m = DecoderLM(cfg).double().eval()
    idx = torch.randint(0, 17, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m(idx)
        caches = m.new_cache("recurrent")
        got = torch.cat([m(idx[:, :33], cache=caches)] + [m(idx[:, t : t + 1], cache=caches) for t in range(33, 70)], 1)
    torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-11)
    F = head_dim * (head_dim + 1) // 2
    assert caches[0].state.shape == (2 * (n_kv_heads or 4), F, head_dim + 1)
    assert RecurrentEAState.state_bytes(cfg, 70) == 2 * (n_kv_heads or 4) * F * (head_dim + 1) * 4


def _orthogonal_steps(dtype, T=40, big=300.0):
    """q, k, v (1, 1, T, 8): keys of norm `big` and queries nearly orthogonal to them (|s| ~ 1e-3), so the
    feature form's terms (|q||k|)^2 are ~1e8 times the s^2 they sum to: R ~ 1e8 on every row."""
    g = torch.Generator().manual_seed(3)
    k = torch.zeros(1, 1, T, 8, dtype=torch.float64)
    k[..., 0] = big
    k[..., 1:] = torch.randn(1, 1, T, 7, generator=g, dtype=torch.float64) * 1e-3
    q = torch.zeros(1, 1, T, 8, dtype=torch.float64)
    q[..., 1] = big
    q[..., 0] = torch.randn(1, 1, T, generator=g, dtype=torch.float64) * 1e-3
    v = torch.randn(1, 1, T, 8, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _layer():
    from expressive_attention.nn import MultiheadAttention
    return MultiheadAttention(8, 1, kind="ea", variant="squared")


@pytest.mark.parametrize("prefill", [0, 25])
def test_cancellation_in_a_float32_state_warns_once_with_the_bound(prefill):
    """The recurrent cache cannot retry in float64 (it keeps no keys): it must say so when the bound is large."""
    from expressive_attention import reference_attention

    q, k, v = _orthogonal_steps(torch.float32)
    st = RecurrentEAState(_layer())
    outs = []
    with pytest.warns(RuntimeWarning, match=r"recurrent cache: .*cancellation ratio R = .*cache='kv'") as rec:
        if prefill:
            outs.append(st.attend(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill]))
        outs += [st.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(prefill, q.shape[2])]
    assert len([w for w in rec if "recurrent cache" in str(w.message)]) == 1  # once per layer state
    assert st.max_ratio > 1e6
    got = torch.cat(outs, dim=2).double()
    ref = reference_attention(q.double(), k.double(), v.double(), is_causal=True, variant="squared", eps=st.eps)
    err = (got - ref).abs().amax()
    assert err <= 2.1 * 2.0**-24 * st.max_ratio * v.abs().max() + 1e-6  # within the bound it reports


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 300.0), (torch.float32, 1.0)])
def test_no_cancellation_warning_for_a_float64_state_or_ordinary_inputs(dtype, scale, recwarn):
    q, k, v = _orthogonal_steps(dtype) if scale != 1.0 else [torch.randn(1, 1, 40, 8) for _ in range(3)]
    st = RecurrentEAState(_layer())
    st.attend(q[:, :, :20], k[:, :, :20], v[:, :, :20])
    for t in range(20, 40):
        st.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert not [w for w in recwarn if "recurrent cache" in str(w.message)]
    if dtype == torch.float32:
        assert 0 < st.max_ratio < 512  # random inputs: R of order E, far below the bound


def test_off_host_decode_steps_read_the_ratio_once_every_check_every_tokens(recwarn):
    """On a GPU a host read syncs the device: decode steps keep the maximum on the device and read it back
    once every CHECK_EVERY tokens (exercised here on CPU through the same method)."""
    from expressive_attention.nn.recurrent import CHECK_EVERY

    st = RecurrentEAState(_layer())
    big = torch.tensor([[[1e6]]])
    for _ in range(CHECK_EVERY - 1):  # tokens 1 .. CHECK_EVERY - 1
        st._check_cancellation(big, on_host=False)
        st.length += 1
    assert not [w for w in recwarn if "recurrent cache" in str(w.message)]  # not read back yet
    st._check_cancellation(big, on_host=False)  # the CHECK_EVERY-th token
    assert len([w for w in recwarn if "recurrent cache" in str(w.message)]) == 1
    assert st.max_ratio == 1e6
