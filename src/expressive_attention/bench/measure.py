"""Time and peak memory of one attention call, measured in a fresh subprocess.

Peak memory on CPU is the growth of the process's resident set while the case runs: the kernel's
high-water mark (VmHWM) is reset through /proc/self/clear_refs after the inputs are built and a warm-up
run has initialised the libraries, and the case's peak is VmHWM minus the resident size at that point.
The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so that every buffer of 64 KiB or more is a fresh
mapping returned to the system when freed: the high-water mark then follows live memory instead of
the allocator's recycled heap. This counts every allocation, including scratch buffers inside fused
C++ kernels that a tensor-level tracker would miss. On CUDA it is torch.cuda.max_memory_allocated().
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

MODES = ("fwd", "fwdbwd")
# The reference materialises several (B, H, L, S) float32 matrices: it is measured only below this size.
REFERENCE_MAX_ELEMENTS = 2**26


@dataclass(frozen=True)
class Case:
    kind: str  # "dpa" (PyTorch SDPA) or "ea"
    B: int
    H: int
    L: int
    E: int
    causal: bool = True
    mode: str = "fwdbwd"  # "fwd" or "fwdbwd"
    variant: str = "saturating"
    backend: str = "auto"
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3

    @property
    def flops(self) -> float:
        """Matmul flops: 2 products of 2*L*S*E each forward (halved when causal); backward ~2.5x."""
        f = 4.0 * self.B * self.H * self.L * self.L * self.E * (0.5 if self.causal else 1.0)
        return f * (3.5 if self.mode == "fwdbwd" else 1.0)

    @property
    def reference_fits(self) -> bool:
        """Whether the materialising reference backend can be measured at this size."""
        return self.B * self.H * self.L * self.L <= REFERENCE_MAX_ELEMENTS


def _call(case: Case, q, k, v):
    if case.kind == "dpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    from expressive_attention import expressive_attention

    return expressive_attention(q, k, v, is_causal=case.causal, variant=case.variant, backend=case.backend)


def _step(case: Case, q, k, v, do):
    out = _call(case, q, k, v)
    if case.mode == "fwdbwd":
        out.backward(do)
        q.grad = k.grad = v.grad = None
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) / 1024.0  # kB -> MiB


def _reset_peak_rss() -> float:
    """Reset the resident-set high-water mark (Linux >= 4.0); returns the current resident MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _inputs(case: Case):
    """q, k, v (B, H, L, E) (leaves that require grad when the mode has a backward) and dO."""
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    shape = (case.B, case.H, case.L, case.E)
    q, k, v, do = (torch.randn(shape, generator=g).to(case.device, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(case.mode == "fwdbwd")
    return q, k, v, do


def _timed_step(case: Case, q, k, v, do) -> float:
    _sync(case.device)
    t0 = time.perf_counter()
    _step(case, q, k, v, do)
    _sync(case.device)
    return time.perf_counter() - t0


def _warm_and_peak(case: Case, q, k, v, do) -> dict:
    """One warm-up call (loads kernels, builds extensions or compiles; its time is `first_ms`), then one
    call whose extra peak memory is measured."""
    first = _timed_step(case, q, k, v, do)
    if case.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _reset_peak_rss()
    _step(case, q, k, v, do)  # measured run
    _sync(case.device)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if case.device.startswith("cuda") else _status_mb("VmHWM")) - base
    return {**asdict(case), "first_ms": 1e3 * first, "peak_mb": max(peak, 0.0)}


def _finish(record: dict, case: Case, times: list[float]) -> dict:
    t = statistics.median(times)
    return {**record, "time_ms": 1e3 * t, "gflops": case.flops / t / 1e9}


def run_in_process(case: Case) -> dict:
    q, k, v, do = _inputs(case)
    record = _warm_and_peak(case, q, k, v, do)
    return _finish(record, case, [_timed_step(case, q, k, v, do) for _ in range(case.repeats)])


def run_interleaved_in_process(cases: Sequence[Case]) -> list[dict]:
    """Cases of one shape (same B, H, L, E, mode, dtype, device) on the same inputs, timed in turn
    within each repeat (SDPA, EA, SDPA, EA, ...), so that a change in the machine's load hits all of
    them alike. A case that raises gets an "error" record; the others go on."""
    q, k, v, do = _inputs(cases[0])
    records = []
    for case in cases:
        try:
            records.append(_warm_and_peak(case, q, k, v, do))
        except Exception as e:  # reported in the table, like a failed fresh-process case
            records.append({**asdict(case), "error": f"{type(e).__name__}: {e}".splitlines()[0]})
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(max(c.repeats for c in cases)):
        for i, case in enumerate(cases):
            if "error" not in records[i]:
                times[i].append(_timed_step(case, q, k, v, do))
    return [r if "error" in r else _finish(r, c, t) for r, c, t in zip(records, cases, times)]


def run_case(case: Case, timeout: float = 900.0) -> dict:
    """Run `case` in a fresh Python process (clean memory high-water mark); returns its record."""
    return _run_fresh([case], timeout, clean_peak=True)[0]


def run_interleaved(cases: Sequence[Case], timeout: float = 1800.0) -> list[dict]:
    """`run_interleaved_in_process(cases)` in one fresh Python process; returns one record per case.
    The process keeps the allocator's defaults: MALLOC_MMAP_THRESHOLD_=65536 (see the module docstring)
    makes every large temporary a fresh mapping, page-faulted on each use, which slows a backend that
    allocates per tile (blocked: 2.9x instead of 1.24x SDPA's time at E=32, L=2048) and not SDPA."""
    return _run_fresh(list(cases), timeout, clean_peak=False)


def _run_fresh(cases: list[Case], timeout: float, clean_peak: bool) -> list[dict]:
    env = dict(os.environ)
    if clean_peak:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    arg = json.dumps(asdict(cases[0]) if len(cases) == 1 else [asdict(c) for c in cases])
    proc = subprocess.run([sys.executable, "-m", "expressive_attention.bench.measure", arg],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return [{**asdict(c), "error": error} for c in cases]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out if isinstance(out, list) else [out]


def check_modes(modes: Sequence[str]) -> None:
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")


def check_positive(spec, *names: str) -> None:
    """Every named integer field of `spec` is >= 1 (ValueError naming the field otherwise)."""
    for name in names:
        if int(getattr(spec, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)!r}")


def check_positive_lists(spec, *names: str) -> None:
    """Every named list field of `spec` is non-empty and holds integers >= 1."""
    for name in names:
        values = list(getattr(spec, name))
        if not values or any(int(v) < 1 for v in values):
            raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values}")


def progress_bar(items: Iterable, enabled: bool = True, **kw) -> Iterable:
    """tqdm over `items` when it is installed (the [cli] extra) and `enabled`, else `items` itself."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, **kw)


def matmul_peak_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This machine's float32 matmul throughput, the roofline the attention kernels are held to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    _arg = json.loads(sys.argv[1])
    if isinstance(_arg, list):
        print(json.dumps(run_interleaved_in_process([Case(**c) for c in _arg])))
    else:
        print(json.dumps(run_in_process(Case(**_arg))))
