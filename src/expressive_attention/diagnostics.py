"""Warnings attributed to the user's code (the first frame outside this package and torch): `warn`."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

_SKIP = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))


def caller_stacklevel() -> int:
    """The `stacklevel` (relative to the function that calls `warn`) of the first frame outside
    expressive_attention and torch (torch: e.g. nn.Module.__call__ between a model and its layer)."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_SKIP):
        level, frame = level + 1, frame.f_back
    return level


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """`warnings.warn` pointing at the user's line instead of library code."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())
