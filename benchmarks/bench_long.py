"""Long-context benchmark: EA-squared's linear form vs the quadratic backends and SDPA; decode steps.

    python benchmarks/bench_long.py [--E 16,32] [--L 2048,4096,8192,16384] [--no-decode] ...

Same as `ea bench long`; the logic is in src/expressive_attention/bench/long.py.
"""
import sys

from expressive_attention.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "long", *sys.argv[1:]]))
