"""Why does a weight function train well or badly? Per-layer attention statistics of a Hugging Face
model, measured on real inputs, for SDPA and every EA variant alike.

    with probe_attention("expressive") as calls:      # the implementation name the model uses
        model(input_ids=x)
    stats = summarise(calls)                           # one dict per layer

`probe_attention` wraps the named function in transformers' global attention table for the
duration of the block (nothing is stored on the model): each call records the scores
s = scaling * q.k (causal / mask-allowed pairs) and the weights the mechanism gives them. Per
layer, `summarise` reports:

- the distribution of |s| (median, 90th / 99th percentile, max);
- ``top_weight``: the weight of the strongest key, mean over query rows with at least ``min_keys``
  keys (rows late in the window, where retrieval matters);
- ``entropy`` of each row's weights, normalised to sum 1 (nats; ``log_keys`` = a uniform row's);
- ``mass``: the mean row sum of the weights (1 for softmax; EA's eps takes a share, and with it
  the attention output shrinks, when sum_l f(s_il) is not >> eps, e.g. tiny scores at init);
- ``gain``: the learned per-head score gains, for implementations that learn one;
- ``top_weight_if``: the top-key weight the *same scores* would get under each weight function
  (softmax and the EA variants). This separates the two explanations of a weak top weight: scores
  that do not single out a key, or a weight function with too little contrast.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ..ops.reference import gated_score_weights, log_decay, score_weights
from ..ops.variants import default_instances

# the weight functions compared on the same scores: name -> (variant, power) or None for softmax; every
# variant of the table at its default parameters ("saturating", "squared", "power4", "exp_squared", ...)
COUNTERFACTUALS = {"softmax": None, **default_instances()}


def weights_of(s: Tensor, keep: Tensor, mechanism, log_d: Tensor | None = None) -> Tensor:
    """Weights (..., L, S) of scores s under ``mechanism`` (None = softmax, else (variant, power));
    ``log_d`` (broadcastable to s): a forget gate's log decay, or None."""
    if mechanism is None:
        x = s if log_d is None else s + log_d
        a = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.nan_to_num(a, nan=0.0)  # rows with no key
    variant, power = mechanism
    if log_d is not None:
        return gated_score_weights(s, keep, log_d, variant=variant, power=power)
    return score_weights(s, keep, variant=variant, power=power)


def _weights_of_call(module, s: Tensor, keep: Tensor, mechanism, spec, hkv: int) -> Tensor:
    """The weights a registered implementation (``spec``; None for "sdpa") gives scores s in this
    call: with its forget gate and, for a hybrid one, this layer's kind and head split."""
    if spec is None or not (spec.forget_gate or spec.hybrid):
        return weights_of(s, keep, mechanism)
    from ..integrations.transformers import layer_split, stored_log_fgate

    log_d = None
    if spec.forget_gate:
        log_d = log_decay(stored_log_fgate(module).to(s.dtype))
    kind, m = layer_split(module, spec, s.shape[1], hkv)
    if kind == "dpa":
        return weights_of(s, keep, None, log_d)
    if m is None:
        return weights_of(s, keep, mechanism, log_d)
    ld_ea = ld_dpa = None
    if log_d is not None:
        ld_ea, ld_dpa = log_d[:, :m], log_d[:, m:]
    return torch.cat([weights_of(s[:, :m], keep[:, :m], mechanism, ld_ea),
                      weights_of(s[:, m:], keep[:, m:], None, ld_dpa)], dim=1)


def _mechanism_of(name: str):
    """(weight function for `weights_of`, learns a score gain?, the registered Spec or None) of an
    attention implementation name."""
    if name == "sdpa":
        return None, False, None
    from ..integrations.transformers import registered

    spec = registered()[name]
    return (None if spec.kind == "dpa" else (spec.variant, spec.power)), spec.learn_scale, spec


