"""`ea lm`: EA vs SDPA in the same small Hugging Face causal LM on real text (see
expressive_attention.experiments.text_study and docs/huggingface.md)."""
from __future__ import annotations

import argparse
import time

from ..ops import KINDS, VARIANTS
from .args import add_lever_options, csv_of, positive_float, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..experiments.text_data import CORPORA
    from ..experiments.text_lm import ARCHS, TextLMConfig

    d = TextLMConfig()
    p = subparsers.add_parser(
        "lm", help="EA vs SDPA in the same small HF causal LM on real text (val loss, bits/byte)",
        description="Train one small Hugging Face causal LM (built from a config, no downloads) once per "
                    "mechanism (DPA, EA per variant) on the same text, with the same initial weights, batches and "
                    "steps; report held-out loss and bits per byte. With several --seeds / --lr values every "
                    "(seed, lr, mechanism) is one run; each finished run is appended to OUT/results.jsonl and "
                    "a rerun of the same command skips it (resume). Writes OUT/report.md, OUT/lm_curves.csv, "
                    "OUT/lm_curves.png and OUT/lm_summary.json over every run in OUT with the same setting. "
                    "One default run (Python stdlib source, byte-level) takes about 3-5 minutes on one core.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="text files or directories (default: the corpus named by --corpus)")
    p.add_argument("--corpus", choices=CORPORA, default=d.corpus,
                   help="without PATHs: code = the Python standard library's source, prose = the English help "
                        "topics in the stdlib's pydoc_data/topics.py (default: %(default)s)")
    p.add_argument("--glob", default=d.glob, help=f"files taken from directories (default: {d.glob})")
    p.add_argument("--max-mb", type=positive_float, default=d.max_bytes / 1e6, help="text budget in MB (default: %(default)s)")
    p.add_argument("--tokenizer", choices=["byte", "char"], default=d.tokenizer, help="byte- or char-level tokens")
    p.add_argument("--kinds", type=csv_of(choices=KINDS), default=list(d.kinds),
                   help="mechanisms to train, comma-separated (default: dpa,ea)")
    p.add_argument("--variants", type=csv_of(), default=list(d.variants),
                   help=f"EA variants, each its own run: one of {', '.join(VARIANTS)} (saturating is the paper's "
                        "EA; power is |s|^4), or power<p> (e.g. power8) (default: saturating)")
    add_lever_options(p)  # --scales, --gate, --ea-heads, --layer-kinds (cli/args.py)
    p.add_argument("--arch", choices=ARCHS, default=d.arch, help="HF model family (default: %(default)s)")
    p.add_argument("--d-model", type=positive_int, default=d.d_model, help="hidden size (default: %(default)s)")
    p.add_argument("--layers", dest="n_layers", type=positive_int, default=d.n_layers, help="layers (default: %(default)s)")
    p.add_argument("--context", dest="context_length", type=positive_int, default=d.context_length, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="training steps per run (default: %(default)s)")
    p.add_argument("--lr", "--lrs", dest="lrs", type=csv_of(positive_float), default=list(d.lrs),
                   help="peak learning rate(s), comma-separated, e.g. 1e-3,2e-3,4e-3 (default: 2e-3)")
    p.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="(default: %(default)s)")
    p.add_argument("--seeds", "--seed", dest="seeds", type=csv_of(int), default=list(d.seeds),
                   help="seed(s), comma-separated, e.g. 0,1,2: mean ± std over them (default: 0)")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                   help="skip the per-layer attention statistics at init and at the end of each run")
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
    from ..experiments.text_lm import TextLMConfig
    from ..experiments.text_study import format_table, run

    kinds, variants = args.kinds, args.variants
    levers = {name: tuple(v) for name, v in (("scales", args.scales), ("gates", args.gate),
                                              ("ea_heads", args.ea_heads), ("layer_kinds", args.layer_kinds))
              if v is not None}  # issue #21's flags, when given (else TextLMConfig's defaults)
    cfg = TextLMConfig(paths=list(args.paths), corpus=args.corpus, glob=args.glob, max_bytes=int(args.max_mb * 1e6),
                       tokenizer=args.tokenizer, kinds=tuple(kinds), variants=tuple(variants),
                       arch=args.arch, d_model=args.d_model, n_layers=args.n_layers,
                       context_length=args.context_length, batch_size=args.batch_size, steps=args.steps, lrs=tuple(args.lrs),
                       eval_every=args.eval_every, seeds=tuple(args.seeds), diagnose=args.diagnose,
                       threads=args.threads, out=args.out, **levers)
    try:
        cfg.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    t0 = time.perf_counter()
    summary = run(cfg, command=args.command_line)
    print(format_table(summary))
    print(summary["verdict"])
    print(f"wall time {time.perf_counter() - t0:.0f} s; wrote {', '.join(summary['paths'].values())}")
    print(f"command: {args.command_line}")
    return 0
