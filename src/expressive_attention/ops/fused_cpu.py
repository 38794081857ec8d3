"""The fused CPU kernel (csrc/ea_cpu.cpp): loader, torch custom op with autograd, and backend.

The extension also carries the linear form's feature helpers (csrc/linear_cpu.cpp, registered by the
kernel's module; used by ops/linear_features.py when it is loaded). The C++ sources are compiled on
first use with `torch.utils.cpp_extension.load` (one time, about a minute; ``ea info --build`` does it
ahead of time) and cached in
``$TORCH_EXTENSIONS_DIR/expressive_attention`` or ``~/.cache/expressive_attention``, in a folder keyed
by a hash of everything the build depends on (`build_key`): the sources, the compiler and its flags,
the torch version and install path, the Python version, interpreter and environment, and the CPU (the build
uses ``-march=native``). So two environments never share (and never rebuild) each other's kernel.
Importing this module builds nothing; a message on stderr says when a build starts.

Interrupted builds: torch's loader guards a build folder with a ``lock`` file that a killed build
leaves behind (torch then waits on it forever). Builders here first take an OS file lock
(``build.flock``, released by the OS when a process dies); whoever holds it removes a leftover
``lock`` as stale. Waiting for another process's build is bounded by ``$EA_BUILD_TIMEOUT`` seconds
(default 900); past it, this process falls back with a warning that names the folder.

If the build fails (no compiler, no ninja, ...), `is_available()` is False, a warning with the
compiler's own error lines is issued once (pointing at the caller's line), and `backend="auto"`
falls back to the next backend; `backend="fused_cpu"` then raises with the reason. "auto" never
starts the build for a tiny problem (`worth_building`): another backend runs it at once.

The op is registered with `torch.library.custom_op` (``expressive_attention::fused_cpu_fwd`` /
``fused_cpu_bwd``) with fake implementations and autograd, so it works under torch.compile.
Supported: CPU tensors in float32, float64, bfloat16, float16 (the latter two computed in float32),
the variants in KERNEL_VARIANTS (declared to dispatch; the others, "power" and "exp_odd", are refused there
and "auto" falls back to blocked),
causal / boolean mask / none, GQA; no dropout.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from ..diagnostics import warn
from ._functorch import modes_active, plain_eager, transform_active
from .backend import Backend
from .problem import SCALE_CHECKED_ABOVE, Problem
from .reference import compute_dtype

# the kernel, and the linear form's feature helpers (registered by the kernel's module)
SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("ea_cpu.cpp", "linear_cpu.cpp"))
CFLAGS = ("-O3", "-march=native", "-fopenmp")  # tuples: torch's loader appends to lists in place
LDFLAGS = ("-fopenmp",)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STAMP = "built.ok"  # written after a successful build + load; its absence means the next load builds
# "auto" does not start the build for problems below this many multiply-adds (B H L S max(E, Ev)):
# the blocked/reference backends finish them in well under a millisecond.
MIN_WORK_TO_BUILD = 2**21
KERNEL_VARIANTS = ("saturating", "squared", "exp_squared")  # the branches of csrc/ea_cpu.cpp (variant_code)
DECODE_ROWS = 16  # calls with at most this many query rows run the kernel's decode schedule (split over keys)

_lock = threading.Lock()
_STATE: dict = {"module": None, "error": None, "warned": False}


@functools.cache
def _cpu_fingerprint() -> str:
    """Model name and feature flags of this CPU (the build is -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_key() -> dict[str, str]:
    """Everything the compiled kernel depends on (hashed into the folder name)."""
    cxx = os.environ.get("CXX", "c++")
    return {
        "source": " ".join(_file_hash(src) for src in SOURCES),
        "flags": " ".join(CFLAGS + LDFLAGS),
        "compiler": f"{cxx} -> {shutil.which(cxx)}",
        "torch": f"{torch.__version__} at {Path(torch.__file__).parent}",
        # the environment (a venv's root) and its interpreter: `python` and `python3` of one venv share
        # a build, two venvs never do
        "python": f"{sys.version} at {os.path.realpath(sys.executable)} in {os.path.realpath(sys.prefix)}",
        "cpu": _cpu_fingerprint(),
    }


def build_dir() -> Path:
    """Where the extension is built and cached: one folder per `build_key()`."""
    h = hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(build_key().items())).encode())
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) / "expressive_attention" if base else Path.home() / ".cache" / "expressive_attention"
    return root / f"ea_cpu_{h.hexdigest()[:16]}"


def _complete(d: Path) -> bool:
    """A finished build in `d`: the stamp written after it loaded, and the library itself."""
    return (d / STAMP).exists() and any(d.glob(f"{d.name}*.so"))


def is_built() -> bool:
    """True when the kernel is loaded in this process or its cached build is complete on disk
    (never starts a build). While torch.compile traces: only when it is loaded (dynamo cannot trace
    the file checks; the first eager call, or `ea info --build`, loads it)."""
    if _STATE["module"] is not None:
        return True
    return not torch.compiler.is_compiling() and _complete(build_dir())


