import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from expressive_attention import reference_attention
from expressive_attention.experiments.geometry import BINS, attention_geometry, attention_weights, suppression
from expressive_attention.experiments.report import verdicts
from expressive_attention.nn import DecoderLM, LMConfig
from expressive_attention.tasks import eval_generator, make_task

torch.set_num_threads(1)


@pytest.mark.parametrize("attention,variant", [("dpa", None), ("ea", "saturating"), ("ea", "squared")])
def test_weights_reproduce_the_attention_output(attention, variant):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g) * 2
    k = torch.randn(2, 2, 7, 8, generator=g) * 2  # GQA: 2 kv heads
    v = torch.randn(2, 2, 7, 8, generator=g)
    a = attention_weights(q, k, attention, variant or "saturating")
    vv = v.repeat_interleave(2, dim=1)
    kk = k.repeat_interleave(2, dim=1)
    if attention == "dpa":
        want = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    else:
        want = reference_attention(q, kk, vv, is_causal=True, variant=variant)
    torch.testing.assert_close(a @ vv, want, rtol=1e-5, atol=1e-5)
    assert torch.all(a.triu(1) == 0)


def test_ea_suppresses_orthogonal_keys_and_takes_antiparallel_ones():
    # one query, keys parallel / orthogonal / antiparallel to it, at equal |q.k| for the two matches
    q = torch.tensor([3.0, 0, 0, 0]).view(1, 1, 1, 4).expand(1, 1, 3, 4).clone()
    k = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [-3.0, 0, 0, 0]]).view(1, 1, 3, 4)
    ea = attention_weights(q, k, "ea")[0, 0, 2]  # last row sees all three keys
    dpa = attention_weights(q, k, "dpa")[0, 0, 2]
    ea, dpa = ea.tolist(), dpa.tolist()
    assert ea[1] < 1e-6 and ea[0] == pytest.approx(ea[2], rel=1e-6)  # orthogonal: 0; +-: equal
    assert dpa[0] > dpa[1] > dpa[2]  # dpa ranks by q.k: antiparallel is the least attended


def test_attention_geometry_on_a_model():
    task = make_task("pointer", T=4, seq_len=16)
    for kind in ("dpa", "ea"):
        torch.manual_seed(0)
        model = DecoderLM(LMConfig(vocab_size=task.vocab_size, context_length=16, d_model=16, n_layers=2,
                                   n_heads=2, kind=kind))
        stats = attention_geometry(model, task, n_sequences=4)
        assert len(stats) == 2
        for st in stats:
            assert st["attention"].shape == (len(BINS) - 1,)
            assert st["attention"].sum() == pytest.approx(1.0) and st["pairs"].sum() == pytest.approx(1.0)
            fr = st["fractions"]["attention"]
            assert 0 <= fr["antiparallel"] + fr["orthogonal"] + fr["parallel"] <= 1 + 1e-9
            assert math.isfinite(suppression(st))
        assert not any(m._forward_pre_hooks for m in model.modules())  # its hooks are gone again


def _row(rung, kind, tok, seq, std=0.0, n=2):
    return {"family": "f", "rung": rung, "rung_label": f"r{rung}", "label": kind, "n": n, "expected": n,
            "token_acc_mean": tok, "token_acc_std": std, "seq_acc_mean": seq, "seq_acc_std": std}


