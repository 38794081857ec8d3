"""`ea bench gpu`: EA (Triton, and FlexAttention: `flex`) against SDPA (flash) on one CUDA GPU, in a few minutes.

Two parts, each case timed with CUDA events, EA and SDPA in turn within every repeat (median):
1. training shape, causal, forward+backward and forward (`modes`): L in `L` at a fixed token count
   (B = tokens // L), H heads, head dims `E`, bf16; triton-EA ("ea"), flex-EA ("flex") and SDPA in turn,
   with which EA backend was faster (`faster`: what ops/cuda_policy.py's CUDA_TABLE is to be filled from);
   a variant the Triton kernels lack is recorded as their refusal;
2. decoding: one query row against a KV cache of `contexts` keys (B in `decode_B`), through the public
   `expressive_attention` call, so it runs whatever path `backend="auto"` has for it.
Every measurement is time-boxed (`case_budget_s`: repeats stop early, at least one is kept) and the
whole run too (`total_budget_s`: cases left are recorded as skipped). Writes gpu_check.json and
gpu_check.md (a markdown table) into `out`. Installs and downloads nothing.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): run this on a machine with an NVIDIA GPU"


@dataclass
class GpuBench:
    """What `run_gpu_benchmark` measures."""

    out: str = "gpu_check"  # folder for gpu_check.json and gpu_check.md
    L: Sequence[int] = (1024, 2048, 4096, 8192, 16384)
    E: Sequence[int] = (64, 128)
    tokens: int = 16384  # B = tokens // L (at least 1)
    H: int = 16
    contexts: Sequence[int] = (1024, 4096, 16384)  # decode: KV-cache lengths
    decode_B: Sequence[int] = (1, 8)
    dtype: str = "bfloat16"
    repeats: int = 10  # per case (median), fewer if the case's time box runs out
    case_budget_s: float = 8.0
    total_budget_s: float = 200.0
    decode_calls: int = 50  # decode calls per timed repeat (one call is ~10 us)
    # the paper's EA and the variant the README recommends for text; each case runs them in turn
    variants: Sequence[str] = field(default_factory=lambda: ["saturating", "exp_squared"])
    modes: Sequence[str] = ("fwdbwd", "fwd")  # training-shape modes, each its own record

    def check(self) -> None:
        for name in ("L", "E", "contexts", "decode_B"):
            if not list(getattr(self, name)) or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {list(getattr(self, name))}")
        for name in ("tokens", "H", "repeats", "decode_calls"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        from ..ops.variants import VARIANTS

        bad = [v for v in self.variants if v not in VARIANTS]
        if not list(self.variants) or bad:
            raise ValueError(f"variants must be a non-empty list of {VARIANTS}, got {list(self.variants)}")
        if not list(self.modes) or any(m not in ("fwd", "fwdbwd") for m in self.modes):
            raise ValueError(f"modes must be a non-empty list of fwd, fwdbwd, got {list(self.modes)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")


def _flash():
    """A context that makes SDPA use the flash kernel (and fail rather than fall back)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def _time_in_turn(fns: dict[str, Callable[[], None]], repeats: int, budget_s: float, calls: int = 1) -> dict:
    """Median ms per call of each function, run in turn within each repeat; stops early once `budget_s`
    has passed (after at least one repeat). A function that raises is reported with its error."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    errors: dict[str, str] = {}
    for name, fn in fns.items():  # warm-up: Triton JIT compiles, cuDNN/flash setup
        try:
            fn()
        except Exception as e:  # recorded, and left out of the timing
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    torch.cuda.synchronize()
    t_end = time.perf_counter() + budget_s
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in errors:
                continue
            start.record()
            for _ in range(calls):
                fn()
            stop.record()
            stop.synchronize()
            times[name].append(start.elapsed_time(stop) / calls)
        if time.perf_counter() > t_end:
            break
    return {n: ({"error": errors[n]} if n in errors else {"ms": statistics.median(t), "repeats": len(t)})
            for n, t in times.items()}


def _training_case(spec: GpuBench, L: int, E: int, variant: str, mode: str = "fwdbwd") -> dict:
    """triton-EA ("ea"), flex-EA ("flex") and SDPA in turn on one causal training shape, `mode` "fwdbwd"
    (forward + backward) or "fwd"."""
    from .. import expressive_attention

    dtype = getattr(torch, spec.dtype)
    B = max(1, spec.tokens // L)
    q, k, v, do = (torch.randn(B, spec.H, L, E, device="cuda", dtype=dtype) for _ in range(4))
    back = mode == "fwdbwd"
    for t in (q, k, v):
        t.requires_grad_(back)

    def step(fn):
        def run():
            out = fn()
            if back:
                out.backward(do)
        return run

    def ea_with(backend):
        return step(lambda: expressive_attention(q, k, v, is_causal=True, variant=variant, backend=backend))

    def sdpa_call():
        with _flash():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    r = _time_in_turn({"ea": ea_with("triton"), "flex": ea_with("flex"), "sdpa": step(sdpa_call)},
                      spec.repeats, spec.case_budget_s)
    flops = (3.5 if back else 1.0) * 4 * B * spec.H * L * L * E * 0.5  # causal forward 2 matmuls, backward ~2.5x
    return {"part": mode, "L": L, "E": E, "B": B, "H": spec.H, "variant": variant, **_ratio(r, flops)}


def _decode_case(spec: GpuBench, S: int, E: int, B: int, variant: str) -> dict:
    from .. import expressive_attention

    dtype = getattr(torch, spec.dtype)
    q = torch.randn(B, spec.H, 1, E, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, spec.H, S, E, device="cuda", dtype=dtype) for _ in range(2))

    @torch.no_grad()
    def ea():
        expressive_attention(q, k, v, variant=variant)

    @torch.no_grad()
    def sdpa():
        with _flash():
            F.scaled_dot_product_attention(q, k, v)

    r = _time_in_turn({"ea": ea, "sdpa": sdpa}, spec.repeats, spec.case_budget_s, calls=spec.decode_calls)
    return {"part": "decode", "L": 1, "S": S, "E": E, "B": B, "H": spec.H, "variant": variant,
            **_ratio(r, 4.0 * B * spec.H * S * E)}


def _ratio(r: dict, flops: float) -> dict:
    """The timings with TFLOP/s, "ratio" (triton-EA / SDPA), "ratio_flex" (flex-EA / SDPA) and "faster"
    (the EA backend with the lower time, where both ran)."""
    rec = {n: r[n] for n in ("ea", "flex", "sdpa") if n in r}
    for x in rec.values():
        if "ms" in x:
            x["tflops"] = flops / (x["ms"] * 1e-3) / 1e12
    if "ms" in rec["sdpa"]:
        for n, key in (("ea", "ratio"), ("flex", "ratio_flex")):
            if "ms" in rec.get(n, {}):
                rec[key] = rec[n]["ms"] / rec["sdpa"]["ms"]
    if "ms" in rec["ea"] and "ms" in rec.get("flex", {}):
        rec["faster"] = "triton" if rec["ea"]["ms"] <= rec["flex"]["ms"] else "flex"
    return rec


def cases(spec: GpuBench) -> list[tuple[str, Callable[[], dict], dict]]:
    """(part, run, what) of every case, training shapes first; the variants in turn within each shape
    (a spent time budget then cuts them all at the same place)."""
    todo = []
    for E in spec.E:
        for L in spec.L:
            for variant in spec.variants:
                for mode in spec.modes:
                    todo.append((mode, lambda L=L, E=E, v=variant, m=mode: _training_case(spec, L, E, v, m),
                                 {"L": L, "E": E, "variant": variant}))
    for E in spec.E:
        for B in spec.decode_B:
            for S in spec.contexts:
                for variant in spec.variants:
                    todo.append(("decode", lambda S=S, E=E, B=B, v=variant: _decode_case(spec, S, E, B, v),
                                 {"S": S, "E": E, "B": B, "variant": variant}))
    return todo


def format_markdown(records: list[dict], header: dict) -> str:
    lines = [f"# EA (Triton; and FlexAttention, 'flex') vs SDPA (flash) on {header['device']}",
             "", f"torch {header['torch']}, triton {header['triton']}, {header['dtype']}, H={header['H']}; "
             f"median of up to {header['repeats']} repeats, EA and SDPA in turn; `{header['command']}`", ""]
    for part, title, cols in (("fwdbwd", "Forward + backward, causal (B = tokens / L)", ("L", "E", "B")),
                              ("fwd", "Forward, causal (B = tokens / L)", ("L", "E", "B")),
                              ("decode", "Decode step: 1 query row, KV cache of S keys", ("S", "E", "B"))):
        rows = [r for r in records if r["part"] == part]
        if not rows:
            continue
        flex = part != "decode"
        extra = " flex ms | flex / SDPA | faster |" if flex else ""
        lines += [f"## {title}", "", "| variant | " + " | ".join(cols) + " | EA ms | SDPA ms | EA / SDPA | EA TFLOP/s "
                  "| SDPA TFLOP/s |" + extra, "|---|" + "---|" * (len(cols) + 5 + (3 if flex else 0))]
        for r in rows:
            def cell(n, key, fmt):
                x = r.get(n, {})
                return format(x[key], fmt) if key in x else (x.get("error") or r.get("error") or r.get("skipped")
                                                             or "-")[:60]
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            more = ""
            if flex:
                ratio_flex = f"{r['ratio_flex']:.2f}" if "ratio_flex" in r else "-"
                more = f" {cell('flex', 'ms', '.3f')} | {ratio_flex} | {r.get('faster', '-')} |"
            lines.append(f"| {r['variant']} | " + " | ".join(str(r.get(c, "-")) for c in cols) +
                         f" | {cell('ea', 'ms', '.3f')} | {cell('sdpa', 'ms', '.3f')} | {ratio} | "
                         f"{cell('ea', 'tflops', '.1f')} | {cell('sdpa', 'tflops', '.1f')} |" + more)
        lines.append("")
    return "\n".join(lines)


def run_gpu_benchmark(spec: GpuBench, command: str = "ea bench gpu", progress: bool = True) -> dict:
    """Run every case of `spec` on the current CUDA device; write the JSON and markdown; return the JSON."""
    spec.check()
    if not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    try:
        import triton
    except ImportError:
        raise RuntimeError("triton is not installed: pip install 'expressive-attention[triton]'") from None

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "dtype": spec.dtype, "H": spec.H,
              "repeats": spec.repeats, "command": command, "spec": asdict(spec)}
    t_end = time.perf_counter() + spec.total_budget_s
    records = []
    for part, run, what in cases(spec):
        if time.perf_counter() > t_end:
            records.append({"part": part, **what, "L": what.get("L", 1), "skipped": "total time budget spent"})
            continue
        t0 = time.perf_counter()
        try:
            rec = run()
        except Exception as e:  # e.g. out of memory: recorded, the run goes on
            rec = {"part": part, **what, "L": what.get("L", 1), "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        torch.cuda.empty_cache()
        if progress:
            ratio = f"{rec['ratio']:.2f}" if "ratio" in rec else rec.get("error", "")
            if "ratio_flex" in rec:
                ratio += f", flex-EA/SDPA {rec['ratio_flex']:.2f}"
            print(f"{part} {what}: EA/SDPA {ratio} ({rec['wall_s']} s)", flush=True)
    result = {**header, "records": records}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(format_markdown(records, header))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return result
