"""Expressive attention inside Hugging Face transformers models (tiny random configs, CPU).

Random-init HF models have |q.k| << 1, where EA, its variants and SDPA give nearly the same
logits; `_scaled_up` re-initialises weights so scores are O(1) and the tests can tell them apart.
Pad ids are non-zero so a pad token has a non-zero key (a broken padding mask would show).
"""
from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface, AutoModelForCausalLM, BloomConfig, Gemma2Config, GPT2Config, GPTNeoConfig,
    LlamaConfig, MistralConfig, Qwen2Config,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from expressive_attention import expressive_attention  # noqa: E402
from expressive_attention.integrations import transformers as eah  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, PAD, HIDDEN = 96, 5, 64
FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
WINDOW = 4  # mistral's sliding window, shorter than the test sequences

eah.register()

# A probe implementation: the real "expressive" function, recording what transformers hands it.
CAPTURED: list = []
_inner = AttentionInterface()["expressive"]


def _probe(module, query, key, value, attention_mask, **kwargs):
    CAPTURED.append((module, query.detach(), key.detach(), value.detach(), kwargs.get("scaling")))
    return _inner(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("ea_probe", _probe)
AttentionMaskInterface.register("ea_probe", sdpa_mask)


def make_config(family: str):
    ids = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                          resid_pdrop=0.0, embd_pdrop=0.0, **ids)
    common = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False, **ids)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=WINDOW, **common)
    raise ValueError(family)


def _scaled_up(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / HIDDEN**0.5)
    return model.eval()


def build(family: str, impl: str, seed=0):
    # one config object per model: from_config writes the implementation name into it
    model = AutoModelForCausalLM.from_config(make_config(family), attn_implementation=impl)
    return _scaled_up(model, seed)


def attention_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def tokens(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, VOCAB, (B, L), generator=g)  # never the pad id


def expected_keep(pad_mask, window=None):
    """Independent mask: keep[b, i, j] = j <= i, key j is real, and inside the window."""
    L = pad_mask.shape[1]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = (j <= i) & pad_mask.bool()[:, None, :]
    if window is not None:
        keep &= i - j < window
    return keep  # (B, L, L)


# ---------------------------------------------------------------- EA through HF == the library op


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_equal_library_op(family):
    model = build(family, "ea_probe")
    B, L = 3, 9
    ids = tokens(B, L)
    pad = torch.ones(B, L, dtype=torch.long)
    pad[1, -3:] = 0  # right padded
    pad[2, :2] = 0  # left padded
    ids = ids.masked_fill(pad == 0, PAD)
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o: outputs.__setitem__(m, o[0])) for m in attention_modules(model)]
    CAPTURED.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=pad, position_ids=pos)
    for h in hooks:
        h.remove()
    assert len(CAPTURED) == model.config.num_hidden_layers
    keep = expected_keep(pad, WINDOW if family == "mistral" else None)[:, None]  # (B, 1, L, L)
    for module, q, k, v, scaling in CAPTURED:
        if family != "gpt2":
            assert k.shape[1] * 2 == q.shape[1]  # GQA really exercised
        ref = expressive_attention(q, k, v, attn_mask=keep, scale=scaling, enable_gqa=True, backend="reference")
        proj = module.o_proj if hasattr(module, "o_proj") else module.c_proj
        expected = proj(ref.transpose(1, 2).reshape(B, L, -1))
        torch.testing.assert_close(outputs[module], expected, rtol=1e-4, atol=1e-5)
        # and it is not what softmax would give on the same q/k/v
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scaling,
                                                                enable_gqa=True)
        rows = keep.any(-1).expand(-1, q.shape[1], -1)  # query rows with a key to attend to
        assert (sdpa - ref).abs().amax(-1)[rows].max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_ea_differs_from_sdpa_and_variants_differ(family):
    ids = tokens(2, 10)
    logits = {impl: build(family, impl)(input_ids=ids).logits for impl in ("sdpa", "expressive", "expressive_squared")}
    assert (logits["expressive"] - logits["sdpa"]).abs().max() > 0.1
    assert (logits["expressive"] - logits["expressive_squared"]).abs().max() > 0.1


