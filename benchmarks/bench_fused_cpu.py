"""Fused CPU expressive attention vs PyTorch SDPA, forward+backward: `ea bench ops` on the fused
kernel's table (float32, B=4, H=4, causal, E in {32, 64}, L in {256, 1024, 4096}).

    python benchmarks/bench_fused_cpu.py                 # the table
    python benchmarks/bench_fused_cpu.py --json out.json # and the records

Time, peak memory, FLOP count and matmul peak come from expressive_attention.bench.measure (each
case in a fresh process); extra flags are passed on to `ea bench ops`.
"""
import sys

from expressive_attention.cli import main
from expressive_attention.ops import fused_cpu

if __name__ == "__main__":
    if not fused_cpu.is_available():
        sys.exit(f"the fused CPU kernel is unavailable: {fused_cpu.build_error()}")
    sys.exit(main(["bench", "ops", "--E", "32,64", "--L", "256,1024,4096", "--modes", "fwdbwd",
                   "--backends", "fused_cpu", *sys.argv[1:]]))
