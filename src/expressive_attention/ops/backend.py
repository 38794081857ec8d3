"""What a backend is: `Backend`, the record each backend module exports as `BACKEND`.

    BACKEND = Backend("mine", run=my_attention, supports=my_supports, priority=25,
                      prefer=lambda p: p.q.shape[-2] >= 1024, description="...")

`run(problem)` gets a checked 4-D `Problem` (ops/problem.py) and returns (B, H, L, Ev) in q's dtype;
key/value heads may divide the query heads (GQA: query head h uses key/value head h // groups).
`supports(problem)` returns None when the backend can run the problem, else the reason (shown to
users who ask for the backend by name). `variants` declares the EA variants (names in the table,
ops/variants.py) the backend implements; the others are refused before `supports` is asked, with one
message (None: every variant of the table, for a backend written on the table's own functions). `backend="auto"` runs, among the backends that support a
call and whose `prefer(problem)` holds (a crossover rule; None: always), the one of highest
`priority`. Dropout is refused here, with one message, for every backend not marked `dropout=True`,
and a forget gate (`Problem.log_fgate`) for every backend not marked `forget_gate=True`.

`shortcut` (optional) is a fast lane of "auto" for one narrow, frequent call (a decode step): it takes
`expressive_attention`'s raw arguments and returns the output, or None for any call it does not
take. It must take only valid calls that "auto" would give this backend anyway, and give the same
output as the general path; it skips the `Problem` and the policy (see dispatch.try_shortcut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from collections.abc import Callable

from .variants import check_variant_names

if TYPE_CHECKING:
    from torch import Tensor

    from .problem import Problem

DROPOUT_REASON = "dropout_p > 0 is only implemented by the reference backend"
FORGET_GATE_REASON = "a forget gate (log_fgate) is only implemented by the reference and blocked backends"


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[["Problem"], "Tensor"]
    supports: Callable[["Problem"], "str | None"]
    priority: int = 0  # "auto": the highest-priority backend that supports (and prefers) the call
    prefer: Callable[["Problem"], bool] | None = None  # "auto" only where this holds; None: wherever supported
    dropout: bool = False  # implements dropout_p > 0
    functorch: bool = True  # works under torch.func transforms (grad, vmap, ...)
    description: str = ""
    shortcut: Callable[..., "Tensor | None"] | None = None  # raw arguments -> output or None (see above)
    forget_gate: bool = False  # implements `log_fgate` (Problem.log_fgate); refused for the others
    variants: tuple[str, ...] | None = None  # the variants it implements (None: every one in the table)

    def __post_init__(self):
        if self.variants is not None:  # a name the table does not define is an error, not a silent claim
            object.__setattr__(self, "variants", check_variant_names(self.variants, f"Backend {self.name!r}: variants"))

    def implements(self, variant: str) -> bool:
        return self.variants is None or variant in self.variants

    def variant_reason(self, variant: str) -> "str | None":
        """Why this backend cannot run `variant` (it does not implement it), or None."""
        if self.implements(variant):
            return None
        return f"variant={variant!r} is not implemented by the {self.name!r} backend (it implements {self.variants})"

    def unsupported(self, p: "Problem") -> "str | None":
        """Why this backend cannot run `p`, or None."""
        if self.variants is not None and p.variant not in self.variants:
            return self.variant_reason(p.variant)
        if p.dropout_p > 0 and not self.dropout:
            return DROPOUT_REASON
        if p.log_fgate is not None and not self.forget_gate:
            return FORGET_GATE_REASON
        return self.supports(p)

    def chosen_by_auto(self, p: "Problem") -> bool:
        """Whether `backend="auto"` may pick this backend for `p` (then the highest priority wins)."""
        # prefer first: it is cheap, and asking a kernel not built yet whether it supports `p` builds it
        return (self.prefer is None or self.prefer(p)) and self.unsupported(p) is None
