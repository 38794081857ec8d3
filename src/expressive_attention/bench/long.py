"""`ea bench --long`: long contexts. EA-squared's exact linear form against the quadratic backends.

1. Attention time and peak memory vs L for the reference, the fused CPU kernel, the linear form and
   SDPA (forward and/or forward+backward), each case in a fresh process (see bench/measure.py for the
   memory method: resident-set high-water mark above the post-warm-up baseline). From the table, the
   crossover: the shortest L at which the linear form beats SDPA and beats the best quadratic EA backend.
2. Decode-step time vs context length for KV-cache DPA, KV-cache EA (squared) and recurrent EA
   (constant-size state), one attention layer, B x H heads: median of timed steps after a prefill,
   round-robin over the contexts, each step starting with the CPU caches flushed.

    ea bench long --threads 1                            # the full default sweep
    ea bench long --E 16 --L 2048,16384 --backends linear,sdpa --no-decode
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from collections.abc import Sequence

import torch

from .measure import Case, check_modes, check_positive, check_positive_lists, progress_bar, run_case

# what part 1 can time: EA-squared on these backends, and "sdpa" (PyTorch's DPA) as the baseline
BACKENDS = ("reference", "fused_cpu", "blocked", "linear", "sdpa")


@dataclass
class LongBench:
    """What `run_long_benchmark` measures (`ea bench long`)."""

    E: Sequence[int] = (16, 32)  # part 1: head dims
    L: Sequence[int] = (2048, 4096, 8192, 16384)  # part 1: sequence lengths
    B: int = 4
    H: int = 4
    backends: Sequence[str] = ("reference", "fused_cpu", "linear", "sdpa")  # part 1: from BACKENDS
    modes: Sequence[str] = ("fwdbwd",)  # part 1
    repeats: int = 2  # part 1: timed repeats per case (median)
    rounds: int = 1  # part 1: passes over all cases, interleaved (each a fresh process); median over rounds
    contexts: Sequence[int] = (1024, 4096, 16384)  # part 2: context lengths
    decode_E: Sequence[int] = (16, 32, 64)  # part 2: head dims
    decode_steps: int = 30  # part 2: timed steps (median)
    attention: bool = True  # run part 1
    decode: bool = True  # run part 2
    threads: int | None = None  # torch/OpenMP threads for every case (None: torch's default)
    json: str | None = None  # write all records here

    def check(self) -> None:
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ValueError(f"backends must be a non-empty subset of {BACKENDS}, got {list(self.backends)}")
        check_modes(self.modes)
        check_positive(self, "B", "H", "repeats", "rounds", "decode_steps")
        check_positive_lists(self, "E", "L", "contexts", "decode_E")
        if self.threads is not None:
            check_positive(self, "threads")


# ----------------------------------------------------------------------------------------------
# part 1: attention time and memory vs L


def _case(name: str, E: int, L: int, mode: str, spec: LongBench) -> Case:
    kw = dict(B=spec.B, H=spec.H, L=L, E=E, causal=True, mode=mode, repeats=spec.repeats)
    if name == "sdpa":
        return Case("dpa", **kw)
    return Case("ea", variant="squared", backend=name, **kw)


def attention_records(spec: LongBench, progress: bool = True) -> list[dict]:
    """Part 1: one record per (E, L, mode, backend), each case in a fresh process; "name" is the
    backend, or "sdpa". With `spec.rounds` > 1 the whole list of cases is run that many times in turn
    (so that load drifting on a shared machine hits every backend alike) and each record holds the
    median time and peak over the rounds ("time_ms_rounds": every round's time)."""
    jobs = [(name, E, L, mode) for E in spec.E for L in spec.L for mode in spec.modes for name in spec.backends]
    runs: dict[tuple, list[dict]] = {job: [] for job in jobs}
    for _, job in progress_bar([(r, j) for r in range(spec.rounds) for j in jobs], progress, desc="attention",
                               unit="case"):
        name, E, L, mode = job
        case = _case(name, E, L, mode, spec)
        if name == "reference" and not case.reference_fits:
            runs[job] = [{**case.__dict__, "name": name, "skipped": "materialises B*H*L^2 floats"}]
            continue
        runs[job].append({**run_case(case, timeout=1800), "name": name})
    records = []
    for job in jobs:
        failed = [r for r in runs[job] if "time_ms" not in r]  # skipped, or a round that failed
        if failed:
            records.append(failed[0])
            continue
        ok = runs[job]
        records.append({**ok[0], "time_ms": statistics.median(r["time_ms"] for r in ok),
                        "peak_mb": statistics.median(r["peak_mb"] for r in ok),
                        "time_ms_rounds": [r["time_ms"] for r in ok]})
    return records


def format_attention(records: list[dict]) -> str:
    head = f"{'E':>3} {'L':>6} {'mode':>6}  {'backend':<10} {'ms':>10} {'x SDPA':>7} {'peak MB':>9} {'x SDPA':>7}"
    lines = [head, "-" * len(head)]
    sdpa = {(r["E"], r["L"], r["mode"]): r for r in records if r["name"] == "sdpa" and "time_ms" in r}
    for r in records:
        pre = f"{r['E']:>3} {r['L']:>6} {r['mode']:>6}  {r['name']:<10}"
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
        t = {(r["name"], r["L"]): r["time_ms"] for r in ok if r["E"] == E and r["mode"] == mode}
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


def decode_records(spec: LongBench, progress: bool = True) -> list[dict]:
    """Per E: prefill one cache of each kind per context, then time steps round-robin over all of
    them (so that load drifting on a shared machine hits every context alike); median per cache.
    Before each timed step a 64 MiB buffer is rewritten, so that no step finds its cache or state
    left in the CPU caches by the step before (in a model, the other layers evict it too)."""
    from ..nn import KVCache, MultiheadAttention
    from ..nn.recurrent import RecurrentEAState

    B, H = spec.B, spec.H
    g = torch.Generator().manual_seed(0)
    flush = torch.zeros(2**24)  # 64 MiB
    records = []
    for E in progress_bar(spec.decode_E, progress, desc="decode", unit="E"):
        layers = {"kv_dpa": MultiheadAttention(H * E, H, kind="dpa"),
                  "kv_ea": MultiheadAttention(H * E, H, kind="ea", variant="squared")}
        layers["recurrent_ea"] = layers["kv_ea"]
        caches = {}
        for ctx in spec.contexts:
            for kind, layer in layers.items():
                cache = RecurrentEAState(layer) if kind == "recurrent_ea" else KVCache()
                _prefill(cache, layer, B, H, E, ctx, g)
                caches[(ctx, kind)] = cache
        times = {key: [] for key in caches}
        for i in range(spec.decode_steps + 2):
            for (ctx, kind), cache in caches.items():
                t = _step_s(cache, layers[kind], B, H, E, g, flush)
                if i >= 2:  # two warm-up steps
                    times[(ctx, kind)].append(t)
        for ctx in spec.contexts:
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
        lines.append(f"E={E}: recurrent step max/min over contexts = {max(rec) / min(rec):.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def run_long_benchmark(spec: LongBench, progress: bool = True) -> dict:
    """Parts 1 and 2 as `spec` asks; prints the tables, returns {"attention": [...], "decode": [...]}."""
    spec.check()
    if spec.threads:
        os.environ["OMP_NUM_THREADS"] = str(spec.threads)  # inherited by the per-case subprocesses
        torch.set_num_threads(spec.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; B={spec.B} H={spec.H} float32 causal, "
          f"EA variant='squared'; load average {os.getloadavg()[0]:.1f}")
    out = {"threads": torch.get_num_threads(), "load_start": os.getloadavg()[0]}
    if spec.attention:
        recs = attention_records(spec, progress)
        print("\nAttention, time and peak memory (each case in a fresh process; peak = resident-set "
              "high-water mark above the post-warm-up baseline)")
        print(format_attention(recs))
        for line in crossovers(recs):
            print(line)
        out["attention"] = recs
    if spec.decode:
        recs = decode_records(spec, progress)
        print(f"\nDecode step, one attention layer, B={spec.B} H={spec.H} (median of "
              f"{spec.decode_steps} steps after prefilling the context, round-robin over contexts)")
        print(format_decode(recs))
        out["decode"] = recs
    out["load_end"] = os.getloadavg()[0]
    print(f"load average at the end {out['load_end']:.1f}")
    if spec.json:
        with open(spec.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {spec.json}")
    return out
