"""Recurrent decoding for EA-squared: a constant-size state per layer instead of a KV cache.

For variant="squared" the attention of token i is phi(scale q_i)^T S_i with
S_i = sum_{j<=i} phi(k_j) [v_j, 1]^T and phi(x) the packed degree-2 features ([x_a^2] ++
[sqrt2 x_a x_b, a < b], F = E (E+1) / 2 of them; see ops/linear_features.py). The state S,
(B * Hkv, F, Ev+1) per layer, replaces the keys and values of the past: a decode step costs
O(H E^2 Ev) whatever the context length. The prompt is prefilled with the chunked linear form.

    model.generate(idx, n, cache="recurrent")   # or cache="auto": chosen when smaller than a KV cache

Inference only: the state update is not differentiable here (train with backend="linear").

Accuracy: a float32 state carries the feature form's cancellation error, up to ~2.1 u R_i max|v| for
R_i = scale^2 |q_i|^2 (sum of |k_j|^2 in the state) / z_i (docs/linear.md, "Accuracy in float32"). The
linear backend recomputes such calls in float64; the cache keeps no keys to recompute from, so it tracks
sum |k_j|^2 and warns (once per layer state) when a step's R_i exceeds the backend's retry bound. A float64
model keeps a float64 state (bound u64 R); `cache="kv"` keeps the keys and is exact.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..diagnostics import warn
from ..ops.linear import (FP64_RETRY_ABOVE, add_to_state, cancellation_ratio, causal_forward, chunk_for, new_state,
                          normalise_rows, with_ones)
from ..ops.linear_features import n_features, read_num
from ..ops.reference import compute_dtype
from .cache import register_cache_kind

# On a GPU, reading the cancellation ratio back to the host syncs the device: decode steps read it once every
# this many tokens (its running maximum stays on the device meanwhile); prompts and CPU calls read it every call.
CHECK_EVERY = 32


class RecurrentEAState:
    """Per-layer decoding state of the exact linear form of EA-squared (cache kind "recurrent")."""

    def __init__(self, layer) -> None:
        if layer.kind != "ea" or layer.variant != "squared":
            raise ValueError(
                "the recurrent cache needs kind='ea' with variant='squared' (got "
                f"kind={layer.kind!r}, variant={layer.variant!r}): "
                "only the squared variant has an exact linear (recurrent) form; use cache='kv'"
            )
        if getattr(layer, "n_ea_heads", None) is not None or getattr(layer, "forget_gate", False):
            raise ValueError("the recurrent cache needs every head to use EA-squared without a forget gate "
                             "(n_ea_heads=None, forget_gate=False); use cache='kv'")
        self.scale = layer.head_dim**-0.5  # the layer calls attention with scale=None = 1/sqrt(E)
        self.eps = float(layer.eps)
        self.state: Tensor | None = None  # (B * Hkv, F, Ev+1), float32 (float64 for float64 models)
        self.key_sq: Tensor | None = None  # (B * Hkv,) sum of |k_j|^2 over the keys in a float32 state
        self.length = 0
        self._max_ratio: Tensor | None = None  # the largest cancellation ratio R_i met so far (a 0-d tensor)
        self.warned = False

    @classmethod
    def for_layer(cls, layer) -> "RecurrentEAState":
        return cls(layer)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attend_fn: Callable[..., Tensor] | None = None) -> Tensor:
        """q (B, H, T, E), k/v (B, Hkv, T, E|Ev) of the T new tokens -> (B, H, T, Ev). `attend_fn`
        (the layer's quadratic mechanism) is not needed: the state replaces it."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError(
                "RecurrentEAState is for inference (generate runs under torch.no_grad()); "
                "to train on long contexts use backend='linear'"
            )
        B, H, T, E = q.shape
        Hkv, Ev = k.shape[1], v.shape[-1]
        if H % Hkv:
            raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
        ct = compute_dtype(q.dtype)
        N = B * Hkv
        if self.state is None:
            self.state = new_state(N, E, Ev, ct, q.device)
            self.key_sq = torch.zeros(N, dtype=ct, device=q.device)
        elif self.state.shape != (N, n_features(E), Ev + 1):
            raise ValueError(
                f"batch/heads changed mid-sequence: state holds {tuple(self.state.shape)}, new tokens "
                f"need {(N, n_features(E), Ev + 1)}"
            )
        q3 = q.to(ct).reshape(N, H // Hkv, T, E)
        k3 = k.to(ct).reshape(N, T, E)
        v3 = v.to(ct).reshape(N, T, Ev)
        if T == 1:  # one token: add it to the state first, then read (phi(q).phi(k) = (q.k)^2)
            add_to_state(self.state, k3, with_ones(v3))
            num = read_num(self.state, q3.view(N, H // Hkv, E) * self.scale)
            out, z = normalise_rows(num, Ev, self.eps)  # (N, G, Ev), (N, G, 1)
            causal, chunk = False, 1  # the row sees every key of its state, the new one included
        else:  # a prompt or several tokens: the chunked causal form from the current state
            causal, chunk = True, chunk_for(q3)
            out, z = causal_forward(q3, k3, v3, self.state, self.eps, chunk, self.scale)
        if ct == torch.float32:  # (a float64 state's bound, u64 R, is the backend's own after its retry)
            self._check_cancellation(cancellation_ratio(q3, k3, z.view(N, H // Hkv, T, 1), causal, self.scale, chunk,
                                                        prior=self.key_sq), on_host=T > 1 or q.device.type == "cpu")
            self.key_sq += torch.linalg.vector_norm(k3, dim=-1).square_().sum(-1)
        self.length += T
        return out.view(B, H, T, Ev).to(q.dtype)

    @property
    def max_ratio(self) -> float:
        """The largest cancellation ratio R_i met so far by a float32 state (0 before any; see the module's
        docstring)."""
        return 0.0 if self._max_ratio is None else float(self._max_ratio)

    def _check_cancellation(self, r: Tensor, on_host: bool) -> None:
        """Keep the running maximum of the ratios r (N, G, T) (a row with no key in its state: 0/0 = NaN, not
        counted) and warn once when it exceeds the linear backend's retry bound; read back to the host when
        ``on_host`` or once every CHECK_EVERY tokens."""
        m = torch.nan_to_num(r, nan=0.0).amax() if r.numel() else r.new_zeros(())
        self._max_ratio = m if self._max_ratio is None else torch.maximum(self._max_ratio, m)
        if self.warned or not (on_host or (self.length + 1) % CHECK_EVERY == 0):
            return
        r = self.max_ratio
        if r > FP64_RETRY_ABOVE:
            self.warned = True
            warn(f"recurrent cache: a decoding step met cancellation ratio R = {r:.3g} > {FP64_RETRY_ABOVE:g} "
                 f"(queries nearly orthogonal to large keys); the float32 state's output may be off by up to "
                 f"~{2.1 * 2.0**-24 * r:.2g} x max|v| (the linear backend would recompute this call in float64, "
                 "the cache keeps no keys). For exact outputs use cache='kv' or a float64 model; see "
                 "docs/linear.md, 'Accuracy in float32'.")

    def nbytes(self) -> int:
        """Bytes this layer's state takes now (independent of the context length)."""
        return 0 if self.state is None else self.state.numel() * self.state.element_size()

    @staticmethod
    def state_bytes(cfg, total_len: int) -> int | None:
        """Bytes per sequence (float32) over all layers, or None when cfg is not EA-squared.
        Constant in `total_len` (E (E+1)/2 x (E+1) floats per key/value head and layer)."""
        if cfg.kind != "ea" or cfg.variant != "squared":
            return None
        if (getattr(cfg, "n_ea_heads", None) is not None or getattr(cfg, "layer_kinds", None) is not None
                or getattr(cfg, "forget_gate", False)):
            return None  # hybrid or gated: not every layer/head has the linear form
        n_kv = cfg.n_kv_heads or cfg.n_heads
        E = cfg.d_model // cfg.n_heads
        return cfg.n_layers * n_kv * n_features(E) * (E + 1) * 4


register_cache_kind("recurrent", RecurrentEAState)