# ---------------------------------------------------------------- masks: padding, causality, packing


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_row_equals_sequence_alone(family, side):
    model = build(family, "expressive")
    L, n = 10, 6
    ids = tokens(2, L, seed=1)
    alone = ids[1, :n][None].clone()
    pad = torch.ones(2, L, dtype=torch.long)
    if side == "left":
        pad[1, : L - n] = 0
        ids[1] = torch.cat([torch.full((L - n,), PAD), alone[0]])
        real = slice(L - n, L)
    else:
        pad[1, n:] = 0
        ids[1, n:] = PAD
        real = slice(0, n)
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    batched = model(input_ids=ids, attention_mask=pad, position_ids=pos).logits[1, real]
    single = model(input_ids=alone).logits[0]
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_causality(family):
    model = build(family, "expressive")
    ids = tokens(2, 10, seed=2)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1 - 6) % (VOCAB - 6) + 6
    a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "mistral"])
@torch.no_grad()
def test_packed_sequences(family):
    """Two sequences packed in one row with restarting position_ids attend only within themselves."""
    model = build(family, "expressive")
    s1, s2 = tokens(1, 5, seed=3), tokens(1, 7, seed=4)
    packed = torch.cat([s1, s2], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    # transformers detects packing from position_ids only without a cache (as for its SDPA path)
    out = model(input_ids=packed, position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(out[:5], model(input_ids=s1).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[5:], model(input_ids=s2).logits[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- generate() with the KV cache


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_cache_matches_no_cache(family):
    model = build(family, "expressive")
    ids = tokens(2, 7, seed=5)
    pad = torch.ones_like(ids)
    pad[1, :3] = 0
    ids[1, :3] = PAD
    kw = dict(attention_mask=pad, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    # the left-padded row generates what its prompt generates alone
    alone = model.generate(ids[1:, 3:], use_cache=True, max_new_tokens=8, do_sample=False, pad_token_id=PAD,
                           eos_token_id=None)
    assert torch.equal(with_cache[1, 3:], alone[0])
    # a static cache too: its unpadded prefill gets mask None with S > Lq (keys cut, top-left causal)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), with_cache)
    assert torch.equal(model.generate(ids[1:, 3:], cache_implementation="static", max_new_tokens=8, do_sample=False,
                                      pad_token_id=PAD, eos_token_id=None), alone)
    # and EA generates something other than SDPA from the same weights
    sdpa = build(family, "sdpa").generate(ids, use_cache=True, **kw)
    assert not torch.equal(sdpa, with_cache)


def test_generate_decode_steps_run_the_fused_kernel(monkeypatch):
    # backend "auto": each one-token step against the cache (with its padding mask) runs the fused
    # CPU kernel (its decode schedule) through auto's decode shortcut, and gives the tokens the
    # reference backend gives
    import dataclasses

    from expressive_attention.ops import BACKENDS, dispatch, fused_cpu

    assert fused_cpu.is_available()
    rows, shortcut_rows = [], []
    orig = BACKENDS["fused_cpu"]

    def run(p):
        rows.append(p.q.shape[2])
        return orig.run(p)

    def shortcut(*args):
        out = fused_cpu.decode_shortcut(*args)
        if out is not None:
            rows.append(args[0].shape[2])
            shortcut_rows.append(args[0].shape[2])
        return out

    monkeypatch.setitem(BACKENDS, "fused_cpu", dataclasses.replace(orig, run=run))
    monkeypatch.setattr(dispatch, "_SHORTCUTS", [shortcut])
    ids = tokens(2, 7, seed=5)
    pad = torch.ones_like(ids)
    pad[1, :3] = 0
    ids[1, :3] = PAD
    kw = dict(attention_mask=pad, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    fast = build("llama", "expressive").generate(ids, use_cache=True, **kw)
    assert rows.count(1) >= 5 * make_config("llama").num_hidden_layers
    assert shortcut_rows.count(1) == rows.count(1)  # every decode step took the shortcut
    eah.register("ea_ref", backend="reference")
    assert torch.equal(build("llama", "ea_ref").generate(ids, use_cache=True, **kw), fast)


# ---------------------------------------------------------------- training, switching, saving


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_finite_with_padding(family):
    model = build(family, "expressive").train()
    ids = tokens(2, 8, seed=6)
    pad = torch.ones_like(ids)
    pad[1, :3] = 0  # left-padded query rows attend to nothing: zeros, not NaN
    ids[1, :3] = PAD
    labels = ids.masked_fill(pad == 0, -100)
    loss = model(input_ids=ids, attention_mask=pad, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    att = attention_modules(model)[0]
    qk = [p for n, p in att.named_parameters() if re.search(r"q_proj|c_attn", n)][0]
    assert qk.grad.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_switch_to_expressive_and_back(family):
    model = build(family, "sdpa")
    ids = tokens(2, 9, seed=7)
    before = model(input_ids=ids).logits
    model.set_attn_implementation("expressive")
    with eah.count_calls() as calls:
        ea = model(input_ids=ids).logits
    assert len(calls) == model.config.num_hidden_layers
    assert (ea - before).abs().max() > 0.1
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_enable_and_verify():
    model = build("llama", "sdpa")
    with pytest.raises(eah.UnsupportedModelError, match="0 module"):
        eah.verify(model)
    assert eah.enable(model, "expressive_squared") is model
    assert model.config._attn_implementation == "expressive_squared"
    assert eah.verify(model) == 2


def test_name_not_saved_reload_with_name(tmp_path):
    model = build("qwen2", "expressive")
    ids = tokens(1, 6)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert "expressive" not in (tmp_path / "config.json").read_text()
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="expressive").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref)
        assert (plain(input_ids=ids).logits - ref).abs().max() > 0.1  # sdpa: the name was not saved


def test_from_config_writes_into_the_given_config():
    cfg = make_config("llama")
    AutoModelForCausalLM.from_config(cfg, attn_implementation="expressive")
    assert cfg._attn_implementation == "expressive"  # why each model needs its own config copy
    other = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    assert cfg._attn_implementation == "expressive" and other.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- errors


def _fn(name="expressive"):
    return AttentionInterface()[name]


def _qkv(L=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, L, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize("arg", ["softcap", "s_aux", "sinks", "position_bias"])
def test_unhonourable_arguments_raise(arg):
    q, k, v = _qkv()
    module = torch.nn.Module()
    with pytest.raises(eah.UnsupportedAttentionError, match=arg):
        _fn()(module, q, k, v, None, scaling=0.3, **{arg: torch.zeros(2)})


def test_additive_float_mask():
    q, k, v = _qkv()
    module = torch.nn.Module()
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    additive = torch.zeros(4, 4).masked_fill(~keep, torch.finfo(torch.float32).min)
    out, _ = _fn()(module, q, k, v, additive[None, None], scaling=0.3)
    ref = expressive_attention(q, k, v, attn_mask=keep, scale=0.3, backend="reference")
    torch.testing.assert_close(out, ref.transpose(1, 2))
    with pytest.raises(eah.UnsupportedAttentionError, match="additive bias"):
        _fn()(module, q, k, v, (additive + 0.5)[None, None], scaling=0.3)


def test_packed_cu_seq_lens_without_mask_raises():
    q, k, v = _qkv()
    with pytest.raises(eah.UnsupportedAttentionError, match="cu_seq_lens"):
        _fn()(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=torch.tensor([0, 2, 4]))


def test_output_attentions_returns_ea_weights():
    q, k, v = _qkv()
    out, w = _fn("expressive_squared")(torch.nn.Module(), q, k, v, None, scaling=0.3, output_attentions=True)
    assert w.shape == (1, 2, 4, 4) and torch.all(w.triu(1) == 0)
    torch.testing.assert_close(out, (w @ v).transpose(1, 2))


def test_softcap_model_raises():
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, intermediate_size=32, pad_token_id=PAD)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="expressive")
    with pytest.raises(eah.UnsupportedAttentionError, match="softcap"):
        model(input_ids=tokens(1, 4))


@pytest.mark.parametrize("cfg", [
    BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2),
    GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, attention_types=[[["global"], 1]]),
], ids=["bloom", "gpt_neo"])
def test_architectures_outside_the_interface_are_refused(cfg):
    assert not eah.routes_through_interface(AutoModelForCausalLM.from_config(copy.deepcopy(cfg)))
    with pytest.raises(eah.UnsupportedModelError, match="keep softmax"):
        AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="expressive")
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    with pytest.raises(eah.UnsupportedModelError, match="keep softmax"):
        model.set_attn_implementation("expressive")
    with pytest.raises(eah.UnsupportedModelError):
        eah.enable(model)


def test_register_is_idempotent_and_checks_names():
    assert eah.register() == "expressive"
    assert eah.register() == "expressive"
    assert eah.registered()["expressive_squared"].variant == "squared"
    assert eah.register("expressive_eps0", eps=0.0) == "expressive_eps0"
    with pytest.raises(ValueError, match="already registered"):
        eah.register("expressive_eps0", eps=1e-3)
    for bad in ("my_sdpa", "flash_ea", "ea/kernel", "flex_ea"):
        with pytest.raises(ValueError, match="name="):
            eah.register(bad)
    with pytest.raises(ValueError, match="variant"):
        eah.register("expressive_cubic", variant="cubic")


def test_installed_transformers_within_the_pinned_extra():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (pin,) = [r for r in pyproject["project"]["optional-dependencies"]["hf"] if r.startswith("transformers")]
    spec = SpecifierSet(pin.removeprefix("transformers"))
    assert Version(transformers.__version__) in spec
    assert str(spec) == str(SpecifierSet(eah.SUPPORTED_TRANSFORMERS))


# ---------------------------------------------------------------- the supported-models table (docs/huggingface.md)

ROUTED = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "gpt2", "gemma", "gemma3_text", "phi", "phi3", "olmo2",
          "starcoder2", "stablelm", "granite", "cohere", "gpt_neox", "gptj", "codegen", "opt", "gpt_bigcode",
          "biogpt", "smollm3", "falcon"]  # falcon: routed since transformers 5.25 (refused with 5.24)
