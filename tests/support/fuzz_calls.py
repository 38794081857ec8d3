"""Random attention calls for the backend fuzzer (tests/ops/test_fuzz_backends.py).

A call is described by a plain dict, a *spec* (so that hypothesis prints a failing one in a form that
can be pasted into an ``@example``): shapes, layouts, mask, dtype, variant, options, value scales, keys
nearly orthogonal to the queries (where the linear form cancels), non-finite entries. `build(spec)` turns
it into the arguments of `expressive_attention`, the same numbers every time (from ``spec["seed"]``).
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from expressive_attention.ops import VARIANTS

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("contiguous", "transposed", "heads_last", "expanded", "sliced")
MASKS = ("none", "causal", "2d", "4d", "keypad", "rows_false", "all_false", "causal_pad")
NONFINITE = (None, "q:inf", "k:inf", "k:-inf", "k:nan", "v:inf", "v:nan", "q:nan")


@st.composite
def specs(draw) -> dict:
    """A random call: mostly tiny (every dim 0..8), sometimes big enough to cross the backends' tiles
    and chunks (L, S up to 150, E up to 48)."""
    big = draw(st.integers(0, 9)) == 5  # (not 0: hypothesis favours the ends of a range)

    def dim(top: int) -> int:  # 0 one time in 30
        return 0 if draw(st.integers(0, 29)) == 5 else draw(st.integers(1, top))

    Hkv = dim(3)
    variant = draw(st.sampled_from(VARIANTS))
    spec = {
        "B": dim(2), "Hkv": Hkv, "groups": draw(st.integers(1, 3)) if Hkv else 1,
        "L": dim(150 if big else 8), "S": dim(150 if big else 8), "E": dim(48 if big else 8), "Ev": dim(5),
        "ndim": draw(st.sampled_from((4, 4, 3, 5))),
        "layouts": tuple(draw(st.sampled_from(LAYOUTS)) for _ in "qkv"),
        "mask": draw(st.sampled_from(MASKS)),
        "dtype": draw(st.sampled_from(("float64", "float32", "float32", "bfloat16", "float16"))),
        "variant": variant,
        "power": draw(st.sampled_from((None, 1.0, 2.0, 3.5, 8.0))) if variant == "power" else None,
        "scale": draw(st.sampled_from((None, None, 1.0, -0.5, 1e-3, 3.0, 2e4))),
        "eps": draw(st.sampled_from((1e-6, 1e-6, 0.0, 0.5))),
        "qk_exp": draw(st.integers(-3, 2)),  # q and k ~ 10^qk_exp: |s| up to ~1e4
        "orth": draw(st.integers(1, 5)) if draw(st.integers(0, 4)) == 2 else 0,  # keys at cosine ~10^-orth to q
        "v_exp": draw(st.integers(-2, 2)),
        "nonfinite": draw(st.sampled_from(NONFINITE)) if draw(st.integers(0, 4)) == 2 else None,
        "dropout": draw(st.integers(0, 14)) == 7,
        "grad": draw(st.integers(0, 2)) > 0,
        "seed": draw(st.integers(0, 2**16)),
    }
    return spec


def _layout(x: torch.Tensor, how: str, g: torch.Generator) -> torch.Tensor:
    """The values of x (B, H, n, d) as a tensor with another memory layout (same values)."""
    if how == "transposed":  # stored (B, H, d, n)
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "heads_last":  # stored (B, n, H, d), the usual projection output
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "sliced":  # a window of a larger buffer, at an offset
        B, H, n, d = x.shape
        buf = torch.randn(B + 1, H + 1, n + 2, d + 3, generator=g, dtype=torch.float64).to(x.dtype)
        view = buf[1:, 1:, 2:, 3:]
        view.copy_(x)
        return view
    return x


def _expand(x: torch.Tensor) -> torch.Tensor:
    """x with a stride-0 dim: the rows (or, with one row, the heads) repeated from the first one."""
    if x.shape[2] > 1:
        return x[:, :, :1].expand(x.shape)
    return x[:, :1].expand(x.shape) if x.shape[1] > 1 else x


def _mask(spec: dict, g: torch.Generator):
    """(attn_mask in the 4-D frame (Bm, Hm, Lm, S) or None, is_causal)."""
    B, H, L, S, kind = spec["B"], spec["Hkv"] * spec["groups"], spec["L"], spec["S"], spec["mask"]
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "2d":
        return (torch.rand(1, 1, L, S, generator=g) > 0.4), False
    if kind == "4d":
        shape = [d if torch.rand(1, generator=g).item() > 0.5 else 1 for d in (B, H, L)]
        return (torch.rand(*shape, S, generator=g) > 0.3), False
    if kind == "keypad":
        return (torch.rand(B, 1, 1, S, generator=g) > 0.3), False
    if kind == "rows_false":
        m = torch.rand(B, H, L, S, generator=g) > 0.3
        m[:, :, ::2] = False
        return m, False
    if kind == "all_false":
        return torch.zeros(1, 1, 1, S, dtype=torch.bool), False
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)  # causal_pad: causal AND left padding
    if B:
        keep[0, ..., : S // 3] = False
    return torch.ones(L, S, dtype=torch.bool).tril()[None, None] & keep, False


def _to_ndim(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B, H, n, d) -> the spec's number of dims: 3 drops B (B = 1), 5 splits it as (1, B)."""
    if ndim == 3:
        return x[0]
    if ndim == 5:
        return x[None]
    return x


