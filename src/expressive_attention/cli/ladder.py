"""`ea ladder`: the complexity ladder, EA vs DPA on tasks of rising complexity -> one report
(see expressive_attention.experiments.ladder)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .args import add_import_option, add_lever_options, csv_of, lever_options, nonnegative_float, positive_float, positive_int

RAY_FLAGS = ("address", "cpus_per_run", "gpus_per_run")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ladder", help="the complexity ladder: EA vs DPA on tasks of rising complexity -> report",
        description="Train EA and DPA models on every rung of each task family (x seeds), in parallel "
                    "workers; append each finished run to OUT/results.jsonl (a rerun resumes), then write "
                    "OUT/summary.csv, OUT/ladder.png, OUT/report.md and OUT/geometry.png.")
    p.add_argument("--preset", default="quick",
                   help="quick (CPU-sized), verify (budget and size axes, 3 seeds), paper (full size), or a "
                        "preset .json file; --dry-run prints a preset's run count and time estimate")
    p.add_argument("--tasks", type=csv_of(), default=None, help="comma-separated task families (default: all in preset)")
    p.add_argument("--kinds", type=csv_of(), default=None, help="attention kinds, e.g. dpa,ea (default: the preset's)")
    p.add_argument("--variants", type=csv_of(), default=None,
                   help="EA variants, e.g. saturating,squared (each variant is its own run)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per point (default: the preset's)")
    add_lever_options(p)
    p.add_argument("--axes", type=csv_of(), default=None,
                   help="keep only these axes of the preset (e.g. budget), or none: the base point only (the "
                        "verify preset's 1x budget at d_model 64) (default: the preset's)")
    p.add_argument("--layers", type=positive_int, default=None, help="override n_layers of every run")
    p.add_argument("--steps", type=positive_int, default=None, help="override the training steps of every run")
    p.add_argument("--out", default=None, help="output directory (default: runs/ladder-PRESET)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="parallel worker processes, one torch thread each (default: one per CPU core)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per run (default: 1 in each pool worker; torch's default with --workers 1, "
                        "which on a busy machine can be far slower than --threads 1)")
    p.add_argument("--no-checkpoints", action="store_true", help="do not save model checkpoints")
    p.add_argument("--storage", default=None, metavar="PATH",
                   help="write checkpoints under PATH/checkpoints instead of OUT (with --executor ray: a "
                        "directory every node sees; without it, checkpoints travel back to the driver's OUT)")
    x = p.add_argument_group("executor", "where the runs execute (docs/scale.md); results.jsonl is written by "
                                         "this process alone, so a sweep can move between executors and resume")
    x.add_argument("--executor", choices=["serial", "pool", "ray"], default=None,
                   help="serial (this process), pool (--workers local processes) or ray (each run a Ray task; "
                        "needs the [ray] extra). Default: pool, or serial with --workers 1")
    x.add_argument("--address", default=None,
                   help="ray: the cluster to use, e.g. auto, HOST:6379 or ray://HOST:10001 (default: "
                        "$RAY_ADDRESS, else a Ray instance running on this machine, else a new local one)")
    x.add_argument("--cpus-per-run", type=positive_float, default=None,
                   help="ray: CPUs (and torch threads) per run (default 1)")
    x.add_argument("--gpus-per-run", type=nonnegative_float, default=None,
                   help="ray: GPUs per run, e.g. 0.25 (default 0)")
    add_import_option(p, " (in every worker)")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the number of runs (total, per family, kind, model and budget; those already in "
                        "OUT/results.jsonl) and the estimated CPU and wall time with --workers, then exit")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.jsonl only")
    p.set_defaults(func=run_ladder_cmd)

    return p


def run_ladder_cmd(args) -> int:
    from ..errors import UserError
    from ..experiments.ladder import run_ladder, run_label
    from ..experiments.presets import ladder_grid
    from ..extras import require

    try:
        axes = None if args.axes is None else [a for a in args.axes if a != "none"]
        preset, grid = ladder_grid(args.preset, imports=args.imports, families=args.tasks, kinds=args.kinds,
                                   variants=args.variants, seeds=args.seeds, steps=args.steps,
                                   levers=lever_options(args), axes=axes, n_layers=args.layers)
    except (ValueError, TypeError, KeyError, ImportError) as e:  # a bad preset, task, kind, parameter
        raise UserError(str(e).strip("'\"")) from None
    if not (args.list or args.dry_run):  # before any work; the plots are skipped without matplotlib
        needs = (() if args.report_only else ("tqdm",)) + (("scipy",) if preset.axes else ())  # axes: t-intervals
        if needs:
            require("cli", "ea ladder", needs)
    out = Path(args.out or f"runs/ladder-{preset.name}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    command = args.command_line
    executor, workers = _executor(args)  # flag errors before any work
    if args.list:
        for p in grid:
            print(f"{p.config.key()}  {run_label(p)}  steps={p.config.steps}")
        print(f"{len(grid)} runs")
        return 0
    if args.dry_run:
        from ..experiments.cost import dry_run_summary
        from ..experiments.results import ResultsStore
        print(dry_run_summary(preset, grid, workers, done=ResultsStore(out).keys() if out.is_dir() else set()))
        return 0
    if args.report_only:
        from ..experiments.report import write_report
        paths = write_report(preset, out, command=command)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    args.resume_hint = (f"Finished runs are kept in {out / 'results.jsonl'}; run the same command again to "
                        "resume where it stopped.")
    t0 = time.time()
    result = run_ladder(preset, out, workers=workers, checkpoints=not args.no_checkpoints, threads=args.threads,
                        imports=args.imports, command=command, executor=executor, storage=args.storage)
    print(f"{result['ran']} runs trained, {result['skipped']} already done, {len(result['failed'])} failed "
          f"in {(time.time() - t0) / 60:.1f} min")
    for k, v in result.get("report", {}).items():
        print(f"{k}: {v}")
    return 1 if result["failed"] else 0


def _executor(args):
    """(executor name or object, workers) from the flags; a flag that does not apply is an error."""
    from ..errors import UserError

    name = args.executor
    if args.no_checkpoints and args.storage:
        raise UserError("--storage is where checkpoints go; it contradicts --no-checkpoints")
    ray_flags = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f) is not None]
    if name != "ray":
        if ray_flags:
            raise UserError(f"{', '.join(ray_flags)} apply to --executor ray only")
        if name == "serial" and args.workers not in (None, 1):
            raise UserError("--executor serial runs one run at a time; drop --workers")
        workers = 1 if name == "serial" else args.workers or os.cpu_count() or 1
        return name, workers
    if args.threads is not None:
        raise UserError("--threads is for local runs; with --executor ray, --cpus-per-run sets each run's threads")
    if args.workers is not None:
        raise UserError("--workers sets the local pool; with --executor ray the cluster's CPUs "
                         "and --cpus-per-run decide how many runs go at once")
    from ..experiments.executors import RayExecutor
    from ..extras import require

    require("ray", "ea ladder --executor ray")  # before any work
    return RayExecutor(address=args.address, cpus_per_run=args.cpus_per_run or 1,
                       gpus_per_run=args.gpus_per_run or 0, ship_checkpoints=args.storage is None,
                       imports=args.imports), 1
