"""`ea bench`: EA vs SDPA timings and peak memory (see expressive_attention.bench)."""
from __future__ import annotations


def add_parser(subparsers):
    from .bench.compare import add_arguments, main

    p = subparsers.add_parser("bench", help="time and memory of EA vs PyTorch SDPA on the same shapes",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=main)
    return p
