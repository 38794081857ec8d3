"""python -m expressive_attention.tasks [--batch 32] [--repeats 200]: the default ladders, one line per
rung (vocabulary, length, scored fraction) and the time to sample one training batch."""
import argparse
import time

from . import LADDERS, make_task, train_generator


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m expressive_attention.tasks", description=__doc__)
    ap.add_argument("--batch", type=int, default=32, help="batch size to time (default 32)")
    ap.add_argument("--repeats", type=int, default=200, help="batches per timing (default 200)")
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
