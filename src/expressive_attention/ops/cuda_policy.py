"""`backend="auto"` on CUDA: the Triton kernels or FlexAttention (`flex`), by a measured table.

"auto" takes `triton` (priority 30) where `prefers_triton(problem)` holds, else `flex` (priority 25, CUDA),
else `blocked`. `prefers_triton` is False where the Triton kernels cannot run the call (a variant they do
not implement, float64, head dims over 256, no triton installed), where the table below says flex is
faster, and where the kernels fail their self-check on this device: one small forward + backward per
(device, variant, dtype) against the reference, run once per process on first use (`triton_self_check`).
The triton backend's `prefer` calls it with its own `Backend` (this module imports no backend module but
the reference, so triton_ea.py can import it).

CUDA_TABLE is a PLACEHOLDER: no GPU has been lent to this project yet, so nothing here is measured. The
first run of `benchmarks/gpu_check.sh` times triton-EA and flex-EA side by side (`ea bench gpu`: forward
and forward+backward, bf16, L 1k-16k) and records, per case, which was faster (`faster` in
gpu_check.json); copy those verdicts here as (variant, mode) -> ((largest L, backend), ...). Until then
every CUDA call triton implements and passes its self-check for goes to triton (the hand-written kernel,
whose design targets this workload), the others to flex.
"""
from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

    from .backend import Backend
    from .problem import Problem

# (variant, "fwd" | "fwdbwd") -> ((L_max, backend), ...) in increasing L_max; the first L_max >= L decides.
# Empty until measured (see the module docstring).
CUDA_TABLE: dict[tuple[str, str], tuple[tuple[int, str], ...]] = {}
DEFAULT = "triton"

_CHECKED: dict[tuple, bool] = {}
_lock = threading.Lock()


def table_choice(p: "Problem") -> str:
    """"triton" or "flex" for `p` from CUDA_TABLE (DEFAULT where it has no entry)."""
    rows = CUDA_TABLE.get((p.variant, "fwdbwd" if p.requires_grad else "fwd"))
    if rows:
        L = p.q.shape[2]
        for l_max, backend in rows:
            if L <= l_max:
                return backend
        return rows[-1][1]
    return DEFAULT


def triton_self_check(device: torch.device, variant: str, dtype: torch.dtype,
                      run: Callable[[Problem], Tensor]) -> bool:
    """True when the Triton kernels (`run`, the backend's entry point) give the reference's values and
    gradients on a small causal GQA problem on `device` (once per process per (device, variant, dtype); a
    failure warns once, naming it)."""
    key = (str(device), variant, dtype)
    if key in _CHECKED:
        return _CHECKED[key]
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return True  # never run a check while tracing or capturing a CUDA graph: assume it passes
    with _lock:
        if key not in _CHECKED:
            ok, why = _run_self_check(device, variant, dtype, run)
            _CHECKED[key] = ok
            if not ok:
                warnings.warn(f"expressive_attention: the Triton kernels failed their self-check on {device} "
                              f"(variant={variant!r}, {dtype}): {why}; backend='auto' uses 'flex' there",
                              RuntimeWarning, stacklevel=2)
    return _CHECKED[key]


def _run_self_check(device, variant: str, dtype: torch.dtype, run: Callable[[Problem], Tensor]) -> tuple[bool, str]:
    from .problem import normalise
    from .reference import reference_backend

    tol = 2e-3 if dtype == torch.float32 else 3e-2
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, h, 77, 32, generator=g).to(device, dtype) for h in (4, 2, 2))
        do = torch.randn(1, 4, 77, 32, generator=g).to(device, dtype)
        outs, grads = [], []
        for attend, cast in ((run, lambda t: t), (reference_backend, lambda t: t.float())):
            leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
            with torch.enable_grad():
                p = normalise(*leaves, None, 0.0, True, None, True, variant, 1e-6)
                out = attend(p)
                grads.append(torch.autograd.grad(out, leaves, cast(do)))
            outs.append(out.float())
        pairs = [(outs[0], outs[1]), *((a.float(), b.float()) for a, b in zip(*grads))]
        for name, (a, b) in zip(("out", "dq", "dk", "dv"), pairs):
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
            if not err <= tol:  # also catches NaN
                return False, f"{name} differs from the reference by {err:.2e} (relative to its largest value)"
        return True, ""
    except Exception as e:  # a kernel that does not compile or launch here
        return False, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def prefers_triton(p: "Problem", backend: Backend) -> bool:
    """"auto"'s rule for the Triton backend (`backend`, triton_ea.BACKEND): a CUDA call the table gives to
    triton, that the backend can run, and that the kernels pass their self-check for."""
    if not p.q.is_cuda:
        return False
    if table_choice(p) != "triton":
        return False
    if backend.unsupported(p) is not None:  # never run the self-check for a call triton cannot take
        return False
    return triton_self_check(p.q.device, p.variant, p.q.dtype, backend.run)
