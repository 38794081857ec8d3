"""What a ladder sweep costs before it runs (`ea ladder --dry-run`): its runs, counted from the grid,
and an estimate of their CPU time and of the wall time with a given number of workers.

The per-run cost model, one torch thread per run (what `ea ladder --workers N` gives each worker):

    cpu_s = RUN_OVERHEAD_S + steps * step_ms(d_model) / 1000 * (n_layers / 2) * (batch_size * seq_len / 2048)

`STEP_CPU_MS` (CPU ms per training step of a 2-layer model on 32 sequences of 64 tokens) and
`RUN_OVERHEAD_S` (model set-up and the held-out evaluation) are fitted to the CPU times recorded by
the verify sweep, docs/ladder-verify/results.jsonl (135 runs, 2-core AMD EPYC VM, torch 2.13.0 CPU):
at d_model 64 its budget axis (450, 1350, 4050 steps, 27 runs each) gives the slope and the intercept
(the least-squares line through the medians); at d_model 32 and 128 (450 steps only) the slope is the median
run minus that intercept. `fit_from_records` recomputes them from such a file, and a test checks the
constants against it. Between measured sizes the step cost is interpolated log-log in d_model;
outside them, and for other depths or tokens per step, it is scaled as the formula says, and the
estimate says that it is extrapolated.

The wall time is the schedule of those CPU times on the workers in grid order (each free worker takes
the next run, as the process pool does), assuming one idle core per worker; with more workers than
cores the cores are the limit. A busy machine, a different CPU or torch's default thread count make it
wrong by a factor: the estimate is for planning, the run's sweeps.jsonl records what it took.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# CPU ms per training step, 2 layers, batch 32 x 64 tokens, one thread (docs/ladder-verify/results.jsonl).
STEP_CPU_MS: dict[int, float] = {32: 23.0, 64: 36.8, 128: 96.0}
# CPU seconds per run besides the steps (set-up, evaluation on 512 held-out sequences).
RUN_OVERHEAD_S = 0.8
REFERENCE_LAYERS, REFERENCE_TOKENS = 2, 32 * 64
SOURCE = "docs/ladder-verify/results.jsonl"


def step_ms(d_model: int) -> tuple[float, bool]:
    """(CPU ms per step of a reference-shaped model of width `d_model`, whether it is extrapolated)."""
    sizes = sorted(STEP_CPU_MS)
    if d_model in STEP_CPU_MS:
        return STEP_CPU_MS[d_model], False
    lo, hi = (sizes[0], sizes[1]) if d_model < sizes[0] else (sizes[-2], sizes[-1]) if d_model > sizes[-1] else \
        next((a, b) for a, b in zip(sizes, sizes[1:]) if a < d_model < b)
    slope = math.log(STEP_CPU_MS[hi] / STEP_CPU_MS[lo]) / math.log(hi / lo)
    ms = STEP_CPU_MS[lo] * (d_model / lo) ** slope
    return ms, not sizes[0] <= d_model <= sizes[-1]


@dataclass
class RunCost:
    cpu_s: float
    extrapolated: bool


def run_cost(d_model: int, n_layers: int, steps: int, batch_size: int, seq_len: int) -> RunCost:
    """The model's estimate for one run (see the module docstring)."""
    ms, extrapolated = step_ms(d_model)
    scale = (n_layers / REFERENCE_LAYERS) * (batch_size * seq_len / REFERENCE_TOKENS)
    extrapolated = extrapolated or n_layers != REFERENCE_LAYERS or batch_size * seq_len != REFERENCE_TOKENS
    return RunCost(RUN_OVERHEAD_S + steps * ms / 1000 * scale, extrapolated)


