"""Full boolean masks that are exactly causal (+ key padding) or exactly key padding run on the linear
form (values and gradients against the reference); near misses never do; "auto" picks the linear form
for such masks only when the call is long enough, and inspects the mask only then."""
import dataclasses

import pytest
import torch
from torch.func import grad, vmap
from attention_inputs import assert_matches, make_qkv

from expressive_attention import expressive_attention
from expressive_attention.nn import MultiheadAttention
from expressive_attention.ops import choose_backend, dispatch, linear, mask_patterns
from expressive_attention.ops.linear import mask_form
from expressive_attention.ops.mask_patterns import key_padding_of
from expressive_attention.ops.problem import normalise


def causal_padding_mask(B, L, lengths, left=False, heads=1):
    """(B, heads, L, L): causal AND key padding (right padding: keys >= length; left: keys < L - length)."""
    j = torch.arange(L)
    keep = torch.stack([(j >= L - n) if left else (j < n) for n in lengths])  # (B, L)
    return torch.ones(L, L, dtype=torch.bool).tril() & keep[:, None, None, :].expand(B, heads, 1, L)


def run(q, k, v, mask, backend):
    return expressive_attention(q, k, v, attn_mask=mask, variant="squared", backend=backend,
                                enable_gqa=q.shape[1] != k.shape[1])


POSITIVES = {
    "causal 2-D": lambda B, L: torch.ones(L, L, dtype=torch.bool).tril(),
    "causal + right padding": lambda B, L: causal_padding_mask(B, L, [L, L - 7]),
    "causal + left padding (HF)": lambda B, L: causal_padding_mask(B, L, [L - 5, L - 20], left=True),
    "causal + padding per head": lambda B, L: causal_padding_mask(B, L, [L - 3, L], heads=4)
    & (torch.rand(1, 4, 1, L, generator=torch.Generator().manual_seed(4)) > 0.2),
}


@pytest.mark.parametrize("name", POSITIVES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_causal_plus_padding_masks_run_on_the_linear_form(name, H, Hkv):
    B, L = 2, 70
    q, k, v = make_qkv(B, H, Hkv, L, L, 5, 3, seed=1)
    mask = POSITIVES[name](B, L)
    p = normalise(q, k, v, mask, 0.0, False, None, H != Hkv, "squared", 1e-6)
    causal, keep = mask_form(p)
    assert causal and keep.shape[-1] == L
    out = run(q, k, v, mask, "linear")
    assert torch.isfinite(out).all()
    assert_matches(out, run(q, k, v, mask, "reference"), (q, k, v), 1e-10, 1e-8)


def test_left_padded_rows_attend_to_nothing():
    q, k, v = make_qkv(2, 2, 2, 40, 40, 4, 3)
    mask = causal_padding_mask(2, 40, [30, 40], left=True)  # batch 0: rows 0..9 see no key
    out = run(q, k, v, mask, "linear")
    assert (out[0, :, :10] == 0).all() and (out[0, :, 10:] != 0).any()


@pytest.mark.parametrize("L,S", [(30, 30), (12, 50)])
def test_key_padding_repeated_over_rows_runs_bidirectional(L, S):
    """An encoder's (B, 1, L, S) padding mask (every row the same) is the bidirectional form."""
    q, k, v = make_qkv(2, 2, 2, L, S, 6, 4, seed=3)
    keep = torch.rand(2, 1, 1, S, generator=torch.Generator().manual_seed(0)) > 0.3
    mask = keep.expand(2, 1, L, S).clone()
    p = normalise(q, k, v, mask, 0.0, False, None, False, "squared", 1e-6)
    assert mask_form(p)[0] is False
    assert_matches(run(q, k, v, mask, "linear"), run(q, k, v, mask, "reference"), (q, k, v), 1e-10, 1e-8)


def near_misses(L):
    """Masks that differ from causal(+padding) in a way that changes the attention."""
    tril = torch.ones(L, L, dtype=torch.bool).tril()
    pad = causal_padding_mask(1, L, [L - 6])[0, 0]
    out = {}
    m = tril.clone(); m[3, 9] = True; out["one entry above the diagonal"] = m  # noqa: E702
    m = tril.clone(); m[L - 2, 4] = False; out["one entry removed below it"] = m  # noqa: E702
    m = pad.clone(); m[L - 2, L - 3] = True; out["one padded key visible to one row"] = m  # noqa: E702
    out["diagonal shifted down"] = torch.ones(L, L, dtype=torch.bool).tril(-1)
    out["diagonal shifted up"] = torch.ones(L, L, dtype=torch.bool).tril(1)
    out["padding on queries only"] = tril & (torch.arange(L) < L - 6)[:, None]
    out["anti-causal"] = tril.T.clone()
    m = pad.clone(); m[:, 0] = False; m[L - 1, 0] = True; out["padding not the last row's"] = m  # noqa: E702
    return out


@pytest.mark.parametrize("name", list(near_misses(40)))
def test_near_misses_are_never_the_linear_form(name):
    L = 40
    mask = near_misses(L)[name]
    assert key_padding_of(mask[None, None], causal=True) is None
    assert key_padding_of(mask[None, None], causal=False) is None
    q, k, v = make_qkv(1, 2, 2, L, L, 4, 3)
    with pytest.raises(ValueError, match="neither"):
        run(q, k, v, mask, "linear")
    # and the other backends give the reference's answer for it (nothing was rewritten)
    torch.testing.assert_close(run(q, k, v, mask, "auto"), run(q, k, v, mask, "reference"))


def test_bottom_right_aligned_causal_is_not_recognised():
    """L < S with the causal diagonal at the bottom right (decoding with a cache): not the top-left
    causal the linear form runs, and not key padding."""
    L, S = 5, 12
    mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)[None, None]
    assert key_padding_of(mask, causal=True) is None and key_padding_of(mask, causal=False) is None


