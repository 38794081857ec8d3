"""`ea bench {ops,long,model}`: EA vs PyTorch SDPA, time and peak memory (see expressive_attention.bench).

    ea bench ops   --E 32,64 --L 256,1024,4096     # one attention call per case
    ea bench ops   --backends blocked --interleave --repeats 5   # SDPA and EA timed in turn, one process per shape
    ea bench long  --threads 1                     # long contexts: the linear form; decode steps
    ea bench model --repeats 5                     # one DecoderLM training step, EA vs DPA
    ea bench decode                                # one decoding step on a KV cache, EA vs SDPA interleaved
    ea bench gpu   --out gpu_check                 # CUDA: EA (Triton) vs SDPA (flash), training and decode
"""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..ops.reference import VARIANTS
from .args import csv_of, positive_int

MODES = ("ops", "long", "model", "decode", "gpu")


def _add_ops(sub) -> None:
    from ..bench.compare import OpsBench

    d = OpsBench()
    p = sub.add_parser("ops", help="one attention call per case: EA (each variant and backend) vs SDPA",
                       description="EA vs SDPA on the same shapes, forward and forward+backward; each case "
                                   "in a fresh process (time: median of repeats; peak: resident-set growth).")
    p.add_argument("--E", type=csv_of(positive_int), default=list(d.E), help="head dims (default 32)")
    p.add_argument("--L", type=csv_of(positive_int), default=list(d.L),
                   help="sequence lengths (default 256,1024,4096)")
    p.add_argument("--B", type=positive_int, default=d.B, help="batch size (default %(default)s)")
    p.add_argument("--H", type=positive_int, default=d.H, help="heads (default %(default)s)")
    p.add_argument("--modes", type=csv_of(choices=("fwd", "fwdbwd")), default=list(d.modes), help="fwd,fwdbwd")
    p.add_argument("--variants", type=csv_of(choices=VARIANTS), default=list(d.variants),
                   help=f"EA variants, comma-separated, of {','.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--backends", type=csv_of(), default=None,
                   help="EA backends (default: auto and every registered backend that supports the shape)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--repeats", type=positive_int, default=d.repeats, help="timed repeats per case (median)")
    p.add_argument("--interleave", action="store_true",
                   help="time SDPA and the EA cases of each shape in one process, in turn within every repeat "
                        "(steadier ratios on a loaded machine; the allocator keeps its defaults, so times are "
                        "not inflated by page faults but peak memory is less clean)")
    p.add_argument("--json", metavar="PATH", help="also write all records as JSON")
    p.set_defaults(func=_ops_cmd)


def _ops_cmd(args) -> int:
    from ..bench.compare import OpsBench, run_ops_benchmark

    spec = OpsBench(E=args.E, L=args.L, B=args.B, H=args.H, modes=args.modes, variants=args.variants,
                    backends=args.backends, dtype=args.dtype, device=args.device, causal=not args.no_causal,
                    repeats=args.repeats, json=args.json, interleave=args.interleave)
    run_ops_benchmark(_checked(spec))
    return 0


