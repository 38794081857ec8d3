"""Backend registry and the `backend="auto"` policy.

A backend is a function `Problem -> Tensor (B, H, L, Ev)` plus a `supports(problem)` check that
returns None when it can run the problem, or a reason string when it cannot. Backends register
themselves with `register_backend`; `choose_backend` below is the one place that decides what
`"auto"` runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .problem import Problem, repeat_kv


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[Problem], Tensor]
    supports: Callable[[Problem], "str | None"]
    native_gqa: bool = True
    description: str = ""


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def _no_dropout(p: Problem) -> "str | None":
    return "dropout_p > 0 is only implemented by the reference backend" if p.dropout_p > 0 else None


def choose_backend(p: Problem) -> Backend:
    """The `"auto"` policy: the first backend in order of preference that supports `p`.

    Preference: the reference for dropout (the only backend with dropout); the linear form for
    EA-squared above its crossover length; then fused kernels, then the blocked PyTorch
    implementation — except for tiny problems, where the reference beats blocked's Python loop.
    """
    L, S = p.q.shape[-2], p.k.shape[-2]
    if p.dropout_p > 0:
        return BACKENDS["reference"]
    lin = BACKENDS.get("linear")  # EA-squared above the measured crossover length (ops/linear.py)
    if lin is not None and lin.supports(p) is None:
        from .linear import linear_pays_off

        if linear_pays_off(p):
            return lin
    for name in AUTO_ORDER:
        if name == "triton" and not p.q.is_cuda:
            continue  # Triton's CPU interpreter (TRITON_INTERPRET=1) is for tests, never "auto"
        b = BACKENDS.get(name)
        if b is not None and b.supports(p) is None:
            if name == "blocked" and L * S <= 64 * 64:
                break
            return b
    return BACKENDS["reference"]


# Order of preference for "auto" once the problem is not tiny; backends added by later work
# (fused CPU, Triton, linear) slot in here.
AUTO_ORDER = ["triton", "fused_cpu", "blocked"]


def run_backend(name: str, p: Problem) -> Tensor:
    if name == "auto":
        backend = choose_backend(p)
    else:
        if name not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
        backend = BACKENDS[name]
        reason = backend.supports(p)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this call: {reason}")
    if not backend.native_gqa and p.groups > 1:
        p.k, p.v = repeat_kv(p.k, p.groups), repeat_kv(p.v, p.groups)  # mask heads are 1 or H already
    return backend.run(p)
