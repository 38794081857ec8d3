"""From a ladder's records: summary.csv, ladder.png and report.md (table, plot, verdicts, command,
machine, versions)."""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..extras import has, install_hint
from ..info import machine, versions
from .presets import Preset
from .kinds import PLOT_STYLE
from .results import ResultsStore
from .stats import SOLVED

METRICS = ("token_acc", "seq_acc", "loss")


def collect(preset: Preset, records: list[dict]) -> list[dict]:
    """One row per (family, rung, kind) of the preset's grid at its base settings (the points of a
    preset's axes are summarised by `scaling`): mean, std, n of each metric."""
    by_key = {r["key"]: r for r in records}
    cells: dict[tuple, dict] = {}
    for p in preset.grid():
        if not p.is_base:
            continue
        cell = cells.setdefault((p.family, p.rung, p.config.label), {
            "family": p.family, "rung": p.rung, "rung_label": p.rung_label, "label": p.config.label,
            "task": p.config.task, "values": defaultdict(list), "wall": [], "params": None, "expected": 0})
        cell["expected"] += 1
        rec = by_key.get(p.config.key())
        if rec is None:
            continue
        for m in METRICS:
            cell["values"][m].append(float(rec["metrics"][m]))
        cell["wall"].append(float(rec["wall_s"]))
        cell["params"] = rec.get("params")
    rows = []
    for cell in cells.values():
        row = {k: cell[k] for k in ("family", "rung", "rung_label", "label", "task")}
        n = len(cell["values"]["token_acc"])
        row["n"] = n
        row["expected"] = cell["expected"]
        for m in METRICS:
            v = np.array(cell["values"][m])
            row[f"{m}_mean"] = float(v.mean()) if n else math.nan
            row[f"{m}_std"] = float(v.std(ddof=1)) if n > 1 else (0.0 if n else math.nan)
        row["wall_s_mean"] = float(np.mean(cell["wall"])) if n else math.nan
        row["params"] = cell["params"]
        rows.append(row)
    return rows


def write_summary_csv(rows: list[dict], path: Path) -> None:
    cols = ["family", "rung", "rung_label", "label", "n", "token_acc_mean", "token_acc_std", "seq_acc_mean",
            "seq_acc_std", "loss_mean", "loss_std", "wall_s_mean", "params", "task"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in cols})