def _add_long(sub) -> None:
    from ..bench.long import BACKENDS, LongBench

    d = LongBench()
    p = sub.add_parser("long", help="long contexts: EA-squared's linear form vs the quadratic backends; decoding",
                       description="1. attention time and peak memory vs L (reference / fused / linear / SDPA) "
                                   "and the crossover lengths; 2. decode-step time vs context for KV-cache DPA, "
                                   "KV-cache EA and recurrent EA.")
    p.add_argument("--E", dest="E", type=csv_of(positive_int), default=list(d.E),
                   help="head dims (default 16,32)")
    p.add_argument("--L", dest="L", type=csv_of(positive_int), default=list(d.L),
                   help="sequence lengths (default 2048,4096,8192,16384)")
    p.add_argument("--B", dest="B", type=positive_int, default=d.B, help="batch (default %(default)s)")
    p.add_argument("--H", dest="H", type=positive_int, default=d.H, help="heads (default %(default)s)")
    p.add_argument("--backends", dest="backends", type=csv_of(choices=BACKENDS), default=list(d.backends),
                   help=f"what to time, from {','.join(BACKENDS)} (default {','.join(d.backends)})")
    p.add_argument("--modes", dest="modes", type=csv_of(choices=("fwd", "fwdbwd")),
                   default=list(d.modes), help="fwd,fwdbwd (default fwdbwd)")
    p.add_argument("--repeats", dest="repeats", type=positive_int, default=d.repeats,
                   help="timed repeats per case (median)")
    p.add_argument("--rounds", type=positive_int, default=d.rounds,
                   help="passes over all cases, interleaved, each case a fresh process; median over rounds")
    p.add_argument("--contexts", type=csv_of(positive_int), default=list(d.contexts),
                   help="decode: context lengths (default 1024,4096,16384)")
    p.add_argument("--decode-E", type=csv_of(positive_int), default=list(d.decode_E), help="decode: head dims")
    p.add_argument("--decode-steps", type=positive_int, default=d.decode_steps, help="decode: timed steps (median)")
    p.add_argument("--no-attention", action="store_true", help="skip part 1")
    p.add_argument("--no-decode", action="store_true", help="skip part 2")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch/OpenMP threads for every case (default: torch's default); on a shared, "
                        "oversubscribed machine 1 gives steadier ratios")
    p.add_argument("--json", dest="json", metavar="PATH", help="write all records as JSON")
    p.set_defaults(func=_long_cmd)


def _long_cmd(args) -> int:
    from ..bench.long import LongBench, run_long_benchmark

    spec = LongBench(E=args.E, L=args.L, B=args.B, H=args.H, backends=args.backends, modes=args.modes,
                     repeats=args.repeats, rounds=args.rounds, contexts=args.contexts, decode_E=args.decode_E,
                     decode_steps=args.decode_steps, attention=not args.no_attention, decode=not args.no_decode,
                     threads=args.threads, json=args.json)
    run_long_benchmark(_checked(spec))
    return 0


def _add_model(sub) -> None:
    p = sub.add_parser("model", help="one DecoderLM training step with EA vs DPA (quick-ladder size, long context)",
                       description="Forward, backward and AdamW step of the same DecoderLM with EA and with DPA, "
                                   "alternating; the median step time of each.")
    p.add_argument("--variant", "--variants", dest="variant", default="saturating", help="EA variant")
    p.add_argument("--backend", "--backends", dest="backend", default="auto", help="EA backend")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed steps = repeats + 5 (median)")
    p.set_defaults(func=_model_cmd)


def _model_cmd(args) -> int:
    from ..bench.model_step import run_model_benchmark

    from ..ops.problem import check_variant

    try:
        check_variant(args.variant)
    except ValueError as e:
        raise UserError(f"model: {e}") from None
    run_model_benchmark(variant=args.variant, backend=args.backend, repeats=args.repeats)
    return 0


def _add_decode(sub) -> None:
    from ..bench.decode import DecodeBench

    d = DecodeBench()
    p = sub.add_parser("decode", help="one decoding step on a KV cache: EA vs SDPA, interleaved",
                       description="L new query rows against a cache of S keys, EA (attention(kind='ea')) and "
                                   "SDPA on the same tensors, timed alternately; medians and the median ratio.")
    p.add_argument("--contexts", type=csv_of(positive_int), default=list(d.contexts),
                   help="cache lengths S (default 1024,4096,16384)")
    p.add_argument("--E", type=csv_of(positive_int), default=list(d.E), help="head dims (default 16,32,64)")
    p.add_argument("--B", type=csv_of(positive_int), default=list(d.B), help="batch sizes (default 1,4)")
    p.add_argument("--H", type=positive_int, default=d.H, help="query heads (default %(default)s)")
    p.add_argument("--kv-heads", type=csv_of(positive_int), default=list(d.kv_heads),
                   help="key/value heads, each dividing H; fewer than H is GQA (default 8,2)")
    p.add_argument("--rows", type=positive_int, default=d.rows, help="new query rows per step (default 1)")
    p.add_argument("--variant", default=d.variant, help="EA variant (default %(default)s)")
    p.add_argument("--backend", default=d.backend, help="EA backend (default %(default)s)")
    p.add_argument("--steps", type=positive_int, default=d.steps,
                   help="timed calls of each kind per case, >= 5 (median; default %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--no-flush", action="store_true", help="do not evict the CPU caches before each call")
    p.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    p.set_defaults(func=_decode_cmd)