@contextlib.contextmanager
def probe_attention(name: str, max_calls: int = 10_000):
    """Record (layer, scores, keep mask, weights) of every call of attention implementation ``name``
    made inside the block; yields the list the records are appended to. The model's output is
    unchanged (the wrapped function still computes it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mechanism, gained, spec = _mechanism_of(name)
    table = ALL_ATTENTION_FUNCTIONS
    had_local = name in table._local_mapping
    original = table[name]
    calls: list[dict] = []

    def probed(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        if len(calls) < max_calls:
            with torch.no_grad():
                g = query.shape[1] // key.shape[1]
                k = key.repeat_interleave(g, dim=1) if g > 1 else key
                scale = query.shape[-1] ** -0.5 if scaling is None else scaling
                s = scale * (query.float() @ k.float().transpose(-1, -2))  # (B, H, L, S)
                gain = None
                if gained:  # the learned per-head gain the implementation applies to the scores
                    from ..integrations.transformers import GAIN_PARAMETER

                    gain = getattr(module, GAIN_PARAMETER).detach().float().exp()
                    s = s * gain[:, None, None]
                L, S = s.shape[-2:]
                if attention_mask is None:
                    keep = torch.ones(L, S, dtype=torch.bool, device=s.device).tril().expand_as(s)
                elif attention_mask.dtype == torch.bool:
                    keep = attention_mask[..., :S].expand_as(s)
                else:
                    keep = (attention_mask[..., :S] == 0).expand_as(s)
                calls.append(dict(layer=getattr(module, "layer_idx", len(calls)), s=s, keep=keep,
                                  a=_weights_of_call(module, s, keep, mechanism, spec, key.shape[1]), gain=gain))
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kw)

    table[name] = probed
    try:
        yield calls
    finally:
        if had_local:
            table[name] = original
        else:
            del table[name]


def _quantiles(x: Tensor, qs=(0.5, 0.9, 0.99)) -> list[float]:
    x = x.flatten().float()
    if x.numel() > 1_000_000:  # torch.quantile's size limit; a strided sample is plenty
        x = x[:: x.numel() // 1_000_000 + 1]
    return [float(v) for v in torch.quantile(x, torch.tensor(qs))]


def row_stats(a: Tensor, keep: Tensor, min_keys: int) -> dict:
    """top-key weight and entropy of the rows of ``a`` with at least ``min_keys`` allowed keys."""
    n = keep.sum(-1)  # (..., L)
    rows = n >= min_keys
    if not bool(rows.any()):
        return dict(top_weight=float("nan"), entropy=float("nan"), log_keys=float("nan"), mass=float("nan"))
    a, mass = a[rows], a.sum(-1)[rows]  # (R, S), (R,)
    top = a.amax(-1)
    pn = a / mass.clamp_min(1e-30)[:, None]  # the row as a distribution (EA's eps share removed)
    ent = -(pn * torch.log(pn.clamp_min(1e-30))).sum(-1)
    return dict(top_weight=float(top.mean()), entropy=float(ent.mean()),
                log_keys=float(torch.log(n[rows].float()).mean()), mass=float(mass.mean()))


def summarise(calls: list[dict], min_keys: int | None = None) -> list[dict]:
    """One dict per layer (sorted by layer) from `probe_attention`'s records; several calls of one
    layer (several batches) are pooled. ``min_keys`` defaults to half the key length."""
    by_layer: dict[int, list[dict]] = {}
    for c in calls:
        by_layer.setdefault(int(c["layer"]), []).append(c)
    out = []
    for layer in sorted(by_layer):
        cs = by_layer[layer]
        s = torch.cat([c["s"].flatten(0, 1) for c in cs])  # (N, L, S)
        keep = torch.cat([c["keep"].flatten(0, 1) for c in cs])
        a = torch.cat([c["a"].flatten(0, 1) for c in cs])
        mk = min_keys if min_keys is not None else max(1, s.shape[-1] // 2)
        abs_s = s.abs()[keep]
        med, p90, p99 = _quantiles(abs_s)
        rec = dict(layer=layer, abs_s_median=med, abs_s_p90=p90, abs_s_p99=p99, abs_s_max=float(abs_s.max()),
                   **row_stats(a, keep, mk), min_keys=mk)
        if cs[0].get("gain") is not None:
            rec["gain"] = [round(float(g), 4) for g in cs[0]["gain"]]
        rec["top_weight_if"] = {name: row_stats(weights_of(s, keep, m), keep, mk)["top_weight"]
                                for name, m in COUNTERFACTUALS.items()}
        out.append(rec)
    return out


@torch.no_grad()
def attention_stats(model, impl: str, windows: Tensor, batch_size: int = 16) -> list[dict]:
    """Per-layer statistics of ``model`` (attention implementation ``impl``) on ``windows`` (N, T)."""
    was = model.training
    model.eval()
    try:
        with probe_attention(impl) as calls:
            for i in range(0, len(windows), batch_size):
                model(input_ids=windows[i : i + batch_size], use_cache=False)
    finally:
        model.train(was)
    return summarise(calls)


def format_stats(stats: list[dict]) -> str:
    """A compact one-line-per-layer text form (for logs)."""
    return "\n".join(
        f"layer {r['layer']}: |s| median {r['abs_s_median']:.3g} p99 {r['abs_s_p99']:.3g} max {r['abs_s_max']:.3g}; "
        f"top weight {r['top_weight']:.3f}; entropy {r['entropy']:.2f} / {r['log_keys']:.2f} nats"
        for r in stats if not math.isnan(r["top_weight"]))