# Older architectures whose routing depends on the transformers release: decided by detection, never
# by a list tied to one release (a release that routes one makes it work here, verified below).
BY_DETECTION = ["bloom", "gpt_neo", "mpt", "xglm"]


def _auto_config(model_type, **extra):
    cfg = transformers.AutoConfig.for_model(model_type)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=64, rotary_dim=8, pad_token_id=0)
    for k, v in {**sizes, **extra}.items():
        try:
            setattr(cfg, k, v)
        except (AttributeError, TypeError, ValueError):
            pass
    return cfg


@pytest.mark.parametrize("model_type", ROUTED)
def test_table_routed_architectures_run_ea_in_every_layer(model_type):
    model = AutoModelForCausalLM.from_config(_auto_config(model_type), attn_implementation="expressive").eval()
    assert eah.verify(model) == 2


def test_table_gemma2_needs_softcapping_off():
    model = AutoModelForCausalLM.from_config(_auto_config("gemma2", attn_logit_softcapping=None),
                                             attn_implementation="expressive").eval()
    assert eah.verify(model) == 2


@pytest.mark.parametrize("model_type", BY_DETECTION)
def test_table_other_architectures_run_ea_or_are_refused_by_detection(model_type):
    cls = transformers.AutoModelForCausalLM._model_mapping[type(_auto_config(model_type))]
    if eah.routes_through_interface(cls):  # a release that routes it: EA must really run in every layer
        model = AutoModelForCausalLM.from_config(_auto_config(model_type), attn_implementation="expressive").eval()
        assert eah.verify(model) == 2
    else:  # it would keep softmax while claiming EA: refused
        with pytest.raises(eah.UnsupportedModelError, match="keep softmax"):
            AutoModelForCausalLM.from_config(_auto_config(model_type), attn_implementation="expressive")


