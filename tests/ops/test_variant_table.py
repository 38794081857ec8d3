"""The variant table (ops/variants.py) is the one place variants are defined: every backend declares a
subset of it, every other name table agrees with it, an unknown name raises everywhere it can enter,
each entry's functions agree with each other, and a new entry is used (never silently replaced by
another variant's formula). Also the table's first added entry, "exp_odd" (the odd control)."""
import dataclasses
import math

import pytest
import torch
from attention_inputs import make_qkv as make

from expressive_attention import expressive_attention
from expressive_attention.ops import BACKENDS, VARIANTS, Backend, expressive_weights, score_fn
from expressive_attention.ops import blocked, fused_cpu, linear, triton_ea, variants
from expressive_attention.ops.problem import normalise
from expressive_attention.ops.variants import VARIANT_TABLE, default_instances, parse_variant


def test_variants_is_the_table():
    assert VARIANTS == tuple(VARIANT_TABLE) and "exp_odd" in VARIANTS
    assert set(variants.EXP_VARIANTS) == {"exp_squared", "exp_odd"}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_declares_a_subset_of_the_table(name):
    b = BACKENDS[name]
    if name in ("reference", "flex"):  # None: every entry of the table, from the table's own functions
        assert b.variants is None and all(b.implements(v) for v in VARIANTS)
        return
    assert b.variants, f"{name} must declare the variants it implements"
    assert set(b.variants) <= set(VARIANTS), f"{name} claims variants the reference does not define"


def test_declarations_agree_with_the_kernels_and_the_table():
    assert BACKENDS["fused_cpu"].variants == fused_cpu.KERNEL_VARIANTS
    assert BACKENDS["triton"].variants == triton_ea.KERNEL_VARIANTS
    assert BACKENDS["linear"].variants == tuple(n for n, v in VARIANT_TABLE.items() if v.linear) == ("squared",)
    # blocked: its own code for the plain variants and power, every exp-type entry from the table
    assert set(BACKENDS["blocked"].variants) == set(VARIANTS)
    assert linear.BACKEND is BACKENDS["linear"] and blocked.BACKEND is BACKENDS["blocked"]


def test_a_backend_cannot_claim_an_unknown_variant():
    with pytest.raises(ValueError, match="'cubic'.*|unknown"):
        Backend("mine", lambda p: p.q, lambda p: None, variants=("saturating", "cubic"))


def test_other_name_tables_agree_with_the_table():
    from expressive_attention.experiments import attention_stats, kinds
    from expressive_attention.experiments.kinds import mechanism_label

    inst = default_instances()
    assert {v for v, _ in inst.values()} == set(VARIANTS)
    assert inst["power4"] == ("power", 4.0)
    stats = {k: v for k, v in attention_stats.COUNTERFACTUALS.items() if v is not None}
    assert stats == inst
    assert all(mechanism_label("ea", v) in kinds.PLOT_STYLE for v in VARIANTS)
    for label, spec in inst.items():
        assert kinds.parse_variant(label) == spec
    assert parse_variant("power8") == ("power", 8.0)


def test_hf_names_come_from_the_table():
    hf = pytest.importorskip("expressive_attention.integrations.transformers",
                             reason="the HF integration needs transformers (extra [hf])")
    assert sorted(hf.DEFAULT_NAMES.values(), key=str) == sorted(default_instances().values(), key=str)
    assert hf.DEFAULT_NAMES["expressive"] == ("saturating", None)
    assert hf.DEFAULT_NAMES["expressive_power4"] == ("power", 4.0)
    assert hf.DEFAULT_NAMES["expressive_exp_odd"] == ("exp_odd", None)
    with pytest.raises(ValueError, match="variant must be one of"):
        hf.register("ea_bogus_variant", variant="cubic")


