"""EA vs DPA along a preset's axes (budget: steps; size: parameters), from the records alone:
gaps with t-intervals, the gap's trend, the capacity-equivalent factor, whether EA's 100% survives
when DPA gets more steps, a verdict per (family, rung, EA kind), and the two plots.

    rows = scaling_rows(ResultsStore(out).read())      # every record with ladder.axes
    res = analyse(rows)                                 # {(family, rung): {kind: {...}}}
    lines = report_lines(res); plot_axis(rows, "budget", "scaling_budget.png")

The rules are written down in docs/ladder.md ("Protocol"); every family is judged by the same ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .kinds import PLOT_STYLE
from .stats import LEVEL, SOLVED, Interval, contrast_interval, equivalent_factor, gap_interval

AXES = {"budget": ("steps", "training steps"), "size": ("params", "parameters")}
BASE = "dpa"
METRIC = "token_acc"  # the score the gaps, trends and factors are computed on


def scaling_rows(records: list[dict]) -> list[dict]:
    """One row per (family, rung, kind, axis, x): the per-seed metrics of the runs on that axis point.

    x is the run's steps (budget) or parameter count (size); `base` marks the preset's base point.
    A base run (no `point`) lies on every axis present in the records, whichever preset (e.g. a
    JSON preset with fewer axes, run first) trained it."""
    present = {a for r in records for a in (r.get("ladder") or {}).get("axes") or () if a in AXES}
    cells: dict[tuple, dict] = {}
    for r in records:
        lad = r.get("ladder") or {}
        axes = set(lad.get("axes") or ()) | (present if lad.get("axes") and not lad.get("point") else set())
        for axis in sorted(axes & present, key=list(AXES).index):
            x = r[AXES[axis][0]]
            cell = cells.setdefault((lad["family"], lad["rung"], r["label"], axis, x), {
                "family": lad["family"], "rung": lad["rung"], "rung_label": lad["rung_label"], "label": r["label"],
                "axis": axis, "x": x, "d_model": r["config"]["d_model"], "steps": r["steps"],
                "base": not lad.get("point"), "seeds": [], "token_acc": [], "seq_acc": []})
            cell["seeds"].append(r["config"]["seed"])
            cell["token_acc"].append(float(r["metrics"]["token_acc"]))
            cell["seq_acc"].append(float(r["metrics"]["seq_acc"]))
    order = {f: i for i, f in enumerate(dict.fromkeys(c["family"] for c in cells.values()))}  # as trained
    return sorted(cells.values(), key=lambda c: (order[c["family"]], c["rung"], c["axis"], c["label"], c["x"]))


def _series(rows: list[dict], family: str, rung: int, kind: str, axis: str) -> list[dict]:
    return [r for r in rows if (r["family"], r["rung"], r["label"], r["axis"]) == (family, rung, kind, axis)]


def who_leads(iv: Interval | None) -> str:
    if iv is None:
        return "?"
    return {1: "EA", -1: "DPA", 0: "tie"}[iv.sign]


_CATEGORY = {  # (who leads at the axis' first point, at its last point) -> verdict, budget axis
    ("EA", "EA"): "EA ahead at 1x and at the largest budget: DPA does not catch up within this budget",
    ("EA", "tie"): "EA learns faster: ahead at 1x, DPA catches up with more steps",
    ("EA", "DPA"): "EA learns faster, but DPA ends ahead with more steps",
    ("tie", "tie"): "no separation at 1x or at the largest budget",
    ("tie", "EA"): "EA ahead only with more steps",
    ("tie", "DPA"): "DPA ahead only with more steps",
    ("DPA", "EA"): "DPA learns faster, but EA ends ahead with more steps",
    ("DPA", "tie"): "DPA learns faster: ahead at 1x, EA catches up with more steps",
    ("DPA", "DPA"): "DPA ahead at 1x and at the largest budget",
}


def category(first: str, last: str) -> str:
    """The budget-axis verdict from who leads (beyond the interval) at the first and last budget."""
    return _CATEGORY.get((first, last), "incomplete")


def _trend(d0: dict, e0: dict, d1: dict, e1: dict) -> tuple[Interval | None, str]:
    """Change of the gap from the first to the last axis point, (e1 - d1) - (e0 - d0), and its word."""
    try:
        iv = contrast_interval([e1[METRIC], d1[METRIC], e0[METRIC], d0[METRIC]], [1, -1, -1, 1])
    except ValueError:
        return None, "?"
    return iv, {1: "grows", -1: "shrinks", 0: "holds"}[iv.sign]


def analyse(rows: list[dict]) -> dict[tuple[str, int], dict[str, dict]]:
    """Per (family, rung) and EA kind: along each axis, the gap (EA - DPA token accuracy, t-interval)
    at every point, who leads, the gap's trend (last vs first point), DPA's capacity-equivalent
    factor; on the budget axis also the verdict category and whether EA's 100% survives."""
    out: dict[tuple[str, int], dict[str, dict]] = {}
    for family, rung in dict.fromkeys((r["family"], r["rung"]) for r in rows):
        kinds = [k for k in dict.fromkeys(r["label"] for r in rows if (r["family"], r["rung"]) == (family, rung))
                 if k != BASE]
        for kind in kinds:
            res: dict = {"rung_label": next(r["rung_label"] for r in rows if (r["family"], r["rung"]) == (family, rung))}
            for axis in AXES:
                d_s = {r["x"]: r for r in _series(rows, family, rung, BASE, axis)}
                e_s = {r["x"]: r for r in _series(rows, family, rung, kind, axis)}
                xs = sorted(set(d_s) & set(e_s))
                if len(xs) < 2:  # an axis needs two points with both kinds (a sweep still running)
                    continue
                points = []
                for x in xs:
                    d, e = d_s[x], e_s[x]
                    try:
                        gap = gap_interval(e[METRIC], d[METRIC])
                    except ValueError:  # fewer than 2 seeds so far
                        gap = None
                    points.append({"x": x, "d_model": e["d_model"], "steps": e["steps"], "base": e["base"],
                                   "n": (len(e[METRIC]), len(d[METRIC])), "gap": gap,
                                   "dpa": float(np.mean(d[METRIC])), "ea": float(np.mean(e[METRIC])),
                                   "dpa_seq": float(np.mean(d["seq_acc"])), "ea_seq": float(np.mean(e["seq_acc"]))})
                ref = next((p for p in points if p["base"]), points[0])
                dpa_x = sorted(d_s)
                factor = equivalent_factor(dpa_x, [float(np.mean(d_s[x][METRIC])) for x in dpa_x],
                                           target=ref["ea"], x_ref=ref["x"])
                trend, word = _trend(d_s[xs[0]], e_s[xs[0]], d_s[xs[-1]], e_s[xs[-1]]) if len(xs) > 1 else (None, "?")
                first, last = who_leads(points[0]["gap"]), who_leads(points[-1]["gap"])
                a = {"points": points, "factor": factor, "trend": trend, "trend_word": word,
                     "first": first, "last": last}
                if axis == "budget":
                    a["category"] = category(first, last)
                    a["solved"] = _survives(points, ref)
                res[axis] = a
            out.setdefault((family, rung), {})[kind] = res
    return out


