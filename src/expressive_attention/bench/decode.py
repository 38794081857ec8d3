"""`ea bench decode`: one decoding step, EA against SDPA on the same KV-cache tensors.

A step is one attention call of L new query rows (1 by default) against a cache of S keys and
values, as `KVCache` hands it to the layer: q (B, H, L, E), k/v (B, Hkv, S, E) views of a buffer
with spare capacity. Both mechanisms go through the one switch, `attention(kind=...)`, so EA pays
its whole Python path (argument checks, `backend="auto"`) like a model does. Per case the two are
timed alternately, one call each, `steps` times (the order flips every step, and a 64 MiB buffer is
rewritten before each call so that no call finds the cache in the CPU caches); the figures are the
medians, and the ratio is the median of the per-step ratios EA / SDPA (steadier than a ratio of
medians when a shared machine's load drifts).

    ea bench decode                                   # contexts 1k,4k,16k; E 16,32,64; B 1,4; H 8 (Hkv 8, 2)
    ea bench decode --contexts 4096 --E 64 --B 1 --H 4 --kv-heads 4 --steps 9
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

from .measure import check_positive, check_positive_lists, progress_bar


@dataclass
class DecodeBench:
    """What `run_decode_benchmark` measures (`ea bench decode`)."""

    contexts: Sequence[int] = (1024, 4096, 16384)  # S: keys in the cache
    E: Sequence[int] = (16, 32, 64)  # head dims
    B: Sequence[int] = (1, 4)  # batch sizes
    H: int = 8  # query heads
    kv_heads: Sequence[int] = (8, 2)  # key/value heads (each divides H; < H is GQA)
    rows: int = 1  # L: new query rows per step
    variant: str = "saturating"
    backend: str = "auto"  # EA backend
    steps: int = 15  # timed calls of each kind per case (median; at least 5)
    threads: int | None = None  # torch threads (None: torch's default)
    flush: bool = True  # rewrite 64 MiB before each call (cold CPU caches, as inside a model)
    json: str | None = None

    def check(self) -> None:
        from ..ops.problem import check_variant

        check_positive(self, "H", "rows", "steps")
        check_positive_lists(self, "contexts", "E", "B", "kv_heads")
        if self.steps < 5:
            raise ValueError(f"steps must be >= 5 (the figures are medians), got {self.steps}")
        bad = [h for h in self.kv_heads if self.H % h]
        if bad:
            raise ValueError(f"kv_heads must divide H={self.H}, got {bad}")
        check_variant(self.variant)
        if self.threads is not None:
            check_positive(self, "threads")


def _cache_views(B: int, Hkv: int, S: int, E: int, g: torch.Generator):
    """k, v (B, Hkv, S, E) as `KVCache` holds them: the first S rows of a buffer of capacity 2 S."""
    buf = torch.randn(2, B, Hkv, 2 * S, E, generator=g)
    return buf[0, :, :, :S], buf[1, :, :, :S]


def _timed_us(fn, flush: torch.Tensor | None) -> float:
    if flush is not None:
        flush.add_(1.0)
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def time_case(spec: DecodeBench, B: int, Hkv: int, S: int, E: int, flush, g) -> dict:
    """One (B, Hkv, S, E): `spec.steps` alternating SDPA / EA calls after two warm-up calls each."""
    from ..ops import attention
    from ..ops.dispatch import choose_backend
    from ..ops.problem import normalise

    H, L = spec.H, spec.rows
    q = torch.randn(B, H, L, E, generator=g)
    k, v = _cache_views(B, Hkv, S, E, g)
    gqa = Hkv != H
    ea_kw = dict(kind="ea", variant=spec.variant, backend=spec.backend)
    calls = {"sdpa": lambda: attention(q, k, v, enable_gqa=gqa, kind="dpa"),
             "ea": lambda: attention(q, k, v, enable_gqa=gqa, **ea_kw)}
    times = {"sdpa": [], "ea": []}
    with torch.inference_mode():
        for fn in calls.values():
            fn(), fn()
        for i in range(spec.steps):
            for name in (("sdpa", "ea") if i % 2 == 0 else ("ea", "sdpa")):
                times[name].append(_timed_us(calls[name], flush))
        backend = spec.backend
        if backend == "auto":
            backend = choose_backend(normalise(q, k, v, None, 0.0, False, None, gqa, spec.variant, 1e-6)).name
    ratios = [e / s for e, s in zip(times["ea"], times["sdpa"])]
    return {"B": B, "H": H, "Hkv": Hkv, "L": L, "S": S, "E": E, "backend": backend,
            "sdpa_us": statistics.median(times["sdpa"]), "ea_us": statistics.median(times["ea"]),
            "ratio": statistics.median(ratios)}


def format_decode(records: list[dict]) -> str:
    head = f"{'B':>2} {'H':>2} {'Hkv':>3} {'E':>3} {'context':>8}  {'SDPA us':>9} {'EA us':>9} {'EA/SDPA':>8}  backend"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['B']:>2} {r['H']:>2} {r['Hkv']:>3} {r['E']:>3} {r['S']:>8}  {r['sdpa_us']:>9.0f} "
                     f"{r['ea_us']:>9.0f} {r['ratio']:>8.2f}  {r['backend']}")
    worst = max(records, key=lambda r: r["ratio"])
    lines.append(f"EA/SDPA over {len(records)} cases: median {statistics.median(r['ratio'] for r in records):.2f}, "
                 f"worst {worst['ratio']:.2f} (B={worst['B']} Hkv={worst['Hkv']} E={worst['E']} context={worst['S']})")
    return "\n".join(lines)


def run_decode_benchmark(spec: DecodeBench, progress: bool = True) -> list[dict]:
    """Every (B, Hkv, E, context) case; prints the table, returns the records."""
    spec.check()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {load:.2f}; float32, L={spec.rows} new rows, EA variant={spec.variant!r} "
          f"backend={spec.backend!r}; median of {spec.steps} alternating calls each"
          f"{', caches flushed before each call' if spec.flush else ''}")
    g = torch.Generator().manual_seed(0)
    flush = torch.zeros(2**24) if spec.flush else None
    jobs = [(B, Hkv, E, S) for B in spec.B for Hkv in spec.kv_heads for E in spec.E for S in spec.contexts]
    records = [time_case(spec, B, Hkv, S, E, flush, g)
               for B, Hkv, E, S in progress_bar(jobs, progress, desc="decode", unit="case")]
    print(format_decode(records))
    if spec.json:
        with open(spec.json, "w") as f:
            json.dump({"spec": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.__dict__.items()},
                       "threads": torch.get_num_threads(), "load_average": load, "records": records}, f, indent=1)
        print(f"wrote {spec.json}")
    return records