def _ensure_ninja_on_path() -> None:
    """torch's loader calls `ninja` from PATH; the pip `ninja` package may not be on it."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _timeout_s() -> float:
    return float(os.environ.get("EA_BUILD_TIMEOUT", "900"))


@contextlib.contextmanager
def _build_lock(d: Path, timeout: float):
    """Hold an OS lock on `d`/build.flock (waiting at most `timeout` s); the OS releases it when its
    holder dies, so unlike torch's ``lock`` file it can never be left stale."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; at least never wait on a lock older than `timeout`
        stale = d / "lock"
        if stale.exists() and time.time() - stale.stat().st_mtime > timeout:
            stale.unlink(missing_ok=True)
        yield
        return
    with open(d / "build.flock", "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has been building the kernel in {d} for more than {timeout:.0f} s "
                        "(set EA_BUILD_TIMEOUT to wait longer)"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build():
    """Compile (or load the cached build of) the extension module."""
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    with _build_lock(d, _timeout_s()):
        # We hold the lock, so no live process is building here: torch's `lock` is a killed build's.
        (d / "lock").unlink(missing_ok=True)
        stamp = d / STAMP
        if not _complete(d):
            stamp.unlink(missing_ok=True)
            print(f"expressive_attention: building the fused CPU kernel (one time, ~1 min) in {d} ...",
                  file=sys.stderr, flush=True)
        # Compile a copy kept in the build folder: the generated build.ninja then names the same path
        # for every checkout whose source has these bytes, so two checkouts never rebuild each other.
        copies = [d / src.name for src in SOURCES]
        for src, copy in zip(SOURCES, copies):
            if not copy.exists() or copy.read_bytes() != src.read_bytes():
                shutil.copyfile(src, copy)
        module = load(name=d.name, sources=[str(c) for c in copies], extra_cflags=list(CFLAGS),
                      extra_ldflags=list(LDFLAGS), build_directory=str(d), verbose=False)
        stamp.write_text("\n".join(f"{k}: {v}" for k, v in build_key().items()) + "\n")
    return module


def _reason(e: Exception) -> str:
    """A one-paragraph reason: the compiler's own error lines when the build failed."""
    text = str(e)
    output = getattr(e, "output", None)  # a compiler run by torch's checks (CalledProcessError)
    if output:
        text += "\n" + (output.decode(errors="replace") if isinstance(output, bytes) else str(output))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith(("ninja:", "FAILED:"))]
    keep = errors[:5] or lines[-3:]
    return f"{type(e).__name__}: " + " | ".join(keep)[:1500]


def load_extension():
    """The compiled module, or None if it cannot be built (warns once with the reason)."""
    if _STATE["module"] is not None or _STATE["error"] is not None:
        return _STATE["module"]
    with _lock:
        if _STATE["module"] is None and _STATE["error"] is None:
            try:
                _STATE["module"] = _build()
            except Exception as e:  # no compiler / ninja / headers, a timeout: fall back, never fail
                _STATE["error"] = f"{_reason(e)} (build folder: {build_dir()})"
        if _STATE["error"] is not None and not _STATE["warned"]:
            _STATE["warned"] = True
            warn(
                "expressive_attention: the fused CPU kernel could not be built "
                f"({_STATE['error']}); falling back to the 'blocked' backend."
            )
    return _STATE["module"]


def is_available() -> bool:
    """True when the fused CPU kernel is built (builds it on the first call)."""
    return load_extension() is not None


def loaded_module():
    """The extension if this process has loaded it, else None (never builds, never touches the disk)."""
    return _STATE["module"]


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
# out (B, H, L, Ev) in q's dtype; z (B, H, L) in the compute dtype: per row, what backward needs of
# the forward's normalisation (Z = eps + sum f, or for "exp_squared" lse = m + log Z, m the row's
# largest allowed s^2 and Z = eps exp(-m) + sum exp(s^2 - m)). variant is one of KERNEL_VARIANTS.

@torch.library.custom_op("expressive_attention::fused_cpu_fwd", mutates_args=())
def fused_cpu_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                  scale: float, variant: str, eps: float) -> tuple[Tensor, Tensor]:
    out, z = _ext().forward(q, k, v, mask, is_causal, scale, variant, eps)
    return out, z


@fused_cpu_fwd.register_fake
def _(q, k, v, mask, is_causal, scale, variant, eps):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("expressive_attention::fused_cpu_bwd", mutates_args=())
def fused_cpu_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, z: Tensor,
                  mask: Tensor | None, is_causal: bool, scale: float,
                  variant: str) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _ext().backward(dout, q, k, v, out, z, mask, is_causal, scale, variant)
    return dq, dk, dv


