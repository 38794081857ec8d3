"""Multi-query associative recall (after Zoology's MQAR; the layout here is the project's own).

Tokens: 0 = filler, keys 1..n_keys, values n_keys+1..n_keys+n_values.
Sequence (L+1 tokens): K pairs "k_1 v_1 ... k_K v_K" (distinct keys, values with replacement),
then the rest split into 2-token slots; Q random slots hold a query "k v" of a key seen in the
pairs and its value, the others hold filler. Only the answers v after a query are scored.
With Q <= K every key is queried at most once, so an answer is never visible earlier as an answer.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Task, check_int, register_task


@register_task("recall")
class RecallTask(Task):
    def __init__(self, K: int = 2, n_keys: int = 16, n_values: int = 16, Q: int | None = None, seq_len: int = 64):
        self.K = check_int("K", K, low=1)
        self.n_keys = check_int("n_keys", n_keys, low=K)
        self.n_values = check_int("n_values", n_values, low=2)
        self.Q = check_int("Q", K if Q is None else Q, low=1)
        self.seq_len = check_int("seq_len", seq_len, low=1)
        self.n_slots = (seq_len + 1 - 2 * K) // 2
        if self.n_slots < self.Q:
            raise ValueError(f"seq_len={seq_len} too short for K={K} pairs and Q={self.Q} queries "
                             f"(needs seq_len >= {2 * (K + self.Q) - 1})")
        self.vocab_size = 1 + self.n_keys + self.n_values

    def params(self) -> dict:
        return {"K": self.K, "n_keys": self.n_keys, "n_values": self.n_values, "Q": self.Q, "seq_len": self.seq_len}

    def describe(self) -> str:
        q = "" if self.Q == self.K else f" Q={self.Q}"
        return f"recall K={self.K} keys={self.n_keys} values={self.n_values}{q}"

    def _sample_raw(self, n, generator):
        K, Q = self.K, self.Q
        # random draws from the torch generator; index work in numpy (steadier than tiny torch ops)
        keys = torch.rand((n, self.n_keys), generator=generator).numpy().argsort(1)[:, :K] + 1  # (n, K) distinct
        vals = torch.randint(0, self.n_values, (n, K), generator=generator).numpy() + 1 + self.n_keys  # (n, K)
        if Q <= K:
            which = torch.rand((n, K), generator=generator).numpy().argsort(1)[:, :Q]  # (n, Q) distinct pairs
        else:
            which = torch.randint(0, K, (n, Q), generator=generator).numpy()
        slots = torch.rand((n, self.n_slots), generator=generator).numpy().argsort(1)[:, :Q]  # (n, Q)
        s = np.zeros((n, self.seq_len + 1), dtype=np.int64)
        s[:, 0 : 2 * K : 2] = keys
        s[:, 1 : 2 * K : 2] = vals
        rows = np.arange(n)[:, None]
        qpos = 2 * K + 2 * slots  # (n, Q) position of each query key; its answer follows
        s[rows, qpos] = np.take_along_axis(keys, which, 1)
        s[rows, qpos + 1] = np.take_along_axis(vals, which, 1)
        det = np.zeros(s.shape, dtype=bool)
        det[rows, qpos + 1] = True
        return torch.from_numpy(s), torch.from_numpy(det)
