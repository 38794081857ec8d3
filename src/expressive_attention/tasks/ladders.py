"""Default ladders: LADDERS[task_name] = rungs of rising complexity, each a full params dict, so
make_task(task_name, **rung) builds the rung. Defaults for a small model (2 layers, d_model 64,
4 heads, 1200-3000 steps, batch 32, length 64); the rationale is in docs/tasks.md.
"""
from __future__ import annotations

from .base import Task, make_task

_POINTER = {"V": 16, "p": 0.1, "seq_len": 64}
_LAGGED = {"T": 8, "V": 2, "n_start": 16, "lag_seed": 0, "seq_len": 64}  # lags nested: rung N's lags contain rung N-1's
_DIGITS = {"T": 8, "base": 2, "n_start": 16, "lag_seed": 0, "seq_len": 64}
_RECALL = {"n_keys": 16, "n_values": 16, "seq_len": 64}

LADDERS: dict[str, list[dict]] = {
    "pointer": [{"T": T, **_POINTER} for T in (2, 4, 6, 8, 12, 16)],
    "lagged": [{"N": N, **_LAGGED} for N in (1, 2, 3, 4, 5, 6)],
    "lagged_digits": [{"N": N, **_DIGITS} for N in (1, 2, 3, 4, 6, 8)],
    "recall": [{"K": K, **_RECALL} for K in (1, 2, 3, 4, 6, 8)],
}


def _mix(i: int, seq_len: int) -> list[dict]:
    # rung i of the mixture = rung i of pointer, recall and lagged_digits, all of length seq_len
    return [{"name": n, **LADDERS[n][i], "seq_len": seq_len} for n in ("pointer", "recall", "lagged_digits")]


LADDERS["multitask"] = [{"tasks": _mix(i, 63), "task_token": True, "seq_len": 64} for i in range(5)]
LADDERS["multitask_notoken"] = [{"tasks": _mix(i, 64), "seq_len": 64} for i in range(5)]


def ladder(name: str) -> list[Task]:
    """The tasks of ladder `name`, lowest rung first."""
    if name not in LADDERS:
        raise ValueError(f"unknown ladder {name!r}; available: {sorted(LADDERS)}")
    return [make_task(name, **rung) for rung in LADDERS[name]]
