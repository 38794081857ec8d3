"""`ea bench --long`: long contexts. EA-squared's exact linear form against the quadratic backends.

1. Attention time and peak memory vs L for the reference, the fused CPU kernel, the linear form and
   SDPA (forward and/or forward+backward), each case in a fresh process (see bench/measure.py for the
   memory method: resident-set high-water mark above the post-warm-up baseline). From the table, the
   crossover: the shortest L at which the linear form beats SDPA and beats the best quadratic EA backend.
2. Decode-step time vs context length for KV-cache DPA, KV-cache EA (squared) and recurrent EA
   (constant-size state), one attention layer, B x H heads: median of timed steps after a prefill,
   round-robin over the contexts, each step starting with the CPU caches flushed.

    python benchmarks/bench_long.py --threads 1          # the full default sweep
    python benchmarks/bench_long.py --long-E 16 --long-L 2048,16384 --impls linear,sdpa --no-decode
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from .measure import Case, run_case

IMPLS = ("reference", "fused_cpu", "blocked", "linear", "sdpa")
REFERENCE_MAX_ELEMENTS = 2**26  # the reference holds several (B, H, L, L) float32 matrices


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `run_long_benchmark` (also used by `ea bench --long`)."""
    g = p.add_argument_group("long-context benchmark (--long)")
    g.add_argument("--long-E", dest="long_E", type=_csv(int), default=[16, 32], help="head dims (default 16,32)")
    g.add_argument("--long-L", dest="long_L", type=_csv(int), default=[2048, 4096, 8192, 16384],
                   help="sequence lengths (default 2048,4096,8192,16384)")
    g.add_argument("--long-B", dest="long_B", type=int, default=4, help="batch (default 4)")
    g.add_argument("--long-H", dest="long_H", type=int, default=4, help="heads (default 4)")
    g.add_argument("--impls", type=_csv(str), default=["reference", "fused_cpu", "linear", "sdpa"],
                   help=f"what to time, from {','.join(IMPLS)} (default reference,fused_cpu,linear,sdpa)")
    g.add_argument("--long-modes", dest="long_modes", type=_csv(str), default=["fwdbwd"],
                   help="fwd,fwdbwd (default fwdbwd)")
    g.add_argument("--long-repeats", dest="long_repeats", type=int, default=2, help="timed repeats per case (median)")
    g.add_argument("--contexts", type=_csv(int), default=[1024, 4096, 16384],
                   help="decode: context lengths (default 1024,4096,16384)")
    g.add_argument("--decode-E", dest="decode_E", type=_csv(int), default=[16, 32, 64], help="decode: head dims")
    g.add_argument("--decode-steps", dest="decode_steps", type=int, default=30, help="decode: timed steps (median)")
    g.add_argument("--no-attention", dest="no_attention", action="store_true", help="skip part 1")
    g.add_argument("--no-decode", dest="no_decode", action="store_true", help="skip part 2")
    g.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads for every case (default: torch's default); on a shared, "
                        "oversubscribed machine 1 gives steadier ratios")
    g.add_argument("--long-json", dest="long_json", metavar="PATH", help="write all records as JSON")


# ----------------------------------------------------------------------------------------------
# part 1: attention time and memory vs L


def _case(impl: str, E: int, L: int, mode: str, args) -> Case:
    kw = dict(B=args.long_B, H=args.long_H, L=L, E=E, causal=True, mode=mode, repeats=args.long_repeats)
    if impl == "sdpa":
        return Case("sdpa", **kw)
    return Case("ea", variant="squared", backend=impl, **kw)


def attention_records(args, progress) -> list[dict]:
    for impl in args.impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown {impl!r} (choose from {', '.join(IMPLS)})")
    jobs = [(impl, E, L, mode) for E in args.long_E for L in args.long_L for mode in args.long_modes
            for impl in args.impls]
    records = []
    for impl, E, L, mode in progress(jobs, desc="attention", unit="case"):
        case = _case(impl, E, L, mode, args)
        if impl == "reference" and case.B * case.H * L * L > REFERENCE_MAX_ELEMENTS:
            records.append({**case.__dict__, "impl_name": impl, "skipped": "materialises B*H*L^2 floats"})
            continue
        records.append({**run_case(case, timeout=1800), "impl_name": impl})
    return records