def test_detection_refuses_a_model_class_whose_attention_bypasses_the_interface():
    """The refusal branch, always exercised: bloom bypasses the interface in 5.24 and 5.25 (if a release
    routes it, move it to BY_DETECTION's routed side in the docs and pick another)."""
    cls = transformers.AutoModelForCausalLM._model_mapping[type(_auto_config("bloom"))]
    assert not eah.routes_through_interface(cls)
    with pytest.raises(eah.UnsupportedModelError, match="keep softmax"):
        AutoModelForCausalLM.from_config(_auto_config("bloom"), attn_implementation="expressive")


def test_falcon_with_alibi_is_refused_with_a_reason():
    with pytest.raises(eah.UnsupportedAttentionError, match="bias"):
        model = AutoModelForCausalLM.from_config(_auto_config("falcon", alibi=True),
                                                 attn_implementation="expressive").eval()
        model(input_ids=tokens(1, 8))


@pytest.mark.parametrize("name,variant,power", [("expressive_power4", "power", 4.0),
                                                ("expressive_exp_squared", "exp_squared", None)])
def test_higher_contrast_names_run_the_library_op(name, variant, power):
    eah.register()
    assert eah.registered()[name] == eah.Spec(variant, 1e-6, "auto", power)
    q, k, v = _qkv()
    out, w = _fn(name)(torch.nn.Module(), q, k, v, None, scaling=0.3, output_attentions=True)
    ref = expressive_attention(q, k, v, is_causal=True, scale=0.3, variant=variant, power=power, backend="reference")
    torch.testing.assert_close(out, ref.transpose(1, 2))
    torch.testing.assert_close(out, (w @ v).transpose(1, 2))
    # a model switched to the name runs it in every layer, and the logits differ from the paper's EA
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
    assert eah.verify(model) == 2
    ids = tokens(1, 8)
    a = model(input_ids=ids).logits
    model.set_attn_implementation("expressive")
    assert (a - model(input_ids=ids).logits).abs().max() > 1e-4