@fused_cpu_bwd.register_fake
def _(dout, q, k, v, out, z, mask, is_causal, scale, variant):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, variant, _eps = inputs
    out, z = output
    ctx.save_for_backward(q, k, v, out, z, mask)
    ctx.args = (is_causal, scale, variant)


def _backward(ctx, dout, _dz):
    q, k, v, out, z, mask = ctx.saved_tensors
    dq, dk, dv = fused_cpu_bwd(dout, q, k, v, out, z, mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


fused_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- backend ----

def supports(p: Problem) -> "str | None":
    if not p.q.is_cpu:
        return f"fused_cpu runs on CPU tensors only, got device {p.q.device}"
    if p.q.dtype not in DTYPES:
        return f"fused_cpu supports dtypes {[str(d) for d in DTYPES]}, got {p.q.dtype}"
    if not is_available():
        return f"the fused CPU kernel could not be built: {build_error()}"
    return None


def _plain_call(p: Problem) -> bool:
    """True when nothing needs the custom op around the kernel: no gradient, no compiler or tracer
    (torch.compile, make_fx, fake tensors), plain tensors. The op's Python wrapper costs ~0.1 ms a
    call, more than a whole decode step."""
    return not p.requires_grad and plain_eager(p.q, p.k, p.v)


def fused_cpu_attention(p: Problem) -> Tensor:
    """Backend entry point: a checked 4-D `Problem` -> output (B, H, L, Ev). Calls with at most
    16 query rows (decoding) run the kernel's decode schedule (split over the key axis)."""
    args = (p.q, p.k, p.v, p.mask, p.is_causal, p.scale, p.variant, p.eps)
    if _plain_call(p):  # inference: the kernel itself, without the custom op around it
        return (_STATE["module"] or _ext()).forward(*args)[0]
    out, _ = fused_cpu_fwd(*args)
    return out


def decode_shortcut(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, eps, power):
    """"auto"'s fast lane for a decode step: at most DECODE_ROWS query rows against a KV cache, no
    gradient, plain 4-D CPU tensors, the kernel loaded. Returns what the general path (`normalise`,
    `choose_backend`, `fused_cpu_attention`) returns for such a call (the same kernel call on the same
    arguments), or None for every other call, valid or not, which then takes the general path with its
    checks and messages. Why: inside a model, a decode step finds the CPU caches holding the rest of the
    network, where each Python-level tensor access costs microseconds, and the general path makes
    many more of them than this function (measured: docs/kernels-cpu.md#decode-step)."""
    if torch.compiler.is_compiling():  # first: constant True under torch.compile, the rest never traced
        return None
    module = _STATE["module"]
    if (module is None or type(query) is not Tensor or type(key) is not Tensor or type(value) is not Tensor
            or variant not in KERNEL_VARIANTS or power is not None or type(is_causal) is not bool
            or type(eps) is not float or not 0.0 <= eps < math.inf
            or not (type(dropout_p) in (float, int) and dropout_p == 0)
            or not (scale is None or (type(scale) is float and -SCALE_CHECKED_ABOVE <= scale <= SCALE_CHECKED_ABOVE))):
        return None
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None
    dtype = query.dtype
    if not (dtype in DTYPES and key.dtype is dtype and value.dtype is dtype
            and query.is_cpu and key.is_cpu and value.is_cpu):
        return None
    B, H, L, E = query.shape
    Bk, Hk, S, Ek = key.shape
    Bv, Hv, Sv, Ev = value.shape
    if not (0 < L <= DECODE_ROWS and B > 0 and S > 0 and E > 0 and Ev > 0 and Bk == B and Bv == B
            and Hv == Hk and Sv == S and Ek == E and Hk > 0 and (Hk == H or (enable_gqa and H % Hk == 0))):
        return None
    if attn_mask is not None:
        if (is_causal or type(attn_mask) is not Tensor or attn_mask.dtype is not torch.bool
                or not attn_mask.is_cpu or attn_mask.dim() != 4):
            return None
        Bm, Hm, Lm, Sm = attn_mask.shape
        if not (Sm == S and Bm in (1, B) and Hm in (1, H) and Lm in (1, L)):
            return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    if modes_active() or transform_active():
        return None
    return module.forward(query, key, value, attn_mask, is_causal, E**-0.5 if scale is None else scale,
                          variant, eps)[0]



def worth_building(p: Problem) -> bool:
    """The `"auto"` rule: a problem waits for the one-time build only if it is big enough to gain."""
    if is_built():
        return True
    B, H, L, E = p.q.shape
    return B * H * L * p.k.shape[2] * max(E, p.v.shape[-1]) >= MIN_WORK_TO_BUILD


BACKEND = Backend(
    "fused_cpu", fused_cpu_attention, supports, priority=20, prefer=worth_building, functorch=False,
    description="fused C++ CPU kernel (flash-style, built on first use), O(L) extra memory",
    shortcut=decode_shortcut, variants=KERNEL_VARIANTS,
)
