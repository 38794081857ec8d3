"""The ladder runner: every (family, rung, kind, seed) of a preset, in parallel worker processes,
each finished run appended at once to DIR/results.jsonl; a rerun skips what is there.

    summary = run_ladder(get_preset("quick"), "runs/ladder-quick", workers=2)
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from pathlib import Path
from collections.abc import Sequence

import torch

from .presets import GridPoint, Preset
from .results import ResultsStore, exclusive
from .train import RunConfig, train_run

CHECKPOINT_DIR = "checkpoints"

# worker-process state (set by _init_worker)
_progress_q = None


def _init_worker(progress_q, threads: int, imports: Sequence[str], sys_path: Sequence[str]) -> None:
    global _progress_q
    _progress_q = progress_q
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it ends the pool)
    for p in sys_path:
        if p not in sys.path:
            sys.path.append(p)
    for mod in imports:  # user modules that register their own tasks
        importlib.import_module(mod)
    if threads:
        torch.set_num_threads(threads)


def _run_point(index: int, cfg_dict: dict, checkpoint: str | None) -> tuple[int, dict | None, str | None]:
    """Train one grid point (in a worker or in-process); never raises: (index, record, error)."""
    cfg = RunConfig.from_dict(cfg_dict)

    def progress(step, total, loss):
        if _progress_q is not None:
            _progress_q.put((index, os.getpid(), step, total, loss))

    try:
        return index, train_run(cfg, checkpoint=checkpoint, progress=progress), None
    except Exception:  # reported by the parent; the sweep goes on
        return index, None, traceback.format_exc()


def run_label(p: GridPoint) -> str:
    return f"{p.family} {p.label} {p.config.label} s{p.config.seed}"


def _tqdm():
    from tqdm.auto import tqdm
    return tqdm


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
) -> dict:
    """Run the preset's grid into `out`, resuming from out/results.jsonl; then write the report.

    threads: torch threads per worker process (default: 1 when workers > 1, else torch's default).
    Returns {"total", "skipped", "ran", "failed": [(label, traceback)], "wall_s", "report": paths}.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "ladder sweep"):  # a second sweep into `out` is refused, not run twice
        return _run_ladder(preset, out, workers, checkpoints, imports, progress, report, threads, command)


def _run_ladder(preset, out, workers, checkpoints, imports, progress, report, threads, command) -> dict:
    for mod in imports:
        importlib.import_module(mod)
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
            record["ladder"] = {"preset": preset.name, "family": p.family, "rung": p.rung, "label": p.label}
            store.append(record)
            m = record["metrics"]
            bar.write(f"done {run_label(p)}: token {m['token_acc']:.3f} seq {m['seq_acc']:.3f} "
                      f"loss {m['loss']:.3f} ({record['wall_s']:.0f} s)")
        bar.update(1)
        bar.set_postfix_str(f"last: {run_label(p)}")

    def ckpt(index: int) -> str | None:
        return str(out / CHECKPOINT_DIR / f"{grid[index].config.key()}.pt") if checkpoints else None

    try:
        if workers == 1 or len(todo) <= 1:
            if threads:
                torch.set_num_threads(threads)
            _run_serial(grid, todo, ckpt, finish, bar, progress)
        else:
            _run_pool(grid, todo, ckpt, finish, bar, progress, workers, imports, threads or 1)
    finally:
        bar.close()
    result = {"total": len(grid), "skipped": skipped, "ran": len(todo) - len(failed), "failed": failed,
              "wall_s": time.perf_counter() - t0, "results": str(store.path)}
    _log_sweep(out, {"command": command, "workers": workers, "total": len(grid), "skipped": skipped,
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


def _run_serial(grid, todo, ckpt, finish, bar, progress) -> None:
    tqdm = _tqdm()
    global _progress_q
    for index in todo:
        run_bar = tqdm(total=1, desc=run_label(grid[index]), position=1, leave=False, disable=not progress,
                       dynamic_ncols=True)

        class _Q:  # in-process stand-in for the progress queue
            @staticmethod
            def put(msg):
                _, _, step, total, loss = msg
                run_bar.total = total
                run_bar.n = step
                run_bar.set_postfix_str(f"loss {loss:.3f}", refresh=True)

        _progress_q = _Q()
        try:
            result = _run_point(index, grid[index].config.to_dict(), ckpt(index))
        finally:
            _progress_q = None
            run_bar.close()
        finish(*result)


def _run_pool(grid, todo, ckpt, finish, bar, progress, workers, imports, threads) -> None:
    tqdm = _tqdm()
    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_init_worker,
                    initargs=(progress_q, threads, tuple(imports), tuple(sys.path)))
    slots: dict[int, object] = {}  # worker pid -> its tqdm bar
    try:
        pending = [pool.apply_async(_run_point, (i, grid[i].config.to_dict(), ckpt(i))) for i in todo]
        while pending:
            msgs = []
            try:  # wait briefly for progress, then take what is queued (bounded, so results are not starved)
                msgs.append(progress_q.get(timeout=0.2))
                while len(msgs) < 1000:
                    msgs.append(progress_q.get_nowait())
            except queue_mod.Empty:
                pass
            for index, pid, step, total, loss in msgs:
                if pid not in slots:
                    slots[pid] = tqdm(total=total, position=len(slots) + 1, leave=False,
                                      disable=not progress, dynamic_ncols=True)
                    slots[pid].run = None
                b = slots[pid]
                if b.run != index:  # this worker started another run
                    b.reset(total=total)
                    b.run = index
                    b.set_description_str(run_label(grid[index]), refresh=False)
                b.n = step
                b.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            for b in slots.values():
                b.refresh()
            still = []
            for r in pending:
                if r.ready():
                    finish(*r.get())
                else:
                    still.append(r)
            pending = still
        pool.close()
    except BaseException:
        pool.terminate()  # Ctrl-C: what is in results.jsonl stays; a rerun resumes
        raise
    finally:
        pool.join()
        for b in slots.values():
            b.close()