def _survives(points: list[dict], ref: dict) -> str:
    """Does EA's 100% sequence accuracy at the base budget hold against DPA with more steps?"""
    if ref["ea_seq"] < SOLVED:
        return f"n/a (EA at 1x: {ref['ea_seq']:.3f} sequence accuracy, not 100%)"
    if ref["dpa_seq"] >= SOLVED:
        return "n/a (DPA is at 100% at 1x as well)"
    base_steps = ref["x"]
    for p in points:
        if p["x"] > base_steps and p["dpa_seq"] >= SOLVED:
            return f"no: DPA reaches 100% at {p['x'] / base_steps:.0f}x the steps"
    top = points[-1]
    return (f"yes: DPA at {top['x'] / base_steps:.0f}x the steps is at {top['dpa_seq']:.3f} sequence accuracy "
            f"(EA at 1x: {ref['ea_seq']:.3f}, at {top['x'] / base_steps:.0f}x: {top['ea_seq']:.3f})")


def _xlabel(axis: str, p: dict, ref_x: float) -> str:
    if axis == "budget":
        return f"{p['x'] / ref_x:.0f}x ({p['x']} steps)"
    return f"d_model {p['d_model']} ({p['x'] / 1e3:.0f}k)"


def summary_table(res: dict[tuple[str, int], dict[str, dict]]) -> list[str]:
    """One row per (family, rung, EA kind): the gap at every point of both axes with its interval,
    and DPA's capacity-equivalent factors."""
    def labels(axis: str, a: dict) -> list[str]:
        ref_x = next((p["x"] for p in a["points"] if p["base"]), a["points"][0]["x"])
        return [f"{p['x'] / ref_x:.0f}x" if axis == "budget" else f"d{p['d_model']}" for p in a["points"]]

    results = [r for kinds in res.values() for r in kinds.values()]
    cols = {axis: max((labels(axis, r[axis]) for r in results if axis in r), key=len, default=[]) for axis in AXES}
    heads = [f"gap {c}" for axis in AXES for c in cols.get(axis, [])]
    lines = ["| family | rung | EA kind | " + " | ".join(heads) + " | DPA steps factor | DPA params factor |",
             "|" + "---|" * (5 + len(heads))]
    for (family, _rung), kinds in res.items():
        for kind, r in kinds.items():
            cells = []
            for axis in AXES:
                pts = r.get(axis, {}).get("points", [])
                for i in range(len(cols.get(axis, []))):
                    g = pts[i]["gap"] if i < len(pts) else None
                    cells.append(g.fmt(2) if g else "–")
            f = [r[a]["factor"].fmt() if a in r else "–" for a in AXES]
            lines.append(f"| {family} | {r['rung_label']} | {kind} | " + " | ".join(cells) + f" | {f[0]} | {f[1]} |")
    return lines


