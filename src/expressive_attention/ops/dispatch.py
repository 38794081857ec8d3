"""The backend table and the `backend="auto"` policy.

Each backend module declares itself as `BACKEND` (a `Backend`, see ops/backend.py): run function,
`supports(problem) -> reason | None`, priority and an optional crossover rule (`prefer`). This
module imports them (they never import it) and decides "auto" from those declarations alone.

Third-party backends join the table with `register_backend`:

    from expressive_attention.ops import Backend, register_backend
    register_backend(Backend("mine", run=my_attention, supports=my_supports, priority=25))
    expressive_attention(q, k, v, backend="mine")     # and "auto" considers it by its priority
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import blocked, flex, fused_cpu, linear, reference, triton_ea
from ._functorch import under_functorch
from .backend import Backend
from .problem import Problem

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (reference.BACKEND, blocked.BACKEND, fused_cpu.BACKEND, triton_ea.BACKEND, linear.BACKEND,
                        flex.BACKEND)
}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add `backend` to the table (by name; `replace=True` to swap out a registered one). The built-in
    shortcuts of "auto" are turned off from then on: the new backend might outrank them."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be an expressive_attention.ops.Backend, got {type(backend).__name__}")
    if backend.name == "auto":
        raise ValueError("'auto' is the name of the policy, not a backend")
    if backend.name in BACKENDS and not replace:
        raise ValueError(f"a backend named {backend.name!r} is registered already; pass replace=True to swap it")
    BACKENDS[backend.name] = backend
    _SHORTCUTS.clear()
    return backend


def choose_backend(p: Problem) -> Backend:
    """The `"auto"` policy: of the backends that support `p` and prefer it, the highest priority.
    (The reference supports every call, so there is always one.)"""
    transformed = under_functorch(p.q, p.k, p.v)  # under torch.func: only backends that support it
    # highest priority first, stopping at the first taker: asking every backend costs several us,
    # which a decode step cannot spare
    for b in _by_priority():
        if (b.functorch or not transformed) and b.chosen_by_auto(p):
            return b
    raise AssertionError("no backend took the call (the reference takes every call)")


_ORDER: list = [(), ()]  # [the table's values when sorted, them by priority]


def _by_priority() -> tuple[Backend, ...]:
    """The table by decreasing priority (ties in table order, as max() would pick), re-sorted only
    when the table changed (the comparison is by identity, so it costs next to nothing)."""
    values = tuple(BACKENDS.values())
    if values != _ORDER[0]:
        _ORDER[:] = [values, tuple(sorted(values, key=lambda b: -b.priority))]
    return _ORDER[1]


# the built-in backends' shortcuts, highest priority first; emptied by `register_backend` (a new backend
# may outrank the one a shortcut stands for)
_SHORTCUTS: list = [b.shortcut for b in _by_priority() if b.shortcut]


def try_shortcut(*args) -> Tensor | None:
    """`backend="auto"` for a call one backend's `shortcut` takes (a decode step; see Backend), from
    `expressive_attention`'s raw arguments (query, key, value, attn_mask, dropout_p, is_causal, scale,
    enable_gqa, variant, eps, power); None when none takes it."""
    for shortcut in _SHORTCUTS:
        out = shortcut(*args)
        if out is not None:
            return out
    return None


class _EmptyEA(torch.autograd.Function):
    """The output of an empty problem (`Problem.is_empty`): zeros (B, H, L, Ev), as SDPA gives for
    S = 0; with E = 0 every score is 0, and for a variant with f(0) = 0 the rows attend to nothing
    (SDPA, whose softmax of zeros is uniform, averages v instead, as "exp_squared" does: f(0) = 1, so
    `is_empty` is False there and the backend runs). Every gradient is zero as well."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.shapes = (q.shape, k.shape, v.shape)

    @staticmethod
    def backward(ctx, dout):
        return tuple(dout.new_zeros(s) for s in ctx.shapes)


def _run_degenerate(p: Problem) -> Tensor | None:
    """The output of a call with a 0-sized dim, or None for every other call: zeros for an empty
    problem; with E = 0 and f(0) != 0 ("exp_squared"), where every score is 0 and the rows average v
    over their allowed keys, the reference (so that kernels never see a 0-sized dim)."""
    if p.is_empty:
        return _EmptyEA.apply(p.q, p.k, p.v)
    if p.q.shape[-1] == 0:
        return reference.BACKEND.run(p)
    return None


def refusal(backend: Backend, p: Problem) -> str | None:
    """Why `backend`, asked for by name, cannot run `p` (what the ValueError says), or None."""
    reason = backend.unsupported(p)
    if reason is None and not backend.functorch and under_functorch(p.q, p.k, p.v):
        ok = sorted(n for n, b in BACKENDS.items() if b.functorch)
        reason = f"it does not support torch.func transforms (grad, vmap, ...); backends that do: {ok}"
    if reason is not None and not backend.implements(p.variant):
        ok = sorted(n for n, b in BACKENDS.items() if b.implements(p.variant))
        reason = f"{reason}; backends that implement it: {ok} (or 'auto')"
    return reason


def run_backend(name: str, p: Problem) -> Tensor:
    if name == "auto":
        out = _run_degenerate(p)
        return choose_backend(p).run(p) if out is None else out
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    backend = BACKENDS[name]
    reason = refusal(backend, p)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this call: {reason}")
    out = _run_degenerate(p)  # every backend agrees (and kernels never see a 0-sized dim)
    return backend.run(p) if out is None else out
