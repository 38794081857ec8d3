"""Lagged recurrences over N fixed lags 1 <= t_1 < ... < t_N <= T, after n_start (default T) random
start tokens (not scored). n_start > T only enlarges the set of distinct sequences (V**n_start).

- "lagged" (the issue's rule): x_t = (x_{t-t_1} + ... + x_{t-t_N}) mod V. Each lagged token alone
  says nothing about the sum, so the task is all-or-nothing for gradient descent at large V.
- "lagged_digits" (project variant): V = base**N and digit j of x_t (base `base`) is digit j of
  x_{t-t_{j+1}}. Each lag fixes its own digit, so each lag carries log(base) nats on its own.
The lags are given (`lags`) or drawn from `lag_seed`; params() always reports them explicitly.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Task, check_int, register_task


def draw_lags(N: int, T: int, lag_seed: int) -> list[int]:
    """N distinct sorted lags from 1..T, a fixed function of lag_seed."""
    g = torch.Generator().manual_seed(lag_seed)
    return sorted((torch.randperm(T, generator=g)[:N] + 1).tolist())


class _Lagged(Task):
    def _determined(self, s: Tensor) -> Tensor:
        """Every position after the n_start random start tokens follows the rule."""
        det = torch.zeros_like(s, dtype=torch.bool)
        det[:, self.n_start:] = True
        return det

    def _init_lags(self, N, T, lags, lag_seed, seq_len, n_start):
        self.T = check_int("T", T, low=1)
        self.n_start = check_int("n_start", T if n_start is None else n_start, low=T)
        if lags is not None:
            if lag_seed is not None:
                raise ValueError("give lags or lag_seed, not both")
            if not isinstance(lags, (list, tuple)) or not lags:
                raise TypeError(f"lags must be a non-empty list of ints, got {lags!r}")
            lags = [check_int("lags[]", t, low=1, high=T) for t in lags]
            if sorted(set(lags)) != lags:
                raise ValueError(f"lags must be strictly increasing, got {lags}")
            if N is not None and N != len(lags):
                raise ValueError(f"N={N} does not match len(lags)={len(lags)}")
            N = len(lags)
        else:
            N = check_int("N", 2 if N is None else N, low=1, high=T)
            lags = draw_lags(N, T, check_int("lag_seed", 0 if lag_seed is None else lag_seed, low=0))
        self.N, self.lags = N, lags
        self.seq_len = check_int("seq_len", seq_len, low=self.n_start)


@register_task("lagged")
class LaggedSumTask(_Lagged):
    """x_t = (sum_i x_{t-t_i}) mod V; x_0..x_{n_start-1} uniform random (not scored)."""

    def __init__(self, N: int | None = None, T: int = 8, V: int = 2, lags=None, lag_seed=None, seq_len: int = 64,
                 n_start: int | None = None):
        self._init_lags(N, T, lags, lag_seed, seq_len, n_start)
        self.V = self.vocab_size = check_int("V", V, low=2)
        # The rule is linear mod V: s = start @ M mod V, M (S, L+1) built by running the rule on unit vectors.
        L1, S = self.seq_len + 1, self.n_start
        M = torch.zeros(S, L1, dtype=torch.long)
        M[:, :S] = torch.eye(S, dtype=torch.long)
        for t in range(S, L1):
            M[:, t] = sum(M[:, t - lag] for lag in self.lags) % self.V
        self._M = M.numpy()

    def params(self) -> dict:
        return {"N": self.N, "T": self.T, "V": self.V, "lags": list(self.lags), "seq_len": self.seq_len,
                "n_start": self.n_start}

    def describe(self) -> str:
        return f"lagged N={self.N} V={self.V} lags={','.join(map(str, self.lags))}"

    def _sample_raw(self, n, generator):
        start = torch.randint(0, self.V, (n, self.n_start), generator=generator)  # (n, S)
        s = torch.from_numpy((start.numpy() @ self._M) % self.V)  # (n, L+1); numpy: steadier than torch for tiny ops
        det = self._determined(s)
        return s, det


@register_task("lagged_digits")
class LaggedDigitsTask(_Lagged):
    """digit_j(x_t) = digit_j(x_{t-t_{j+1}}) in base `base`, j = 0..N-1; V = base**N."""

    def __init__(self, N: int | None = None, T: int = 8, base: int = 2, lags=None, lag_seed=None, seq_len: int = 64,
                 n_start: int | None = None):
        self._init_lags(N, T, lags, lag_seed, seq_len, n_start)
        self.base = check_int("base", base, low=2)
        self.V = self.vocab_size = self.base**self.N
        if self.V > 4096:
            raise ValueError(f"base**N must be <= 4096 (a vocabulary), got {self.base}**{self.N}")
        # digit plane j is a copy with lag t_{j+1}: position t takes it from start position src[j, t] < S
        L1 = self.seq_len + 1
        src = torch.arange(L1).repeat(self.N, 1)  # (N, L+1)
        for j, lag in enumerate(self.lags):
            for t in range(self.n_start, L1):
                src[j, t] = src[j, t - lag]
        self._pw = self.base ** np.arange(self.N, dtype=np.int64)  # (N,) digit weights
        self._idx = (src * self.N + torch.arange(self.N)[:, None]).flatten().numpy()  # (N*(L+1),) into (S, N) digits

    def params(self) -> dict:
        return {"N": self.N, "T": self.T, "base": self.base, "lags": list(self.lags), "seq_len": self.seq_len,
                "n_start": self.n_start}

    def describe(self) -> str:
        return f"lagged_digits N={self.N} base={self.base} lags={','.join(map(str, self.lags))}"

    def _sample_raw(self, n, generator):
        start = torch.randint(0, self.V, (n, self.n_start), generator=generator)  # (n, S)
        digits = (start.numpy()[:, :, None] // self._pw) % self.base  # (n, S, N)
        planes = digits.reshape(n, -1)[:, self._idx]  # (n, N*(L+1)): plane j copied along lag t_{j+1}
        s = torch.from_numpy((planes.reshape(n, self.N, -1) * self._pw[:, None]).sum(1))  # (n, L+1)
        det = self._determined(s)
        return s, det
