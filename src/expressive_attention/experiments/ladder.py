"""The ladder runner: every (family, rung, kind, seed) of a preset, run by an executor (in this
process, in local worker processes, or as Ray tasks: executors.py), each finished run appended at
once to DIR/results.jsonl by this process alone; a rerun skips what is there.

    summary = run_ladder(get_preset("quick"), "runs/ladder-quick", workers=2)
    summary = run_ladder(get_preset("paper"), "runs/ladder-paper", executor=RayExecutor(address="auto"))
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from collections.abc import Sequence

from ..tasks import import_task_modules
from .executors import Job, PoolExecutor, RayExecutor, SerialExecutor, _tqdm, make_executor
from .presets import GridPoint, Preset
from .results import ResultsStore, exclusive

CHECKPOINT_DIR = "checkpoints"


def run_label(p: GridPoint) -> str:
    at = f" {p.point_label}" if p.point else ""
    return f"{p.family} {p.rung_label}{at} {p.config.label} s{p.config.seed}"


def run_ladder(
    preset: Preset,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    checkpoints: bool = True,
    imports: Sequence[str] = (),
    progress: bool = True,
    report: bool = True,
    threads: int | None = None,
    command: str | None = None,
    executor: str | SerialExecutor | PoolExecutor | RayExecutor | None = None,
    storage: str | os.PathLike | None = None,
) -> dict:
    """Run the preset's grid into `out`, resuming from out/results.jsonl; then write the report.

    executor: "serial", "pool", "ray" or an executor object (executors.py); default: a pool of
      `workers` processes when workers > 1 and more than one run is left, else serial.
    threads: torch threads per worker process (default: 1 when workers > 1, else torch's default).
    storage: directory for the checkpoints (default: out); with Ray, one that every node sees.
    Returns {"total", "skipped", "ran", "failed": [(label, traceback)], "wall_s", "report": paths}.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "ladder sweep"):  # a second sweep into `out` is refused, not run twice
        return _run_ladder(preset, out, workers, checkpoints, imports, progress, report, threads, command,
                           executor, storage)


def _run_ladder(preset, out, workers, checkpoints, imports, progress, report, threads, command, executor,
                storage) -> dict:
    import_task_modules(imports)
    store = ResultsStore(out)
    store.repair()
    grid = preset.grid()
    done = store.keys()
    todo, seen = [], set(done)
    for i, p in enumerate(grid):  # one run per key (a grid may list a config twice)
        if p.config.key() not in seen:
            seen.add(p.config.key())
            todo.append(i)
    skipped = sum(p.config.key() in done for p in grid)
    t0, started, load0 = time.perf_counter(), _utc(), _load()
    failed: list[tuple[str, str]] = []
    tqdm = _tqdm()
    bar = tqdm(total=len(grid), initial=skipped, desc=f"ladder {preset.name}", unit="run",
               disable=not progress, dynamic_ncols=True)
    if skipped:
        bar.write(f"resuming: {skipped} of {len(grid)} runs already in {store.path}")

    def finish(index: int, record: dict | None, error: str | None) -> None:
        p = grid[index]
        if error is not None:
            failed.append((run_label(p), error))
            bar.write(f"FAILED {run_label(p)}:\n{error}")
        else:
            record["ladder"] = {"preset": preset.name, "family": p.family, "rung": p.rung, "rung_label": p.rung_label,
                                "axes": list(p.axes), "point": dict(p.point)}
            store.append(record)
            m = record["metrics"]
            bar.write(f"done {run_label(p)}: token {m['token_acc']:.3f} seq {m['seq_acc']:.3f} "
                      f"loss {m['loss']:.3f} ({record['wall_s']:.0f} s)")
        bar.update(1)
        bar.set_postfix_str(f"last: {run_label(p)}")

    ckpt_dir = Path(storage if storage is not None else out) / CHECKPOINT_DIR
    jobs = [Job(i, grid[i].config.to_dict(), str(ckpt_dir / f"{grid[i].config.key()}.pt") if checkpoints else None,
                run_label(grid[i])) for i in todo]
    if executor is None:
        executor = "pool" if workers > 1 and len(todo) > 1 else "serial"
    if isinstance(executor, str):
        executor = make_executor(executor, workers=workers, threads=threads, imports=imports,
                                 **({"ship_checkpoints": storage is None} if executor == "ray" else {}))
    if jobs:
        bar.write(f"running {len(jobs)} runs: {executor.describe()}")
    try:
        executor.run(jobs, finish, progress)
    finally:
        bar.close()
    result = {"total": len(grid), "skipped": skipped, "ran": len(todo) - len(failed), "failed": failed,
              "wall_s": time.perf_counter() - t0, "results": str(store.path)}
    _log_sweep(out, {"command": command, "executor": executor.describe(), "workers": workers,
                     "total": len(grid), "skipped": skipped,
                     "ran": result["ran"], "failed": len(failed), "wall_s": round(result["wall_s"], 1),
                     "started_utc": started, "finished_utc": _utc(), "load_start": load0, "load_end": _load()})
    if report:
        from .report import write_report
        result["report"] = write_report(preset, out, command=command, sweep=result)
    return result


SWEEPS_FILE = "sweeps.jsonl"


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _log_sweep(out: Path, entry: dict) -> None:
    """One line per invocation (command, wall time, machine load): the report lists them."""
    import json
    with open(out / SWEEPS_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
