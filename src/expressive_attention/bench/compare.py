"""`ea bench`: EA (each variant, each backend) against SDPA on the same shapes, in one run."""
from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict

import torch

from .measure import Case, matmul_peak_gflops, run_case

# The reference materialises several (B, H, L, S) float32 matrices: keep it to sizes that fit.
REFERENCE_MAX_ELEMENTS = 2**26


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def ea_backends_for(case: Case) -> list[str]:
    """Registered backends that can run `case` (checked on a tiny problem of the same kind)."""
    from expressive_attention.ops import BACKENDS
    from expressive_attention.ops._inputs import normalise

    x = torch.zeros(1, 1, 4, case.E, dtype=getattr(torch, case.dtype), device=case.device)
    p = normalise(x, x, x, None, 0.0, case.causal, None, False, case.variant, 1e-6)
    names = []
    for name, b in BACKENDS.items():
        if name == "reference" and case.B * case.H * case.L * case.L > REFERENCE_MAX_ELEMENTS:
            continue
        if b.supports(p) is None:
            names.append(name)
    return names


def build_cases(args) -> list[Case]:
    cases = []
    for E in args.E:
        for L in args.L:
            for mode in args.modes:
                base = Case("sdpa", args.B, args.H, L, E, causal=not args.no_causal, mode=mode,
                            dtype=args.dtype, device=args.device, repeats=args.repeats)
                cases.append(base)
                for variant in args.variants:
                    probe = Case(**{**asdict(base), "impl": "ea", "variant": variant})
                    backends = args.backends or ["auto", *ea_backends_for(probe)]
                    for backend in dict.fromkeys(backends):
                        cases.append(Case(**{**asdict(probe), "backend": backend}))
    return cases


def format_table(records: list[dict], peak: float) -> str:
    head = f"{'E':>4} {'L':>6} {'mode':>6}  {'attention':<28} {'ms':>10} {'x SDPA':>7} {'peak MB':>9} {'x SDPA':>7} {'GFLOP/s':>8} {'% peak':>6}"
    lines = [head, "-" * len(head)]
    sdpa = {}
    for r in records:
        key = (r["E"], r["L"], r["mode"])
        if r["impl"] == "sdpa":
            sdpa[key] = r
        name = "sdpa" if r["impl"] == "sdpa" else f"ea {r['variant']} [{r['backend']}]"
        if "error" in r:
            lines.append(f"{r['E']:>4} {r['L']:>6} {r['mode']:>6}  {name:<28} failed: {r['error'][:60]}")
            continue
        s = sdpa.get(key)
        t_ratio = r["time_ms"] / s["time_ms"] if s and "time_ms" in s else float("nan")
        m_ratio = r["peak_mb"] / s["peak_mb"] if s and s.get("peak_mb") else float("nan")
        r["time_ratio"], r["mem_ratio"] = t_ratio, m_ratio
        lines.append(
            f"{r['E']:>4} {r['L']:>6} {r['mode']:>6}  {name:<28} {r['time_ms']:>10.2f} {t_ratio:>7.2f} "
            f"{r['peak_mb']:>9.1f} {m_ratio:>7.2f} {r['gflops']:>8.1f} {100 * r['gflops'] / peak:>6.0f}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .long import add_arguments as add_long_arguments

    p.add_argument("--E", type=_csv(int), default=[32], help="head dims, comma-separated (default 32)")
    p.add_argument("--L", type=_csv(int), default=[256, 1024, 4096], help="sequence lengths (default 256,1024,4096)")
    p.add_argument("--B", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--H", type=int, default=4, help="heads (default 4)")
    p.add_argument("--modes", type=_csv(str), default=["fwd", "fwdbwd"], help="fwd,fwdbwd")
    p.add_argument("--variants", type=_csv(str), default=["saturating"], help="EA variants (saturating,squared)")
    p.add_argument("--backends", type=_csv(str), default=None,
                   help="EA backends (default: auto and every registered backend that supports the shape)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write all records as JSON")
    add_long_arguments(p)
    p.add_argument("--long", action="store_true",
                   help="instead: long contexts (reference / fused / linear / SDPA vs L) and decode-step time vs context")
    p.add_argument("--model", action="store_true",
                   help="instead: time a DecoderLM training step with EA vs DPA (quick-ladder size and a long context)")


def main(args) -> int:
    from expressive_attention.ops._inputs import check_variant

    if args.model:
        from .model_step import main as model_main

        return model_main(args)
    if args.long:
        from .long import run_long_benchmark

        return run_long_benchmark(args)

    for v in args.variants:
        check_variant(v)
    for m in args.modes:
        if m not in ("fwd", "fwdbwd"):
            raise SystemExit(f"--modes: unknown mode {m!r} (fwd, fwdbwd)")
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety: the [cli] extra brings tqdm
        tqdm = lambda it, **kw: it  # noqa: E731
    peak = matmul_peak_gflops()
    cases = build_cases(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"float32 matmul peak {peak:.0f} GFLOP/s; B={args.B} H={args.H} {args.dtype} "
          f"{'full' if args.no_causal else 'causal'}; {len(cases)} cases, each in a fresh process")
    records = []
    for case in tqdm(cases, desc="bench", unit="case"):
        records.append(run_case(case))
    print(format_table(records, peak))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "torch": torch.__version__, "records": records}, f, indent=1)
        print(f"wrote {args.json}")
    return 0