UNKNOWN = "cubic"


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_an_unknown_variant_raises_on_every_backend(backend):
    q, k, v = make(1, 2, 2, 8, 8, 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"variant must be one of \(.*'exp_odd'\), got 'cubic'"):
        expressive_attention(q, k, v, variant=UNKNOWN, backend=backend)


def test_an_unknown_variant_raises_at_every_entry():
    from expressive_attention import attention
    from expressive_attention.experiments.kinds import kind_specs
    from expressive_attention.nn import DecoderLM, LMConfig, MultiheadAttention

    q = torch.randn(3, 4)
    msg = r"variant must be one of \(.*'exp_odd'\),? .*got"
    calls = [
        lambda: score_fn(q, UNKNOWN),
        lambda: expressive_weights(q, q, variant=UNKNOWN),
        lambda: attention(q, q, q, kind="ea", variant=UNKNOWN),
        lambda: MultiheadAttention(8, 2, kind="ea", variant=UNKNOWN),
        lambda: DecoderLM(LMConfig(vocab_size=11, context_length=8, d_model=8, n_heads=2, n_layers=1, variant=UNKNOWN)),
        lambda: kind_specs(["ea"], [UNKNOWN]),
        lambda: parse_variant(UNKNOWN),
        lambda: normalise(q, q, q, None, 0.0, False, None, False, UNKNOWN, 1e-6),
        lambda: variants.check_variant(None),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()


def test_a_backend_that_lacks_a_variant_names_the_ones_that_have_it():
    q, k, v = make(1, 2, 2, 80, 80, 8, 8, torch.float32)
    for name in ("fused_cpu", "linear", "triton"):
        with pytest.raises(ValueError, match=r"'exp_odd' is not implemented by the .*backends that implement it: "
                                             r"\['blocked', .*'reference'\]") as e:
            expressive_attention(q, k, v, variant="exp_odd", backend=name)
        assert "use 'blocked'" not in str(e.value)


@pytest.mark.parametrize("name", VARIANTS)
def test_entry_functions_agree(name):
    e = VARIANT_TABLE[name]
    s = torch.linspace(-5, 5, 101, dtype=torch.float64)  # includes s = 0
    p = variants.resolve_power(name, None)
    f, lf = e.f(s, p), e.log_f(s, p)
    torch.testing.assert_close(lf.exp(), f, atol=1e-12, rtol=1e-10)
    assert torch.equal(score_fn(s, name), f)
    # log f has a finite gradient everywhere, s = 0 included (flex's score_mod backward)
    s0 = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(e.log_f(s0, p).exp().sum(), s0)
    assert torch.isfinite(g).all()
    assert e.exp_type == (name in ("exp_squared", "exp_odd")) and e.even == (name != "exp_odd")
    if e.exp_type:
        torch.testing.assert_close(e.exponent(s), lf)
        (dx,) = torch.autograd.grad(e.exponent(s0).sum(), s0)
        torch.testing.assert_close(e.dexp(s), dx)
    assert e.description


def test_exp_odd_is_the_written_definition_and_odd():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    keep = torch.rand(6, 9, generator=g) > 0.3
    keep[1] = False
    got = expressive_weights(q, k, keep, scale=0.7, variant="exp_odd", eps=1e-3)
    want = torch.zeros(6, 9, dtype=torch.float64)
    for i in range(6):
        f = [math.exp(s * abs(s)) if keep[i, j] else 0.0 for j in range(9) for s in [0.7 * float(q[i] @ k[j])]]
        z = 1e-3 + sum(f)
        want[i] = torch.tensor([x / z for x in f], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert torch.equal(got[1], torch.zeros(9, dtype=torch.float64))
    # odd: a key and its negation weigh differently (exp_squared: the same)
    qq, kk = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    w = expressive_weights(qq, kk, variant="exp_odd")[0]
    assert w[0] > w[2] > w[1]
    w2 = expressive_weights(qq, kk, variant="exp_squared")[0]
    assert w2[0] == w2[1]


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_exp_odd_rows_of_negative_scores_stay_finite(eps):
    """Every allowed score very negative: f ~ exp(-s^2) underflows; with eps = 0 the weights are a softmax
    of s|s| (never 0 * inf), with eps > 0 they are ~0 (sum f << eps), as the definition says."""
    q = torch.full((1, 1, 3, 4), 6.0, dtype=torch.float64, requires_grad=True)
    k = torch.full((1, 1, 5, 4), -6.0, dtype=torch.float64, requires_grad=True)
    k.data[0, 0, 0] = -5.5
    v = torch.randn(1, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    outs = {}
    for b in ("reference", "blocked"):
        out = expressive_attention(q, k, v, variant="exp_odd", eps=eps, scale=1.0, backend=b)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in grads)
        outs[b] = out
    torch.testing.assert_close(outs["blocked"], outs["reference"], atol=1e-12, rtol=1e-10)
    if eps == 0.0:  # the top key (s = -121 vs -144) takes everything
        torch.testing.assert_close(outs["reference"][0, 0, 0], v[0, 0, 0].detach(), atol=1e-9, rtol=0)
    else:
        assert outs["reference"].abs().max() < 1e-30


def test_exp_odd_blocked_matches_reference_with_gradients(monkeypatch):
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 1)  # 16-row tiles, causal key skipping
    q, k, v = make(2, 4, 2, 41, 41, 8, 6, torch.float64)
    mask = torch.rand(2, 4, 41, 41, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, :, 7] = False
    for kw in ({"is_causal": True}, {"attn_mask": mask}, {}):
        outs = [expressive_attention(q, k, v, enable_gqa=True, variant="exp_odd", backend=b, **kw)
                for b in ("blocked", "reference")]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-8)
        do = torch.randn_like(outs[0])
        for a, b in zip(torch.autograd.grad(outs[0], (q, k, v), do), torch.autograd.grad(outs[1], (q, k, v), do)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_auto_routes_exp_odd_to_blocked_on_cpu():
    q, k, v = make(1, 2, 2, 256, 256, 16, 16, torch.float32)
    p = normalise(q, k, v, None, 0.0, True, None, False, "exp_odd", 1e-6)
    from expressive_attention.ops import choose_backend

    assert choose_backend(p).name == "blocked"


def test_a_new_entry_is_used_not_replaced(monkeypatch):
    """The contributor's path: one table entry. The reference computes *its* f (no fall-through to another
    variant's formula); a backend that does not declare it refuses it; 'auto' runs it on one that does."""
    cube = variants.Variant("abs_cubed", f=lambda s, p: s.abs() ** 3,
                            log_f=lambda s, p: 3 * variants._safe_log(s.abs()), description="|s|^3 (test)")
    table = dict(VARIANT_TABLE, abs_cubed=cube)
    monkeypatch.setattr(variants, "VARIANT_TABLE", table)
    monkeypatch.setattr(variants, "VARIANTS", tuple(table))
    from expressive_attention.ops import reference

    monkeypatch.setattr(reference, "VARIANT_TABLE", table)
    q, k, v = make(1, 1, 1, 70, 70, 8, 8, torch.float64)
    out = expressive_attention(q, k, v, variant="abs_cubed", backend="reference")
    want = expressive_attention(q, k, v, variant="power", power=3.0, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    for name in ("blocked", "fused_cpu"):
        with pytest.raises(ValueError, match="'abs_cubed' is not implemented"):
            expressive_attention(q, k, v, variant="abs_cubed", backend=name)
    torch.testing.assert_close(expressive_attention(q, k, v, variant="abs_cubed"), out)


def test_variant_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        VARIANT_TABLE["saturating"].paper = False
    with pytest.raises(ValueError, match="exp-type"):
        variants.Variant("x", f=lambda s, p: s, log_f=lambda s, p: s, description="", exponent=lambda s: s)
