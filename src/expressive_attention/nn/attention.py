"""Multi-head attention with one switch between expressive attention and dot-product attention."""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import KINDS, VARIANTS, BACKENDS, attention
from ..ops.problem import check_finite_float
from ..ops.reference import resolve_power


def check_positive_int(name: str, n) -> None:
    """`n` is an integer >= 1 (not a bool, not a float such as 11.5 or 12.0), else a ValueError naming it."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), rotating pairs (i, i + E/2) of each head's features."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        # x (B, H, T, E), positions (T,)
        angles = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]  # (T, E/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class MultiheadAttention(nn.Module):
    """Self- or cross-attention; `kind="ea"|"dpa"` selects the weights, nothing else differs.

    forward(x (B, T, C), context (B, S, C) | None) -> (B, T, C). With `context`, keys and values come
    from it (cross-attention); otherwise from x. GQA when n_kv_heads < n_heads.

    Options for both mechanisms (off by default; off adds no parameters and changes nothing):
    ``qk_norm`` RMS-normalises each head's q and k (learned per-feature weight, as in Qwen3) before
    RoPE; ``learn_scale`` multiplies each head's scores by a learned gain exp(g_h) (g_h = 0 at init):
    a temperature for DPA, a sharpness for EA's "saturating" / "exp_squared" (the "power" variant
    is scale-invariant, so the gain does nothing there). ``power`` is the degree of variant="power".

    Levers of issue #21 (off by default; off changes nothing, bit for bit):
    ``gain_init`` the initial log gain g_h of ``learn_scale`` (default 0: the plain scale); e.g.
    variant="exp_squared" with ``gain_init = 0.5 ln 0.1`` (about -1.1513) is exp(beta_h s^2) with a
    learned per-head sharpness beta_h = exp(2 g_h) starting at beta = 0.1, EA's flat end.
    ``n_ea_heads`` (kind="ea" only): a hybrid layer whose first ``n_ea_heads`` query heads use EA
    (``variant``) and the rest softmax (SDPA); a multiple of the GQA group size n_heads // n_kv_heads,
    so the key/value heads split with them (None: every head uses ``kind``).
    ``forget_gate`` a data-dependent forget gate (Forgetting Transformer, arXiv 2503.02130) for EA
    and DPA alike: log_fgate = logsigmoid(W x_t + b), one gate per head from the layer input x
    (``fgate_proj``, a Linear(d_model, n_heads) with bias; initialised as the other Linears of a
    model, i.e. bias 0, as in FoX's reference code, unless ``gate_bias_init`` says otherwise); weights f(s_ij) D_ij with
    D_ij = prod_{t=j+1..i} sigmoid(W x_t + b) (see `ops.expressive_attention`). Self-attention only;
    not with a decoding cache (generate with cache=None).
    ``gate_bias_init`` the forget gate's initial bias b (default 0: every step multiplies the past's
    weight by sigmoid(0) = 1/2 at init, a half-life of one token); e.g. 4 gives sigmoid(4) = 0.982 per step,
    a half-life of ~38 tokens (xLSTM initialises its forget gates at 3-6).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        kind: str = "ea",
        variant: str = "saturating",
        eps: float = 1e-6,
        backend: str = "auto",
        dropout: float = 0.0,
        bias: bool = False,
        rope: RotaryEmbedding | None = None,
        power: float | None = None,
        qk_norm: bool = False,
        learn_scale: bool = False,
        gain_init: float = 0.0,
        n_ea_heads: int | None = None,
        forget_gate: bool = False,
        gate_bias_init: float = 0.0,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, n in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            check_positive_int(name, n)
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if kind == "dpa" and power is not None:
            raise ValueError(f"power={power!r} applies to kind='ea' (variant='power') only")
        power = resolve_power(variant, power) if kind == "ea" else None
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        check_levers(n_heads, n_kv_heads, kind, n_ea_heads, learn_scale, gain_init, forget_gate, gate_bias_init)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, d_model // n_heads
        self.kind, self.variant, self.eps, self.backend = kind, variant, eps, backend
        self.power = power
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.rope = rope
        if qk_norm:  # (Qwen3-style) per-head RMSNorm of q and k
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        if learn_scale:  # per-head log gain of the scores, 0 = the default scale
            self.log_gain = nn.Parameter(torch.full((n_heads,), float(gain_init)))
        self.qk_norm, self.learn_scale = bool(qk_norm), bool(learn_scale)
        self.gain_init = float(gain_init)
        self.n_ea_heads = None if n_ea_heads is None else int(n_ea_heads)
        self.forget_gate = bool(forget_gate)
        self.gate_bias_init = float(gate_bias_init)
        if forget_gate:  # per-head forget gate logits from the layer input
            self.fgate_proj = nn.Linear(d_model, n_heads, bias=True)
            self.reset_gate_bias()

    def reset_gate_bias(self) -> None:
        """The forget gate's bias at its initial value ``gate_bias_init`` (a model's weight init calls it
        after zeroing every Linear's bias)."""
        nn.init.constant_(self.fgate_proj.bias, self.gate_bias_init)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask=None, is_causal: bool = False,
               log_fgate: Tensor | None = None) -> Tensor:
        """The configured mechanism on (B, H, L, E) / (B, Hkv, S, E) tensors (``log_fgate`` (B, H, L):
        the forget gate's per-step log gates, or None)."""
        m = self.n_ea_heads
        if m is None or self.kind != "ea":
            return self._attend(q, k, v, attn_mask, is_causal, log_fgate, self.kind)
        if m in (0, self.n_heads):  # one mechanism for every head
            return self._attend(q, k, v, attn_mask, is_causal, log_fgate, "ea" if m else "dpa")
        mk = m // (self.n_heads // self.n_kv_heads)  # key/value heads of the EA part
        mask_ea = mask_dpa = attn_mask
        if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] == self.n_heads:
            mask_ea, mask_dpa = attn_mask[..., :m, :, :], attn_mask[..., m:, :, :]
        g_ea = g_dpa = None
        if log_fgate is not None:
            g_ea, g_dpa = log_fgate[..., :m, :], log_fgate[..., m:, :]
        ea = self._attend(q[:, :m], k[:, :mk], v[:, :mk], mask_ea, is_causal, g_ea, "ea")
        dpa = self._attend(q[:, m:], k[:, mk:], v[:, mk:], mask_dpa, is_causal, g_dpa, "dpa")
        return torch.cat([ea, dpa], dim=1)

    def _attend(self, q, k, v, attn_mask, is_causal, log_fgate, kind: str) -> Tensor:
        extra = {}
        if kind == "ea":
            extra = dict(variant=self.variant, eps=self.eps, backend=self.backend, power=self.power)
        if log_fgate is not None:
            extra["log_fgate"] = log_fgate
        return attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1], kind=kind, **extra,
        )

    def weights(self, q: Tensor, k: Tensor, log_fgate: Tensor | None = None) -> Tensor:
        """The causal attention weights (B, H, T, T) this layer gives q (B, H, T, E) and k (B, Hkv, T, E):
        its own `attend` (kind, head split, forget gate, backend) on one-hot values, so A @ I = A."""
        B, Hkv, T, _ = k.shape
        eye = torch.eye(T, dtype=q.dtype, device=q.device).expand(B, Hkv, T, T)
        return self.attend(q, k, eye, is_causal=True, log_fgate=log_fgate)

    def log_fgate(self, x: Tensor) -> Tensor:
        """The forget gate's per-step log gates (B, H, T) for the layer input x (B, T, C), in float32
        (float64 for a float64 model)."""
        logits = self.fgate_proj(x)
        ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return F.logsigmoid(logits.to(ct)).transpose(1, 2)

    def qkv(self, x: Tensor, context: Tensor | None = None, positions: Tensor | None = None):
        """Projections into heads, RoPE applied: q (B, H, T, E), k and v (B, Hkv, S, E); keys and
        values from `context` (B, S, C) when given, else from x (B, T, C). For analysis (e.g. a
        forward pre-hook that wants the layer's q and k) and for `forward`."""
        for name, t in (("x", x), ("context", context)):
            if t is not None and (t.dim() != 3 or t.shape[-1] != self.d_model):
                raise ValueError(f"{name} must be (B, T, d_model={self.d_model}), got shape {tuple(t.shape)}")
        B, T, C = x.shape
        src = x if context is None else context
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(src).view(B, src.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(src).view(B, src.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.learn_scale:  # scores scale with q: s_h = exp(g_h) * scale * q.k
            q = q * self.log_gain.exp().to(q.dtype)[:, None, None]
        if self.rope is not None:
            if context is not None:
                raise ValueError("RoPE applies to self-attention only; pass rope=None for cross-attention")
            if positions is None:
                positions = torch.arange(T, device=x.device)
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache=None,
        positions: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.qkv(x, context, positions)  # (checks x and context first)
        B, T, C = x.shape
        log_fgate = None
        if self.forget_gate:
            if context is not None:
                raise ValueError("forget_gate applies to self-attention only (got a context for cross-attention)")
            if cache is not None:
                raise ValueError("forget_gate does not support a decoding cache; generate with cache=None")
            log_fgate = self.log_fgate(x)
        if cache is not None:
            if attn_mask is not None or context is not None:
                raise ValueError("a decoding cache supports causal self-attention only (no attn_mask/context)")
            y = cache.attend(q, k, v, self.attend)
        else:
            y = self.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal, log_fgate=log_fgate)  # (B, H, T, E)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


def check_levers(n_heads: int, n_kv_heads: int, kind: str, n_ea_heads, learn_scale: bool, gain_init,
                 forget_gate: bool = False, gate_bias_init=0.0) -> None:
    """The options of issue #21 for one layer: ``n_ea_heads`` (None, or 0..n_heads, kind="ea", a
    multiple of the GQA group size), ``gain_init`` (finite; not 0 only with ``learn_scale``) and
    ``gate_bias_init`` (finite; not 0 only with ``forget_gate``)."""
    if n_ea_heads is not None:
        if isinstance(n_ea_heads, bool) or not isinstance(n_ea_heads, int):
            raise ValueError(f"n_ea_heads must be None or an int, got {n_ea_heads!r}")
        if kind != "ea":
            raise ValueError(f"n_ea_heads applies to kind='ea' (the EA heads of a hybrid layer), got kind={kind!r}")
        if not 0 <= n_ea_heads <= n_heads:
            raise ValueError(f"n_ea_heads must be in [0, n_heads={n_heads}], got {n_ea_heads}")
        group = n_heads // n_kv_heads
        if n_ea_heads % group:
            raise ValueError(
                f"n_ea_heads ({n_ea_heads}) must be a multiple of the GQA group size n_heads // n_kv_heads = "
                f"{group}, so that the key/value heads split between EA and softmax with their query heads")
    check_finite_float("gain_init", gain_init)
    check_finite_float("gate_bias_init", gate_bias_init)
    if gate_bias_init != 0 and not forget_gate:
        raise ValueError(f"gate_bias_init={gate_bias_init!r} is the initial bias of forget_gate=True; "
                         "it does nothing without it")
    if gain_init != 0 and not learn_scale:
        raise ValueError(f"gain_init={gain_init!r} is the initial log gain of learn_scale=True; "
                         "it does nothing without it")


def weights_of_call(module: MultiheadAttention, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, causal weights) of a forward call of `module` with these arguments (detached; the weights
    as `module.weights` gives them, forget gate included): for a forward pre-hook registered with
    `with_kwargs=True` on a causal self-attention call."""
    bound = dict(zip(("x", "context"), args), **kwargs)
    with torch.no_grad():
        q, k, _ = module.qkv(bound["x"], bound.get("context"), bound.get("positions"))
        log_fgate = module.log_fgate(bound["x"]) if module.forget_gate else None
        return q.detach(), k.detach(), module.weights(q, k, log_fgate)
