"""A small decoder-only language model (nanoGPT-shaped) whose attention is EA or DPA by config."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import KINDS
from .attention import MultiheadAttention, RotaryEmbedding, check_levers, check_positive_int
from .cache import CACHE_KINDS, KVCache

POSITIONS = ("learned", "rope")


@dataclass
class LMConfig:
    vocab_size: int
    context_length: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # GQA when smaller than n_heads
    pos: str = "learned"  # "learned" absolute positions or "rope"
    kind: str = "ea"  # the mechanism: "ea" or "dpa"
    variant: str = "saturating"  # EA variant: a name of the table in ops/variants.py
    power: float | None = None  # degree of variant="power" (None: 4)
    qk_norm: bool = False  # RMSNorm of each head's q and k (EA and DPA)
    learn_scale: bool = False  # learned per-head score gain (EA and DPA)
    eps: float = 1e-6
    backend: str = "auto"  # EA backend
    dropout: float = 0.0
    mlp_ratio: int = 4
    bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    # levers of issue #21 (off by default; see MultiheadAttention)
    gain_init: float = 0.0  # initial per-head log gain of learn_scale
    n_ea_heads: int | None = None  # hybrid layers: the first n_ea_heads heads EA, the rest softmax
    layer_kinds: tuple[str, ...] | None = None  # per-layer kind ("ea"/"dpa"), overriding `kind`
    forget_gate: bool = False  # data-dependent forget gate (FoX) in every layer
    gate_bias_init: float = 0.0  # the forget gate's initial bias (0: sigmoid(0) = 1/2 per step at init)

    def __post_init__(self):
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {self.pos!r}")
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            check_positive_int(name, getattr(self, name))
        if self.n_kv_heads is not None:
            check_positive_int("n_kv_heads", self.n_kv_heads)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.layer_kinds is not None:
            if isinstance(self.layer_kinds, str):
                raise ValueError(f"layer_kinds must be a sequence of kinds, one per layer, got {self.layer_kinds!r}")
            self.layer_kinds = tuple(self.layer_kinds)
            if len(self.layer_kinds) != self.n_layers:
                raise ValueError(f"layer_kinds must give one kind per layer ({self.n_layers}), "
                                 f"got {len(self.layer_kinds)}: {self.layer_kinds}")
            bad = [k for k in self.layer_kinds if k not in KINDS]
            if bad:
                raise ValueError(f"layer_kinds must be among {KINDS}, got {bad}")
        kinds = set(self.layer_kinds or (self.kind,))
        if self.n_ea_heads is not None and "ea" not in kinds:
            raise ValueError("n_ea_heads applies to EA layers (kind='ea' or 'ea' in layer_kinds)")
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if n_kv >= 1 and self.n_heads % n_kv == 0:  # else MultiheadAttention says what is wrong
            for k in kinds:
                check_levers(self.n_heads, n_kv, k, self.n_ea_heads if k == "ea" else None, self.learn_scale,
                             self.gain_init, self.forget_gate, self.gate_bias_init)

    def layer_kind(self, i: int) -> str:
        """The mechanism of layer i: ``layer_kinds[i]``, or ``kind`` for every layer."""
        return self.kind if self.layer_kinds is None else self.layer_kinds[i]
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        """From `to_dict()` output."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LMConfig fields: {sorted(unknown)}")
        return cls(**d)


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: LMConfig, rope: RotaryEmbedding | None = None, kind: str | None = None):
        super().__init__()
        kind = cfg.kind if kind is None else kind  # this layer's mechanism (LMConfig.layer_kind)
        levers = {}  # issue #21's options, passed only when on (a layer built without them is as before)
        if cfg.gain_init:
            levers["gain_init"] = cfg.gain_init
        if cfg.n_ea_heads is not None and kind == "ea":
            levers["n_ea_heads"] = cfg.n_ea_heads
        if cfg.forget_gate:
            levers["forget_gate"] = True
        if cfg.gate_bias_init:
            levers["gate_bias_init"] = cfg.gate_bias_init
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = MultiheadAttention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, kind=kind, variant=cfg.variant,
            eps=cfg.eps, backend=cfg.backend, dropout=cfg.dropout, bias=cfg.bias, rope=rope,
            power=cfg.power if kind == "ea" else None, qk_norm=cfg.qk_norm, learn_scale=cfg.learn_scale, **levers,
        )
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache=None, positions: Tensor | None = None) -> Tensor:
        # x (B, T, C); causal self-attention over x (and what `cache` holds)
        x = x + self.drop(self.attn(self.ln1(x), is_causal=cache is None, cache=cache, positions=positions))
        return x + self.mlp(self.ln2(x))


