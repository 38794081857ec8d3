"""Task base class, registry, seeded train/eval generators and the train/eval split.

A task samples fresh sequences s (B, L+1) with a bool `determined` (B, L+1) that marks the
tokens fixed by the task's rule; `sample` returns the next-token pairs
inputs = s[:, :-1], targets = s[:, 1:], loss_mask = determined[:, 1:]  (all (B, L)).

Held-out data never repeats a training sequence: every sequence belongs to exactly one split,
decided by a fixed hash of its `inputs` row (`in_eval_split`). A generator made by
`train_generator` / `eval_generator` carries its split, and `sample` keeps only rows of that
split (rejection sampling, ~2x raw draws). A plain torch.Generator samples without a split.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "eval")
TASKS: dict[str, type["Task"]] = {}

_MASK63 = (1 << 63) - 1


def _splitmix64(x: int) -> int:
    """A 64-bit integer mixer (splitmix64 finaliser), folded to a non-negative int63."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _MASK63


class SplitGenerator(torch.Generator):
    """A CPU torch.Generator tagged with the split ("train" or "eval") it draws sequences for."""

    def __new__(cls, seed: int, split: str):
        return super().__new__(cls, "cpu")

    def __init__(self, seed: int, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.split = split
        self.manual_seed(_splitmix64(seed * 2 + SPLITS.index(split)))


def train_generator(seed: int) -> SplitGenerator:
    """Generator for the training stream of `seed` (only train-split sequences)."""
    return SplitGenerator(seed, "train")


def eval_generator(seed: int) -> SplitGenerator:
    """Generator for the held-out stream of `seed` (only eval-split sequences, never in training)."""
    return SplitGenerator(seed, "eval")


_HASH_WEIGHTS: dict[int, np.ndarray] = {}


def _hash_weights(length: int) -> np.ndarray:
    w = _HASH_WEIGHTS.get(length)
    if w is None:
        g = torch.Generator().manual_seed(0x5EED_0000 + length)
        w = torch.randint(1, 2**31 - 1, (length,), generator=g, dtype=torch.long).numpy()
        _HASH_WEIGHTS[length] = w
    return w


def in_eval_split(inputs: Tensor) -> Tensor:
    """(B, L) long tokens -> (B,) bool, True where the row belongs to the eval split.

    A fixed function of the token row (the same for every task of this length), so the two
    splits are disjoint sets of input rows by construction; about half of all rows fall in each.
    """
    if inputs.dim() != 2:
        raise ValueError(f"inputs must be (B, L), got shape {tuple(inputs.shape)}")
    # numpy: small torch reductions can stall for milliseconds on a busy CPU (intra-op threads)
    x = inputs.detach().cpu().long().numpy()
    h = ((x + 1) * _hash_weights(x.shape[1])).sum(1)  # < L * V * 2^31: no overflow for L * V < 2^31
    h = (h ^ (h >> 29)) & 0x7FFFFFFF
    h = (h * 0x2C1B3C6D) & 0x7FFFFFFF  # products < 2^62
    h = (h ^ (h >> 16)) & 0x7FFFFFFF
    h = (h * 0x297A2D39) & 0x7FFFFFFF
    return torch.from_numpy(((h ^ (h >> 15)) & 1).astype(bool))


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer parameter; errors name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


class Task(ABC):
    """A family of sequences with a rule. Subclasses set `vocab_size`, `seq_len` and implement
    `params`, `describe` and `_sample_raw`."""

    name: str = ""
    vocab_size: int
    seq_len: int

    @abstractmethod
    def params(self) -> dict:
        """Explicit parameters (JSON-serialisable); make_task(self.name, **params()) rebuilds the task."""

    @abstractmethod
    def describe(self) -> str:
        """One-line human label, e.g. "pointer T=8"."""

    @abstractmethod
    def _sample_raw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n fresh sequences, no split: tokens (n, L+1) long and determined (n, L+1) bool."""

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """inputs (B, L) long, targets (B, L) long (the next token), loss_mask (B, L) bool (True = scored)."""
        check_int("batch_size", batch_size, low=1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        split = getattr(generator, "split", None)
        if split is None:
            s, d = self._sample_raw(batch_size, generator)
            return _pairs(s, d)
        want_eval = split == "eval"
        seqs, dets, have, rounds = [], [], 0, 0
        while have < batch_size:
            rounds += 1
            if rounds > 200:
                raise RuntimeError(f"{self.describe()}: found only {have} of {batch_size} {split}-split sequences "
                                   f"in 200 rounds; the task has too few distinct sequences for a train/eval split")
            n = 2 * (batch_size - have) + 16
            s, d = self._sample_raw(n, generator)
            keep = (in_eval_split(s[:, :-1]) == want_eval).numpy().nonzero()[0][: batch_size - have]
            keep = torch.from_numpy(keep)  # row indices (numpy: torch's bool indexing is slow on a busy CPU)
            s, d = s.index_select(0, keep), d.index_select(0, keep)
            seqs.append(s)
            dets.append(d)
            have += s.shape[0]
        s = seqs[0] if len(seqs) == 1 else torch.cat(seqs)
        d = dets[0] if len(dets) == 1 else torch.cat(dets)
        return _pairs(s, d)

    def score_groups(self) -> list[str] | None:
        """Names of the per-position score groups, or None for a single-group task."""
        return None

    def sample_with_groups(self, batch_size: int, generator: torch.Generator):
        """Like `sample`, plus group_ids (B, L) long indexing `score_groups()` (all 0 here)."""
        x, y, m = self.sample(batch_size, generator)
        return x, y, m, torch.zeros_like(x)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def register_task(name: str):
    """Class decorator: register a Task subclass under `name` (sets cls.name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}) decorates a Task subclass, got {cls!r}")
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered to {TASKS[name].__name__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def import_task_modules(names) -> None:
    """Import each module in `names` (e.g. `ea ... --import mymod`): modules that register their own
    tasks with `register_task` when imported."""
    import importlib

    for name in names:
        importlib.import_module(name)


def make_task(name: str, **params) -> Task:
    """Build the registered task `name` with `params` (e.g. make_task("pointer", T=8))."""
    if name not in TASKS:
        raise ValueError(f"unknown task name {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name](**params)


def _pairs(s: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # s, d: (B, L+1) -> inputs, targets, loss_mask: (B, L), contiguous
    return s[:, :-1].contiguous(), s[:, 1:].contiguous(), d[:, 1:].contiguous()