def _decode_cmd(args) -> int:
    from ..bench.decode import DecodeBench, run_decode_benchmark

    spec = DecodeBench(contexts=args.contexts, E=args.E, B=args.B, H=args.H, kv_heads=args.kv_heads,
                       rows=args.rows, variant=args.variant, backend=args.backend, steps=args.steps,
                       threads=args.threads, flush=not args.no_flush, json=args.json)
    run_decode_benchmark(_checked(spec))
    return 0


def _add_gpu(sub) -> None:
    from ..bench.gpu import GpuBench
    from ..ops.variants import VARIANTS

    d = GpuBench()
    p = sub.add_parser("gpu", help="CUDA: EA (Triton, FlexAttention) vs SDPA (flash), fwd(+bwd) and decode, in a few "
                                   "minutes",
                       description="EA (Triton, and FlexAttention: 'flex') vs SDPA (flash) on the current CUDA device: "
                                   "causal forward+backward and forward at a fixed token count (with which EA backend "
                                   "was faster), and one decode step against a KV cache; every case "
                                   "time-boxed. Writes OUT/gpu_check.json and OUT/gpu_check.md. Exits with "
                                   "status 1 and one line when there is no CUDA device.")
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--L", type=csv_of(positive_int), default=list(d.L), help="sequence lengths (fwd+bwd)")
    p.add_argument("--E", type=csv_of(positive_int), default=list(d.E), help="head dims (default 64,128)")
    p.add_argument("--tokens", type=positive_int, default=d.tokens, help="B x L of the fwd+bwd cases")
    p.add_argument("--H", type=positive_int, default=d.H, help="heads (default %(default)s)")
    p.add_argument("--contexts", type=csv_of(positive_int), default=list(d.contexts), help="decode: KV-cache lengths")
    p.add_argument("--decode-B", type=csv_of(positive_int), default=list(d.decode_B), help="decode: batch sizes")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--modes", type=csv_of(choices=["fwdbwd", "fwd"]), default=list(d.modes),
                   help="training-shape modes, each its own record (default: fwdbwd,fwd)")
    p.add_argument("--variants", type=csv_of(choices=VARIANTS), default=list(d.variants),
                   help=f"EA variants, each timed at every shape, of {','.join(VARIANTS)} (triton-EA where the "
                        "kernels have it, flex-EA for all) (default: "
                        "%(default)s)")
    p.add_argument("--repeats", type=positive_int, default=d.repeats, help="timed repeats per case (median)")
    p.add_argument("--case-budget", type=float, default=d.case_budget_s, help="seconds per case (time box)")
    p.add_argument("--total-budget", type=float, default=d.total_budget_s, help="seconds for all cases")
    p.set_defaults(func=_gpu_cmd)


def _gpu_cmd(args) -> int:
    import torch

    from ..bench.gpu import GpuBench, run_gpu_benchmark

    spec = GpuBench(out=args.out, L=args.L, E=args.E, tokens=args.tokens, H=args.H, contexts=args.contexts,
                    decode_B=args.decode_B, dtype=args.dtype, variants=args.variants, modes=args.modes,
                    repeats=args.repeats,
                    case_budget_s=args.case_budget, total_budget_s=args.total_budget)
    try:
        run_gpu_benchmark(_checked(spec), command=getattr(args, "command_line", "ea bench gpu"))
    except RuntimeError as e:  # no CUDA device, no triton: one line
        if torch.cuda.is_available() and "triton" not in str(e):
            raise
        print(f"ea bench gpu: {e}", file=sys.stderr)
        return 1
    return 0


def _checked(spec):
    """`spec` after its own check; a bad value becomes a one-line error naming the field."""
    try:
        spec.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    return spec


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time and memory of EA vs PyTorch SDPA on the same shapes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_mode", required=True, metavar="{ops,long,model,decode,gpu}")
    _add_ops(sub)
    _add_long(sub)
    _add_model(sub)
    _add_decode(sub)
    _add_gpu(sub)
    return p
