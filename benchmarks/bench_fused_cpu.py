"""Fused CPU expressive attention vs PyTorch SDPA, forward+backward, measured in one run.

    .venv/bin/python benchmarks/bench_fused_cpu.py            # the table (float32, B=4, H=4, causal)
    .venv/bin/python benchmarks/bench_fused_cpu.py --json out.json

Prints the matmul peak of this machine (torch.mm 2048^3, float32), then for each E in {32, 64}
and L in {256, 1024, 4096}: forward+backward times of SDPA and of EA (`backend="fused_cpu"`),
their ratio, the extra peak memory of each and its ratio, and the achieved GFLOP/s.

Time: SDPA and EA runs alternate, and the median of each is taken (the machine is shared).
FLOPs: one convention for both, so GFLOP/s ratios equal time ratios: forward 4*B*H*L*S*E
(QK^T and AV), backward 2.5x forward (QK^T recompute, dO V^T, dV, dK, dQ), halved when causal.
Peak memory: each (implementation, E, L) runs once in a fresh subprocess; after a warm-up on a
tiny problem and allocating the inputs, the kernel's peak-RSS counter is reset
(/proc/self/clear_refs = 5) and the extra peak is VmHWM - VmRSS around one forward+backward.
This counts every byte the process touches (PyTorch tensors and the kernels' own buffers).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from expressive_attention.bench import matmul_peak_gflops
from expressive_attention.ops import expressive_attention

B, H = 4, 4
ES, LS = (32, 64), (256, 1024, 4096)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_inputs(E: int, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, E, generator=g).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(B, H, L, E, generator=g)


def step(impl: str, q, k, v, dout) -> None:
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = expressive_attention(q, k, v, is_causal=True, backend="fused_cpu")
    out.backward(dout)
    q.grad = k.grad = v.grad = None


def flops(E: int, L: int) -> float:
    fwd = 4 * B * H * L * L * E / 2  # causal
    return 3.5 * fwd


def time_pair(E: int, L: int, budget_s: float = 3.0) -> tuple[float, float]:
    q, k, v, dout = make_inputs(E, L)
    for impl in ("sdpa", "ea"):
        step(impl, q, k, v, dout)  # warm-up
    t0 = _timed(lambda: step("sdpa", q, k, v, dout)) + _timed(lambda: step("ea", q, k, v, dout))
    reps = max(3, min(30, int(budget_s / max(t0, 1e-6))))
    ts = {"sdpa": [], "ea": []}
    for _ in range(reps):
        for impl in ("sdpa", "ea"):
            ts[impl].append(_timed(lambda: step(impl, q, k, v, dout)))
    return statistics.median(ts["sdpa"]), statistics.median(ts["ea"])


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {key: int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def mem_case(impl: str, E: int, L: int) -> int:
    """Extra peak bytes of one forward+backward (run in a fresh process)."""
    step(impl, *make_inputs(E, 64))  # initialise libraries, thread pools, the extension
    q, k, v, dout = make_inputs(E, L)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status()["VmRSS"]
    step(impl, q, k, v, dout)
    return _status()["VmHWM"] - before


def peak_memory(impl: str, E: int, L: int) -> int:
    cmd = [sys.executable, __file__, "--mem-case", impl, str(E), str(L)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    ap.add_argument("--mem-case", nargs=3, metavar=("IMPL", "E", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_case:
        impl, E, L = args.mem_case
        print(mem_case(impl, int(E), int(L)))
        return

    from expressive_attention.ops import fused_cpu

    if not fused_cpu.is_available():
        sys.exit(f"the fused CPU kernel is unavailable: {fused_cpu._STATE['error']}")
    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32, B={B}, H={H}, "
          f"causal, forward+backward")
    print(f"matmul peak (torch.mm 2048^3): {peak:.1f} GFLOP/s")
    hdr = ("E", "L", "SDPA ms", "EA ms", "EA/SDPA", "SDPA MB", "EA MB", "mem ratio",
           "SDPA GF/s", "EA GF/s", "EA %peak")
    print(" | ".join(f"{h:>9}" for h in hdr))
    rows = []
    for E in ES:
        for L in LS:
            t_sdpa, t_ea = time_pair(E, L, args.budget)
            m_sdpa, m_ea = peak_memory("sdpa", E, L), peak_memory("ea", E, L)
            fl = flops(E, L)
            row = dict(E=E, L=L, sdpa_ms=t_sdpa * 1e3, ea_ms=t_ea * 1e3, ratio=t_ea / t_sdpa,
                       sdpa_mb=m_sdpa / 2**20, ea_mb=m_ea / 2**20, mem_ratio=m_ea / max(m_sdpa, 1),
                       sdpa_gflops=fl / t_sdpa / 1e9, ea_gflops=fl / t_ea / 1e9)
            row["ea_pct_peak"] = 100 * row["ea_gflops"] / peak
            rows.append(row)
            vals = (E, L, row["sdpa_ms"], row["ea_ms"], row["ratio"], row["sdpa_mb"], row["ea_mb"],
                    row["mem_ratio"], row["sdpa_gflops"], row["ea_gflops"], row["ea_pct_peak"])
            fmt = ("{:>9d}", "{:>9d}", "{:>9.2f}", "{:>9.2f}", "{:>9.2f}", "{:>9.1f}", "{:>9.1f}",
                   "{:>9.2f}", "{:>9.1f}", "{:>9.1f}", "{:>9.0f}")
            print(" | ".join(f.format(x) for f, x in zip(fmt, vals)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(matmul_peak_gflops=peak, threads=torch.get_num_threads(), B=B, H=H,
                           dtype="float32", causal=True, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