def makespan(costs: list[float], workers: int, cores: int | None = None) -> float:
    """Wall seconds for `costs` (seconds each, in order) on `workers` workers, each free worker taking
    the next one; with more workers than `cores`, no less than the total over the cores."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    free = [0.0] * workers
    for c in costs:
        i = min(range(workers), key=free.__getitem__)
        free[i] += c
    wall = max(free, default=0.0)
    if cores is not None and workers > cores:
        wall = max(wall, sum(costs) / cores)
    return wall


def grid_costs(grid) -> list[tuple[object, RunCost]]:
    """(grid point, its cost) for each distinct run of a ladder grid, in grid order (a config listed
    twice is one run, as the runner trains it once)."""
    from ..tasks import make_task
    from .train import num_steps

    seq_lens: dict[str, int] = {}
    seen, out = set(), []
    for p in grid:
        c = p.config
        if c.key() in seen:
            continue
        seen.add(c.key())
        tkey = json.dumps([c.task, c.task_params], sort_keys=True, default=str)
        if tkey not in seq_lens:
            seq_lens[tkey] = make_task(c.task, **c.task_params).seq_len
        seq_len = seq_lens[tkey]
        out.append((p, run_cost(c.d_model, c.n_layers, num_steps(c, seq_len), c.batch_size, seq_len)))
    return out


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s < 10800 else f"{s / 3600:.1f} h"


def dry_run_summary(preset, grid, workers: int, done: set[str] | frozenset = frozenset(),
                    cores: int | None = None) -> str:
    """What `ea ladder --dry-run` prints: the runs of `grid` (total, per family, kind and model size),
    those already in the results store (`done`, config keys), and the estimated CPU and wall time of the
    rest with `workers` workers."""
    cores = cores or os.cpu_count() or 1
    runs = grid_costs(grid)
    todo = [(p, c) for p, c in runs if p.config.key() not in done]

    def counts(key) -> str:
        return ", ".join(f"{k}: {n}" for k, n in Counter(key(p) for p, _ in runs).items())

    lines = [f"preset {preset.name}: {len(runs)} runs (dry run: nothing is trained)",
             f"  per family: {counts(lambda p: p.family)}",
             f"  per kind: {counts(lambda p: p.config.label)}",
             f"  per model: {counts(lambda p: f'd_model {p.config.d_model} x {p.config.n_layers} layers')}",
             f"  per budget: {counts(lambda p: f'{p.config.steps} steps' if p.config.steps else f'{p.config.tokens} tokens')}"]
    if done:
        lines.append(f"  already in the results store: {len(runs) - len(todo)}; to train: {len(todo)}")
    cpu = [c.cpu_s for _, c in todo]
    total = sum(cpu)
    wall = makespan(cpu, workers, cores)
    extrapolated = sum(c.extrapolated for _, c in todo)
    lines.append(f"estimated CPU time: {_minutes(total)} ({len(todo)} runs, one thread each)")
    lines.append(f"estimated wall time with --workers {workers}: {_minutes(wall)}"
                 + (f" (more workers than this machine's {cores} cores: the cores are the limit)"
                    if workers > cores else ""))
    if extrapolated:
        lines.append(f"  extrapolated for {extrapolated} of {len(todo)} runs (model size or tokens per step "
                     "outside the measured ones): a rough guide only")
    lines.append(f"  cost model: expressive_attention/experiments/cost.py, fitted to {SOURCE} (an idle core "
                 "per worker of a 2-core AMD EPYC VM, torch 2.13.0 CPU); busy or other machines differ")
    return "\n".join(lines)


def fit_from_records(path: str | os.PathLike) -> tuple[dict[int, float], float]:
    """(STEP_CPU_MS, RUN_OVERHEAD_S) as fitted from a results.jsonl of reference-shaped runs (2 layers,
    batch 32, 64-token sequences): the d_model with most step counts gives the line through the median
    CPU time per step count (least squares), the other sizes their median minus its intercept."""
    by_size: dict[int, dict[int, list[float]]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        c = r["config"]
        if c["n_layers"] != REFERENCE_LAYERS or c["batch_size"] * 64 != REFERENCE_TOKENS:
            continue
        by_size.setdefault(c["d_model"], {}).setdefault(int(r["steps"]), []).append(float(r["cpu_s"]))
    anchor = max(by_size, key=lambda d: len(by_size[d]))
    xs = sorted(by_size[anchor])
    if len(xs) < 2:
        raise ValueError(f"{path}: no model size with runs at two or more step counts to fit a line to")
    ys = [statistics.median(by_size[anchor][x]) for x in xs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    overhead = my - slope * mx
    ms = {anchor: 1000 * slope}
    for d, per_steps in by_size.items():
        if d != anchor:
            ms[d] = 1000 * statistics.median((y - overhead) / s for s, ys_ in per_steps.items() for y in ys_)
    return dict(sorted(ms.items())), overhead