def test_verdicts_on_synthetic_ladders():
    win = [_row(0, "dpa", 1.0, 1.0), _row(0, "ea", 1.0, 1.0),
           _row(1, "dpa", 0.9, 0.5), _row(1, "ea", 1.0, 1.0),
           _row(2, "dpa", 0.6, 0.0), _row(2, "ea", 0.9, 0.4),
           _row(3, "dpa", 0.3, 0.0), _row(3, "ea", 0.4, 0.0)]
    v = verdicts(win)["f"]["ea"]
    assert v["at_least_as_good"] and v["widening"] == "yes" and v["max_gap_at"] == "r2"
    assert v["solves_where_dpa_does_not"] == ["r1"]
    assert v["gaps"] == pytest.approx([0.0, 0.1, 0.3, 0.1])

    lose = [_row(0, "dpa", 1.0, 1.0), _row(0, "ea", 0.95, 0.8),
            _row(1, "dpa", 0.8, 0.2, std=0.1), _row(1, "ea", 0.75, 0.1, std=0.1)]
    v = verdicts(lose)["f"]["ea"]
    assert not v["at_least_as_good"] and v["behind"] == ["r0"]  # r1's -0.05 is within noise
    assert v["widening"] == "no" and v["solves_where_dpa_does_not"] == []

    dip = [_row(0, "dpa", 1.0, 1.0), _row(0, "ea", 1.0, 1.0), _row(1, "dpa", 0.8, 0.1), _row(1, "ea", 1.0, 1.0),
           _row(2, "dpa", 0.8, 0.1), _row(2, "ea", 0.9, 0.2), _row(3, "dpa", 0.5, 0.0), _row(3, "ea", 0.9, 0.1)]
    v = verdicts(dip)["f"]["ea"]
    assert v["widening"] == "mostly" and v["dips"] == ["r2"] and v["max_gap_at"] == "r3"


@pytest.mark.parametrize("options", [
    {"layer_kinds": ("dpa", "ea")},             # per-layer hybrid: layer 0 is softmax
    {"kind": "ea", "n_ea_heads": 1},            # per-head hybrid
    {"kind": "ea", "forget_gate": True},        # the forget gate
    {"kind": "dpa", "forget_gate": True},
    {"kind": "ea", "learn_scale": True, "gain_init": 0.7},
], ids=["layer_kinds", "n_ea_heads", "ea+gate", "dpa+gate", "learned_gain"])
def test_geometry_measures_the_weights_each_layer_runs(options):
    """Issue #21's options change the weights: the geometry must see the layer's own (not cfg.kind's)."""
    from expressive_attention.nn import MultiheadAttention
    from expressive_attention.nn.attention import weights_of_call

    torch.manual_seed(0)
    task = make_task("pointer", T=4, seq_len=16)
    cfg = {"kind": "ea", **options}
    model = DecoderLM(LMConfig(vocab_size=task.vocab_size, context_length=16, d_model=16, n_layers=2, n_heads=2,
                               **cfg)).double()
    if options.get("forget_gate"):
        for m in model.modules():  # a gate far from 0.5, so that ignoring it would show
            if isinstance(m, MultiheadAttention):
                torch.nn.init.normal_(m.fgate_proj.weight, std=2.0)
    seen = []

    def check(m, args, kwargs):  # the weights reproduce the layer's own output on random values
        q, k, a = weights_of_call(m, args, kwargs)
        v = torch.randn(k.shape[0], k.shape[1], k.shape[2], 5, dtype=k.dtype)
        log_fgate = m.log_fgate(args[0]) if m.forget_gate else None
        want = m.attend(q, k, v, is_causal=True, log_fgate=log_fgate)
        got = a @ v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert torch.all(a.triu(1) == 0)
        seen.append((q, k, a))

    x, _, _ = task.sample(3, eval_generator(0))  # what attention_geometry(seed=0) feeds the model
    hooks = [m.register_forward_pre_hook(check, with_kwargs=True) for m in model.modules()
             if isinstance(m, MultiheadAttention)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    if "layer_kinds" in options or options.get("kind") == "dpa":  # softmax layers: rows sum to 1
        a0 = seen[0][2]
        torch.testing.assert_close(a0.sum(-1), torch.ones_like(a0.sum(-1)))
    stats = attention_geometry(model, task, n_sequences=3, seed=0)
    for st, (q, k, a) in zip(stats, seen):  # its histograms are those of the weights the layer runs
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        cos = F.normalize(q, dim=-1) @ F.normalize(kk, dim=-1).transpose(-1, -2)
        keep = torch.ones_like(a, dtype=torch.bool).tril()
        w = a[keep].numpy()
        want = np.histogram(cos[keep].numpy(), BINS, weights=w)[0] / w.sum()
        np.testing.assert_allclose(st["attention"], want, rtol=1e-6, atol=1e-9)