def report_lines(res: dict[tuple[str, int], dict[str, dict]]) -> list[str]:
    """The report section: the summary, one table per axis, the verdicts, factors and the 100% question."""
    pct = f"{LEVEL:.0%}"
    lines = [f"Gap = EA - DPA held-out token accuracy, mean over seeds, with its {pct} Welch t-interval "
             f"over seeds in brackets; a side leads where the interval excludes 0. Trend = change of the gap "
             f"from the first to the last point of the axis (same interval rule). Factor = how many times the "
             f"base steps (parameters) DPA needs to reach EA's token accuracy at the base point (log-linear "
             f"interpolation between the axis points). Rules: docs/ladder.md, \"Protocol\".", ""]
    lines += summary_table(res) + [""]
    for axis, (_, what) in AXES.items():
        rows = []
        for (family, _rung), kinds in res.items():
            for kind, r in kinds.items():
                a = r.get(axis)
                if a is None:
                    continue
                ref_x = next((p["x"] for p in a["points"] if p["base"]), a["points"][0]["x"])
                for p in a["points"]:
                    gap = p["gap"].fmt() if p["gap"] else "(< 2 seeds)"
                    rows.append(f"| {family} | {r['rung_label']} | {kind} | {_xlabel(axis, p, ref_x)} | {p['dpa']:.3f} | "
                                f"{p['ea']:.3f} | {gap} | {p['dpa_seq']:.3f} | {p['ea_seq']:.3f} | "
                                f"{p['n'][0]}/{p['n'][1]} |")
        if not rows:
            continue
        lines += [f"### Along the {axis} axis ({what})", "",
                  "| family | rung | EA kind | point | DPA token | EA token | gap [interval] | DPA seq | EA seq | "
                  "seeds EA/DPA |", "|---|---|---|---|---|---|---|---|---|---|"] + rows + [""]
    lines += ["### Verdicts", ""]
    for (family, _rung), kinds in res.items():
        for kind, r in kinds.items():
            b, s = r.get("budget"), r.get("size")
            parts = [f"- **{family} {r['rung_label']}**, {kind} vs dpa:"]
            if b:
                parts.append(f"budget: **{b['category']}**; gap {b['trend_word']} from 1x to "
                             f"{b['points'][-1]['x'] / b['points'][0]['x']:.0f}x"
                             + (f" (change {b['trend'].fmt()})" if b["trend"] else "")
                             + f"; DPA needs **{b['factor'].fmt()}** the steps to match EA at 1x; "
                             f"EA's 100% survives: {b['solved']}.")
            if s:
                parts.append(f"size: leads at d_model {s['points'][0]['d_model']} / {s['points'][-1]['d_model']}: "
                             f"**{s['first']} / {s['last']}**; gap {s['trend_word']}"
                             + (f" (change {s['trend'].fmt()})" if s["trend"] else "")
                             + f"; DPA needs **{s['factor'].fmt()}** the parameters to match EA at the base size.")
            if not (b or s):
                parts.append("(not yet two points of an axis with both kinds)")
            lines.append(" ".join(parts))
    return lines


