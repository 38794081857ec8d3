"""Functional expressive attention: the reference definition and the fast backends."""
from .dispatch import BACKENDS, choose_backend, register_backend
from .functional import KINDS, attention, expressive_attention
from . import fused_cpu as _fused_cpu  # noqa: F401  registers backend="fused_cpu" (built on first use)
from . import linear as _linear  # noqa: F401  registers backend="linear"
from .reference import VARIANTS, expressive_weights, reference_attention, score_fn
from . import triton_ea  # noqa: F401  (registers backend "triton"; imports without triton)

__all__ = [
    "BACKENDS", "KINDS", "VARIANTS", "attention", "choose_backend", "expressive_attention",
    "expressive_weights", "reference_attention", "register_backend", "score_fn",
]
