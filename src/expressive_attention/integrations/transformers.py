"""Expressive attention inside Hugging Face transformers models (needs the ``[hf]`` extra).

    from expressive_attention.integrations.transformers import register
    register()                                    # idempotent; registers the names below
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="expressive")
    model.set_attn_implementation("expressive_squared")   # or back to "sdpa"

Registered names (``register()``): ``"expressive"`` (f(s) = s^2/(1+s^2), the paper's EA),
``"expressive_squared"`` (f(s) = s^2), ``"expressive_power4"`` (f(s) = |s|^4) and
``"expressive_exp_squared"`` (f(s) = exp(s^2)), all with eps=1e-6.
``register("my_name", variant=..., power=..., eps=..., backend=...)`` adds more. Every model whose
attention goes through transformers' ``AttentionInterface`` then runs EA in every attention layer,
in training and in ``generate()`` with the KV cache.

A learned per-head sharpness (a gain exp(g_h) on the scores, g_h = 0 at init) for EA and for
softmax alike: ``register("ea_exp2_gain", variant="exp_squared", learn_scale=True)`` or
``register("softmax_gain", kind="dpa", learn_scale=True)``, then ``add_score_gain(model)`` once
before building the optimizer (it adds a ``score_log_gain`` parameter to each attention module).

Levers of issue #21 (for EA and softmax alike; see docs/real-text.md):
- a learned sharpness starting elsewhere than gain 1: ``add_score_gain(model, init=g)`` (g the
  initial log gain; e.g. exp_squared with g = 0.5 ln 0.1 is exp(0.1 s^2) at init);
- a forget gate (Forgetting Transformer): ``register("ea_gate", forget_gate=True)`` (or
  ``kind="dpa"`` for softmax), then ``add_forget_gate(model)`` once before building the optimizer
  (it adds an ``fgate_proj`` Linear(hidden, heads) to each attention module and a forward pre-hook
  that computes log_fgate = logsigmoid(fgate_proj(hidden_states)); training / full forwards only:
  ``use_cache=False``);
- hybrid models: ``register("ea_hybrid", hybrid=True)`` (``"expressive_hybrid"`` is registered by
  ``register()``) reads ``config.ea_layer_kinds`` (one "ea"/"dpa" per layer, or None: every
  layer EA) and ``config.n_ea_heads`` (None: every head of an EA layer uses EA; else the first
  n_ea_heads query heads use EA and the rest softmax, a multiple of the GQA group size).

How the pieces fit (transformers 5.x):
- An attention *function* is registered under the name; it receives q (B, Hq, Lq, E) and k/v
  (B, Hkv, S, E) with RoPE applied and the cache concatenated, and returns (B, Lq, Hq, E).
- A *mask* function is registered under the same name (SDPA's boolean mask builder). Without it,
  transformers builds no mask for unknown names and padded batches silently lose their padding
  mask. With it, the function gets a bool (B, 1, Lq, S) mask (True = attend) holding padding,
  causality, sliding windows and packed-sequence boundaries, or None when the mask is plain
  causal (Lq > 1, top-left aligned, exactly as SDPA reads it) or empty (one query, no padding).
- transformers dispatches on substrings of the name, so names containing ``flash``, ``sdpa``,
  ``flex``, ``eager``, ``paged`` or ``/`` are refused.
- The name is not written to config.json: pass ``attn_implementation=`` again to
  ``from_pretrained``. ``from_config`` writes the name into the config object it is given, so use
  one config object per model.
- Arguments EA cannot honour (``softcap``, attention sinks ``s_aux``/``sinks``, an additive
  ``position_bias`` or additive float mask) raise ``UnsupportedAttentionError``.
- Models whose attention does not go through the interface (with transformers 5.25: Bloom, GPT-Neo,
  MPT, XGLM; Falcon too before 5.25; detected from the installed release) would keep softmax while claiming EA: ``register()`` installs a guard so that
  asking them for an EA name raises ``UnsupportedModelError``; ``count_calls()`` / ``verify()``
  prove at run time that EA really ran.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import attention, expressive_attention, expressive_weights
from ..ops.problem import check_finite_float, check_variant, repeat_kv
from ..ops.reference import resolve_power
from ..ops.variants import DEFAULT_VARIANT, default_instances

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "expressive_attention.integrations.transformers needs Hugging Face transformers 5.x: "
        "pip install 'expressive-attention[hf]'"
    ) from e

SUPPORTED_TRANSFORMERS = ">=5.0,<6"
# name -> (variant, power): "expressive" (the paper's saturating EA), then "expressive_<label>" for every
# other variant of the table at its default parameters ("expressive_squared", "expressive_power4", ...)
DEFAULT_NAMES = {("expressive" if v == DEFAULT_VARIANT else f"expressive_{label}"): (v, p)
                 for label, (v, p) in default_instances().items()}
HYBRID_NAME = "expressive_hybrid"  # register(): saturating EA, the layer/head split read from the config
_FORBIDDEN = ("flash", "sdpa", "flex", "eager", "paged", "/", ":", "@")
# kwargs some models pass that have no meaning once softmax is replaced
_UNSUPPORTED = {
    "softcap": "logit soft-capping (tanh before softmax)",
    "s_aux": "attention sinks (an extra softmax logit per head)",
    "sinks": "attention sinks (an extra softmax logit per head)",
    "position_bias": "an additive position bias (T5 / ALiBi style) added to the logits",
}


GAIN_PARAMETER = "score_log_gain"
FGATE_MODULE = "fgate_proj"  # add_forget_gate: the gate's Linear on each attention module
_FGATE_STATE = "_ea_log_fgate"  # the pre-hook's log_fgate (B, H, L) for the call in progress
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class UnsupportedAttentionError(ValueError):
    """A model asked the EA attention function for something EA cannot honour."""


class UnsupportedModelError(ValueError):
    """A model does not route its attention through transformers' AttentionInterface."""


