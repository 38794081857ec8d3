"""Per-layer attention statistics of HF models (experiments/attention_stats.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from expressive_attention.experiments import attention_stats as st  # noqa: E402
from expressive_attention.integrations import transformers as eah  # noqa: E402

CFG = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=32)


@pytest.mark.parametrize("impl", ["sdpa", "expressive", "expressive_power4"])
def test_probe_records_every_layer_and_changes_nothing(impl):
    eah.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CFG), attn_implementation=impl).eval()
    ids = torch.randint(0, 64, (3, 20))
    before = model(input_ids=ids).logits
    original = ALL_ATTENTION_FUNCTIONS[impl]
    with st.probe_attention(impl) as calls:
        during = model(input_ids=ids).logits
    assert torch.equal(before, during)
    assert ALL_ATTENTION_FUNCTIONS[impl] is original and impl not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert [c["layer"] for c in calls] == [0, 1]
    a = calls[0]["a"]  # (B, H, L, S): causal rows summing to 1 (EA: less, eps takes a share at tiny scores)
    assert a.shape == (3, 2, 20, 20) and torch.all(a.triu(1) == 0)
    assert torch.all(a.sum(-1) <= 1 + 1e-5) and torch.all(a.sum(-1) > 0)
    if impl == "sdpa":
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 20), atol=1e-5, rtol=0)
    stats = st.attention_stats(model, impl, ids)
    assert [r["layer"] for r in stats] == [0, 1]
    for r in stats:
        assert 0 < r["abs_s_median"] <= r["abs_s_p90"] <= r["abs_s_p99"] <= r["abs_s_max"]
        assert 0 < r["top_weight"] <= 1 and 0 < r["mass"] <= 1 + 1e-6
        assert r["top_weight"] >= r["mass"] / 20 - 1e-6 and 0 <= r["entropy"] <= r["log_keys"] + 1e-5
    mech = "softmax" if impl == "sdpa" else {"expressive": "saturating", "expressive_power4": "power4"}[impl]
    assert math.isclose(stats[0]["top_weight_if"][mech], stats[0]["top_weight"], rel_tol=1e-6)


def test_summary_separates_scores_from_contrast():
    # one clear match among 63 random keys: softmax of large scores singles it out, s^2 barely does
    g = torch.Generator().manual_seed(0)
    s = 0.3 * torch.randn(1, 1, 1, 64, generator=g)
    s[..., 0] = 3.0
    keep = torch.ones_like(s, dtype=torch.bool)
    calls = [dict(layer=0, s=s, keep=keep, a=st.weights_of(s, keep, ("squared", None)))]
    (r,) = st.summarise(calls, min_keys=1)
    t = r["top_weight_if"]
    assert t["squared"] == pytest.approx(r["top_weight"])
    assert t["squared"] < t["power4"] and t["saturating"] < t["squared"]
    assert t["power4"] < t["exp_squared"] and t["softmax"] > 0.2
    assert r["abs_s_max"] == pytest.approx(3.0)
