"""The verify preset's learning-rate check (docs/ladder.md): the base-point gap EA - DPA with both kinds
at the pre-registered lr 1e-3, and with each kind at its better lr, from the records of both sweeps.

    python benchmarks/ladder_lr_check.py docs/ladder-verify/results.jsonl docs/ladder-lrcheck/results.jsonl
"""
import argparse

import numpy as np

from expressive_attention.experiments.results import ResultsStore
from expressive_attention.experiments.scaling import BASE, METRIC, who_leads
from expressive_attention.experiments.stats import LEVEL, Interval, gap_interval


def lr_rule_gaps(records: list[dict], preregistered_lr: float) -> list[dict]:
    """The base-point gap EA - DPA under two learning-rate rules (docs/ladder.md, learning-rate check):
    both kinds at `preregistered_lr`, and each kind at its better lr (the higher mean token accuracy
    at the base point over the lrs present). Base-point records only (no axis `point`), any preset.
    One row per (family, rung, EA kind): the per-lr means and both gaps with their intervals."""
    cells: dict[tuple, list[float]] = {}
    labels: dict[tuple, str] = {}
    for r in records:
        lad = r.get("ladder") or {}
        if "family" not in lad or lad.get("point"):
            continue
        fam = (lad["family"], lad["rung"])
        labels[fam] = lad["rung_label"]
        cells.setdefault((*fam, r["label"], float(r["config"]["lr"])), []).append(float(r["metrics"][METRIC]))
    rows = []
    for fam, label in labels.items():
        by_kind: dict[str, dict[float, list[float]]] = {}
        for (f, rung, kind, lr), vals in cells.items():
            if (f, rung) == fam:
                by_kind.setdefault(kind, {})[lr] = vals
        if BASE not in by_kind:
            continue

        def best(kind: str) -> float:  # ties go to the pre-registered lr, then to the smaller one
            lrs = by_kind[kind]
            return max(lrs, key=lambda lr: (np.mean(lrs[lr]), lr == preregistered_lr, -lr))

        for kind in sorted(k for k in by_kind if k != BASE):
            d, e = by_kind[BASE], by_kind[kind]
            same = _gap_if_seeds(e.get(preregistered_lr), d.get(preregistered_lr))
            bd, be = best(BASE), best(kind)
            rows.append({"family": fam[0], "rung": fam[1], "rung_label": label, "label": kind,
                         "means": {k: {lr: float(np.mean(v)) for lr, v in sorted(by_kind[k].items())}
                                   for k in (BASE, kind)},
                         "same_lr": same, "best_lr": {BASE: bd, kind: be},
                         "best": _gap_if_seeds(e[be], d[bd])})
    return rows


def _gap_if_seeds(ea: list[float] | None, dpa: list[float] | None) -> Interval | None:
    """The gap's interval, or None while a group has fewer than 2 seeds (no spread to judge by)."""
    return gap_interval(ea, dpa) if ea and dpa and min(len(ea), len(dpa)) >= 2 else None


def lr_rule_lines(rows: list[dict]) -> list[str]:
    """A markdown table of `lr_rule_gaps`: the means per lr, and the gap (who leads) under both rules."""
    lines = [f"| family, rung | EA kind | DPA mean token acc. by lr | EA mean by lr | EA - DPA, same lr | "
             f"EA - DPA, each at its better lr ({int(LEVEL * 100)}% interval) |", "|---|---|---|---|---|---|"]
    for r in rows:
        means = {k: ", ".join(f"{lr:g}: {m:.3f}" for lr, m in v.items()) for k, v in r["means"].items()}
        same = "n/a" if r["same_lr"] is None else f"{r['same_lr'].fmt()} ({who_leads(r['same_lr'])})"
        best = "n/a" if r["best"] is None else (f"{r['best'].fmt()} ({who_leads(r['best'])}; DPA at {r['best_lr'][BASE]:g}, "
                f"{r['label']} at {r['best_lr'][r['label']]:g})")
        lines.append(f"| {r['family']} {r['rung_label']} | {r['label']} | {means[BASE]} | {means[r['label']]} | "
                     f"{same} | {best} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.jsonl files (or their folders)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the pre-registered lr (default 1e-3)")
    args = parser.parse_args(argv)
    records = [r for path in args.results for r in ResultsStore(path).read()]
    print("\n".join(lr_rule_lines(lr_rule_gaps(records, args.lr))))


if __name__ == "__main__":
    main()