def format_attention(records: list[dict]) -> str:
    head = f"{'E':>3} {'L':>6} {'mode':>6}  {'impl':<10} {'ms':>10} {'x SDPA':>7} {'peak MB':>9} {'x SDPA':>7}"
    lines = [head, "-" * len(head)]
    sdpa = {(r["E"], r["L"], r["mode"]): r for r in records if r["impl_name"] == "sdpa" and "time_ms" in r}
    for r in records:
        pre = f"{r['E']:>3} {r['L']:>6} {r['mode']:>6}  {r['impl_name']:<10}"
        if "skipped" in r or "error" in r:
            lines.append(f"{pre} {'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r['error'][:70]}")
            continue
        s = sdpa.get((r["E"], r["L"], r["mode"]))
        r["time_x_sdpa"] = r["time_ms"] / s["time_ms"] if s else float("nan")
        r["mem_x_sdpa"] = r["peak_mb"] / s["peak_mb"] if s and s["peak_mb"] > 0 else float("nan")
        lines.append(f"{pre} {r['time_ms']:>10.1f} {r['time_x_sdpa']:>7.2f} {r['peak_mb']:>9.1f} {r['mem_x_sdpa']:>7.2f}")
    return "\n".join(lines)


def crossovers(records: list[dict]) -> list[str]:
    """Per (E, mode): the shortest measured L from which on linear is faster than SDPA / than every
    quadratic EA backend measured, and an estimate between grid points: the median over L of
    L * t_linear / t_other (exact if linear time ~ L and quadratic time ~ L^2)."""
    ok = [r for r in records if "time_ms" in r]
    out = []
    for E, mode in dict.fromkeys((r["E"], r["mode"]) for r in ok):
        Ls = sorted({r["L"] for r in ok if r["E"] == E and r["mode"] == mode})
        t = {(r["impl_name"], r["L"]): r["time_ms"] for r in ok if r["E"] == E and r["mode"] == mode}
        quad = [i for i in ("reference", "fused_cpu", "blocked") if any((i, L) in t for L in Ls)]

        def first_win(others):
            wins = [L for L in Ls if ("linear", L) in t and any((o, L) in t for o in others)]
            wins = [L for L in wins if all(t[("linear", L)] < t[(o, L)] for o in others if (o, L) in t)]
            comparable = [L for L in Ls if L in wins or (("linear", L) in t and any((o, L) in t for o in others))]
            # the crossover: linear wins at this L and at every longer L measured
            for i, L in enumerate(comparable):
                if all(x in wins for x in comparable[i:]):
                    return f"L >= {L}"
            return f"nowhere up to L = {Ls[-1]}"

        def estimate(others):
            # linear ~ L, quadratic ~ L^2: the time ratio at L predicts the crossover L * ratio
            est = [L * t[("linear", L)] / min(t[(o, L)] for o in others if (o, L) in t)
                   for L in Ls if ("linear", L) in t and any((o, L) in t for o in others)]
            return f" (estimate ~{statistics.median(est):.0f})" if est else ""

        out.append(f"E={E} {mode}: linear beats SDPA from {first_win(['sdpa'])}{estimate(['sdpa'])}; beats the "
                   f"quadratic EA backends ({', '.join(quad) or 'none measured'}) from {first_win(quad)}{estimate(quad)}")
    return out


def targets(records: list[dict]) -> list[str]:
    by = {(r["impl_name"], r["E"], r["L"], r["mode"]): r for r in records if "time_ms" in r}
    lin, sd = by.get(("linear", 16, 16384, "fwdbwd")), by.get(("sdpa", 16, 16384, "fwdbwd"))
    if not (lin and sd):
        return []
    speed, mem = sd["time_ms"] / lin["time_ms"], lin["peak_mb"] / max(sd["peak_mb"], 1e-9)
    return [f"target L=16384 E=16 fwd+bwd: linear is {speed:.2f}x faster than SDPA (target >= 3), "
            f"peak memory {mem:.2f}x SDPA's (target <= 2)"]


# ----------------------------------------------------------------------------------------------
# part 2: decode step vs context length


def _prefill(cache, layer, B: int, H: int, E: int, context: int, g) -> None:
    with torch.no_grad():
        q, k, v = (torch.randn(B, H, context, E, generator=g) for _ in range(3))
        cache.attend(q, k, v, layer.attend)


