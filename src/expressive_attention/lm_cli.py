"""`ea lm`: EA vs SDPA in the same small Hugging Face causal LM on real text (see
expressive_attention.experiments.text_lm and docs/huggingface.md)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _impls(s: str) -> tuple[str, ...]:
    from .experiments.text_lm import IMPLEMENTATIONS

    items = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in items if x not in IMPLEMENTATIONS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {IMPLEMENTATIONS}, got {s!r}")
    return items


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .experiments.text_lm import ARCHS, LMConfig

    d = LMConfig()
    p = subparsers.add_parser(
        "lm", help="EA vs SDPA in the same small HF causal LM on real text (val loss, bits/byte)",
        description="Train one small Hugging Face causal LM (built from a config, no downloads) once per "
                    "attention implementation on the same text, with the same initial weights, batches and "
                    "steps; report held-out loss and bits per byte. Writes OUT/lm_curves.csv, "
                    "OUT/lm_curves.png and OUT/lm_summary.json. The default run (Python stdlib source, "
                    "byte-level) takes about 5 minutes on 2 idle CPU cores, up to 10 on a busy one.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="text files or directories (default: the Python standard library's source)")
    p.add_argument("--glob", default=d.glob, help=f"files taken from directories (default: {d.glob})")
    p.add_argument("--max-mb", type=float, default=d.max_bytes / 1e6, help="text budget in MB (default: %(default)s)")
    p.add_argument("--tokenizer", choices=["byte", "char"], default=d.tokenizer, help="byte- or char-level tokens")
    p.add_argument("--impls", type=_impls, default=d.impls,
                   help="comma-separated attn implementations (default: sdpa,expressive; also expressive_squared)")
    p.add_argument("--arch", choices=ARCHS, default=d.arch, help="HF model family (default: %(default)s)")
    p.add_argument("--d-model", type=_positive, default=d.d_model, help="hidden size (default: %(default)s)")
    p.add_argument("--layers", type=_positive, default=d.layers, help="layers (default: %(default)s)")
    p.add_argument("--context", type=_positive, default=d.context, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--steps", type=_positive, default=d.steps, help="training steps per run (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--eval-every", type=_positive, default=d.eval_every, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads (default: 1 if the load average >= cores, else torch's default)")
    p.add_argument("--out", default=d.out, help="output directory (default: %(default)s)")
    p.set_defaults(func=run_lm_cmd)
    return p


def run_lm_cmd(args) -> int:
    from .experiments.text_lm import LMConfig, format_table, run

    if args.max_mb <= 0:
        raise SystemExit("ea lm: --max-mb must be > 0")
    cfg = LMConfig(paths=list(args.paths), glob=args.glob, max_bytes=int(args.max_mb * 1e6),
                   tokenizer=args.tokenizer, impls=args.impls, arch=args.arch, d_model=args.d_model,
                   layers=args.layers, context=args.context, batch_size=args.batch_size, steps=args.steps,
                   lr=args.lr, eval_every=args.eval_every, seed=args.seed, threads=args.threads, out=args.out)
    try:
        cfg.check()
    except ValueError as e:
        raise SystemExit(f"ea lm: {e}") from None
    t0 = time.perf_counter()
    summary = run(cfg)
    print(format_table(summary))
    print(f"wall time {time.perf_counter() - t0:.0f} s; wrote {', '.join(summary['paths'].values())}")
    print("command: ea lm " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    return 0
