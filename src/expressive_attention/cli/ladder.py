"""`ea ladder`: the complexity ladder, EA vs DPA on tasks of rising complexity -> one report
(see expressive_attention.experiments.ladder)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .args import csv_of, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ladder", help="the complexity ladder: EA vs DPA on tasks of rising complexity -> report",
        description="Train EA and DPA models on every rung of each task family (x seeds), in parallel "
                    "workers; append each finished run to OUT/results.jsonl (a rerun resumes), then write "
                    "OUT/summary.csv, OUT/ladder.png, OUT/report.md and OUT/geometry.png.")
    p.add_argument("--preset", default="quick",
                   help="quick (CPU, <= 15 min on 2 cores), paper (full size), or a preset .json file")
    p.add_argument("--tasks", type=csv_of(), default=None, help="comma-separated task families (default: all in preset)")
    p.add_argument("--kinds", type=csv_of(), default=None, help="attention kinds, e.g. dpa,ea (default: the preset's)")
    p.add_argument("--variants", type=csv_of(), default=None,
                   help="EA variants, e.g. saturating,squared (each is its own kind)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per point (default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=None, help="override the training steps of every run")
    p.add_argument("--out", default=None, help="output directory (default: runs/ladder-PRESET)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="parallel worker processes, one torch thread each (default: one per CPU core)")
    p.add_argument("--no-checkpoints", action="store_true", help="do not save model checkpoints")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (in every worker), e.g. one that registers your own tasks")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.jsonl only")
    p.set_defaults(func=run_ladder_cmd)

    return p


def run_ladder_cmd(args) -> int:
    from ..errors import UserError
    from ..experiments.ladder import run_ladder, run_label
    from ..experiments.presets import ladder_grid
    from ..extras import require

    if not (args.list or args.report_only):
        require("cli", "ea ladder", ("tqdm",))  # before any work; the plots are skipped without matplotlib
    try:
        preset, grid = ladder_grid(args.preset, imports=args.imports, families=args.tasks, kinds=args.kinds,
                                   variants=args.variants, seeds=args.seeds, steps=args.steps)
    except (ValueError, TypeError, KeyError, ImportError) as e:  # a bad preset, task, kind, parameter
        raise UserError(str(e).strip("'\"")) from None
    out = Path(args.out or f"runs/ladder-{preset.name}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    command = args.command_line
    if args.list:
        for p in grid:
            print(f"{p.config.key()}  {run_label(p)}  steps={p.config.steps}")
        print(f"{len(grid)} runs")
        return 0
    if args.report_only:
        from ..experiments.report import write_report
        paths = write_report(preset, out, command=command)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    args.resume_hint = (f"Finished runs are kept in {out / 'results.jsonl'}; run the same command again to "
                        "resume where it stopped.")
    t0 = time.time()
    workers = args.workers or os.cpu_count() or 1
    result = run_ladder(preset, out, workers=workers, checkpoints=not args.no_checkpoints,
                        imports=args.imports, command=command)
    print(f"{result['ran']} runs trained, {result['skipped']} already done, {len(result['failed'])} failed "
          f"in {(time.time() - t0) / 60:.1f} min")
    for k, v in result.get("report", {}).items():
        print(f"{k}: {v}")
    return 1 if result["failed"] else 0
