"""Per-layer decoding caches.

A cache object holds what one attention layer needs of the past and computes attention for new
tokens: `out = cache.attend(q, k, v, attend_fn)` with q (B, H, T, E) and k/v (B, Hkv, T, E) for the
T new tokens (RoPE already applied), where `attend_fn(q, k, v, attn_mask=None, is_causal=False)`
runs the layer's attention mechanism. `cache.length` is the number of tokens seen so far.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every past token, in a buffer that grows by doubling."""

    def __init__(self) -> None:
        self.k: Tensor | None = None  # (B, Hkv, capacity, E)
        self.v: Tensor | None = None  # (B, Hkv, capacity, Ev)
        self.length = 0

    def _append(self, k: Tensor, v: Tensor) -> None:
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            cap = max(end, 2 * (0 if self.k is None else self.k.shape[2]), 16)
            new_k = k.new_empty(*k.shape[:2], cap, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], cap, v.shape[3])
            if self.k is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attend_fn: Callable[..., Tensor]) -> Tensor:
        past, T = self.length, q.shape[2]
        self._append(k, v)
        keys, values = self.k[:, :, : self.length], self.v[:, :, : self.length]
        if past == 0:
            return attend_fn(q, keys, values, is_causal=True)
        if T == 1:
            return attend_fn(q, keys, values)  # the newest token sees everything
        # new token i (absolute position past + i) sees keys j <= past + i: bottom-right causal
        mask = torch.ones(T, self.length, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return attend_fn(q, keys, values, attn_mask=mask)

    @staticmethod
    def state_bytes(cfg, total_len: int) -> int:
        """Bytes per sequence (float32) that a KV cache of `total_len` tokens takes over all layers."""
        n_kv = cfg.n_kv_heads or cfg.n_heads
        return 2 * cfg.n_layers * n_kv * (cfg.d_model // cfg.n_heads) * total_len * 4

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        per_token = self.k[:, :, :1].numel() * self.k.element_size() + self.v[:, :, :1].numel() * self.v.element_size()
        return per_token * self.length


# name -> cache class. Construction: cls() or, when cls.takes_layer is True, cls(layer) with the
# layer's MultiheadAttention. Optional cls.state_bytes(cfg, total_len) -> bytes per sequence, or None
# when the kind does not apply to cfg: `cache="auto"` picks the smallest.
CACHE_KINDS: dict[str, Callable[..., object]] = {"kv": KVCache}