def test_mask_check_works_in_row_blocks(monkeypatch):
    """The check runs in blocks of rows: a difference in a late block is still found."""
    monkeypatch.setattr(mask_patterns, "ROWS", 16)
    L = 100
    good = causal_padding_mask(2, L, [L, 70])
    assert torch.equal(key_padding_of(good, causal=True), good[:, :, -1])
    bad = good.clone()
    bad[1, 0, 90, 75] = True  # a padded key, in the last block
    assert key_padding_of(bad, causal=True) is None


def _problem(mask, L, E=16, requires_grad=False):
    q = torch.zeros(1, 1, L, E, requires_grad=requires_grad)
    return normalise(q, q, q, mask, 0.0, False, None, False, "squared", 1e-6)


def test_auto_picks_linear_for_long_masked_calls_only():
    L = int(linear.crossover_length(16, train=False)) + 64
    mask = causal_padding_mask(1, L, [L - 100])
    assert choose_backend(_problem(mask, L)).name == "linear"
    bad = mask.clone()
    bad[0, 0, 10, 11] = True
    assert choose_backend(_problem(bad, L)).name != "linear"
    assert choose_backend(_problem(torch.ones(L, L, dtype=torch.bool).tril(1), L)).name != "linear"


def test_auto_does_not_inspect_the_mask_of_short_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(linear, "key_padding_of", lambda *a, **kw: calls.append(1))
    L = 256
    assert choose_backend(_problem(torch.ones(L, L, dtype=torch.bool).tril(), L)).name != "linear"
    assert calls == []


def test_mask_is_checked_once_per_call(monkeypatch):
    calls = []
    real = linear.key_padding_of
    monkeypatch.setattr(linear, "key_padding_of", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    L = int(linear.crossover_length(16, train=False)) + 64
    p = _problem(torch.ones(L, L, dtype=torch.bool).tril(), L)
    assert choose_backend(p).name == "linear"
    dispatch.run_backend("auto", p)
    assert calls == [1]  # the causal pattern matched at the first try, and the result was kept


def test_multihead_attention_with_a_causal_mask_gets_the_linear_form(monkeypatch):
    used = []
    lin = dispatch.BACKENDS["linear"]
    monkeypatch.setitem(dispatch.BACKENDS, "linear",
                        dataclasses.replace(lin, run=lambda p: used.append(p.q.shape) or lin.run(p)))
    E, H = 16, 2
    L = int(linear.crossover_length(E, train=False)) + 10
    torch.manual_seed(0)
    mha = MultiheadAttention(E * H, H, kind="ea", variant="squared").eval()
    x = torch.randn(2, L, E * H)
    with torch.no_grad():
        got = mha(x, attn_mask=torch.ones(L, L, dtype=torch.bool).tril())
        assert used, "auto did not run the linear backend"
        want = mha(x, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_torch_func_grad_with_a_causal_mask_and_vmap_refusal():
    """grad through a recognised causal mask equals autograd; under vmap a per-sample (batched) mask
    cannot be inspected without a data-dependent branch, so the linear backend refuses it (and "auto"
    runs another backend, with the same result)."""
    q, k, v = make_qkv(1, 2, 2, 30, 30, 4, 3, requires_grad=False)
    mask = causal_padding_mask(1, 30, [25])

    def loss(q, k, v, m, backend):
        return run(q, k, v, m, backend).square().sum()

    got = grad(loss, argnums=(0, 1, 2))(q, k, v, mask, "linear")
    want = grad(loss, argnums=(0, 1, 2))(q, k, v, mask, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    qs, ks, vs = (t.expand(3, *t.shape) for t in (q, k, v))
    masks = mask.expand(3, *mask.shape)
    with pytest.raises(ValueError, match="neither"):
        vmap(lambda q, k, v, m: run(q, k, v, m, "linear"))(qs, ks, vs, masks)
    torch.testing.assert_close(vmap(lambda q, k, v, m: run(q, k, v, m, "auto"))(qs, ks, vs, masks),
                               vmap(lambda q, k, v, m: run(q, k, v, m, "reference"))(qs, ks, vs, masks))


@pytest.mark.parametrize("masking", ["causal", "keypad"])
def test_masked_inf_key_does_not_poison_other_rows(masking):
    # found by the fuzzer (#24): a masked key was zeroed by k * keep and a later key inside a causal chunk
    # by f * tril, both inf * 0 = NaN for an inf key; every row that does not see it must stay finite
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 6, 3, generator=g) for _ in range(3))
    k[0, 0, 3, 0] = float("inf")
    if masking == "causal":
        kw, clean = {"is_causal": True}, slice(0, 3)
    else:
        kw, clean = {"attn_mask": (torch.arange(6) != 3)[None, None, None]}, slice(0, 6)
    out = expressive_attention(q, k, v, variant="squared", backend="linear", **kw)
    ref = expressive_attention(q.double(), k.double(), v.double(), variant="squared", backend="reference", **kw)
    assert torch.isfinite(out[..., clean, :]).all()
    torch.testing.assert_close(out[..., clean, :].double(), ref[..., clean, :], atol=1e-5, rtol=1e-5)