class DecoderLM(nn.Module):
    """GPT-style decoder. With `kind="dpa"` it is an ordinary GPT; with "ea" only the attention
    weights differ."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model) if cfg.pos == "learned" else None
        rope = RotaryEmbedding(cfg.d_model // cfg.n_heads) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, rope, cfg.layer_kind(i)) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.out_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))
        for block in self.blocks:  # _init zeroed every bias: the forget gate's starts at gate_bias_init
            if block.attn.forget_gate:
                block.attn.reset_gate_bias()

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, kind: str = "kv") -> list:
        """One decoding cache per layer (see nn/cache.py); kind is a key of CACHE_KINDS."""
        if kind not in CACHE_KINDS:
            raise ValueError(f"cache kind must be one of {sorted(CACHE_KINDS)}, got {kind!r}")
        if self.cfg.forget_gate:
            raise ValueError("a model with forget_gate=True has no decoding cache; generate with cache=None")
        return [CACHE_KINDS[kind].for_layer(block.attn) for block in self.blocks]

    def forward(self, idx: Tensor, cache: list | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, V). With `cache`, idx continues what it holds."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) long tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache must hold one entry per layer ({len(self.blocks)}), got {len(cache)}")
        B, T = idx.shape
        _check_token_ids(idx, self.cfg.vocab_size)
        past = cache[0].length if cache is not None else 0
        if self.pos_emb is not None and past + T > self.cfg.context_length:
            raise ValueError(
                f"sequence length {past + T} exceeds context_length {self.cfg.context_length} (learned positions)"
            )
        positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if cache is None else cache[i], positions=positions)
        return self.head(self.ln_f(x))  # (B, T, V)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        cache: str | None = "kv",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Extend idx (B, T) by max_new_tokens tokens; greedy when temperature == 0.

        cache: "kv" (keys/values of past tokens), another key of CACHE_KINDS, "auto" (the smallest
        state that applies; None for a model with a forget gate), or None (recompute the full forward
        pass every step).
        With learned positions, a sequence that outgrows `context_length` is cropped to its last
        `context_length` tokens for the next step (as nanoGPT does; the cache is then dropped and each
        further step recomputes the window). The prompt must hold at least one token per row.
        """
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError("idx must be a (B, T) long tensor of token ids")
        if idx.shape[1] == 0:
            raise ValueError(
                "generate() needs a prompt of at least one token per row (idx has shape "
                f"{tuple(idx.shape)}); start from a BOS/separator token of your vocabulary"
            )
        _check_sampling(max_new_tokens, temperature, top_k)
        if cache == "auto":
            cache = None if self.cfg.forget_gate else choose_cache_kind(self.cfg, idx.shape[1] + max_new_tokens)
        state = None if cache is None else self.new_cache(cache)
        window = self.cfg.context_length if self.pos_emb is not None else None  # learned positions
        out = idx
        step_input = idx
        for _ in range(max_new_tokens):
            if state is not None and window is not None and state[0].length + step_input.shape[1] > window:
                state = None  # positions past the window: crop and recompute from here on
            if state is not None:
                logits = self(step_input, cache=state)
            else:
                logits = self(out if window is None else out[:, -window:])
            nxt = _sample(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            step_input = nxt
        return out


def _check_sampling(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def _check_token_ids(idx: Tensor, vocab_size: int) -> None:
    """Out-of-range ids would give a bare IndexError on CPU and a device-side assert on GPU."""
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(x) for x in torch.aminmax(idx))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")


def choose_cache_kind(cfg: LMConfig, total_len: int) -> str:
    """The `cache="auto"` policy: the KV cache unless a registered cache kind says it is smaller."""
    best, best_size = "kv", KVCache.state_bytes(cfg, total_len)
    for name, kind in CACHE_KINDS.items():
        size = kind.state_bytes(cfg, total_len)  # None: does not apply to cfg
        if size is not None and size < best_size:
            best, best_size = name, size
    return best


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    if temperature == 0.0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
