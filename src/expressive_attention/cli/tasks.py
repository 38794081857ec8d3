"""`ea tasks` (also `python -m expressive_attention.tasks`): the default ladders, one line per rung
(vocabulary, length, scored fraction) and the time to sample one training batch."""
from __future__ import annotations

import argparse
import time

from .args import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=positive_int, default=32, help="batch size to time (default 32)")
    p.add_argument("--repeats", type=positive_int, default=200, help="batches per timing (default 200)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tasks", help="the task ladders: one line per rung, and sampling speed",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=tasks_cmd)
    return p


def tasks_cmd(args) -> int:
    from ..tasks import LADDERS, make_task, train_generator

    print(f"{'ladder':18s} {'rung':>4s} {'vocab':>5s} {'len':>4s} {'scored':>6s} {'ms/batch':>8s}  task")
    for name, rungs in LADDERS.items():
        for i, rung in enumerate(rungs):
            task, gen = make_task(name, **rung), train_generator(0)
            _, _, m = task.sample(args.batch, gen)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                task.sample(args.batch, gen)
            ms = (time.perf_counter() - t0) / args.repeats * 1e3
            print(f"{name:18s} {i:4d} {task.vocab_size:5d} {task.seq_len:4d} {m.float().mean().item():6.3f} "
                  f"{ms:8.3f}  {task.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m expressive_attention.tasks`: the same as `ea tasks`."""
    ap = argparse.ArgumentParser(prog="python -m expressive_attention.tasks", description=__doc__)
    add_arguments(ap)
    return tasks_cmd(ap.parse_args(argv))
