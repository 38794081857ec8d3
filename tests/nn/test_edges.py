"""Modules and generation at the edges: empty inputs, bad sampling arguments, token ids out of range,
generation past the context window (learned positions crop it, as nanoGPT does)."""
import math

import pytest
import torch

from expressive_attention.nn import DecoderLM, LMConfig, MultiheadAttention


def model(**kw):
    base = dict(vocab_size=23, context_length=16, d_model=32, n_layers=2, n_heads=4, init_std=0.2)
    base.update(kw)
    torch.manual_seed(0)
    return DecoderLM(LMConfig(**base)).eval()


@pytest.mark.parametrize("kind", ["ea", "dpa"])
def test_multihead_attention_with_empty_sequence(kind):
    mha = MultiheadAttention(32, 4, n_kv_heads=2, kind=kind)
    x = torch.randn(2, 0, 32, requires_grad=True)
    y = mha(x, is_causal=True)
    assert y.shape == (2, 0, 32)
    ctx = torch.randn(2, 0, 32)  # cross-attention to nothing: zeros before the output projection
    y = mha(torch.randn(2, 5, 32), context=ctx)
    assert y.shape == (2, 5, 32)
    torch.testing.assert_close(y, mha.out_proj(torch.zeros(2, 5, 32)))


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_decoder_with_zero_tokens(pos):
    m = model(pos=pos)
    logits = m(torch.zeros(3, 0, dtype=torch.long))
    assert logits.shape == (3, 0, 23)
    m.train()
    m(torch.zeros(3, 0, dtype=torch.long)).sum().backward()  # trains through an empty batch


def test_generate_with_an_empty_prompt_says_what_to_do():
    with pytest.raises(ValueError, match="at least one token"):
        model().generate(torch.zeros(2, 0, dtype=torch.long), 5)


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=0), "top_k"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
])
def test_generate_rejects_bad_sampling_arguments(kw, match):
    args = dict(max_new_tokens=3, temperature=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        model().generate(torch.zeros(1, 2, dtype=torch.long), **args)


@pytest.mark.parametrize("bad", [23, -1, 10**6])
def test_token_ids_out_of_range_are_named(bad):
    m = model()
    idx = torch.zeros(2, 4, dtype=torch.long)
    idx[1, 2] = bad
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=23\)"):
        m(idx)
    with pytest.raises(ValueError, match="token ids"):
        m.generate(idx, 2)


@pytest.mark.parametrize("cache", ["kv", None, "auto"])
def test_generate_past_the_context_window_crops_learned_positions(cache):
    m = model(pos="learned")  # context_length 16
    prompt = torch.randint(0, 23, (2, 10))
    out = m.generate(prompt, 20, cache=cache)
    assert out.shape == (2, 30) and torch.equal(out[:, :10], prompt)
    # each token is the argmax given (at most) the last 16 tokens before it
    for t in range(10, 30):
        window = out[:, max(0, t - 16):t]
        assert torch.equal(m(window)[:, -1].argmax(-1), out[:, t])
    # a prompt already longer than the window works too
    long = torch.randint(0, 23, (1, 40))
    assert m.generate(long, 3, cache=cache).shape == (1, 43)


def test_generate_kv_cache_equals_uncached_when_it_fits():
    m = model(pos="learned")
    prompt = torch.randint(0, 23, (2, 4))
    assert torch.equal(m.generate(prompt, 12, cache="kv"), m.generate(prompt, 12, cache=None))


@pytest.mark.parametrize("args,words", [
    ((12, 0), "n_heads must be an integer >= 1, got 0"),  # was ZeroDivisionError (issue #24, defect 5)
    ((12, -3), "n_heads must be an integer >= 1"),
    ((12, 2.0), "n_heads must be an integer >= 1, got 2.0"),
    ((0, 1), "d_model must be an integer >= 1"),
    ((12.5, 1), "d_model must be an integer >= 1"),
    ((12, 4, 0), "n_kv_heads must be an integer >= 1, got 0"),
    ((12, 4, True), "n_kv_heads must be an integer >= 1"),
])
def test_multihead_attention_bad_sizes_are_named(args, words):
    with pytest.raises(ValueError, match=words):
        MultiheadAttention(*args)


def test_multihead_attention_wrong_input_width_names_d_model():
    mha = MultiheadAttention(12, 3)
    with pytest.raises(ValueError, match=r"x must be \(B, T, d_model=12\), got shape \(2, 5, 8\)"):
        mha(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"context must be \(B, T, d_model=12\)"):
        mha(torch.randn(2, 5, 12), context=torch.randn(2, 4, 13))
    with pytest.raises(ValueError, match=r"x must be \(B, T, d_model=12\), got shape \(5, 12\)"):
        mha(torch.randn(5, 12))
    assert mha(torch.randn(2, 5, 12)).shape == (2, 5, 12)


@pytest.mark.parametrize("field,value", [("vocab_size", 11.5), ("vocab_size", 11.0), ("d_model", "64"),
                                         ("n_layers", True), ("context_length", 0), ("n_kv_heads", 1.5)])
def test_lm_config_rejects_non_integer_sizes(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        LMConfig(**{"vocab_size": 11, field: value})
