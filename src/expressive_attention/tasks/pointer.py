"""Pointer recurrence: the lag depends on content.

x_t = x_{t-1-(x_{t-1} mod T)} for t >= T, after T random start tokens; at each step t >= T a
fresh uniform token replaces the rule with probability p (those steps are not scored).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Task, check_int, register_task


@register_task("pointer")
class PointerTask(Task):
    def __init__(self, T: int = 8, V: int = 16, p: float = 0.1, seq_len: int = 64):
        self.T = check_int("T", T, low=1)
        self.V = check_int("V", V, low=2)
        if self.V < self.T:
            raise ValueError(f"V must be >= T so every lag 1..T can occur, got V={V}, T={T}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"p must be a float in [0, 1), got {p!r}")
        self.p = float(p)
        self.seq_len = check_int("seq_len", seq_len, low=T)
        self.vocab_size = self.V

    def params(self) -> dict:
        return {"T": self.T, "V": self.V, "p": self.p, "seq_len": self.seq_len}

    def describe(self) -> str:
        return f"pointer T={self.T} V={self.V} p={self.p:g}"

    def _sample_raw(self, n, generator):
        L1, T = self.seq_len + 1, self.T
        x = torch.randint(0, self.V, (L1, n), generator=generator)  # time-major; start + fresh tokens
        fresh = torch.rand((L1, n), generator=generator) < self.p  # (L+1, n)
        xs, ruled = x.numpy(), (~fresh).numpy()  # numpy views: per-step numpy ops are cheaper than torch's
        rows = np.arange(n)
        for t in range(T, L1):  # sequential: the lag of step t depends on x_{t-1}
            np.copyto(xs[t], xs[t - 1 - xs[t - 1] % T, rows], where=ruled[t])
        det = ~fresh
        det[:T] = False
        return x.t(), det.t()  # (n, L+1)