def plot_ladder(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    ncols = len(families) if len(families) <= 3 else 2
    nrows = -(-len(families) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.7 * nrows), squeeze=False)
    axes = [list(grid.flat)]  # one row of panels, filled left to right, top to bottom
    for ax in axes[0][len(families):]:
        ax.set_visible(False)
    for ax, fam in zip(axes[0], families):
        fr = [r for r in rows if r["family"] == fam]
        labels = [r["rung_label"] for r in sorted({r["rung"]: r for r in fr}.values(), key=lambda r: r["rung"])]
        for kind in dict.fromkeys(r["label"] for r in fr):
            kr = sorted((r for r in fr if r["label"] == kind and r["n"]), key=lambda r: r["rung"])
            if not kr:
                continue
            color, marker = PLOT_STYLE.get(kind, (None, "d"))
            x = [r["rung"] for r in kr]
            for metric, ls, name in (("token_acc", "-", "token"), ("seq_acc", "--", "sequence")):
                ax.errorbar(x, [r[f"{metric}_mean"] for r in kr], yerr=[r[f"{metric}_std"] for r in kr],
                            color=color, marker=marker, ls=ls, capsize=3, ms=4,
                            mfc=color if metric == "token_acc" else "white", label=f"{kind} {name}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30 if max(map(len, labels)) > 5 else 0, fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(fam)
        ax.set_xlabel("rung (harder to the right)", fontsize=8)
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("held-out accuracy\n(mean ± std over seeds)")
    handles = {}
    for ax in axes[0]:  # one legend, from whichever panels have data
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        axes[0][0].legend(handles.values(), handles.keys(), fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdicts(rows: list[dict], base: str = "dpa") -> dict[str, dict[str, dict]]:
    """Per family and per EA kind: the paper's three claims, judged on this run.

    - at_least_as_good: EA token accuracy >= DPA's at every rung, within seed noise (2 standard
      errors of the difference, at least 0.01); the rungs where EA is behind are listed.
    - widening: "yes" if the token-accuracy gap EA - DPA rises beyond noise above the first rung's
      gap at some rung up to its largest value, and never falls (beyond noise) on the way there;
      "mostly" if it rises overall (every rung up to the peak above the first rung's gap) with dips
      (listed); else "no".
    - solves_where_dpa_does_not: rungs where EA's sequence accuracy is 100% (>= 0.999, mean over
      seeds) and DPA's is not.
    """
    out: dict[str, dict[str, dict]] = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        fr = {(r["rung"], r["label"]): r for r in rows if r["family"] == fam and r["n"]}
        rungs = sorted({r for r, _ in fr})
        for kind in sorted({k for _, k in fr if k != base}):
            pairs = [(fr[(r, base)], fr[(r, kind)]) for r in rungs if (r, base) in fr and (r, kind) in fr]
            if not pairs:
                continue
            gaps, noise, behind, ahead, solved = [], [], [], [], []
            for d, e in pairs:
                gap = e["token_acc_mean"] - d["token_acc_mean"]
                se = math.sqrt(e["token_acc_std"] ** 2 / e["n"] + d["token_acc_std"] ** 2 / d["n"])
                tol = max(0.01, 2 * se)
                gaps.append(gap)
                noise.append(tol)
                if gap < -tol:
                    behind.append(e["rung_label"])
                if gap > tol:
                    ahead.append(e["rung_label"])
                if e["seq_acc_mean"] >= SOLVED and d["seq_acc_mean"] < SOLVED:
                    solved.append(e["rung_label"])
            top = int(np.argmax(gaps))
            dips = [pairs[i + 1][1]["rung_label"] for i in range(top) if gaps[i + 1] < gaps[i] - noise[i + 1]]
            # grows: some rung up to the largest gap is beyond noise above the first rung's gap
            grows = any(gaps[i] - gaps[0] > noise[i] for i in range(1, top + 1))
            # "yes": grows, and never falls (beyond noise) on the way up to its largest value;
            # "mostly": grows overall (every rung up to the peak above the first), with dips; else "no"
            if grows and not dips:
                widening = "yes"
            elif grows and all(g > gaps[0] + noise[0] for g in gaps[1:top + 1]):
                widening = "mostly"
            else:
                widening = "no"
            out.setdefault(fam, {})[kind] = {
                "rungs": [e["rung_label"] for _, e in pairs], "gaps": gaps, "noise": noise,
                "at_least_as_good": not behind, "behind": behind, "ahead": ahead,
                "widening": widening, "dips": dips, "max_gap_at": pairs[top][1]["rung_label"], "max_gap": gaps[top],
                "solves_where_dpa_does_not": solved, "complete": all(d["n"] == d["expected"] and
                                                                     e["n"] == e["expected"] for d, e in pairs),
            }
    return out


def verdict_lines(v: dict[str, dict[str, dict]], base: str = "dpa") -> list[str]:
    lines = []
    for fam, kinds in v.items():
        for kind, c in kinds.items():
            gaps = ", ".join(f"{r} {g:+.3f}" for r, g in zip(c["rungs"], c["gaps"]))
            ge = ("yes" if c["at_least_as_good"] else f"NO: {kind} behind at {', '.join(c['behind'])}")
            wid = f"{c['widening']} (largest gap {c['max_gap']:+.3f} at {c['max_gap_at']}"
            wid += f"; dips at {', '.join(c['dips'])})" if c["dips"] else ")"
            sol = ", ".join(c["solves_where_dpa_does_not"]) or "none"
            note = "" if c["complete"] else " (incomplete: some runs missing)"
            lines.append(f"- **{fam}**, {kind} vs {base}{note}: {kind} >= {base} at every rung within seed "
                         f"noise: **{ge}**; gap widens with the rung: **{wid}**; {kind} at 100% sequence "
                         f"accuracy where {base} is not: **{sol}**. Token-accuracy gap by rung: {gaps}.")
    return lines


def _fmt(mean: float, std: float, n: int) -> str:
    if not n:
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def markdown_table(rows: list[dict]) -> str:
    kinds = list(dict.fromkeys(r["label"] for r in rows))
    head = "| family | rung | " + " | ".join(f"{k} token | {k} seq" for k in kinds) + " | n |"
    sep = "|" + "---|" * (3 + 2 * len(kinds))
    lines = [head, sep]
    cells = {(r["family"], r["rung"], r["label"]): r for r in rows}
    for fam, rung, label in dict.fromkeys((r["family"], r["rung"], r["rung_label"]) for r in rows):
        parts, ns = [], []
        for k in kinds:
            r = cells.get((fam, rung, k))
            if r is None:
                parts += ["", ""]
                continue
            parts += [_fmt(r["token_acc_mean"], r["token_acc_std"], r["n"]),
                      _fmt(r["seq_acc_mean"], r["seq_acc_std"], r["n"])]
            ns.append(str(r["n"]))
        lines.append(f"| {fam} | {label} | " + " | ".join(parts) + f" | {'/'.join(dict.fromkeys(ns))} |")
    return "\n".join(lines)


def group_table(preset: Preset, records: list[dict]) -> list[str]:
    """Per-task token / sequence accuracy inside multitask runs (mean over seeds; base settings)."""
    points = {p.config.key(): p for p in preset.grid() if p.is_base}
    cells: dict[tuple, list] = defaultdict(list)
    for r in records:
        p = points.get(r["key"])
        for g, m in (r["metrics"].get("groups") or {}).items():
            if p is not None and len(r["metrics"]["groups"]) > 1:
                cells[(p.family, p.rung, p.rung_label, g, p.config.label)].append((m["token_acc"], m["seq_acc"]))
    if not cells:
        return []
    kinds = list(dict.fromkeys(k[-1] for k in cells))
    lines = ["| family | rung | task | " + " | ".join(f"{k} token / seq" for k in kinds) + " |",
             "|" + "---|" * (3 + len(kinds))]
    for fam, rung, label, g in dict.fromkeys(k[:4] for k in sorted(cells, key=lambda k: (k[0], k[1], k[3]))):
        parts = []
        for k in kinds:
            v = np.array(cells.get((fam, rung, label, g, k), []))
            parts.append(f"{v[:, 0].mean():.3f} / {v[:, 1].mean():.3f}" if len(v) else "–")
        lines.append(f"| {fam} | {label} | {g} | " + " | ".join(parts) + " |")
    return lines


def _task_lines(preset: Preset, records: list[dict]) -> list[str]:
    keys = {p.config.key(): p for p in preset.grid()}
    seen, out = set(), []
    for r in records:
        p = keys.get(r["key"])
        if p is None or (p.family, p.rung) in seen:
            continue
        seen.add((p.family, p.rung))
        out.append((p.family, p.rung, f"- {p.family} {p.rung_label}: {r['task']['describe']}"))
    return [line for *_, line in sorted(out)]


def _read_sweeps(out: Path) -> list[dict]:
    import json
    path = out / "sweeps.jsonl"
    if not path.exists():
        return []
    sweeps = []
    for line in path.read_text().splitlines():
        try:
            sweeps.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line: the sweep log is informational only
    return sweeps


def write_report(preset: Preset, out: str | os.PathLike, *, command: str | None = None,
                 sweep: dict | None = None, geometry: bool = True) -> dict:
    """Write summary.csv, ladder.png, report.md into `out`; return their paths."""
    out = Path(out)
    records = ResultsStore(out).read()
    rows = collect(preset, records)
    paths = {"summary": out / "summary.csv", "plot": out / "ladder.png", "report": out / "report.md"}
    write_summary_csv(rows, paths["summary"])
    grid = preset.grid()
    c0 = grid[0].config
    if has("matplotlib"):
        plot_ladder(rows, paths["plot"], title=f"preset {preset.name}: d_model {c0.d_model}, {c0.n_layers} layers, "
                    f"{preset.seeds} seeds; solid = token accuracy, dashed = sequence accuracy")
    else:
        del paths["plot"]
    v = verdicts(rows)
    keys = {p.config.key() for p in grid}
    mine = [r for r in records if r["key"] in keys]
    geo_lines: list[str] = []
    if geometry and mine:
        try:
            from .geometry import ladder_geometry
            geo = ladder_geometry(preset, out, rows)
            if geo and geo["plot"]:
                paths["geometry"] = geo["plot"]
            if geo:
                geo_lines = geo["lines"]
        except Exception as exc:  # the report must still be written
            geo_lines = [f"(geometry analysis failed: {type(exc).__name__}: {exc})"]
    if command is None:
        command = "(Python API) run_ladder / write_report"
    mach = machine()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    run_wall = sum(r["wall_s"] for r in mine)
    c = grid[0].config  # the effective settings (family overrides may change steps)
    steps = sorted({r["steps"] for r in mine}) or sorted({p.config.steps for p in grid})
    lines = [
        f"# Complexity ladder: preset `{preset.name}`", "",
        preset.description, "",
        f"Report written by: `{command}`", "",
        f"Runs: {len(mine)} of {len(grid)} in the grid ({len(preset.families)} families x rungs x "
        f"{len(preset.mechanisms())} kinds x {preset.seeds} seeds). Model: d_model {c.d_model}, {c.n_layers} "
        f"layers, {c.n_heads} heads, {c.pos} positions, {mine[0]['params'] if mine else '?'} parameters. "
        f"Training: {'/'.join(map(str, steps))} steps of batch {c.batch_size}, AdamW lr {c.lr} betas "
        f"{tuple(c.betas)} weight decay {c.weight_decay}, {c.warmup} warm-up steps then cosine to 0, grad clip "
        f"{c.grad_clip}. Evaluation: {c.eval_sequences} held-out sequences per run.",
    ]
    if preset.axes:
        axes = "; ".join(f"{a}: " + ", ".join(",".join(f"{k} {v}" for k, v in pt.items()) for pt in pts)
                         for a, pts in preset.axes.items())
        lines += ["", f"Axes ({axes}): each point of each axis for every family, rung, kind and seed. The "
                  f"ladder table and verdicts below are at the base settings; the axes have their own section."]
    sweeps = _read_sweeps(out)
    if sweeps:
        lines += ["", "Sweeps into this directory (one line per invocation; load = 1-minute load average "
                  "of the machine at start / end):", ""]
        for sw in sweeps:
            sw_load = (f"; load {sw['load_start'][0]:.1f} / {sw['load_end'][0]:.1f}"
                       if sw.get("load_start") and sw.get("load_end") else "")
            how = sw.get("executor") or f"{sw.get('workers')} workers"  # older sweeps.jsonl: workers only
            lines.append(f"- `{sw.get('command')}` on {how}, {sw.get('started_utc')}: "
                         f"{sw.get('ran')} runs trained, {sw.get('skipped')} found done, {sw.get('failed')} failed, "
                         f"wall time **{sw.get('wall_s', 0) / 60:.1f} min**{sw_load}")
    elif sweep is not None:
        lines += ["", f"This invocation: {sweep['ran']} runs trained, {sweep['skipped']} found done, "
                  f"{len(sweep['failed'])} failed; wall time {sweep['wall_s'] / 60:.1f} min."]
    lines += [""] if sweeps or sweep is not None else []
    cpu = sum(r.get("cpu_s", r["wall_s"]) for r in mine)
    lines += [f"Sum of per-run wall times: {run_wall / 60:.1f} min; sum of per-run CPU times: {cpu / 60:.1f} min "
              f"(with W workers on an otherwise idle machine the sweep takes about CPU / W).", "",
              "## Accuracy (held-out; mean ± std over seeds; token = scored tokens, seq = every scored "
              "token of a sequence right)", "", markdown_table(rows), "",
              "![ladder](ladder.png)" if "plot" in paths
              else f"(plot skipped: matplotlib is not installed; {install_hint('cli')})", "",
              "## The paper's claims in this run", "",
              "Judged on token accuracy (>=, widening) and sequence accuracy (100%); seed noise = 2 standard "
              "errors of the EA - DPA difference, at least 0.01.", ""]
    lines += verdict_lines(v) or ["(no rung has both kinds yet)"]
    if preset.axes:  # budget / size axes: gaps with intervals, trends, factors, two more plots
        from .scaling import scaling_section
        axis_lines, axis_paths = scaling_section(mine, out)
        paths.update(axis_paths)
        lines += [""] + axis_lines
    groups = group_table(preset, records)
    if groups:
        lines += ["", "## Inside the multitask runs: each task's score (mean over seeds)", ""] + groups
    if geo_lines:
        lines += ["", "## Attention geometry", ""] + geo_lines
    lines += ["", "## Tasks", ""] + _task_lines(preset, records)
    ver = versions()
    lines += ["", "## Machine and versions", "",
              f"- {mach['platform']}, {mach['processor']}, {mach['cpus']} CPUs"
              + (f", load average at report time {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}" if load else ""),
              f"- expressive_attention {ver['expressive_attention']}, torch {ver['torch']}, numpy {ver['numpy']}, "
              f"Python {ver['python']}", f"- results: results.jsonl ({len(records)} records), summary.csv", ""]
    paths["report"].write_text("\n".join(lines))
    return {k: str(p) for k, p in paths.items()}
