"""`ea bench ops`: EA (each variant, each backend) against SDPA on the same shapes, in one run."""
from __future__ import annotations

import itertools
import json
import platform
from dataclasses import dataclass, replace
from collections.abc import Sequence

import torch

from ..ops.problem import check_variant, normalise
from .measure import (Case, check_modes, check_positive, check_positive_lists, matmul_peak_gflops,
                      progress_bar, run_case, run_interleaved)


def ea_backends_for(case: Case) -> list[str]:
    """Registered backends that can run `case` (checked on a tiny problem of the same kind)."""
    from ..ops import BACKENDS

    x = torch.zeros(1, 1, 4, case.E, dtype=getattr(torch, case.dtype), device=case.device,
                    requires_grad=case.mode == "fwdbwd")  # forward-only backends (flex on CPU) refuse fwdbwd
    p = normalise(x, x, x, None, 0.0, case.causal, None, False, case.variant, 1e-6)
    names = []
    for name, b in BACKENDS.items():
        if name == "reference" and not case.reference_fits:
            continue
        if b.unsupported(p) is None:
            names.append(name)
    return names


def build_cases(spec: OpsBench) -> list[Case]:
    """SDPA, then each EA variant on each backend, for every (E, L, mode) of `spec`."""
    cases = []
    for E in spec.E:
        for L in spec.L:
            for mode in spec.modes:
                base = Case("dpa", spec.B, spec.H, L, E, causal=spec.causal, mode=mode,
                            dtype=spec.dtype, device=spec.device, repeats=spec.repeats)
                cases.append(base)
                for variant in spec.variants:
                    probe = replace(base, kind="ea", variant=variant)
                    backends = spec.backends or ["auto", *ea_backends_for(probe)]
                    cases.extend(replace(probe, backend=b) for b in dict.fromkeys(backends))
    return cases


def format_table(records: list[dict], peak: float) -> str:
    head = f"{'E':>4} {'L':>6} {'mode':>6}  {'attention':<28} {'ms':>10} {'x SDPA':>7} {'peak MB':>9} {'x SDPA':>7} {'GFLOP/s':>8} {'% peak':>6}"
    lines = [head, "-" * len(head)]
    sdpa = {}
    for r in records:
        key = (r["E"], r["L"], r["mode"])
        if r["kind"] == "dpa":
            sdpa[key] = r
        name = "sdpa" if r["kind"] == "dpa" else f"ea {r['variant']} [{r['backend']}]"
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


@dataclass
class OpsBench:
    """What `run_ops_benchmark` measures (`ea bench ops`): EA against SDPA on every (E, L, mode)."""

    E: Sequence[int] = (32,)  # head dims
    L: Sequence[int] = (256, 1024, 4096)  # sequence lengths
    B: int = 4
    H: int = 4
    modes: Sequence[str] = ("fwd", "fwdbwd")
    variants: Sequence[str] = ("saturating",)  # EA variants
    backends: Sequence[str] | None = None  # EA backends; None: "auto" and every one that supports the shape
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = True
    repeats: int = 3  # timed repeats per case (median reported)
    json: str | None = None  # also write all records here
    interleave: bool = False  # time the cases of one shape in one process, in turn (else one process per case)

    def check(self) -> None:
        for v in self.variants:
            check_variant(v)
        check_modes(self.modes)
        check_positive(self, "B", "H", "repeats")
        check_positive_lists(self, "E", "L")


def run_ops_benchmark(spec: OpsBench, progress: bool = True) -> list[dict]:
    """Time every case of `spec`, each in a fresh process; print the table; return the records."""
    spec.check()
    peak = matmul_peak_gflops()
    cases = build_cases(spec)
    how = "the cases of each shape interleaved in one fresh process" if spec.interleave else "each in a fresh process"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"float32 matmul peak {peak:.0f} GFLOP/s; B={spec.B} H={spec.H} {spec.dtype} "
          f"{'causal' if spec.causal else 'full'}; {len(cases)} cases, {how}")
    if spec.interleave:
        groups = itertools.groupby(cases, key=lambda c: (c.E, c.L, c.mode))
        records = [r for group in progress_bar([list(g) for _, g in groups], progress, desc="bench", unit="shape")
                   for r in run_interleaved(group)]
    else:
        records = [run_case(case) for case in progress_bar(cases, progress, desc="bench", unit="case")]
    print(format_table(records, peak))
    slow_first = [r for r in records if r.get("first_ms", 0.0) > 1000.0 and r["first_ms"] > 10 * r["time_ms"]]
    for r in slow_first:  # a one-time build or compile, not part of the timed calls
        print(f"first call of E={r['E']} L={r['L']} {r['mode']} {r['kind']} {r['variant']} [{r['backend']}]: "
              f"{r['first_ms'] / 1e3:.1f} s (one-time build/compile, excluded from the times)")
    if spec.json:
        with open(spec.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "torch": torch.__version__, "records": records}, f, indent=1)
        print(f"wrote {spec.json}")
    return records
