"""The float32 error of the linear form (backend="linear", variant="squared") against its bound.

    PYTHONPATH=src python benchmarks/linear_error_bound.py [--trials 400] [--seed 0]

The feature form computes s^2 = <phi(q), phi(k)> as a sum of terms of size up to |q|^2 |k|^2 (and the
normaliser as q^T (sum_j k_j k_j^T) q, the same terms), so a row's rounding error is of the order of
u * scale^2 |q_i|^2 sum_j |k_j|^2, against a normaliser z_i = eps + sum_j s_ij^2; u = 2^-24 in float32.
With the row's ratio

    R_i = scale^2 |q_i|^2 sum_{j seen by i} |k_j|^2 / z_i      (>= 1 when eps = 0; = (|q||k|/|s|)^2 for one key)

the error of row i, relative to max |v|, is bounded by c * u * R_i (R_i counts only the keys that go
through the state: for a causal call, those before the row's chunk; the rest go through the quadratic
form and are as accurate as the reference). This script measures c: random
calls (E from 1 to 128, S from 1 to 300, causal or not, keys drawn at controlled angles to the queries,
from orthogonal to parallel, norms spread over 1e-2..1e2), the float32 linear form with its float64
retry turned off against the float64 reference; prints the largest err_i / (u R_i max|v|) per E and over
all, and the error of the fp32 reference for comparison. (c is taken over rows with 64 <= R_i <= 1/u: below
64 plain rounding of a few u dominates, printed separately; above 1/u the error saturates at ~1.)
"""
import argparse
import math

import torch

from expressive_attention import expressive_attention
from expressive_attention.ops import linear

U32 = torch.finfo(torch.float32).eps / 2


def draw(g: torch.Generator, E: int, L: int, S: int):
    """q (1, 1, L, E), k (1, 1, S, E), v (1, 1, S, 3) in float64: keys at cosines 10^-x (x up to 5) to a
    shared query direction, or random; norms log-uniform in [1e-2, 1e2]."""
    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    d = torch.randn(E, generator=g, dtype=torch.float64)
    d = d / d.norm()
    q = d + 0.3 * r(1).item() * torch.randn(L, E, generator=g, dtype=torch.float64) / math.sqrt(E)
    w = torch.randn(S, E, generator=g, dtype=torch.float64)
    if E > 1:
        w = w - (w @ d)[:, None] * d
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = torch.sign(r(S, 1) - 0.5) * 10.0 ** (-5 * r(S, 1))
    if E == 1:
        cos = torch.ones_like(cos)
    k = cos * d + (1 - cos * cos).clamp_min(0).sqrt() * w
    if r(1).item() < 0.3:  # plain random keys
        k = torch.randn(S, E, generator=g, dtype=torch.float64)
    q = q * 10.0 ** (4 * r(L, 1) - 2)
    k = k * 10.0 ** (4 * r(S, 1) - 2)
    v = torch.randn(S, 3, generator=g, dtype=torch.float64)
    return q[None, None], k[None, None], v[None, None]


def ratio(q, k, causal: bool, eps: float, chunk: int):
    """R_i (L,) in float64 as the backend defines it (`linear.cancellation_ratio`), from the exact normaliser."""
    scale = q.shape[-1] ** -0.5
    s = scale * (q @ k.transpose(-2, -1))[0, 0]
    if causal:
        s = s.tril()
    z = (eps + s.square().sum(-1))[None, None, :, None]
    return linear.cancellation_ratio(q[:, :1], k[:, 0], z, causal, scale, chunk)[0, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    retry = linear.FP64_RETRY_ABOVE
    linear.FP64_RETRY_ABOVE = math.inf  # the raw float32 form
    worst: dict[int, tuple[float, str]] = {}
    worst_ref32 = worst_small = 0.0
    try:
        for t in range(args.trials):
            E = int(2 ** (7 * torch.rand(1, generator=g).item()))
            S = int(torch.randint(1, 300, (1,), generator=g).item()) if t % 2 else int(torch.randint(1, 4, (1,), generator=g).item())
            causal = bool(t % 3 == 0)
            L = S if causal else int(torch.randint(1, 40, (1,), generator=g).item())
            eps = (0.0, 1e-6)[t % 2]
            q, k, v = draw(g, E, L, S)
            kw = dict(variant="squared", eps=eps, is_causal=causal)
            exact = expressive_attention(q, k, v, backend="reference", **kw)
            lin = expressive_attention(q.float(), k.float(), v.float(), backend="linear", **kw).double()
            ref32 = expressive_attention(q.float(), k.float(), v.float(), backend="reference", **kw).double()
            vmax = v.abs().max().item()
            err = (lin - exact).abs().amax(-1)[0, 0] / vmax
            R = ratio(q.float().double(), k.float().double(), causal, eps, linear.chunk_for(q.float()))
            small = ~(R >= 64)  # (and NaN: rows that see no key through the state)
            if small.any():
                worst_small = max(worst_small, (err[small].max() / U32).item())
            ok = (U32 * R <= 1) & (R >= 64)
            if ok.any():
                c = (err[ok] / (U32 * R[ok])).max().item()
                i = int(torch.nonzero(ok)[(err[ok] / (U32 * R[ok])).argmax()].item())
                if c > worst.get(E, (0.0, ""))[0]:
                    worst[E] = (c, f"S={S} L={L} causal={causal} eps={eps} R_i={R[i].item():.2e} err_i={err[i].item():.2e}")
            worst_ref32 = max(worst_ref32, ((ref32 - exact).abs().amax() / vmax).item())
    finally:
        linear.FP64_RETRY_ABOVE = retry
    print(f"{args.trials} calls, float32 linear form without its float64 retry, u = {U32:.3g}")
    for E in sorted(worst):
        print(f"E={E:4d}  max err_i / (u R_i max|v|) = {worst[E][0]:.3f}   ({worst[E][1]})")
    print(f"over all E: c = {max(c for c, _ in worst.values()):.3f} (rows with 64 <= R_i <= 1/u)")
    print(f"rows with R_i < 64 (or no key in the state): largest error {worst_small:.1f} u")
    print(f"largest error of the fp32 reference over these calls: {worst_ref32:.2e} (of max|v|)")
    print(f"the backend retries in float64 when u * max_i R_i > {U32 * retry:.2e} (R > {retry:.3g})")


if __name__ == "__main__":
    main()
