"""Multi-task mixture: each sequence comes from one sub-task, drawn per row (uniform or `weights`).

All sub-tasks share one vocabulary (the max of theirs; token ids are not offset) and one length.
With task_token=True each sequence starts with a task token (ids base..base+n_tasks-1, base = the
max sub-task vocabulary), so sub-tasks have length seq_len - 1; without it the model must infer
the task from content. Per-task scoring: score_groups() / sample_with_groups().
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Task, check_int, make_task, register_task


@register_task("multitask")
class MultiTask(Task):
    def __init__(self, tasks: list, task_token: bool = True, weights: list | None = None, seq_len: int | None = None):
        if not isinstance(tasks, (list, tuple)) or not tasks:
            raise TypeError(f"tasks must be a non-empty list of dicts with a 'name', got {tasks!r}")
        if not isinstance(task_token, bool):
            raise TypeError(f"task_token must be a bool, got {task_token!r}")
        self.task_token = task_token
        sub_len = None if seq_len is None else check_int("seq_len", seq_len, low=2) - int(task_token)
        self.tasks = []
        for i, spec in enumerate(tasks):
            if not isinstance(spec, dict) or "name" not in spec:
                raise TypeError(f"tasks[{i}] must be a dict with a 'name', got {spec!r}")
            spec = dict(spec)
            name = spec.pop("name")
            if name in ("multitask", "multitask_notoken"):
                raise ValueError(f"tasks[{i}]: nested multitask is not supported")
            if sub_len is not None:
                spec.setdefault("seq_len", sub_len)
            self.tasks.append(make_task(name, **spec))
        lens = {t.seq_len for t in self.tasks}
        if len(lens) != 1:
            raise ValueError(f"all tasks must have one seq_len, got {[t.seq_len for t in self.tasks]}")
        self.seq_len = lens.pop() + int(task_token)
        if seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f"seq_len={seq_len} does not match the sub-tasks' seq_len + task_token = {self.seq_len}")
        if weights is None:
            self.weights = None
        else:
            if not isinstance(weights, (list, tuple)) or len(weights) != len(self.tasks) or any(not isinstance(w, (int, float)) or w < 0 for w in weights) \
                    or sum(weights) <= 0:
                raise ValueError(f"weights must be {len(self.tasks)} non-negative numbers with a positive sum, got {weights!r}")
            self.weights = [float(w) for w in weights]
        self._probs = torch.tensor(self.weights or [1.0] * len(self.tasks), dtype=torch.float)
        self.base_vocab = max(t.vocab_size for t in self.tasks)
        self.vocab_size = self.base_vocab + (len(self.tasks) if task_token else 0)
        names = [t.describe() for t in self.tasks]
        self._groups = [n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names)]

    def params(self) -> dict:
        return {"tasks": [{"name": t.name, **t.params()} for t in self.tasks], "task_token": self.task_token,
                "weights": self.weights, "seq_len": self.seq_len}

    def describe(self) -> str:
        tok = "" if self.task_token else " no-token"
        return f"multitask{tok} [{'; '.join(self._groups)}]"

    def score_groups(self) -> list[str]:
        return list(self._groups)

    def _sample_raw(self, n, generator):  # unused: sample() delegates the split to the sub-tasks
        raise NotImplementedError("MultiTask samples through its sub-tasks")

    def sample(self, batch_size, generator):
        return self.sample_with_groups(batch_size, generator)[:3]

    def sample_with_groups(self, batch_size: int, generator: torch.Generator):
        """inputs, targets, loss_mask, group_ids: all (B, seq_len); group_ids index score_groups()."""
        check_int("batch_size", batch_size, low=1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        B, L, tt = batch_size, self.seq_len, int(self.task_token)
        which = torch.multinomial(self._probs, B, replacement=True, generator=generator).numpy()  # (B,)
        x = np.empty((B, L), dtype=np.int64)  # assembled in numpy: steadier than tiny torch ops
        y = np.empty((B, L), dtype=np.int64)
        m = np.zeros((B, L), dtype=bool)
        for i, task in enumerate(self.tasks):
            rows = (which == i).nonzero()[0]
            if rows.size == 0:
                continue
            xi, yi, mi = (t.numpy() for t in task.sample(rows.size, generator))  # (n_i, L - tt); split kept
            x[rows, tt:], y[rows, tt:], m[rows, tt:] = xi, yi, mi
            if tt:
                x[rows, 0] = self.base_vocab + i
                y[rows, 0] = xi[:, 0]  # the sub-task's first token: random, not scored
        g = np.repeat(which[:, None], L, 1)
        return tuple(torch.from_numpy(a) for a in (x, y, m, g))


@register_task("multitask_notoken")
class MultiTaskNoToken(MultiTask):
    """The harder variant: the same mixture without a task token (task inferred from content)."""

    def __init__(self, tasks: list, weights: list | None = None, seq_len: int | None = None):
        super().__init__(tasks, task_token=False, weights=weights, seq_len=seq_len)

    def params(self) -> dict:
        p = super().params()
        del p["task_token"]
        return p
