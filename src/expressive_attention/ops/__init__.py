"""Functional expressive attention: the reference definition, the backend table and the fast backends.

Layers, lowest first: variants.py (the variant table), problem.py (checks -> `Problem`), backend.py (what a
backend declares), reference.py (the definition), one module per backend (reference, blocked, fused_cpu,
triton_ea, linear, flex; each declares `BACKEND`; cuda_policy.py: "auto" on CUDA, below triton_ea),
dispatch.py (the table and "auto"), functional.py (the public calls).
"""
from .backend import Backend
from .dispatch import BACKENDS, choose_backend, register_backend
from .functional import KINDS, attention, expressive_attention
from .problem import Problem
from .reference import VARIANTS, compute_dtype, expressive_weights, reference_attention, score_fn

__all__ = [
    "BACKENDS", "Backend", "KINDS", "Problem", "VARIANTS", "attention", "choose_backend", "compute_dtype",
    "expressive_attention", "expressive_weights", "reference_attention", "register_backend", "score_fn",
]
