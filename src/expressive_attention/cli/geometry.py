"""`ea geometry`: where attention goes in cos(q, k), for trained ladder models (DPA vs EA); see
expressive_attention.experiments.geometry."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    g = subparsers.add_parser(
        "geometry", help="attention mass by cos(q, k) for trained models (DPA vs EA)",
        description="RUN is a ladder output directory (picks, per family, the rung with the largest EA-DPA gap, "
                    "seed 0, one checkpoint per kind) or checkpoint .pt files. Writes geometry.png, "
                    "geometry.json and prints the antiparallel / orthogonal / parallel shares.")
    g.add_argument("runs", nargs="+", metavar="RUN", help="ladder directory or checkpoint files")
    g.add_argument("--out", default=None, help="where to write (default: the ladder directory, or .)")
    g.add_argument("--sequences", type=positive_int, default=128, help="held-out sequences to analyse")
    g.set_defaults(func=geometry_cmd)
    return g


def geometry_cmd(args) -> int:
    from ..errors import UserError
    from ..extras import install_hint
    from ..experiments.geometry import geometry_for, pick_checkpoints, summary_lines
    from ..experiments.results import ResultsStore

    checkpoints: dict[str, dict[str, Path]] = {}
    out = None
    for run in map(Path, args.runs):
        if run.is_dir():
            records = ResultsStore(run).read()
            if not records:
                raise UserError(f"no results.jsonl records in {run}")
            checkpoints.update(pick_checkpoints(run, _rows_from_records(records)))
            out = out or run
        elif run.is_file():
            from ..experiments.train import load_checkpoint
            try:
                _, cfg = load_checkpoint(run)
            except Exception as e:  # not a torch file, or not one of ours
                raise UserError(f"{run} is not a checkpoint written by `ea ladder` "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            checkpoints.setdefault(f"{run.stem[:8]}", {})[cfg.label] = run
        else:
            raise UserError(f"RUN {run} is neither a directory nor a checkpoint file")
    if not checkpoints:
        raise UserError("found no checkpoints (was the ladder run with --no-checkpoints?)")
    out = Path(args.out) if args.out else (out or Path("."))
    res = geometry_for(checkpoints, out, n_sequences=args.sequences)
    print("\n".join(summary_lines(res["panels"])))
    print(f"plot: {res['plot'] or 'skipped (matplotlib is not installed: ' + install_hint('cli') + ')'}\n"
          f"json: {res['json']}")
    return 0


def _rows_from_records(records: list[dict]) -> list[dict]:
    """Mean token accuracy per (family, rung, mechanism label) from ladder records (for picking checkpoints)."""
    import numpy as np
    cells: dict[tuple, list] = {}
    labels = {}
    for r in records:
        lad = r.get("ladder")
        if not lad:
            continue
        cells.setdefault((lad["family"], lad["rung"], r["label"]), []).append(r["metrics"]["token_acc"])
        labels[(lad["family"], lad["rung"])] = lad["rung_label"]
    return [{"family": f, "rung": g, "label": k, "rung_label": labels[(f, g)], "n": len(v),
             "token_acc_mean": float(np.mean(v))} for (f, g, k), v in cells.items()]
