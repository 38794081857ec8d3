"""The fused CPU backward when B x Hkv is smaller than the thread count: split over query blocks
(now) vs one task per (batch, key head) (before: the split forced to 1), both against SDPA.

    python benchmarks/bench_backward_split.py                       # B=1, H=1 and 2; 2 threads
    python benchmarks/bench_backward_split.py --threads 2 --L 1024,4096 --E 32,64 --repeats 7

Float32, causal, forward+backward of out.sum()-style random dO. Per case the three are timed in
turn, `repeats` rounds (the order rotates every round); medians, and the median of the per-round
ratios to SDPA. Prints the load average the run started under.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from expressive_attention import expressive_attention
from expressive_attention.cli.args import csv_of, positive_int
from expressive_attention.ops import fused_cpu


def fwd_bwd(fn, q, k, v, do) -> float:
    t0 = time.perf_counter()
    out = fn(q, k, v)
    torch.autograd.grad(out, (q, k, v), do)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--B", type=positive_int, default=1)
    ap.add_argument("--H", type=csv_of(positive_int), default=[1, 2], help="heads (= key/value heads)")
    ap.add_argument("--L", type=csv_of(positive_int), default=[1024, 4096])
    ap.add_argument("--E", type=csv_of(positive_int), default=[32, 64])
    ap.add_argument("--repeats", type=positive_int, default=7, help="rounds (median), >= 5")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    if not fused_cpu.is_available():
        sys.exit(f"the fused CPU kernel is unavailable: {fused_cpu.build_error()}")
    torch.set_num_threads(args.threads)
    ext = fused_cpu.load_extension()
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    ea = lambda q, k, v: expressive_attention(q, k, v, is_causal=True, backend="fused_cpu")  # noqa: E731

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"float32, causal, forward+backward, median of {args.repeats} rounds")
    head = f"{'B':>2} {'H':>2} {'E':>3} {'L':>5}  {'SDPA ms':>8} {'before ms':>9} {'after ms':>8}  " \
           f"{'before/SDPA':>11} {'after/SDPA':>10} {'after/before':>12}"
    print(head + "\n" + "-" * len(head))
    g = torch.Generator().manual_seed(0)
    try:
        for H in args.H:
            for E in args.E:
                for L in args.L:
                    q, k, v = (torch.randn(args.B, H, L, E, generator=g).requires_grad_() for _ in range(3))
                    do = torch.randn(args.B, H, L, E, generator=g)
                    # name -> (function, backward splits: 1 = before, 0 = automatic = after)
                    runs = {"sdpa": (sdpa, 0), "before": (ea, 1), "after": (ea, 0)}
                    t = {name: [] for name in runs}
                    for fn, splits in runs.values():  # warm-up
                        ext.set_splits(0, splits, 16)
                        fwd_bwd(fn, q, k, v, do)
                    names = list(runs)
                    for r in range(args.repeats):
                        for name in names[r % 3:] + names[:r % 3]:
                            fn, splits = runs[name]
                            ext.set_splits(0, splits, 16)
                            t[name].append(1e3 * fwd_bwd(fn, q, k, v, do))
                    med = {n: statistics.median(x) for n, x in t.items()}
                    ratio = {n: statistics.median(a / s for a, s in zip(t[n], t["sdpa"])) for n in ("before", "after")}
                    speedup = statistics.median(a / b for a, b in zip(t["after"], t["before"]))
                    print(f"{args.B:>2} {H:>2} {E:>3} {L:>5}  {med['sdpa']:>8.1f} {med['before']:>9.1f} "
                          f"{med['after']:>8.1f}  {ratio['before']:>11.2f} {ratio['after']:>10.2f} {speedup:>12.2f}",
                          flush=True)
    finally:
        ext.set_splits(0, 0, 16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
