"""`ea lm`: EA vs SDPA in the same small Hugging Face causal LM on real text (see
expressive_attention.experiments.text_lm and docs/huggingface.md)."""
from __future__ import annotations

import argparse
import time

from ..ops import KINDS
from .args import csv_of, deprecated, positive_float, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..experiments.text_lm import ARCHS, IMPLEMENTATIONS, TextLMConfig

    d = TextLMConfig()
    p = subparsers.add_parser(
        "lm", help="EA vs SDPA in the same small HF causal LM on real text (val loss, bits/byte)",
        description="Train one small Hugging Face causal LM (built from a config, no downloads) once per "
                    "mechanism (DPA, EA per variant) on the same text, with the same initial weights, batches and "
                    "steps; report held-out loss and bits per byte. Writes OUT/lm_curves.csv, "
                    "OUT/lm_curves.png and OUT/lm_summary.json. The default run (Python stdlib source, "
                    "byte-level) takes about 5 minutes on 2 idle CPU cores, up to 10 on a busy one.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="text files or directories (default: the Python standard library's source)")
    p.add_argument("--glob", default=d.glob, help=f"files taken from directories (default: {d.glob})")
    p.add_argument("--max-mb", type=positive_float, default=d.max_bytes / 1e6, help="text budget in MB (default: %(default)s)")
    p.add_argument("--tokenizer", choices=["byte", "char"], default=d.tokenizer, help="byte- or char-level tokens")
    p.add_argument("--kinds", type=csv_of(choices=KINDS), default=list(d.kinds),
                   help="mechanisms to train, comma-separated (default: dpa,ea)")
    p.add_argument("--variants", type=csv_of(), default=list(d.variants),
                   help="EA variants, each its own run, e.g. saturating,squared (default: saturating)")
    p.add_argument("--impls", type=csv_of(choices=IMPLEMENTATIONS), default=None,
                   help="deprecated: attn implementations (sdpa,expressive,expressive_squared); "
                        "use --kinds and --variants")
    p.add_argument("--arch", choices=ARCHS, default=d.arch, help="HF model family (default: %(default)s)")
    p.add_argument("--d-model", type=positive_int, default=d.d_model, help="hidden size (default: %(default)s)")
    p.add_argument("--layers", type=positive_int, default=d.layers, help="layers (default: %(default)s)")
    p.add_argument("--context", type=positive_int, default=d.context, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="training steps per run (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: 1 if the load average >= cores, else torch's default)")
    p.add_argument("--out", default=d.out, help="output directory (default: %(default)s)")
    p.set_defaults(func=run_lm_cmd)
    return p


def run_lm_cmd(args) -> int:
    from ..errors import UserError
    from ..extras import require

    require("hf", "ea lm")  # before any work; the plot is skipped without matplotlib
    require("cli", "ea lm", ("tqdm",))
    from ..experiments.text_lm import TextLMConfig, format_table, kinds_from_impls, run

    kinds, variants = args.kinds, args.variants
    if args.impls is not None:
        deprecated("`ea lm --impls` is deprecated; use --kinds and --variants")
        kinds, variants = kinds_from_impls(args.impls)
    cfg = TextLMConfig(paths=list(args.paths), glob=args.glob, max_bytes=int(args.max_mb * 1e6),
                       tokenizer=args.tokenizer, kinds=tuple(kinds), variants=tuple(variants), arch=args.arch,
                       d_model=args.d_model, layers=args.layers, context=args.context, batch_size=args.batch_size,
                       steps=args.steps, lr=args.lr, eval_every=args.eval_every, seed=args.seed,
                       threads=args.threads, out=args.out)
    try:
        cfg.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    t0 = time.perf_counter()
    summary = run(cfg)
    print(format_table(summary))
    print(f"wall time {time.perf_counter() - t0:.0f} s; wrote {', '.join(summary['paths'].values())}")
    print(f"command: {args.command_line}")
    return 0
