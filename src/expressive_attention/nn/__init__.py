"""Modules: multi-head attention (EA or DPA), a pre-norm block and a small decoder-only LM."""
from .attention import MultiheadAttention, RotaryEmbedding
from .cache import CACHE_KINDS, CacheKind, DecodingCache, KVCache, register_cache_kind
from .model import MLP, Block, DecoderLM, LMConfig, choose_cache_kind
from .recurrent import RecurrentEAState  # noqa: F401  registers CACHE_KINDS["recurrent"]

__all__ = [
    "CACHE_KINDS", "MLP", "Block", "CacheKind", "DecoderLM", "DecodingCache", "KVCache", "LMConfig",
    "MultiheadAttention", "RotaryEmbedding", "choose_cache_kind", "register_cache_kind",
]
