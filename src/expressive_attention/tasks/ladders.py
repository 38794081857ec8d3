"""The ladders: rungs of rising complexity per task family, the one source of rungs for the
complexity-ladder presets (experiments/presets.py) and for `ea tasks`.

`ladder_rungs(size)` gives LADDERS-shaped rungs for a preset size ("quick": what the README reports;
"paper": the full size); each rung is a full params dict, so `make_task(name, **rung)` builds it.
LADDERS = the quick rungs, plus two task variants outside the presets ("lagged", the sum-mod-V form of
lagged_digits, and "multitask_notoken"). Rationale: docs/tasks.md.
"""
from __future__ import annotations

from .base import Task, make_task

# Per size: pointer T (and vocabulary V), lagged-digits N, recall K (keys = values = n_keys, Q queries
# per sequence, or "all": every slot after the pairs is a query, see recall_slots).
SIZES: dict[str, dict] = {
    "quick": dict(pointer_T=(2, 4, 8, 12, 16), pointer_V=16, digits_N=(2, 4, 5, 6, 7), recall_K=(1, 2, 3, 4, 6),
                  n_keys=16, Q=8),
    "paper": dict(pointer_T=(4, 8, 12, 16, 24, 32), pointer_V=32, digits_N=(3, 4, 5, 6, 7, 8),
                  recall_K=(2, 4, 6, 8, 12, 16), n_keys=32, Q=16),
}
MIXED = ("pointer", "recall", "lagged_digits")  # the families that rung i of multitask mixes


def ladder_rungs(size: str = "quick") -> dict[str, list[dict]]:
    """Pointer, lagged-digits and recall ladders, and the multitask ladder whose rung i mixes rung i of
    the three (one model, a task token per sequence), all of length 64."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    s = SIZES[size]
    rungs = {
        "pointer": [{"T": T, "V": s["pointer_V"], "p": 0.1, "seq_len": 64} for T in s["pointer_T"]],
        "lagged_digits": [{"N": N, "T": 8, "base": 2, "n_start": 16, "lag_seed": 0, "seq_len": 64}
                          for N in s["digits_N"]],
        "recall": recall_rungs(s["recall_K"], s["n_keys"], s["Q"]),
    }
    rungs["multitask"] = [{"tasks": mix(rungs, i, 63), "task_token": True, "seq_len": 64}
                          for i in range(len(rungs["pointer"]))]
    return rungs


def recall_slots(K: int, seq_len: int) -> int:
    """The 2-token query slots after K pairs in a recall sequence of seq_len + 1 tokens: Q equal to it
    is the dense layout, every slot a query (Q > K: keys are queried repeatedly)."""
    return (seq_len + 1 - 2 * K) // 2


def recall_rungs(Ks, n_keys: int, Q, seq_len: int = 64) -> list[dict]:
    """Recall rungs with K pairs each; Q queries per sequence, or "all" (the dense layout)."""
    return [{"K": K, "Q": recall_slots(K, seq_len) if Q == "all" else Q, "n_keys": n_keys, "n_values": n_keys,
             "seq_len": seq_len} for K in Ks]


def mix(rungs: dict[str, list[dict]], i: int, seq_len: int) -> list[dict]:
    """Rung i of each of MIXED, as multitask sub-task specs of length seq_len."""
    return [{"name": n, **rungs[n][i], "seq_len": seq_len} for n in MIXED]


# The recall family of the verify preset: the quick size's K and vocabulary, every slot a query (DPA
# solves K <= 2 at the quick budget; calibration in docs/tasks.md).
DENSE_RECALL: list[dict] = recall_rungs((1, 2, 3, 4, 6), n_keys=16, Q="all")


LADDERS: dict[str, list[dict]] = ladder_rungs("quick")
# lags nested: rung N's lags contain rung N-1's
LADDERS["lagged"] = [{"N": N, "T": 8, "V": 2, "n_start": 16, "lag_seed": 0, "seq_len": 64} for N in (1, 2, 3, 4, 5, 6)]
LADDERS["multitask_notoken"] = [{"tasks": mix(LADDERS, i, 64), "seq_len": 64} for i in range(len(LADDERS["multitask"]))]


def ladder(name: str) -> list[Task]:
    """The tasks of ladder `name`, lowest rung first."""
    if name not in LADDERS:
        raise ValueError(f"unknown ladder {name!r}; available: {sorted(LADDERS)}")
    return [make_task(name, **rung) for rung in LADDERS[name]]
