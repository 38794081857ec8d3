"""Issue #21's levers through the Hugging Face integration: the forget gate (add_forget_gate + names
registered with forget_gate=True, for EA and softmax), hybrid layers/heads read from the config
("expressive_hybrid"), and add_score_gain(init=)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig  # noqa: E402

from expressive_attention.integrations import transformers as eah  # noqa: E402
from expressive_attention.ops import attention, expressive_attention  # noqa: E402

transformers.logging.set_verbosity_error()
eah.register()
GATED_EA = eah.register("test_ea_gate", forget_gate=True)
GATED_SM = eah.register("test_softmax_gate", kind="dpa", forget_gate=True)
GATED_HYBRID = eah.register("test_exp2_hybrid_gate", variant="exp_squared", forget_gate=True, hybrid=True)


def config(**kw):
    return LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None, **kw)


def build(impl, seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(**kw), attn_implementation=impl)


def qkv(L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g),
            torch.randn(2, 2, L, 8, generator=g))


def modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


@pytest.mark.parametrize("impl,kind", [(GATED_EA, "ea"), (GATED_SM, "dpa")])
def test_gated_function_equals_the_op(impl, kind):
    model = build(impl)
    assert eah.add_forget_gate(model) == 2 and eah.add_forget_gate(model) == 2  # idempotent
    module = modules(model)[0]
    q, k, v = qkv()
    lf = F.logsigmoid(torch.randn(2, 4, 6))
    setattr(module, eah._FGATE_STATE, lf)  # what the pre-hook stores
    out, _ = AttentionInterface()[impl](module, q, k, v, None, scaling=8**-0.5)
    want = attention(q, k, v, is_causal=True, scale=8**-0.5, enable_gqa=True, kind=kind, log_fgate=lf)
    assert torch.equal(out, want.transpose(1, 2))


def test_the_pre_hook_computes_the_gate_from_the_layer_input():
    model = build(GATED_EA)
    eah.add_forget_gate(model)
    module = modules(model)[1]
    assert torch.equal(module.fgate_proj.bias, torch.zeros(4))
    seen = {}

    def after(mod, args, kwargs):  # registered after add_forget_gate's hook: sees its result
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["h"], seen["lf"] = h.detach(), eah.stored_log_fgate(mod).detach()

    module.register_forward_pre_hook(after, with_kwargs=True)
    ids = torch.randint(3, 50, (2, 7))
    model(input_ids=ids, use_cache=False)
    want = F.logsigmoid(module.fgate_proj(seen["h"])).transpose(1, 2)
    assert seen["lf"].shape == (2, 4, 7)
    torch.testing.assert_close(seen["lf"], want.detach())


@pytest.mark.parametrize("impl", [GATED_EA, GATED_SM, GATED_HYBRID])
def test_gated_models_train(impl):
    model = build(impl, ea_layer_kinds=["dpa", "ea"], n_ea_heads=2)
    eah.add_forget_gate(model)
    eah.verify(model)
    ids = torch.randint(3, 50, (4, 12))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    for m in modules(model):
        assert m.fgate_proj.weight.grad.abs().sum() > 0


def test_gate_errors():
    model = build(GATED_EA)
    ids = torch.randint(3, 50, (1, 5))
    with pytest.raises(eah.UnsupportedAttentionError, match="add_forget_gate"):
        model(input_ids=ids, use_cache=False)
    eah.add_forget_gate(model)
    with pytest.raises(eah.UnsupportedAttentionError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=2, do_sample=False)


def test_hybrid_reads_layer_kinds_and_heads_from_the_config():
    model = build(eah.HYBRID_NAME, ea_layer_kinds=["dpa", "ea"], n_ea_heads=2)
    fn = AttentionInterface()[eah.HYBRID_NAME]
    q, k, v = qkv()
    first, second = modules(model)
    out0, _ = fn(first, q, k, v, None, scaling=0.3)
    assert torch.equal(out0, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                            enable_gqa=True).transpose(1, 2))
    out1, _ = fn(second, q, k, v, None, scaling=0.3)
    ea = expressive_attention(q[:, :2], k[:, :1], v[:, :1], is_causal=True, scale=0.3, enable_gqa=True)
    sm = F.scaled_dot_product_attention(q[:, 2:], k[:, 1:], v[:, 1:], is_causal=True, scale=0.3, enable_gqa=True)
    assert torch.equal(out1, torch.cat([ea, sm], 1).transpose(1, 2))


def test_hybrid_without_a_split_is_the_plain_model():
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        plain = build("expressive")(input_ids=ids).logits
        hybrid = build(eah.HYBRID_NAME)(input_ids=ids).logits  # no ea_layer_kinds / n_ea_heads: all EA
        all_ea = build(eah.HYBRID_NAME, ea_layer_kinds=["ea", "ea"], n_ea_heads=4)(input_ids=ids).logits
        softmax = build("sdpa")(input_ids=ids).logits
        all_dpa = build(eah.HYBRID_NAME, ea_layer_kinds=["dpa", "dpa"])(input_ids=ids).logits
    assert torch.equal(hybrid, plain) and torch.equal(all_ea, plain)
    torch.testing.assert_close(all_dpa, softmax)


def test_hybrid_config_errors():
    q, k, v = qkv()
    fn = AttentionInterface()[eah.HYBRID_NAME]
    for kw, match in ((dict(ea_layer_kinds=["ea"]), "layer_idx=1"), (dict(ea_layer_kinds=["ea", "x"]), "'ea' or 'dpa'"),
                      (dict(n_ea_heads=1), "multiple of the GQA group size")):
        model = build(eah.HYBRID_NAME, **kw)
        with pytest.raises(eah.UnsupportedAttentionError, match=match):
            fn(modules(model)[1], q, k, v, None)
    with pytest.raises(ValueError, match="needs kind='ea'"):
        eah.register("test_bad_hybrid", kind="dpa", hybrid=True)


def test_score_gain_init():
    g0 = 0.5 * math.log(0.1)
    name = eah.register("test_exp2_gain", variant="exp_squared", learn_scale=True)
    model = build(name)
    assert eah.add_score_gain(model, init=g0) == 2
    for m in modules(model):
        assert torch.allclose(m.score_log_gain, torch.full((4,), g0))
    default = build(name)
    eah.add_score_gain(default)
    assert torch.equal(modules(default)[0].score_log_gain, torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        eah.add_score_gain(build(name), init=float("nan"))
    # the gain multiplies the scores: exp_squared with g0 is exp(0.1 s^2)
    m = modules(model)[0]
    q, k, v = qkv()
    out, _ = AttentionInterface()[name](m, q, k, v, None, scaling=1.0)
    want = expressive_attention(q * math.exp(g0), k, v, is_causal=True, scale=1.0, enable_gqa=True,
                                variant="exp_squared")
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_add_forget_gate_with_an_initial_bias():
    model = build(GATED_EA)
    eah.add_forget_gate(model, bias_init=4.0)
    for m in modules(model):
        assert torch.equal(getattr(m, eah.FGATE_MODULE).bias, torch.full((4,), 4.0))
    with pytest.raises(ValueError, match="bias_init must be a finite float"):
        eah.add_forget_gate(build(GATED_EA), bias_init=float("inf"))
