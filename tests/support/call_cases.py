"""Calls of `expressive_attention` / `normalise` as keyword arguments, shared by the tests of the fast
paths (`problem._normalise_4d`, the decode shortcut of "auto"; tests/ops/test_argument_checks_agree.py
runs every case through all three checks): valid calls in several layouts and a catalogue of bad
ones, each of which must reach the general path's error unchanged. (Importable as
`call_cases`: pytest's `pythonpath` setting puts tests/support on sys.path.)"""
from decimal import Decimal

import torch

B, H, L, S, E, Ev = 2, 4, 3, 7, 8, 5


def call_args(**over):
    """normalise's positional arguments for a valid 4-D call, with `over` replacing some."""
    g = torch.Generator().manual_seed(0)
    a = dict(query=torch.randn(B, H, L, E, generator=g), key=torch.randn(B, H, S, E, generator=g),
             value=torch.randn(B, H, S, Ev, generator=g), attn_mask=None, dropout_p=0.0, is_causal=False,
             scale=None, enable_gqa=False, variant="saturating", eps=1e-6, power=None)
    a.update(over)
    return a


def random_mask(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1)) > 0.4


def gqa_kv(hkv):
    return dict(key=torch.randn(B, hkv, S, E), value=torch.randn(B, hkv, S, Ev), enable_gqa=True)


VALID = {
    "plain": {},
    "causal": dict(is_causal=True),
    "mask (B,H,L,S)": dict(attn_mask=random_mask(B, H, L, S)),
    "mask (1,1,1,S)": dict(attn_mask=random_mask(1, 1, 1, S)),
    "mask (B,1,L,S)": dict(attn_mask=random_mask(B, 1, L, S)),
    "mask (1,H,1,S) expanded": dict(attn_mask=random_mask(1, H, 1, 1).expand(1, H, 1, S)),
    "gqa": gqa_kv(2),
    "gqa, Hkv == H": gqa_kv(H),
    "scale": dict(scale=0.3),
    "int scale, int dropout, int eps": dict(scale=2, dropout_p=0, eps=0),
    "dropout": dict(dropout_p=0.25),
    "variant power": dict(variant="power", power=3),
    "variant squared": dict(variant="squared"),
    "float64": dict(query=torch.randn(B, H, L, E, dtype=torch.float64),
                    key=torch.randn(B, H, S, E, dtype=torch.float64),
                    value=torch.randn(B, H, S, Ev, dtype=torch.float64)),
    "bfloat16": dict(query=torch.randn(B, H, L, E).bfloat16(), key=torch.randn(B, H, S, E).bfloat16(),
                     value=torch.randn(B, H, S, Ev).bfloat16()),
    "strided (B, L, H, E) views": dict(query=torch.randn(B, L, H, E).transpose(1, 2),
                                       key=torch.randn(B, S, H, E).transpose(1, 2),
                                       value=torch.randn(B, S, H, Ev).transpose(1, 2)),
    "S = 0": dict(key=torch.randn(B, H, 0, E), value=torch.randn(B, H, 0, Ev)),
    "E = 0": dict(query=torch.randn(B, H, L, 0), key=torch.randn(B, H, S, 0)),
    "requires grad": dict(query=torch.randn(B, H, L, E, requires_grad=True)),
}
# calls the fast path leaves to the general one although they are valid
VALID_GENERAL_ONLY = {
    "3-D": dict(query=torch.randn(H, L, E), key=torch.randn(H, S, E), value=torch.randn(H, S, Ev)),
    "2-D mask": dict(attn_mask=random_mask(L, S)),
    "mask broadcast over keys": dict(attn_mask=random_mask(B, H, L, 1)),
}


BAD = {
    "query not a tensor": dict(query=[[1.0]]),
    "value not a tensor": dict(value=3.0),
    "integer query": dict(query=torch.ones(B, H, L, E, dtype=torch.int64)),
    "integer key and value": dict(key=torch.ones(B, H, S, E, dtype=torch.int64),
                                  value=torch.ones(B, H, S, Ev, dtype=torch.int64)),
    "dtypes differ": dict(key=torch.randn(B, H, S, E, dtype=torch.float64)),
    "devices differ": dict(key=torch.randn(B, H, S, E, device="meta")),
    "dims differ": dict(value=torch.randn(B, H, S, Ev, 1)),
    "E differs": dict(key=torch.randn(B, H, S, E + 1)),
    "S differs": dict(value=torch.randn(B, H, S + 1, Ev)),
    "batch differs": dict(key=torch.randn(B + 1, H, S, E), value=torch.randn(B + 1, H, S, Ev)),
    "value heads differ": dict(value=torch.randn(B, H - 1, S, Ev)),
    "heads differ without enable_gqa": dict(key=torch.randn(B, 2, S, E), value=torch.randn(B, 2, S, Ev)),
    "gqa heads do not divide": gqa_kv(3),
    "gqa with zero heads": dict(query=torch.randn(B, 0, L, E), **gqa_kv(0)),
    "float mask": dict(attn_mask=torch.zeros(B, H, L, S)),
    "int mask": dict(attn_mask=torch.ones(B, H, L, S, dtype=torch.int64)),
    "mask not a tensor": dict(attn_mask=[[True]]),
    "mask on another device": dict(attn_mask=torch.ones(B, H, L, S, dtype=torch.bool, device="meta")),
    "mask batch 3": dict(attn_mask=random_mask(3, H, L, S)),
    "mask heads 2": dict(attn_mask=random_mask(B, 2, L, S)),
    "mask rows 2": dict(attn_mask=random_mask(B, H, 2, S)),
    "mask keys S + 1": dict(attn_mask=random_mask(B, H, L, S + 1)),
    "mask and is_causal": dict(attn_mask=random_mask(B, H, L, S), is_causal=True),
    "dropout 1": dict(dropout_p=1.0),
    "dropout a string": dict(dropout_p="0"),
    "dropout a Decimal": dict(dropout_p=Decimal(0)),
    "scale nan": dict(scale=float("nan")),
    "scale inf": dict(scale=float("inf")),
    "scale overflows": dict(scale=1e30),
    "eps negative": dict(eps=-1.0),
    "eps None": dict(eps=None),
    "variant unknown": dict(variant="cubic"),
    "power without variant power": dict(power=3.0),
    "power out of range": dict(variant="power", power=100.0),
}
