"""The linear form under torch.compile: time of the first compiled call (compilation included) and of a
later one, against eager, forward+backward of a causal EA-squared call with backend="linear".

    python benchmarks/bench_linear_compile.py                          # aot_eager, L=1024
    python benchmarks/bench_linear_compile.py --compiler inductor --L 4096

B=2, H=2, E=32, float32, one process; the later compiled call and the eager one are medians of
`--repeats`. Prints the load average the run started under.
"""
import argparse
import os
import statistics
import time
import warnings

import torch

from expressive_attention import expressive_attention
from expressive_attention.ops import fused_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compiler", default="aot_eager", help="torch.compile backend (aot_eager, inductor)")
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--E", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    fused_cpu.load_extension()  # the linear form's C++ feature helpers, as a user's long calls get them
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, args.L, args.E, generator=g, requires_grad=True) for _ in range(3))

    def step(fn):
        t = time.perf_counter()
        fn(q, k, v).backward()
        return time.perf_counter() - t

    def f(q, k, v):
        return expressive_attention(q, k, v, is_causal=True, variant="squared", backend="linear").square().sum()

    compiled = torch.compile(f, backend=args.compiler)
    first = step(compiled)
    later = statistics.median(step(compiled) for _ in range(args.repeats))
    eager = statistics.median(step(f) for _ in range(args.repeats))
    print(f"{args.compiler}, L={args.L}, E={args.E}: first compiled call {first:.1f} s, "
          f"later {later * 1e3:.1f} ms, eager {eager * 1e3:.1f} ms ({later / eager:.2f}x eager)")


if __name__ == "__main__":
    main()