def test_register_power_checks_its_degree():
    assert eah.register("expressive_power6", variant="power", power=6) == "expressive_power6"
    assert eah.registered()["expressive_power6"].power == 6.0
    with pytest.raises(ValueError, match="power"):
        eah.register("expressive_power_bad", variant="power", power=0.1)
    with pytest.raises(ValueError, match="power"):
        eah.register("expressive_sat_power", variant="saturating", power=4)


@pytest.mark.parametrize("kind,variant", [("ea", "exp_squared"), ("dpa", "saturating")])
def test_learned_score_gain(kind, variant):
    name = f"gain_test_{kind}"
    eah.register(name, kind=kind, variant=variant, learn_scale=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
    ids = tokens(1, 8)
    with pytest.raises(eah.UnsupportedAttentionError, match="add_score_gain"):
        model(input_ids=ids)
    assert eah.add_score_gain(model) == 2 and eah.add_score_gain(model) == 2  # idempotent
    assert sum(n.endswith("score_log_gain") for n, _ in model.named_parameters()) == 2
    # gain 0 = the plain mechanism, exactly
    plain = "sdpa" if kind == "dpa" else "expressive_exp_squared"
    eah.register()
    a = model(input_ids=ids).logits
    model.set_attn_implementation(plain)
    torch.testing.assert_close(model(input_ids=ids).logits, a, atol=1e-5, rtol=1e-5)
    model.set_attn_implementation(name)
    a.square().sum().backward()  # logits of the gained model: the gain gets a gradient
    for mod in model.modules():
        if hasattr(mod, "score_log_gain"):
            mod.score_log_gain.data.fill_(1.5)
    assert (model(input_ids=ids).logits - a).abs().max() > 1e-4
    grads = [m.score_log_gain.grad for m in model.modules() if hasattr(m, "score_log_gain")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@torch.no_grad()
def test_padded_batch_gets_the_linear_form_when_long(monkeypatch):
    """transformers hands a left-padded batch's attention a bool (B, 1, L, L) causal-and-padding mask;
    past the crossover "auto" recognises it and runs the linear form (same logits as the reference)."""
    import dataclasses

    from expressive_attention.ops import dispatch, linear

    used = []
    lin = dispatch.BACKENDS["linear"]
    monkeypatch.setitem(dispatch.BACKENDS, "linear",
                        dataclasses.replace(lin, run=lambda p: used.append(p.mask is not None) or lin.run(p)))
    cfg = make_config("llama")
    cfg.num_hidden_layers, cfg.max_position_embeddings = 1, 4096
    E = cfg.hidden_size // cfg.num_attention_heads
    L = int(linear.crossover_length(E, train=False)) + 16
    model = _scaled_up(AutoModelForCausalLM.from_config(cfg, attn_implementation="expressive_squared"))
    ids = tokens(2, L, seed=4)
    pad = torch.ones(2, L, dtype=torch.long)
    pad[1, :40] = 0
    ids[1, :40] = PAD
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    got = model(input_ids=ids, attention_mask=pad, position_ids=pos).logits
    assert used == [True]  # one layer, its full mask recognised
    eah.register("ea_sq_reference", variant="squared", backend="reference")
    model.set_attn_implementation("ea_sq_reference")
    want = model(input_ids=ids, attention_mask=pad, position_ids=pos).logits
    torch.testing.assert_close(got[:, 40:], want[:, 40:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