def _step_s(cache, layer, B: int, H: int, E: int, g, flush: torch.Tensor) -> float:
    with torch.no_grad():
        q, k, v = (torch.randn(B, H, 1, E, generator=g) for _ in range(3))
        flush.add_(1.0)  # evict the CPU caches: every step starts cold, whatever ran before it
        t0 = time.perf_counter()
        cache.attend(q, k, v, layer.attend)
        return time.perf_counter() - t0


def decode_records(args, progress) -> list[dict]:
    """Per E: prefill one cache of each kind per context, then time steps round-robin over all of
    them (so that load drifting on a shared machine hits every context alike); median per cache.
    Before each timed step a 64 MiB buffer is rewritten, so that no step finds its cache or state
    left in the CPU caches by the step before (in a model, the other layers evict it too)."""
    from ..nn import KVCache, MultiheadAttention
    from ..nn.recurrent import RecurrentEAState

    B, H = args.long_B, args.long_H
    g = torch.Generator().manual_seed(0)
    flush = torch.zeros(2**24)  # 64 MiB
    records = []
    for E in progress(args.decode_E, desc="decode", unit="E"):
        layers = {"kv_dpa": MultiheadAttention(H * E, H, attention="dpa"),
                  "kv_ea": MultiheadAttention(H * E, H, attention="ea", variant="squared")}
        layers["recurrent_ea"] = layers["kv_ea"]
        caches = {}
        for ctx in args.contexts:
            for kind, layer in layers.items():
                cache = RecurrentEAState(layer) if kind == "recurrent_ea" else KVCache()
                _prefill(cache, layer, B, H, E, ctx, g)
                caches[(ctx, kind)] = cache
        times = {key: [] for key in caches}
        for i in range(args.decode_steps + 2):
            for (ctx, kind), cache in caches.items():
                t = _step_s(cache, layers[kind], B, H, E, g, flush)
                if i >= 2:  # two warm-up steps
                    times[(ctx, kind)].append(t)
        for ctx in args.contexts:
            r = {"E": E, "context": ctx, "B": B, "H": H}
            for kind in layers:
                r[f"{kind}_us"] = 1e6 * statistics.median(times[(ctx, kind)])
            r["kv_mb"] = caches[(ctx, "kv_ea")].nbytes() / 2**20
            r["state_mb"] = caches[(ctx, "recurrent_ea")].nbytes() / 2**20
            records.append(r)
        del caches
    return records


def format_decode(records: list[dict]) -> str:
    head = (f"{'E':>3} {'context':>8}  {'KV DPA us':>10} {'KV EA us':>10} {'recurrent us':>12}  "
            f"{'KV cache MB':>11} {'state MB':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['E']:>3} {r['context']:>8}  {r['kv_dpa_us']:>10.0f} {r['kv_ea_us']:>10.0f} "
                     f"{r['recurrent_ea_us']:>12.0f}  {r['kv_mb']:>11.2f} {r['state_mb']:>9.2f}")
    for E in dict.fromkeys(r["E"] for r in records):
        rec = [r["recurrent_ea_us"] for r in records if r["E"] == E]
        lines.append(f"E={E}: recurrent step max/min over contexts = {max(rec) / min(rec):.2f} (target: within 1.20)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def run_long_benchmark(args: argparse.Namespace) -> int:
    """Entry point of `ea bench --long` and benchmarks/bench_long.py; `args` from `add_arguments`."""
    if getattr(args, "threads", None):
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the per-case subprocesses
        torch.set_num_threads(args.threads)
    try:
        from tqdm import tqdm as progress
    except ImportError:  # the [cli] extra brings tqdm
        progress = lambda it, **kw: it  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; B={args.long_B} H={args.long_H} float32 causal, "
          "EA variant='squared'")
    out = {}
    if not args.no_attention:
        recs = attention_records(args, progress)
        print("\nAttention, time and peak memory (each case in a fresh process; peak = resident-set "
              "high-water mark above the post-warm-up baseline)")
        print(format_attention(recs))
        for line in crossovers(recs) + targets(recs):
            print(line)
        out["attention"] = recs
    if not args.no_decode:
        recs = decode_records(args, progress)
        print(f"\nDecode step, one attention layer, B={args.long_B} H={args.long_H} (median of "
              f"{args.decode_steps} steps after prefilling the context, round-robin over contexts)")
        print(format_decode(recs))
        out["decode"] = recs
    if args.long_json:
        with open(args.long_json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.long_json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_long_benchmark(p.parse_args(argv))