@dataclass(frozen=True)
class Spec:
    variant: str
    eps: float
    backend: str
    power: float | None = None  # the degree of variant="power"
    kind: str = "ea"  # "dpa": softmax (SDPA), for a like-for-like learned gain
    learn_scale: bool = False  # scores times exp(module.score_log_gain[h]) (see add_score_gain)
    forget_gate: bool = False  # weights times the forget gate's decay (see add_forget_gate)
    hybrid: bool = False  # per-layer kinds / EA heads from config.ea_layer_kinds / config.n_ea_heads


_REGISTRY: dict[str, Spec] = {}
_COUNTERS: list[Counter] = []  # active count_calls() contexts


def _check_transformers_version() -> None:
    major = int(transformers.__version__.split(".")[0])
    if major != 5:
        raise ImportError(
            f"expressive_attention.integrations.transformers supports transformers{SUPPORTED_TRANSFORMERS}, "
            f"found {transformers.__version__}"
        )


# ---------------------------------------------------------------- masks


def _bool_mask(mask: Tensor | None, S: int) -> Tensor | None:
    """A 4-D mask from transformers -> bool (True = attend), cut to the S keys, or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise UnsupportedAttentionError(
            f"attention_mask of type {type(mask).__name__} (e.g. a flex BlockMask) is not supported; "
            "the expressive implementations use boolean masks"
        )
    if mask.shape[-1] != S:  # (a view per layer and step otherwise)
        mask = mask[..., :S]
    if mask.dtype == torch.bool:
        return mask
    # An additive float mask (e.g. a custom 4-D mask): 0 = attend, very negative = masked.
    keep = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((keep | blocked).all()):
        raise UnsupportedAttentionError(
            "attention_mask holds an additive bias (values other than 0 and -inf/min): expressive "
            "attention squares the scores, so a bias cannot be added to them. Pass a boolean mask."
        )
    return keep


def _packed_without_mask(kwargs: dict) -> bool:
    cu = kwargs.get("cu_seq_lens_q")
    return cu is not None and cu.numel() > 2


# ---------------------------------------------------------------- the attention function


def _make_forward(name: str, spec: Spec):
    def expressive_attention_forward(
        module: torch.nn.Module,
        query: Tensor,  # (B, Hq, Lq, E)
        key: Tensor,  # (B, Hkv, S, E)
        value: Tensor,  # (B, Hkv, S, Ev)
        attention_mask: Tensor | None,  # bool (B, 1, Lq, S), or None
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        for arg, what in _UNSUPPORTED.items():
            if kwargs.get(arg) is not None:
                raise UnsupportedAttentionError(
                    f"{type(module).__name__} passes `{arg}` ({what}), which attn_implementation={name!r} "
                    "cannot honour: expressive attention has no softmax logits to modify"
                )
        for counter in _COUNTERS:
            counter[id(module)] += 1
        Lq, S = query.shape[2], key.shape[2]
        mask = _bool_mask(attention_mask, S)
        causal = False
        if mask is None:
            if _packed_without_mask(kwargs):
                raise UnsupportedAttentionError(
                    "packed sequences given by cu_seq_lens_* but no attention mask: pass position_ids "
                    "that restart at 0 for each sequence so transformers builds the packed mask"
                )
            # As transformers' SDPA path: None means plain causal for Lq > 1, nothing for one query.
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
            causal = causal and Lq > 1
            if causal and S > Lq:  # empty static-cache prefill: top-left causal never reaches them
                key, value = key[:, :, :Lq], value[:, :, :Lq]
        if spec.learn_scale:
            query = query * _score_gain(module, name, query.shape[1]).to(query.dtype)[:, None, None]
        if spec.forget_gate or spec.hybrid:
            log_fgate = _log_fgate(module, name, query, key) if spec.forget_gate else None
            kind, m = layer_split(module, spec, query.shape[1], key.shape[1])
            out = _attend_split(query, key, value, mask, float(dropout), causal, scaling, spec, kind, m, log_fgate)
            weights = None
            if kwargs.get("output_attentions"):
                raise UnsupportedAttentionError(f"output_attentions is not supported by {name!r} (gate / hybrid)")
            return out.transpose(1, 2).contiguous(), weights
        if spec.kind == "dpa":
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=float(dropout), is_causal=causal, scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous(), None
        out = expressive_attention(
            query, key, value, attn_mask=mask, dropout_p=float(dropout), is_causal=causal,
            scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
            variant=spec.variant, eps=spec.eps, backend=spec.backend, power=spec.power,
        )  # (B, Hq, Lq, Ev)
        weights = None
        if kwargs.get("output_attentions"):
            g = query.shape[1] // key.shape[1]
            weights = expressive_weights(
                query, repeat_kv(key, g), mask, causal, scaling, variant=spec.variant, eps=spec.eps,
                power=spec.power,
            ).to(query.dtype)
        return out.transpose(1, 2).contiguous(), weights

    expressive_attention_forward.__name__ = f"expressive_attention_forward[{name}]"
    expressive_attention_forward.spec = spec
    return expressive_attention_forward


def layer_split(module: torch.nn.Module, spec: Spec, hq: int, hkv: int) -> tuple[str, int | None]:
    """(this layer's kind, its number of EA query heads or None for all) for ``spec``: a hybrid spec
    reads ``config.ea_layer_kinds`` and ``config.n_ea_heads``; otherwise (spec.kind, None)."""
    if not spec.hybrid:
        return spec.kind, None
    config = getattr(module, "config", None)
    kinds = getattr(config, "ea_layer_kinds", None)
    kind = "ea"
    if kinds is not None:
        idx = getattr(module, "layer_idx", None)
        if idx is None or not 0 <= idx < len(kinds):
            raise UnsupportedAttentionError(
                f"config.ea_layer_kinds has {len(kinds)} entries; attention module layer_idx={idx!r} is not among them")
        kind = kinds[idx]
        if kind not in ("ea", "dpa"):
            raise UnsupportedAttentionError(f"config.ea_layer_kinds must hold 'ea' or 'dpa', got {kind!r}")
    m = getattr(config, "n_ea_heads", None)
    if kind == "dpa" or m is None or m == hq:
        return kind, None
    if not (isinstance(m, int) and 0 <= m <= hq and m % (hq // hkv) == 0):
        raise UnsupportedAttentionError(
            f"config.n_ea_heads={m!r} must be an int in [0, {hq}] and a multiple of the GQA group size {hq // hkv}")
    return kind, m


def _attend_split(query, key, value, mask, dropout, causal, scaling, spec: Spec, kind: str, m, log_fgate):
    """The layer's attention (B, Hq, L, Ev): ``kind`` for every head when ``m`` is None, else EA on
    the first ``m`` query heads (and their key/value heads) and softmax on the rest."""
    def run(q, k, v, kind, g):
        extra = {} if kind == "dpa" else dict(variant=spec.variant, eps=spec.eps, backend=spec.backend,
                                              power=spec.power)
        if g is not None:
            extra["log_fgate"] = g
        return attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling,
                         enable_gqa=q.shape[1] != k.shape[1], kind=kind, **extra)

    if m is None:
        return run(query, key, value, kind, log_fgate)
    if m == 0:
        return run(query, key, value, "dpa", log_fgate)
    mk = m // (query.shape[1] // key.shape[1])
    g_ea = g_dpa = None
    if log_fgate is not None:
        g_ea, g_dpa = log_fgate[:, :m], log_fgate[:, m:]
    ea = run(query[:, :m], key[:, :mk], value[:, :mk], "ea", g_ea)
    dpa = run(query[:, m:], key[:, mk:], value[:, mk:], "dpa", g_dpa)
    return torch.cat([ea, dpa], dim=1)


def stored_log_fgate(module: torch.nn.Module) -> Tensor | None:
    """The log forget gates (B, H, L) add_forget_gate's pre-hook stored for ``module``'s call in
    progress (None before the first call or without a gate)."""
    return getattr(module, _FGATE_STATE, None)


def _log_fgate(module: torch.nn.Module, name: str, query: Tensor, key: Tensor) -> Tensor:
    g = stored_log_fgate(module)
    if getattr(module, FGATE_MODULE, None) is None or g is None:
        raise UnsupportedAttentionError(
            f"attn_implementation={name!r} uses a forget gate: call add_forget_gate(model) first")
    if query.shape[2] != key.shape[2] or g.shape[-1] != query.shape[2]:
        raise UnsupportedAttentionError(
            f"attn_implementation={name!r} (forget gate) needs a full forward without a KV cache (use_cache=False): "
            f"got {query.shape[2]} queries against {key.shape[2]} keys")
    return g


def add_forget_gate(model: PreTrainedModel, bias_init: float = 0.0) -> int:
    """Add a forget gate (Forgetting Transformer) to every attention module of ``model``
    (idempotent); returns how many modules have one. Each gets ``fgate_proj`` = Linear(hidden_size,
    num_attention_heads) with bias (weights normal(0, config.initializer_range), bias ``bias_init``: 0 as
    FoX's reference code initialises it, i.e. 1/2 per step at init; e.g. 4: 0.982) and a forward pre-hook that stores
    log_fgate = logsigmoid(fgate_proj(hidden_states)) (float32, (B, H, L)) for the attention call;
    names registered with ``forget_gate=True`` use it. Call it before building the optimizer."""
    check_finite_float("bias_init", bias_init)
    heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    std = getattr(model.config, "initializer_range", 0.02)
    p = next(model.parameters())
    mods = _attention_modules(model)
    for m in mods:
        if getattr(m, FGATE_MODULE, None) is None:
            proj = torch.nn.Linear(hidden, heads, bias=True, device=p.device)
            torch.nn.init.normal_(proj.weight, 0.0, std)
            torch.nn.init.constant_(proj.bias, float(bias_init))
            m.add_module(FGATE_MODULE, proj)
            m.register_forward_pre_hook(_store_log_fgate, with_kwargs=True)
    return len(mods)


def _store_log_fgate(module, args, kwargs):
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    logits = getattr(module, FGATE_MODULE)(h)
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    setattr(module, _FGATE_STATE, torch.nn.functional.logsigmoid(logits.to(ct)).transpose(1, 2))


def _attention_modules(model: PreTrainedModel) -> list:
    mods = [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    if not mods:
        raise UnsupportedModelError(f"{type(model).__name__}: no attention modules with layer_idx/head_dim found")
    return mods


def _score_gain(module: torch.nn.Module, name: str, heads: int) -> Tensor:
    gain = getattr(module, GAIN_PARAMETER, None)
    if gain is None:
        raise UnsupportedAttentionError(
            f"attn_implementation={name!r} learns a per-head score gain: call add_score_gain(model) first")
    if gain.shape != (heads,):
        raise UnsupportedAttentionError(f"{GAIN_PARAMETER} has shape {tuple(gain.shape)}, expected ({heads},)")
    return gain.exp()


def add_score_gain(model: PreTrainedModel, init: float = 0.0) -> int:
    """Add a learned per-head log gain ``score_log_gain`` (num_attention_heads,), all ``init``
    (default 0: gain 1), to every attention module of ``model`` (idempotent); returns how many
    modules have one. Used by names registered with ``learn_scale=True``; call it before building
    the optimizer. E.g. ``init = 0.5 * math.log(0.1)`` with variant="exp_squared": exp(beta_h s^2)
    with a learned sharpness beta_h = exp(2 g_h) starting at 0.1."""
    check_finite_float("init", init, " (the initial log gain)")
    heads = model.config.num_attention_heads
    mods = _attention_modules(model)
    p = next(model.parameters())
    for m in mods:
        if getattr(m, GAIN_PARAMETER, None) is None:
            m.register_parameter(GAIN_PARAMETER, torch.nn.Parameter(torch.full((heads,), float(init), device=p.device)))
    return len(mods)


# ---------------------------------------------------------------- guard for old architectures


def routes_through_interface(model_or_class) -> bool:
    """True when the model class (and every PreTrainedModel inside an instance) calls its attention
    through ``ALL_ATTENTION_FUNCTIONS`` (transformers' own source heuristic)."""
    if isinstance(model_or_class, type):
        return bool(model_or_class._can_set_attn_implementation())
    return all(
        type(m)._can_set_attn_implementation()
        for m in model_or_class.modules()
        if isinstance(m, PreTrainedModel)
    )


def _not_routed_error(cls_name: str, name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{cls_name} does not route its attention through transformers' AttentionInterface, so "
        f"attn_implementation={name!r} would be ignored and the model would keep softmax attention. "
        "Expressive attention supports models written against the interface (Llama, Qwen2, "
        "Mistral, GPT-2, ...); see docs/huggingface.md."
    )


def _install_guard() -> None:
    """Make an EA name raise on model classes that would silently ignore it."""
    get_correct = PreTrainedModel.get_correct_attn_implementation
    if not getattr(get_correct, "_ea_guard", False):

        @functools.wraps(get_correct)
        def guarded_get_correct(self, requested_attention, *args, **kwargs):
            if requested_attention in _REGISTRY and not type(self)._can_set_attn_implementation():
                raise _not_routed_error(type(self).__name__, requested_attention)
            return get_correct(self, requested_attention, *args, **kwargs)

        guarded_get_correct._ea_guard = True
        PreTrainedModel.get_correct_attn_implementation = guarded_get_correct

    set_impl = PreTrainedModel.set_attn_implementation
    if not getattr(set_impl, "_ea_guard", False):

        @functools.wraps(set_impl)
        def guarded_set(self, attn_implementation, *args, **kwargs):
            names = attn_implementation.values() if isinstance(attn_implementation, dict) else [attn_implementation]
            ours = [n for n in names if isinstance(n, str) and n in _REGISTRY]
            if ours:
                for m in self.modules():
                    if isinstance(m, PreTrainedModel) and not type(m)._can_set_attn_implementation():
                        raise _not_routed_error(type(m).__name__, ours[0])
            return set_impl(self, attn_implementation, *args, **kwargs)

        guarded_set._ea_guard = True
        PreTrainedModel.set_attn_implementation = guarded_set


# ---------------------------------------------------------------- public API


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    bad = [s for s in _FORBIDDEN if s in name.lower()]
    if bad:
        raise ValueError(
            f"name={name!r} contains {bad[0]!r}: transformers dispatches on substrings of the "
            f"implementation name, so names containing any of {_FORBIDDEN} would be misrouted"
        )


def register(
    name: str | None = None, *, variant: str = "saturating", eps: float = 1e-6, backend: str = "auto",
    power: float | None = None, kind: str = "ea", learn_scale: bool = False, forget_gate: bool = False,
    hybrid: bool = False,
) -> str:
    """Register expressive attention with transformers; returns the implementation name.

    ``register()`` registers the names in ``DEFAULT_NAMES`` ("expressive" = the paper's saturating
    EA, then "expressive_<variant>" for each variant of the table: "expressive_squared",
    "expressive_power4", "expressive_exp_squared", "expressive_exp_odd"); with a name it
    registers that one with the given ``variant`` (and ``power`` for variant="power"), ``eps``
    and op ``backend``; ``kind="dpa"`` registers softmax attention instead (with ``learn_scale``,
    the like-for-like baseline of a learned EA gain); ``learn_scale=True`` multiplies each head's
    scores by a learned gain (see `add_score_gain`); ``forget_gate=True`` applies a forget gate
    (see `add_forget_gate`); ``hybrid=True`` (kind="ea") reads the per-layer kinds and the EA heads
    from the model config (``config.ea_layer_kinds``, ``config.n_ea_heads``). Calling it
    again with the same settings does nothing; the same name with other settings raises.
    """
    _check_transformers_version()
    if name is None:
        for n, (v, p) in DEFAULT_NAMES.items():
            register(n, variant=v, power=p)
        register(HYBRID_NAME, hybrid=True)
        return "expressive"
    _check_name(name)
    check_variant(variant)
    power = resolve_power(variant, power)
    if kind not in ("ea", "dpa"):
        raise ValueError(f"kind must be 'ea' or 'dpa', got {kind!r}")
    if kind == "dpa" and (variant, power, backend) != ("saturating", None, "auto"):
        raise ValueError("variant/power/backend apply to kind='ea' only")
    if kind == "dpa" and hybrid:
        raise ValueError("hybrid=True mixes EA with softmax: it needs kind='ea'")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    spec = Spec(variant, float(eps), backend, power, kind, bool(learn_scale), bool(forget_gate), bool(hybrid))
    if name in _REGISTRY:
        if _REGISTRY[name] != spec:
            raise ValueError(f"name={name!r} is already registered as {_REGISTRY[name]}, not {spec}")
        return name
    AttentionInterface.register(name, _make_forward(name, spec))
    AttentionMaskInterface.register(name, sdpa_mask)
    _REGISTRY[name] = spec
    _install_guard()
    return name


def registered() -> dict[str, Spec]:
    """The EA implementation names registered so far, with their settings."""
    return dict(_REGISTRY)


def enable(model: PreTrainedModel, name: str = "expressive") -> PreTrainedModel:
    """Switch ``model`` (in place) to expressive attention; raises on models that would ignore it."""
    if name in DEFAULT_NAMES or name == HYBRID_NAME:
        register()
    if name not in _REGISTRY:
        raise ValueError(f"{name!r} is not registered; call register({name!r}, ...) first")
    if not routes_through_interface(model):
        raise _not_routed_error(type(model).__name__, name)
    model.set_attn_implementation(name)
    return model


@contextlib.contextmanager
def count_calls():
    """Count calls of the EA attention functions: yields a Counter {id(attention module): calls}."""
    counter: Counter = Counter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


@torch.no_grad()
def verify(model: PreTrainedModel, input_ids: Tensor | None = None) -> int:
    """Run one short forward and check that EA ran in every layer; returns the number of attention
    modules that called it. Raises UnsupportedModelError when fewer than
    ``config.num_hidden_layers`` modules did (hybrid models with non-attention layers excepted)."""
    if input_ids is None:
        input_ids = torch.tensor([[1, 2, 3]], device=model.device)
    with count_calls() as counter:
        model(input_ids=input_ids)
    n = len(counter)
    expected = getattr(model.config, "num_hidden_layers", 1)
    types = getattr(model.config, "layer_types", None)
    if types:  # hybrid models: only the attention layers count
        expected = sum(t in _ATTENTION_LAYER_TYPES for t in types[:expected])
    if n == 0 or n < expected:
        raise UnsupportedModelError(
            f"{type(model).__name__} called expressive attention in {n} module(s), expected "
            f"{expected} (attn_implementation={model.config._attn_implementation!r})"
        )
    return n