def plot_axis(rows: list[dict], axis: str, path: str | Path, title: str = "") -> bool:
    """Accuracy vs steps (budget) or parameters (size), log x, one panel per (family, rung), every kind
    on the same axes; mean ± std over seeds, solid = token, dashed = sequence accuracy. False if no data."""
    rows = [r for r in rows if r["axis"] == axis]
    panels = list(dict.fromkeys((r["family"], r["rung"], r["rung_label"]) for r in rows))
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in list(grid.flat)[len(panels):]:
        ax.set_visible(False)
    for ax, (family, rung, label) in zip(grid.flat, panels):
        for kind in dict.fromkeys(r["label"] for r in rows):
            s = _series(rows, family, rung, kind, axis)
            if not s:
                continue
            color, marker = PLOT_STYLE.get(kind, (None, "d"))
            x = [r["x"] for r in s]
            for metric, ls in (("token_acc", "-"), ("seq_acc", "--")):
                y = [np.mean(r[metric]) for r in s]
                e = [np.std(r[metric], ddof=1) if len(r[metric]) > 1 else 0.0 for r in s]
                ax.errorbar(x, y, yerr=e, color=color, marker=marker, ls=ls, capsize=3, ms=4,
                            mfc=color if metric == "token_acc" else "white",
                            label=f"{kind} {'token' if metric == 'token_acc' else 'sequence'}")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["x"] for r in rows if (r["family"], r["rung"]) == (family, rung)}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v / 1e3:.0f}k" if axis == "size" else f"{v:.0f}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{family} {label}", fontsize=9)
        ax.set_xlabel(AXES[axis][1], fontsize=8)
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("held-out accuracy\n(mean ± std over seeds)")
    handles = {}
    for ax in grid.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    grid.flat[0].legend(handles.values(), handles.keys(), fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def scaling_section(records: list[dict], out: Path) -> tuple[list[str], dict[str, str]]:
    """Markdown lines and plot paths for report.md, or ([], {}) when no record lies on an axis."""
    rows = scaling_rows(records)
    if not rows:
        return [], {}
    paths = {}
    for axis in AXES:
        path = out / f"scaling_{axis}.png"
        if plot_axis(rows, axis, path, title=f"EA vs DPA along the {axis} axis; solid = token, dashed = "
                                                    f"sequence accuracy"):
            paths[f"scaling_{axis}"] = str(path)
    lines = ["## Budget and size axes: does EA learn faster, or can it do more?", ""]
    lines += [f"![{k}]({Path(p).name})" for k, p in paths.items()] + [""]
    lines += report_lines(analyse(rows))
    return lines, paths
