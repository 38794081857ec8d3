"""`ea ladder` (the complexity ladder: EA vs DPA on tasks of rising complexity, one report) and
`ea geometry` (where attention goes in cos(q, k) for trained models)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path


def _csv(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ladder", help="the complexity ladder: EA vs DPA on tasks of rising complexity -> report",
        description="Train EA and DPA models on every rung of each task family (x seeds), in parallel "
                    "workers; append each finished run to OUT/results.jsonl (a rerun resumes), then write "
                    "OUT/summary.csv, OUT/ladder.png, OUT/report.md and OUT/geometry.png.")
    p.add_argument("--preset", default="quick",
                   help="quick (CPU, <= 15 min on 2 cores), paper (full size), or a preset .json file")
    p.add_argument("--tasks", type=_csv, default=None, help="comma-separated task families (default: all in preset)")
    p.add_argument("--kinds", type=_csv, default=None, help="attention kinds, e.g. dpa,ea (default: the preset's)")
    p.add_argument("--variants", type=_csv, default=None,
                   help="EA variants, e.g. saturating,squared (each is its own kind)")
    p.add_argument("--seeds", type=_positive, default=None, help="seeds per point (default: the preset's)")
    p.add_argument("--steps", type=_positive, default=None, help="override the training steps of every run")
    p.add_argument("--out", default=None, help="output directory (default: runs/ladder-PRESET)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="parallel worker processes, one torch thread each (default: one per CPU core)")
    p.add_argument("--no-checkpoints", action="store_true", help="do not save model checkpoints")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (in every worker), e.g. one that registers your own tasks")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.jsonl only")
    p.set_defaults(func=run_ladder_cmd)

    g = subparsers.add_parser(
        "geometry", help="attention mass by cos(q, k) for trained models (DPA vs EA)",
        description="RUN is a ladder output directory (picks, per family, the rung with the largest EA-DPA gap, "
                    "seed 0, one checkpoint per kind) or checkpoint .pt files. Writes geometry.png, "
                    "geometry.json and prints the antiparallel / orthogonal / parallel shares.")
    g.add_argument("runs", nargs="+", metavar="RUN", help="ladder directory or checkpoint files")
    g.add_argument("--out", default=None, help="where to write (default: the ladder directory, or .)")
    g.add_argument("--sequences", type=_positive, default=128, help="held-out sequences to analyse")
    g.set_defaults(func=geometry_cmd)
    return p


def run_ladder_cmd(args) -> int:
    import importlib

    from .experiments.ladder import run_ladder, run_label
    from .experiments.presets import get_preset

    for mod in args.imports:
        importlib.import_module(mod)
    preset = get_preset(args.preset).replace(
        families=args.tasks, kinds=args.kinds, variants=args.variants, seeds=args.seeds,
        base={"steps": args.steps, "tokens": None} if args.steps else None)
    grid = preset.grid()  # validates kinds and configs before any work
    out = Path(args.out or f"runs/ladder-{preset.name}")
    command = "ea " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    if args.list:
        for p in grid:
            print(f"{p.config.key()}  {run_label(p)}  steps={p.config.steps}")
        print(f"{len(grid)} runs")
        return 0
    if args.report_only:
        from .experiments.report import write_report
        paths = write_report(preset, out, command=command)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    t0 = time.time()
    workers = args.workers or os.cpu_count() or 1
    result = run_ladder(preset, out, workers=workers, checkpoints=not args.no_checkpoints,
                        imports=args.imports, command=command)
    print(f"{result['ran']} runs trained, {result['skipped']} already done, {len(result['failed'])} failed "
          f"in {(time.time() - t0) / 60:.1f} min")
    for k, v in result.get("report", {}).items():
        print(f"{k}: {v}")
    return 1 if result["failed"] else 0


def geometry_cmd(args) -> int:
    from .experiments.geometry import geometry_for, pick_checkpoints, summary_lines
    from .experiments.results import ResultsStore

    checkpoints: dict[str, dict[str, Path]] = {}
    out = None
    for run in map(Path, args.runs):
        if run.is_dir():
            records = ResultsStore(run).read()
            if not records:
                raise SystemExit(f"ea geometry: no results.jsonl records in {run}")
            checkpoints.update(pick_checkpoints(run, _rows_from_records(records)))
            out = out or run
        elif run.is_file():
            from .experiments.train import load_checkpoint
            _, cfg = load_checkpoint(run)
            checkpoints.setdefault(f"{run.stem[:8]}", {})[cfg.kind] = run
        else:
            raise SystemExit(f"ea geometry: RUN {run} is neither a directory nor a checkpoint file")
    if not checkpoints:
        raise SystemExit("ea geometry: found no checkpoints (was the ladder run with --no-checkpoints?)")
    out = Path(args.out) if args.out else (out or Path("."))
    res = geometry_for(checkpoints, out, n_sequences=args.sequences)
    print("\n".join(summary_lines(res["panels"])))
    print(f"plot: {res['plot']}\njson: {res['json']}")
    return 0


def _rows_from_records(records: list[dict]) -> list[dict]:
    """Mean token accuracy per (family, rung, kind) from ladder records (for picking checkpoints)."""
    import numpy as np
    cells: dict[tuple, list] = {}
    labels = {}
    for r in records:
        lad = r.get("ladder")
        if not lad:
            continue
        cells.setdefault((lad["family"], lad["rung"], r["kind"]), []).append(r["metrics"]["token_acc"])
        labels[(lad["family"], lad["rung"])] = lad["label"]
    return [{"family": f, "rung": g, "kind": k, "label": labels[(f, g)], "n": len(v),
             "token_acc_mean": float(np.mean(v))} for (f, g, k), v in cells.items()]
