"""Recognising boolean masks that are exactly "key padding", or "causal and key padding".

Models build full (B, 1, L, S) masks even when all they encode is which keys are padding (an
encoder) or causality plus padding (a decoder, e.g. every Hugging Face model and a
`MultiheadAttention` given a causal `attn_mask`). The linear form can run those as its own
bidirectional / causal mode with the padded keys removed, but only when the mask is *exactly* that
pattern: a single differing entry must make it a different attention, run by another backend.

    keep = key_padding_of(mask, causal=True)     # bool (Bm, Hm, S), or None when the mask is anything else

The check reads the mask once, in blocks of rows (one vectorised comparison per block, memory
O(block * S), never an L x S temporary), and stops at the first block that differs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._functorch import is_vmapped

# Rows compared per vectorised step: bounds the temporary to Bm * Hm * ROWS * S booleans.
ROWS = 1024


def key_padding_of(mask: Tensor, causal: bool) -> Tensor | None:
    """`mask` bool (Bm, Hm, L, S) -> keep (Bm, Hm, S) such that, for every row i and key j,

        causal=False: mask[..., i, j] == keep[..., j]
        causal=True:  mask[..., i, j] == (j <= i) and keep[..., j]     (needs L == S, top-left aligned)

    or None when `mask` is not exactly that (or it is batched by torch.func.vmap: the check would
    need a data-dependent branch per sample). `keep` is the last row, which sees every key in both patterns.
    A fully masked row (a padded query in a left-padded causal batch) fits the pattern: the linear
    form then returns zeros for it, as the definition does."""
    if mask.dtype != torch.bool or mask.dim() != 4 or is_vmapped(mask):
        return None
    L, S = mask.shape[-2:]
    if L == 0 or S == 0 or (causal and L != S):
        return None
    keep = mask[..., -1, :]
    cols = torch.arange(S, device=mask.device)
    for r0 in range(0, L, ROWS):
        r1 = min(L, r0 + ROWS)
        want = keep[..., None, :]
        if causal:  # (r1 - r0, S): key j visible from row i when j <= i
            want = want & (cols[None, :] <= torch.arange(r0, r1, device=mask.device)[:, None])
        if not torch.equal(mask[..., r0:r1, :], want.expand(*mask.shape[:-2], r1 - r0, S)):
            return None
    return keep
