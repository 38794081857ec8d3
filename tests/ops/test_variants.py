"""The higher-contrast members of the EA family (variant="power", "exp_squared") and the options for
both mechanisms (qk_norm, learn_scale): definition, backends against the reference, masks, empty
rows, bf16 range, backends that refuse, and "off changes nothing"."""
import math

import pytest
import torch
from attention_inputs import make_qkv as make

from expressive_attention import attention, expressive_attention
from expressive_attention.nn import DecoderLM, LMConfig, MultiheadAttention
from expressive_attention.ops import BACKENDS, choose_backend, expressive_weights, score_fn
from expressive_attention.ops.problem import normalise
from expressive_attention.ops.reference import DEFAULT_POWER, score_weights

NEW = [("power", None), ("power", 3.0), ("power", 8.0), ("exp_squared", None)]


def loop_weights(q, k, keep, scale, variant, power, eps):
    """The definition written out with Python floats (no rescaling tricks): a (L, S)."""
    L, S = q.shape[0], k.shape[0]
    out = [[0.0] * S for _ in range(L)]
    for i in range(L):
        f = [0.0] * S
        for j in range(S):
            if keep[i][j]:
                s = scale * float(q[i] @ k[j])
                f[j] = abs(s) ** power if variant == "power" else math.exp(s * s)
        z = eps + sum(f)
        out[i] = [x / z if z > 0 else 0.0 for x in f]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("variant,power", NEW)
