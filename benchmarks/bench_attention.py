"""EA vs SDPA, time and peak memory, forward and forward+backward. Same as `ea bench ops`.

    python benchmarks/bench_attention.py --E 32,64 --L 256,1024,4096 --json bench.json
"""
import sys

from expressive_attention.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ops", *sys.argv[1:]]))
