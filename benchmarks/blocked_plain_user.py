"""What a plain user measures with the blocked backend: default settings (torch's thread count, EA_COMPILE
unset), one process, causal forward+backward, one warm-up call of each (EA's compiles the tiles), then EA and
SDPA timed in turn, round after round. Prints one JSON line: times, EA/SDPA ratio per round and their median,
threads, the environment that matters (EA_COMPILE, OMP_NUM_THREADS, OMP_WAIT_POLICY) and the load average
before and after. docs/blocked.md ("A plain user's call") has the figures and what they depend on.

    python benchmarks/blocked_plain_user.py                      # B=4 H=4 L=1024 E=32, 10 rounds
    OMP_NUM_THREADS=1 python benchmarks/blocked_plain_user.py    # one thread
    OMP_WAIT_POLICY=PASSIVE python benchmarks/blocked_plain_user.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from expressive_attention import expressive_attention
from expressive_attention.ops import tile_compile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--E", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    load0 = os.getloadavg()
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.B, args.H, args.L, args.E, requires_grad=True) for _ in range(3))
    do = torch.randn(args.B, args.H, args.L, args.E)

    def step(attend) -> float:
        t0 = time.perf_counter()
        attend(q, k, v).backward(do)
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - t0

    def ea(q, k, v):
        return expressive_attention(q, k, v, is_causal=True, backend="blocked")

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    first_ea, first_sdpa = step(ea), step(sdpa)
    t_ea, t_sdpa = [], []
    for _ in range(args.rounds):
        t_sdpa.append(step(sdpa))
        t_ea.append(step(ea))
    ratios = [a / b for a, b in zip(t_ea, t_sdpa)]
    print(json.dumps({
        "shape": {"B": args.B, "H": args.H, "L": args.L, "E": args.E}, "threads": torch.get_num_threads(),
        "env": {k_: os.environ.get(k_) for k_ in ("EA_COMPILE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "compiled_tiles": sorted(tile_compile.compile_seconds),
        "first_call_s": {"ea": round(first_ea, 1), "sdpa": round(first_sdpa, 3)},
        "ea_ms": [round(1e3 * t, 1) for t in t_ea], "sdpa_ms": [round(1e3 * t, 1) for t in t_sdpa],
        "ratio_median": round(statistics.median(ratios), 2),
        "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
