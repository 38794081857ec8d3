"""torch.compile for a backend's tile functions, where it is available and pays (used by blocked.py).

A tile function is plain PyTorch on one tile (a few matmuls and the element-wise arithmetic between
them). Compiled by inductor (C++ on CPU, Triton on CUDA) the element-wise part becomes one fused
loop per tile instead of a dozen passes over a tile that does not fit in cache. Each function is
compiled once per process with dynamic shapes (`dynamic=True`), so the growing causal tiles and
other sizes reuse the same graph; inductor also keeps its code on disk, so a later process only
re-traces (seconds).

When: `EA_COMPILE` = "auto" (the default): calls of at least `COMPILE_MIN_SCORES` score elements
(B H L S), so the one-time compile never lands on a tiny call; "1": every call; "0": never (the
plain path). Never under torch.func transforms or inside an outer torch.compile trace, never on
Windows, on CPU only with a C++ compiler, on CUDA only with Triton, and never on other devices
(e.g. MPS): there the same functions run eagerly. A compile (or compiled run) that fails warns
once and the process uses the plain path from then on.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable

import torch

from ._functorch import under_functorch

# "auto" compiles calls with at least this many score elements B * H * L * S (e.g. B=4, H=4, L=S=724):
# such a call takes ~50 ms on the plain path, so the one-time compile pays back within a few hundred calls.
COMPILE_MIN_SCORES = 2**23
MODES = ("auto", "0", "1")

_COMPILED: dict[Callable, Callable] = {}
_STATE: dict = {"failed": None, "announced": False}
compile_seconds: dict[str, float] = {}  # tile function name -> seconds its first compiled call took


def compile_mode() -> str:
    """The `EA_COMPILE` setting: "auto" (unset), "0" or "1"."""
    mode = os.environ.get("EA_COMPILE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"EA_COMPILE must be one of {MODES} (unset means 'auto'), got {mode!r}")
    return mode


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c)


def unavailable_reason(device: torch.device) -> str | None:
    """Why tile functions cannot be compiled for `device` in this process, or None."""
    if _STATE["failed"] is not None:
        return f"a compile failed earlier in this process ({_STATE['failed']})"
    if sys.platform == "win32":
        return "torch.compile is not used on Windows"
    if device.type == "cpu":
        return None if _has_cxx() else "no C++ compiler (g++, c++, clang++ or $CXX) for inductor"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor needs it on CUDA)"
    return f"inductor is not used on {device.type} devices"


def use_compiled(n_scores: int, *tensors: torch.Tensor) -> bool:
    """Whether a call with `n_scores` score elements on `tensors` should run compiled tile functions."""
    mode = compile_mode()
    if mode == "0" or (mode == "auto" and n_scores < COMPILE_MIN_SCORES):
        return False
    if torch.compiler.is_compiling() or under_functorch(*tensors):
        return False
    return unavailable_reason(tensors[0].device) is None


def run_tile(fn: Callable, compiled: bool, *args):
    """`fn(*args)`, through its compiled version when `compiled` (falling back, with a warning, if that fails)."""
    if compiled and _STATE["failed"] is None:
        try:
            return _compiled(fn)(*args)
        except Exception as e:  # any compiler or codegen failure: the plain function gives the same result
            _STATE["failed"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"expressive_attention: compiling the blocked backend's tiles failed "
                          f"({_STATE['failed']}); using the plain PyTorch path (set EA_COMPILE=0 to skip the "
                          "attempt)", RuntimeWarning, stacklevel=2)
    return fn(*args)


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        if not _STATE["announced"]:
            _STATE["announced"] = True
            print("expressive_attention: compiling the blocked backend's tile functions with torch.compile "
                  "(once per process; ~30-60 s the first time on a machine, seconds from inductor's cache; "
                  "EA_COMPILE=0 turns it off)", file=sys.stderr, flush=True)
        _COMPILED[fn] = _timed_first_call(torch.compile(fn, dynamic=True), fn.__name__)
    return _COMPILED[fn]


@contextlib.contextmanager
def _tracing_config():
    """Traced without "duck sizing" (sizes equal on one call are not assumed equal for good: a causal
    loop's first tile has as many keys as rows, and the next tile would recompile), and with room for
    the graphs of several variants and mask kinds (each one its own entry) before dynamo gives up."""
    from torch.fx.experimental import _config as fx_config

    dyn = torch._dynamo.config  # set and restored directly: config.patch() costs milliseconds per tile
    saved = fx_config.use_duck_shape, dyn.recompile_limit
    fx_config.use_duck_shape, dyn.recompile_limit = False, max(64, saved[1])
    try:
        yield
    finally:
        fx_config.use_duck_shape, dyn.recompile_limit = saved


def _timed_first_call(compiled: Callable, name: str) -> Callable:
    """`compiled` run under `_tracing_config`, recording how long its first call (the compile) took
    in `compile_seconds`."""
    def call(*args):
        if name in compile_seconds:
            with _tracing_config():
                return compiled(*args)
        t0 = time.perf_counter()
        with _tracing_config():
            out = compiled(*args)
        compile_seconds[name] = time.perf_counter() - t0
        return out

    return call
