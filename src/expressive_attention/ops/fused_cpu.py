"""The fused CPU kernel (csrc/ea_cpu.cpp): loader, torch custom op with autograd, and backend.

The C++ source is compiled on first use with `torch.utils.cpp_extension.load` (one time, about a
minute) and cached in ``$TORCH_EXTENSIONS_DIR/expressive_attention`` or
``~/.cache/expressive_attention``, in a folder keyed by a hash of the source, the compiler flags,
the torch and Python versions and the CPU (the build uses ``-march=native``). A changed source
or a different machine therefore rebuilds; concurrent builders (e.g. pytest-xdist workers) wait
on torch's file lock in that folder. Importing this module builds nothing.

If the build fails (no compiler, no ninja, ...), `is_available()` is False, a warning is issued
once, and `backend="auto"` falls back to the next backend; `backend="fused_cpu"` then raises
with the reason.

The op is registered with `torch.library.custom_op` (``expressive_attention::fused_cpu_fwd`` /
``fused_cpu_bwd``) with fake implementations and autograd, so it works under torch.compile.
Supported: CPU tensors in float32, float64, bfloat16, float16 (the latter two computed in float32),
both variants, causal / boolean mask / none, GQA; no dropout.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .backend import Backend
from .problem import Problem
from .reference import compute_dtype

SOURCE = Path(__file__).parent / "csrc" / "ea_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_STATE: dict = {"module": None, "error": None, "warned": False}


def _cpu_fingerprint() -> str:
    """Model name and feature flags of this CPU (the build is -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def build_dir() -> Path:
    """Where the extension is built and cached: one folder per (source, flags, torch, CPU)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_fingerprint().encode()):
        h.update(part)
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) / "expressive_attention" if base else Path.home() / ".cache" / "expressive_attention"
    return root / f"ea_cpu_{h.hexdigest()[:16]}"


def _ensure_ninja_on_path() -> None:
    """torch's loader calls `ninja` from PATH; the pip `ninja` package may not be on it."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _build():
    """Compile (or load the cached build of) the extension module."""
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    name = d.name
    if not list(d.glob(f"{name}*.so")):
        print(f"expressive_attention: building the fused CPU kernel (one time, ~1 min) in {d} ...",
              file=sys.stderr, flush=True)
    return load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                build_directory=str(d), verbose=False)


def load_extension():
    """The compiled module, or None if it cannot be built (warns once with the reason)."""
    if _STATE["module"] is not None or _STATE["error"] is not None:
        return _STATE["module"]
    with _lock:
        if _STATE["module"] is None and _STATE["error"] is None:
            try:
                _STATE["module"] = _build()
            except Exception as e:  # no compiler / ninja / headers: fall back, never fail
                msg = str(e).strip().splitlines()
                _STATE["error"] = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:500]
        if _STATE["error"] is not None and not _STATE["warned"]:
            _STATE["warned"] = True
            warnings.warn(
                "expressive_attention: the fused CPU kernel could not be built "
                f"({_STATE['error']}); falling back to the 'blocked' backend.",
                RuntimeWarning, stacklevel=3,
            )
    return _STATE["module"]


def is_available() -> bool:
    """True when the fused CPU kernel is built (builds it on the first call)."""
    return load_extension() is not None


def is_built() -> bool:
    """True when the kernel is loaded in this process (never starts a build)."""
    return _STATE["module"] is not None


def build_error() -> "str | None":
    """Why the kernel could not be built, or None (not tried yet, or built). Never starts a build."""
    return _STATE["error"]


def _ext():
    mod = load_extension()
    if mod is None:
        raise RuntimeError(f"the fused CPU kernel is unavailable: {build_error()}")
    return mod


# ---- torch custom ops: (out, z) = fwd(q, k, v, ...); (dq, dk, dv) = bwd(dout, ...) ----
# q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask bool (1|B, 1|H, 1|L, S) or None;
# out (B, H, L, Ev) in q's dtype; z (B, H, L) the per-row normaliser in the compute dtype.

@torch.library.custom_op("expressive_attention::fused_cpu_fwd", mutates_args=())
def fused_cpu_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                  scale: float, saturating: bool, eps: float) -> tuple[Tensor, Tensor]:
    out, z = _ext().forward(q, k, v, mask, is_causal, scale, saturating, eps)
    return out, z


@fused_cpu_fwd.register_fake
def _(q, k, v, mask, is_causal, scale, saturating, eps):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("expressive_attention::fused_cpu_bwd", mutates_args=())
def fused_cpu_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, z: Tensor,
                  mask: Optional[Tensor], is_causal: bool, scale: float,
                  saturating: bool) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _ext().backward(dout, q, k, v, out, z, mask, is_causal, scale, saturating)
    return dq, dk, dv


@fused_cpu_bwd.register_fake
def _(dout, q, k, v, out, z, mask, is_causal, scale, saturating):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, saturating, _eps = inputs
    out, z = output
    ctx.save_for_backward(q, k, v, out, z, mask)
    ctx.args = (is_causal, scale, saturating)


def _backward(ctx, dout, _dz):
    q, k, v, out, z, mask = ctx.saved_tensors
    dq, dk, dv = fused_cpu_bwd(dout, q, k, v, out, z, mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


fused_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- backend ----

def supports(p: Problem) -> "str | None":
    if p.q.device.type != "cpu":
        return f"fused_cpu runs on CPU tensors only, got device {p.q.device}"
    if p.q.dtype not in DTYPES:
        return f"fused_cpu supports dtypes {[str(d) for d in DTYPES]}, got {p.q.dtype}"
    if not is_available():
        return f"the fused CPU kernel could not be built: {build_error()}"
    return None


def fused_cpu_attention(p: Problem) -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev)."""
    out, _ = fused_cpu_fwd(p.q, p.k, p.v, p.mask, p.is_causal, p.scale,
                           p.variant == "saturating", p.eps)
    return out


BACKEND = Backend(
    "fused_cpu", fused_cpu_attention, supports, priority=20,
    description="fused C++ CPU kernel (flash-style, built on first use), O(L) extra memory",
)
