"""The `flex` backend: expressive attention through PyTorch's FlexAttention (a GPU path PyTorch maintains).

FlexAttention computes softmax of a modified score, and every variant is one: with f > 0 on the allowed
keys, f(s) / sum f = softmax(log f(s)), so the variant table's `log_f` is the score_mod
(saturating: log(s^2 / (1 + s^2)), squared: 2 log|s|, power: p log|s|, exp_squared: s^2, exp_odd: s|s|).
log 0 = -inf is a weight of 0, as f(0) = 0; `log_f` is written so that its gradient is finite there.
Masks (causal: top-left aligned, as in SDPA; a boolean mask) become a block mask (`create_block_mask`), so
fully masked blocks are skipped; GQA is flex's own (`enable_gqa`).

eps: EA divides by eps + sum f, softmax by sum f. With lse = log sum f (flex's `return_lse`), the output
is rescaled by sum f / (eps + sum f) = 1 / (1 + eps exp(-lse)), which is exact (and differentiable through
lse). A row with nothing to attend to (every key masked, or every allowed f = 0) has lse = -inf: its output
is 0 (flex gives 0 and the factor is 0), never NaN. torch.compile'd flex on CPU has no `return_lse`
(torch 2.13); there eps is one more key instead, at index S, allowed for every row, with log f = log eps and
a zero value: softmax over the keys and it is exactly sum_j f_j v_j / (eps + sum f) (and 0 for a row with
nothing else).

Where it runs: CUDA, forward and backward (compiled: flex's Triton kernels); CPU, forward only
(FlexAttention has no backward on CPU in torch 2.13: calls that need gradients are refused with the
reason). `EA_FLEX_COMPILE=1` runs flex through `torch.compile` (the default on CUDA), `0` eagerly (its
unfused reference path: it materialises the scores; the default on CPU). On CPU compiling is opt-in: torch
2.13's CPU inductor fails to compile some flex graphs (a C++ compile error at L = 6, causal, found by the
fuzzer) and has no float64 (float64 always runs eagerly), and every new shape compiles anew. Either way
flex on CPU is slower than `auto` (see docs/bench/flex-cpu.md); "auto" never picks it there.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from .backend import Backend
from .problem import Problem
from .variants import VARIANT_TABLE

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch without FlexAttention
    flex_attention = create_block_mask = None
try:
    from torch.nn.attention.flex_attention import AuxRequest  # return_lse is deprecated from torch 2.9
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cuda", "cpu")


def compile_enabled(q: Tensor) -> bool:
    """Run flex through torch.compile for these inputs: `EA_FLEX_COMPILE` (1 / 0), by default on CUDA only;
    never for float64 on CPU (the CPU inductor has no float64 flex)."""
    if q.is_cpu and q.dtype == torch.float64:
        return False
    flag = os.environ.get("EA_FLEX_COMPILE")
    return (not q.is_cpu) if flag is None else flag != "0"


@functools.cache
def _compiled():
    return torch.compile(flex_attention)


@functools.cache
def score_mod_for(variant: str, power: float | None):
    """The score_mod of `variant`: score -> log f(score) (scale is applied by flex before it)."""
    log_f = VARIANT_TABLE[variant].log_f

    def score_mod(score, b, h, q_idx, kv_idx):
        return log_f(score, power)

    score_mod.__name__ = f"ea_{variant}_score_mod"
    return score_mod


@functools.lru_cache(maxsize=32)
def _causal_block_mask(L: int, S: int, eps_key: bool, device: torch.device):
    """The causal block mask (cached: building one costs ~60 ms at L = 1k on CPU, ~0.6 s at 4k)."""
    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        return allowed | (kv_idx == S) if eps_key else allowed

    return create_block_mask(mask_mod, None, None, L, S + eps_key, device=device)


def block_mask_for(p: Problem, eps_key: bool = False):
    """The block mask of `p` (None when every key is allowed); with `eps_key`, key S (the eps key) is
    allowed for every row."""
    L, S = p.q.shape[2], p.k.shape[2]
    if p.is_causal:
        return _causal_block_mask(L, S, eps_key, p.q.device)
    if p.mask is not None:
        m = p.mask
        Bm, Hm, Lm, _ = m.shape
        zero = torch.zeros((), dtype=torch.long, device=m.device)  # the index of a broadcast dim

        def base(b, h, q_idx, kv_idx):
            j = kv_idx.clamp(max=S - 1) if eps_key else kv_idx
            return m[b if Bm > 1 else zero, h if Hm > 1 else zero, q_idx if Lm > 1 else zero, j]
    else:
        return None

    def with_eps_key(b, h, q_idx, kv_idx):
        return base(b, h, q_idx, kv_idx) | (kv_idx == S)

    return create_block_mask(with_eps_key if eps_key else base, Bm if Bm > 1 else None, Hm if Hm > 1 else None,
                             L, S + eps_key, device=p.q.device)


@functools.cache
def _eps_key_score_mod(variant: str, power: float | None, S: int, log_eps: float):
    log_f = VARIANT_TABLE[variant].log_f

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx == S, log_eps, log_f(score, power))

    return score_mod


def flex_ea(p: Problem) -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev)."""
    q, k, v = (p.q, p.k, p.v) if p.requires_grad else (p.q.detach(), p.k.detach(), p.v.detach())
    if q.is_cpu and q.dtype in (torch.float16, torch.bfloat16):
        # scores in float32, as the reference's: CPU flex in bf16 let a query row with an inf turn its
        # neighbour row into NaN (found by the fuzzer); the output is cast back below
        q, k, v = q.float(), k.float(), v.float()
    compiled = compile_enabled(q)
    fn = _compiled() if compiled else flex_attention
    kw = dict(scale=p.scale, enable_gqa=p.groups > 1)
    if compiled and q.is_cpu and p.eps > 0:  # no return_lse there: eps is one more key (see the top)
        S = k.shape[2]
        k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
        out = fn(q, k, v, score_mod=_eps_key_score_mod(p.variant, p.power, S, math.log(p.eps)),
                 block_mask=block_mask_for(p, eps_key=True), **kw)
        return out.to(p.q.dtype)
    if p.eps == 0 or (compiled and q.is_cpu):
        out = fn(q, k, v, score_mod=score_mod_for(p.variant, p.power), block_mask=block_mask_for(p), **kw)
        return out.to(p.q.dtype)
    mod, bm = score_mod_for(p.variant, p.power), block_mask_for(p)
    if AuxRequest is not None:
        out, aux = fn(q, k, v, score_mod=mod, block_mask=bm, return_aux=AuxRequest(lse=True), **kw)
        lse = aux.lse
    else:  # pragma: no cover - older torch
        out, lse = fn(q, k, v, score_mod=mod, block_mask=bm, return_lse=True, **kw)
    # softmax -> EA: times sum f / (eps + sum f); lse = -inf (nothing to attend to) -> 0
    factor = torch.sigmoid(lse - math.log(p.eps))  # 1 / (1 + eps exp(-lse))
    return (out * factor.unsqueeze(-1).to(out.dtype)).to(p.q.dtype)


def supports(p: Problem) -> "str | None":
    if flex_attention is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    dev = p.q.device.type
    if dev not in DEVICES:
        return f"flex runs on CUDA (forward + backward) or CPU (forward), got device {dev}"
    if dev == "cpu" and p.requires_grad:
        return ("FlexAttention has no backward on CPU (torch 2.13): flex runs the CPU forward only; call it "
                "under torch.no_grad() or on tensors that do not require grad, or use 'fused_cpu' / 'blocked' "
                "to train on CPU")
    if p.q.dtype not in DTYPES:
        return f"flex supports dtypes {[str(d) for d in DTYPES]}, got {p.q.dtype}"
    return None


# Priority 25: below triton (30), which "auto" takes on CUDA where the measured table and the kernels'
# self-check allow (cuda_policy.py); flex on CUDA otherwise. Never "auto" on CPU, where it is slower than
# what auto runs there (docs/bench/flex-cpu.md).
BACKEND = Backend(
    "flex", flex_ea, supports, priority=25, prefer=lambda p: p.q.is_cuda, functorch=False,
    variants=None,  # every entry of the variant table: its score_mod is the entry's log_f
    description="PyTorch FlexAttention with score_mod = log f (CUDA fwd + bwd; CPU forward only)",
)