def test_reference_is_the_written_definition(variant, power):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    keep = torch.rand(6, 7, generator=g) > 0.3
    keep[2] = False  # an empty row
    got = expressive_weights(q, k, keep, scale=0.6, variant=variant, power=power, eps=1e-3)
    p = DEFAULT_POWER if power is None else power
    want = loop_weights(q, k, keep.tolist(), 0.6, variant, p, 1e-3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert torch.equal(got[2], torch.zeros(7, dtype=torch.float64))


def test_power_two_is_squared_and_even_geometry():
    q, k, v = make(2, 3, 3, 20, 20, 8, 8, torch.float64)
    a = expressive_attention(q, k, v, is_causal=True, variant="power", power=2, backend="reference")
    b = expressive_attention(q, k, v, is_causal=True, variant="squared", backend="reference")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # even in s: a key and its negation get the same weight; an orthogonal key gets (almost) none
    qq = torch.tensor([[1.0, 0.0]])
    kk = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    for variant in ("power", "exp_squared"):
        w = expressive_weights(qq, kk, variant=variant)[0]
        assert w[0] == w[1] and w[2] < w[0]


def test_higher_contrast_puts_more_weight_on_the_top_key():
    q, k, _ = make(1, 1, 1, 64, 64, 16, 16, torch.float64)
    tops = [expressive_weights(q, k, is_causal=True, variant=v, power=p).amax(-1).mean().item()
            for v, p in [("squared", None), ("power", 4), ("power", 8)]]
    assert tops[0] < tops[1] < tops[2]


@pytest.mark.parametrize("variant,power", NEW)
def test_blocked_gradients_and_several_tiles(variant, power, monkeypatch):
    from expressive_attention.ops import blocked

    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 1)  # 16-row tiles, causal key skipping
    q, k, v = make(2, 4, 2, 50, 50, 8, 6, torch.float64)
    mask = torch.rand(2, 4, 50, 50, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, :, 7] = False
    for kw in ({"is_causal": True}, {"attn_mask": mask}):
        outs = [expressive_attention(q, k, v, enable_gqa=True, variant=variant, power=power, backend=b, **kw)
                for b in ("blocked", "reference")]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-8)
        do = torch.randn_like(outs[0])
        for a, b in zip(torch.autograd.grad(outs[0], (q, k, v), do), torch.autograd.grad(outs[1], (q, k, v), do)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("variant", ["power", "exp_squared"])
def test_gradcheck(backend, variant):
    q, k, v = make(1, 2, 1, 5, 6, 4, 3, torch.float64)
    mask = torch.rand(1, 2, 5, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    for kw in ({"is_causal": True}, {"attn_mask": mask}):
        fn = lambda q, k, v: expressive_attention(q, k, v, variant=variant, enable_gqa=True, backend=backend, **kw)
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("variant,power", NEW)
def test_empty_rows_zero_and_finite_grads(backend, variant, power):
    q, k, v = make(1, 2, 2, 8, 8, 4, 4, torch.float32)
    mask = torch.ones(1, 2, 8, 8, dtype=torch.bool)
    mask[..., 3, :] = False
    for eps in (1e-6, 0.0):
        out = expressive_attention(q, k, v, attn_mask=mask, variant=variant, power=power, eps=eps, backend=backend)
        assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
    # all-zero scores (q = 0): no NaN either
    zq = torch.zeros_like(q, requires_grad=True)
    out = expressive_attention(zq, k, v, is_causal=True, variant=variant, power=power, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.isfinite(torch.autograd.grad(out.sum(), zq)[0]).all()


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("variant,power", NEW)
def test_bfloat16_scores_in_the_hundreds(backend, variant, power):
    q, k, v = make(1, 2, 2, 64, 64, 16, 16, torch.bfloat16, spread=12.0)
    s_max = (q.double() @ k.double().transpose(-1, -2)).abs().max() / 4
    assert s_max > 100  # |s|^8 ~ 1e16+, exp(s^2) ~ exp(1e4): only the rescaled form stays finite
    out = expressive_attention(q, k, v, is_causal=True, variant=variant, power=power, backend=backend)
    ref = expressive_attention(q.double(), k.double(), v.double(), is_causal=True, variant=variant,
                               power=power, backend="reference")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
    assert all(torch.isfinite(g.float()).all() for g in torch.autograd.grad(out.float().sum(), (q, k, v)))


def test_kernels_that_lack_a_variant_refuse_and_auto_falls_back():
    q, k, v = make(1, 2, 2, 128, 128, 16, 16, torch.float32)
    refusing = {"power": ("fused_cpu", "triton", "linear"), "exp_squared": ("linear",)}
    for variant, names in refusing.items():
        p = normalise(q, k, v, None, 0.0, True, None, False, variant, 1e-6)
        for name in names:
            if name in BACKENDS:
                reason = BACKENDS[name].unsupported(p)
                assert reason is not None and variant in reason
                with pytest.raises(ValueError, match=variant):
                    expressive_attention(q, k, v, is_causal=True, variant=variant, backend=name)
    assert choose_backend(normalise(q, k, v, None, 0.0, True, None, False, "power", 1e-6)).name == "blocked"


def test_auto_runs_exp_squared_on_the_fused_kernel_where_it_runs_saturating():
    from expressive_attention.ops import fused_cpu

    assert fused_cpu.is_available()
    for shape, causal in (((1, 2, 2, 128, 128, 16, 16), True), ((2, 8, 2, 1, 4096, 64, 64), False)):
        q, k, v = make(*shape, torch.float32)
        chosen = {variant: choose_backend(normalise(q, k, v, None, 0.0, causal, None, True, variant, 1e-6)).name
                  for variant in ("saturating", "exp_squared")}
        assert chosen == {"saturating": "fused_cpu", "exp_squared": "fused_cpu"}


def test_bad_power_arguments_name_the_argument():
    q, k, v = make(1, 1, 1, 4, 4, 4, 4, torch.float32)
    for kw in ({"variant": "saturating", "power": 4}, {"variant": "power", "power": 0.5},
               {"variant": "power", "power": float("nan")}, {"variant": "power", "power": "4"}):
        with pytest.raises(ValueError, match="power"):
            expressive_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="power"):
        attention(q, k, v, kind="dpa", power=4)
    with pytest.raises(ValueError, match="power"):
        MultiheadAttention(16, 2, kind="dpa", power=4)


def test_score_fn_and_weights_agree():
    s = torch.linspace(-3, 3, 13, dtype=torch.float64)[None]
    for variant, power in NEW:
        f = score_fn(s, variant, power)
        torch.testing.assert_close(score_weights(s, variant=variant, power=power, eps=0.0), f / f.sum())


# ---------------------------------------------------------------- options for both mechanisms


def _old_style_mha(mha, x):
    """What MultiheadAttention computed before the options existed (projections, attention, out)."""
    B, T, C = x.shape
    q = mha.q_proj(x).view(B, T, mha.n_heads, mha.head_dim).transpose(1, 2)
    k = mha.k_proj(x).view(B, T, mha.n_kv_heads, mha.head_dim).transpose(1, 2)
    v = mha.v_proj(x).view(B, T, mha.n_kv_heads, mha.head_dim).transpose(1, 2)
    extra = dict(variant=mha.variant) if mha.kind == "ea" else {}
    y = attention(q, k, v, is_causal=True, enable_gqa=True, kind=mha.kind, **extra)
    return mha.out_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("kind,variant", [("dpa", "saturating"), ("ea", "saturating"), ("ea", "squared")])
def test_options_off_change_nothing(kind, variant):
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4, 2, kind=kind, variant=variant)
    assert sorted(n for n, _ in mha.named_parameters()) == [
        "k_proj.weight", "out_proj.weight", "q_proj.weight", "v_proj.weight"]
    x = torch.randn(2, 40, 32)
    assert torch.equal(mha(x, is_causal=True), _old_style_mha(mha, x))
    # the model: same parameters, same initialisation, same logits with the options spelled out
    cfg = dict(vocab_size=50, context_length=40, d_model=32, n_heads=4, kind=kind, variant=variant)
    torch.manual_seed(1)
    a = DecoderLM(LMConfig(**cfg))
    torch.manual_seed(1)
    b = DecoderLM(LMConfig(**cfg, qk_norm=False, learn_scale=False))
    idx = torch.randint(0, 50, (2, 40))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert torch.equal(a(idx), b(idx))


def test_run_config_keys_unchanged_by_the_new_fields():
    from expressive_attention.experiments.train import RunConfig

    cfg = RunConfig(task="pointer", task_params={"T": 4})
    assert not {"power", "qk_norm", "learn_scale"} & set(cfg.to_dict())
    assert RunConfig.from_dict(cfg.to_dict()).key() == cfg.key()
    p = RunConfig(task="pointer", task_params={"T": 4}, variant="power", qk_norm=True)
    assert p.label == "ea-power4+qknorm" and p.to_dict()["power"] == 4.0 and p.key() != cfg.key()
    assert RunConfig.from_dict(p.to_dict()).key() == p.key()


@pytest.mark.parametrize("kind", ["dpa", "ea"])
def test_qk_norm_and_learned_gain_act_and_train(kind):
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4, 2, kind=kind, qk_norm=True, learn_scale=True)
    assert {"q_norm.weight", "k_norm.weight", "log_gain"} <= {n for n, _ in mha.named_parameters()}
    x = torch.randn(2, 24, 32)
    y0 = mha(x, is_causal=True)
    mha.log_gain.data.fill_(1.0)  # a larger gain sharpens both mechanisms: the output changes
    y1 = mha(x, is_causal=True)
    assert not torch.allclose(y0, y1)
    y1.square().sum().backward()
    assert mha.log_gain.grad.abs().sum() > 0 and mha.q_norm.weight.grad.abs().sum() > 0
    # qk_norm: the scores no longer depend on the scale of the q/k projections
    mha2 = MultiheadAttention(32, 4, 2, kind=kind, qk_norm=True)
    before = mha2(x, is_causal=True)
    mha2.q_proj.weight.data.mul_(10)
    mha2.k_proj.weight.data.mul_(0.1)
    torch.testing.assert_close(mha2(x, is_causal=True), before, atol=1e-3, rtol=1e-3)
