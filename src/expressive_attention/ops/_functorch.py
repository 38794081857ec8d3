"""torch.func (grad, vmap, jacrev, ...) support for the backends' autograd.Functions.

`fold_vmap` is the vmap rule of every backend whose inputs lead with a batch dim B: it folds the
vmapped dim into B, (n, B, ...) -> (n * B, ...), runs the function once, and unfolds its outputs
(each of which leads with a multiple of B). `under_functorch` tells whether a call is being
transformed; backends that are torch custom ops or kernels without these rules refuse such calls.
`plain_eager` tells whether a kernel may skip its custom op (no tracing or transform can see the call).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # looked up once: every call pays for it
_transform_level = torch._C._functorch.maybe_current_level  # None when no torch.func transform is active
# how many torch_dispatch modes are active (what torch.utils._python_dispatch._get_current_dispatch_mode reads)
_dispatch_modes = torch._C._len_torch_dispatch_stack


def transform_active() -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, ...)."""
    return _transform_level() is not None


def modes_active() -> bool:
    """True while a torch_dispatch mode (fake tensors, make_fx, ...) is active."""
    return _dispatch_modes() > 0


def under_functorch(*tensors: Tensor) -> bool:
    """True when any tensor is wrapped by a torch.func transform (grad, vmap, jvp, ...)."""
    if torch.compiler.is_compiling() or _transform_level() is None:  # no transform: nothing is wrapped
        return False
    for t in tensors:  # a loop: any() over a generator costs ~0.5 us more, a decode step's budget
        if t is not None and _is_wrapped(t):
            return True
    return False


def plain_eager(*tensors: Tensor) -> bool:
    """True when the tensors are plain `torch.Tensor`s (not fake, functional or functorch-wrapped)
    and no compiler, tracer (make_fx) or torch_dispatch mode is active: a kernel may then be called
    directly instead of through its torch custom op (which such machinery needs to see)."""
    # is_compiling first: under torch.compile it is constant True and the rest is never traced
    if torch.compiler.is_compiling() or _dispatch_modes() > 0:
        return False
    for t in tensors:
        if type(t) is not Tensor:
            return False
    return True


def is_vmapped(t: Tensor) -> bool:
    """True when `t` is batched by a torch.func.vmap at any level (its values then differ per sample,
    and a data-dependent check such as torch.equal has no batching rule)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        if F.is_batchedtensor(t):
            return True
        t = F.get_unwrapped(t)
    return False


def fold_vmap(apply: Callable, info, in_dims, args, n_tensors: int, broadcast: tuple[int, ...] = ()):
    """The vmap rule: args[:n_tensors] are tensors (B, ...) or None, args[0] is the query (its dim 0
    is B); the rest are plain arguments. The tensors at the `broadcast` positions (masks) may have a
    size-1 dim 0 instead of B; one that is not vmapped is then passed as it is. Returns
    (outputs, out_dims)."""
    n = info.batch_size
    q, dq = args[0], in_dims[0]
    B = q.shape[0] if dq is None else q.movedim(dq, 0).shape[1]

    def fold(x, d, can_broadcast):
        if x is None:
            return None
        if d is None:
            if can_broadcast and x.shape[0] == 1:
                return x  # broadcast over every (vmapped, batch) pair
            x = x.expand(n, *x.shape)
        else:
            x = x.movedim(d, 0)
        if can_broadcast and x.shape[1] == 1 and B != 1:
            x = x.expand(n, B, *x.shape[2:])
        return x.reshape(n * x.shape[1], *x.shape[2:])

    folded = [fold(x, d, i in broadcast) for i, (x, d) in enumerate(zip(args[:n_tensors], in_dims[:n_tensors]))]
    outs = apply(*folded, *args[n_tensors:])
    single = isinstance(outs, Tensor)
    unfolded = tuple(o.reshape(n, o.shape[0] // n, *o.shape[1:]) for o in ((outs,) if single else outs))
    return (unfolded[0], 0) if single else (unfolded, (0,) * len(unfolded))
