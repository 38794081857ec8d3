"""Per-layer decoding caches.

A cache object (`DecodingCache`) holds what one attention layer needs of the past and computes
attention for new tokens: `out = cache.attend(q, k, v, attend_fn)` with q (B, H, T, E) and k/v
(B, Hkv, T, E) for the T new tokens (RoPE already applied), where
`attend_fn(q, k, v, attn_mask=None, is_causal=False)` runs the layer's attention mechanism.
`cache.length` is the number of tokens seen so far. A cache kind (`CacheKind`, the class registered
in CACHE_KINDS) builds one cache per layer and says how big its state gets.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class DecodingCache(Protocol):
    """One layer's decoding state."""

    length: int

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attend_fn: Callable[..., Tensor]) -> Tensor: ...

    def nbytes(self) -> int: ...


@runtime_checkable
class CacheKind(Protocol):
    """What CACHE_KINDS holds (usually the cache class itself)."""

    def for_layer(self, layer) -> DecodingCache:
        """A fresh cache for `layer` (the layer's MultiheadAttention: variant, eps, heads)."""
        ...

    def state_bytes(self, cfg, total_len: int) -> int | None:
        """Bytes per sequence (float32) over all layers after `total_len` tokens, or None when this kind
        does not apply to `cfg` (`generate(cache="auto")` picks the smallest)."""
        ...


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
        # narrow(): one call per view, ~3x cheaper than indexing with slices (every layer, every step)
        self.k.narrow(2, self.length, k.shape[2]).copy_(k)
        self.v.narrow(2, self.length, v.shape[2]).copy_(v)
        self.length = end

    @classmethod
    def for_layer(cls, layer) -> "KVCache":
        return cls()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attend_fn: Callable[..., Tensor]) -> Tensor:
        past, T = self.length, q.shape[2]
        self._append(k, v)
        keys, values = self.k.narrow(2, 0, self.length), self.v.narrow(2, 0, self.length)
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


# name -> cache kind (see CacheKind): `cache=name` in DecoderLM.generate / new_cache.
CACHE_KINDS: dict[str, CacheKind] = {"kv": KVCache}


def register_cache_kind(name: str, kind: CacheKind) -> CacheKind:
    """Add a cache kind (a class with `for_layer` and `state_bytes`, see CacheKind) under `name`."""
    if not isinstance(kind, CacheKind):
        raise TypeError(f"a cache kind needs for_layer(layer) and state_bytes(cfg, total_len); got {kind!r}")
    CACHE_KINDS[name] = kind
    return kind