def build(spec: dict) -> tuple[tuple, dict]:
    """(q, k, v), keyword arguments of `expressive_attention` (without backend) for `spec`."""
    g = torch.Generator().manual_seed(spec["seed"])
    B, Hkv, G, L, S, E, Ev = (spec[n] for n in ("B", "Hkv", "groups", "L", "S", "E", "Ev"))
    if spec["ndim"] == 3:
        B = 1
    spec = {**spec, "B": B}
    dtype = DTYPES[spec["dtype"]]
    mag = 10.0 ** spec["qk_exp"]
    base = {
        "q": mag * torch.randn(B, Hkv * G, L, E, generator=g, dtype=torch.float64),
        "k": mag * torch.randn(B, Hkv, S, E, generator=g, dtype=torch.float64),
        "v": 10.0 ** spec["v_exp"] * torch.randn(B, Hkv, S, Ev, generator=g, dtype=torch.float64),
    }
    if spec.get("orth") and E > 1:  # q along one direction d, every key at cosine +-10^-orth to it
        d = torch.randn(E, generator=g, dtype=torch.float64)
        d = d / d.norm()
        base["q"] = base["q"].norm(dim=-1, keepdim=True) * d
        w = base["k"] - (base["k"] @ d)[..., None] * d
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        cos = 10.0 ** -spec["orth"] * torch.sign(torch.randn(B, Hkv, S, 1, generator=g, dtype=torch.float64))
        base["k"] = base["k"].norm(dim=-1, keepdim=True) * (cos * d + (1 - cos * cos).sqrt() * w)
    if spec["nonfinite"]:  # "k:inf" (at a random entry) or "k:inf:6" (at flat index 6 of k)
        name, value, *at = spec["nonfinite"].split(":")
        t = base[name]
        if t.numel():
            t.view(-1)[int(at[0]) if at else int(torch.randint(t.numel(), (1,), generator=g))] = float(value)
    out = []
    for name, how in zip("qkv", spec["layouts"]):
        x = base[name]
        if how == "expanded":
            x = _expand(x)
        out.append(_to_ndim(_layout(x.to(dtype), how, g), spec["ndim"]))
    mask, causal = _mask(spec, g)
    if mask is not None:
        mask = mask[0] if spec["ndim"] == 3 else mask
    kw = dict(attn_mask=mask, is_causal=causal, scale=spec["scale"], enable_gqa=G > 1, variant=spec["variant"],
              eps=spec["eps"], power=spec["power"], dropout_p=0.25 if spec["dropout"] else 0.0)
    return tuple(out), kw
