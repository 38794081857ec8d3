"""Issue #21's study (docs/levers.md, pre-registered): its queue and its selection rule, from the records.

    python benchmarks/levers/study.py stage1 QUEUE [--out runs/levers]   # the screen + the ladder stage
    python benchmarks/levers/study.py select [--out runs/levers]         # lrs, gaps, ladder leads, Pareto
    python benchmarks/levers/study.py final QUEUE [--out runs/levers]    # append the final stage's jobs
    python benchmarks/levers/study.py report [--out runs/levers] [--plot PNG]  # final stage, verdict, size, Pareto
    python benchmarks/levers/study.py size QUEUE [--out runs/levers]     # append the size step's jobs

Each job line is one `ea` command (benchmarks/levers/worker.sh runs a queue); every `ea lm` / `ea ladder`
call skips the runs its --out already holds, so a queue resumes. The rules below are docs/levers.md's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # the package, also when not installed
from expressive_attention.experiments.stats import contrast_interval, gap_interval  # noqa: E402

# id, run label, `ea lm` / `ea ladder` flags (every mechanism of the study, in the protocol's order)
MECHANISMS = [
    ("S0", "dpa", "--kinds dpa"),
    ("S1", "dpa+gate", "--kinds dpa --gate on"),
    ("C1", "ea-power4", "--kinds ea --variants power4"),
    ("C2", "ea-power6", "--kinds ea --variants power6"),
    ("C3", "ea-power8", "--kinds ea --variants power8"),
    ("C4", "ea-exp_squared+gain@-1.1513", "--kinds ea --variants exp_squared --scales learned@-1.1513"),
    ("C5", "ea-exp_odd", "--kinds ea --variants exp_odd"),
    ("C6", "ea+gate", "--kinds ea --variants saturating --gate on"),
    ("C7", "ea-exp_squared+gate", "--kinds ea --variants exp_squared --gate on"),
    ("C8", "ea[h2]", "--kinds ea --variants saturating --ea-heads 2"),
    ("C9", "ea[first]", "--kinds ea --variants saturating --layer-kinds first"),
]
FLAGS = {label: flags for _, label, flags in MECHANISMS}
SOFTMAX = [label for _, label, _ in MECHANISMS if label.startswith("dpa")]
CONTROL = "ea-exp_odd"  # the odd control: screened, never selected
CANDIDATES = [label for i, label, _ in MECHANISMS if i.startswith("C") and label != CONTROL]
CORPORA = ("prose", "code")
LRS = ("2e-3", "4e-3", "1e-3")  # the screen's order
TARGET_RUNGS = {"pointer": "T=16", "lagged_digits": "N=5"}  # the ladder lead the target keeps (>= KEEP)
KEEP = 0.75
FINALISTS = 3
SEEDS = (0, 1, 2)
WITHIN = 0.01  # the target's text margin: 1200-step 3-seed mean within 0.01 bits/byte of the best softmax's
SIZE = "--d-model 256"  # the size step: d_model 256, 1200 steps, 3 seeds, the d_model-128 lrs


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _label(r: dict) -> str:
    return r.get("label") or r["kind"]  # the mechanism's label (named `kind` in records up to #23)


def stage1_jobs(out: str) -> list[str]:
    jobs = [f"!OUT={out} bash benchmarks/levers/ladder_stage.sh"]
    for lr in LRS:
        for c in CORPORA:
            jobs += [f"lm --threads 1 --corpus {c} --lr {lr} --seeds 0 --steps 300 --out {out}/{c}-300 {FLAGS[label]}"
                     for _, label, _ in MECHANISMS]
    return jobs


def screen(out: Path) -> dict:
    """{corpus: {label: {lr: bits/byte}}} of the seed-0, 300-step runs."""
    res: dict = {c: {} for c in CORPORA}
    for c in CORPORA:
        for r in _records(out / f"{c}-300" / "results.jsonl"):
            if r["seed"] == 0:
                res[c].setdefault(_label(r), {})[float(r["lr"])] = float(r["val_bpb"])
    return res


def ladder(out: Path) -> dict:
    """{family: {label: [token accuracy per seed]}} of the ladder stage."""
    res: dict = {}
    for r in _records(out / "ladder" / "results.jsonl"):
        lad = r.get("ladder") or {}
        res.setdefault(lad.get("family"), {}).setdefault(_label(r), []).append(float(r["metrics"]["token_acc"]))
    return res


def select(out: Path) -> dict:
    """The protocol's numbers: each mechanism's lr per corpus, the best softmax, screen gaps, ladder leads
    and kept fractions, and the finalists (None while the records are incomplete)."""
    scr, lad = screen(out), ladder(out)
    sel = {c: {m: min(lrs, key=lrs.get) for m, lrs in scr[c].items()} for c in CORPORA}
    bpb = {c: {m: scr[c][m][lr] for m, lr in sel[c].items()} for c in CORPORA}
    best_softmax = {c: min((m for m in SOFTMAX if m in bpb[c]), key=bpb[c].get, default=None) for c in CORPORA}
    gap = {m: statistics.mean(bpb[c][m] - bpb[c][best_softmax[c]] for c in CORPORA)
           for m in FLAGS if all(m in bpb[c] and best_softmax[c] for c in CORPORA)}
    mean = {f: {m: statistics.mean(v) for m, v in d.items()} for f, d in lad.items()}
    sd = {f: {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in d.items()} for f, d in lad.items()}
    kept = {}
    for m in {m for d in mean.values() for m in d}:
        fr = {}
        for f in TARGET_RUNGS:
            d = mean.get(f, {})
            if {m, "dpa", "ea"} <= set(d) and d["ea"] != d["dpa"]:
                fr[f] = (d[m] - d["dpa"]) / (d["ea"] - d["dpa"])
        kept[m] = fr
    complete = all(len(scr[c].get(m, {})) == len(LRS) for c in CORPORA for m in FLAGS) and all(
        len(kept.get(m, {})) == len(TARGET_RUNGS) for m in CANDIDATES)
    finalists = None
    if complete:
        ok = [m for m in CANDIDATES if all(v >= KEEP for v in kept[m].values())]
        order = sorted(ok, key=gap.get) + sorted((m for m in CANDIDATES if m not in ok), key=gap.get)
        finalists = order[:FINALISTS]
    return dict(lr=sel, bpb=bpb, best_softmax=best_softmax, gap=gap, ladder=mean, ladder_sd=sd, kept=kept, complete=complete,
                finalists=finalists)


def final_jobs(res: dict, out: str) -> list[str]:
    """Seeds 1, 2 at 300 steps and seeds 0-2 at 1200 steps, each (mechanism, corpus) at its selected lr."""
    jobs = []
    for steps, seeds in ((300, (1, 2)), (1200, (0, 1, 2))):
        extra = " --eval-every 100" if steps == 1200 else ""
        for c in CORPORA:
            for m in [*res["finalists"], res["best_softmax"][c]]:
                jobs += [f"lm --threads 1 --corpus {c} --lr {res['lr'][c][m]:g} --seeds {s} --steps {steps}{extra} "
                         f"--out {out}/{c}-{steps} {FLAGS[m]}" for s in seeds]
    return jobs


def stage_runs(out: Path, folder: str, res: dict) -> dict:
    """{corpus: {label: {seed: bits/byte}}} of the runs in OUT/<corpus>-<folder> at each mechanism's selected lr."""
    runs: dict = {c: {} for c in CORPORA}
    for c in CORPORA:
        for r in _records(out / f"{c}-{folder}" / "results.jsonl"):
            m = _label(r)
            if m in res["lr"][c] and float(r["lr"]) == res["lr"][c][m] and r["seed"] in SEEDS:
                runs[c].setdefault(m, {})[r["seed"]] = float(r["val_bpb"])
    return runs


def _summary(got: dict) -> dict:
    """One row of a table: the bits/byte per seed {seed: value} as values (in seed order), n, mean and sample std."""
    vals = [got[s] for s in SEEDS if s in got]
    return {"vals": vals, "n": len(vals), "mean": statistics.mean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "gap": None}


def _fmt_bpb(r: dict) -> str:
    return "-" if r["mean"] is None else f"{r['mean']:.3f}" + ("" if r["std"] is None else f" ± {r['std']:.3f}")


def final(out: Path, res: dict | None = None) -> dict:
    """The final stage: per corpus and step count, each finalist's 3-seed bits/byte and its gap to the best
    softmax (Welch 95% interval); the target check per finalist; the size step's finalist (smallest mean
    1200-step gap) once the 1200-step runs are complete."""
    res = res or select(out)
    if not res["finalists"]:
        return {"complete": False, "rows": {}, "target": {}, "size_candidate": None}
    names = [*res["finalists"]]
    rows: dict = {}
    complete = True
    for steps in (300, 1200):
        runs = stage_runs(out, str(steps), res)
        for c in CORPORA:
            bar = _summary(runs[c].get(res["best_softmax"][c], {}))["vals"]
            for m in [*names, res["best_softmax"][c]]:
                row = _summary(runs[c].get(m, {}))
                complete &= row["n"] == len(SEEDS)
                if m in names and row["n"] > 1 and len(bar) > 1:
                    row["gap"] = gap_interval(row["vals"], bar)
                rows[(steps, c, m)] = row
    target = {}
    for m in names:
        # within WITHIN on both corpora: one corpus with all its seeds (candidate and bar) outside decides "no"
        full = {c: rows[(1200, c, m)]["n"] == len(SEEDS) and rows[(1200, c, res["best_softmax"][c])]["n"] == len(SEEDS)
                for c in CORPORA}
        gaps = {c: rows[(1200, c, m)]["gap"] for c in CORPORA}
        if any(full[c] and gaps[c].estimate > WITHIN for c in CORPORA):
            text_ok = False
        else:
            text_ok = True if all(full.values()) else None
        ladder_ok = all(v >= KEEP for v in res["kept"][m].values())
        # met None: the 1200-step runs decide (only while the ladder rule holds)
        target[m] = {"text": text_ok, "ladder": ladder_ok, "met": text_ok if ladder_ok else False}
    size_candidate = None
    if complete:
        size_candidate = min(names, key=lambda m: statistics.mean(rows[(1200, c, m)]["gap"].estimate for c in CORPORA))
    return {"complete": complete, "rows": rows, "target": target, "size_candidate": size_candidate}


def size_jobs(res: dict, fin: dict, out: str) -> list[str]:
    """The size step: the size candidate and the best softmax at d_model 256, 1200 steps, 3 seeds, both corpora,
    at their d_model-128 lrs (no re-tuning); seed by seed, candidate then softmax, so that a partial step
    already has matched pairs."""
    m0 = fin["size_candidate"]
    return [f"lm --threads 1 --corpus {c} --lr {res['lr'][c][m]:g} --seeds {s} --steps 1200 --eval-every 100 "
            f"{SIZE} --out {out}/{c}-1200-d256 {FLAGS[m]}"
            for c in CORPORA for s in SEEDS for m in (m0, res["best_softmax"][c])]


def final_table(res: dict, fin: dict) -> list[str]:
    """Per corpus and step count: mean ± std over seeds, and each finalist's gap to the best softmax with its
    95% Welch interval; then the target check."""
    lines = ["| corpus | steps | mechanism | lr | seeds | bits/byte (mean ± std) | gap to best softmax [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for c in CORPORA:
        for steps in (300, 1200):
            for m in [*res["finalists"], res["best_softmax"][c]]:
                r = fin["rows"][(steps, c, m)]
                bpb = _fmt_bpb(r)
                gap = "(the bar)" if m == res["best_softmax"][c] else ("-" if r["gap"] is None else r["gap"].fmt())
                lines.append(f"| {c} | {steps} | {m} | {res['lr'][c][m]:g} | {r['n']} | {bpb} | {gap} |")
    lines += ["", f"| candidate | text: within {WITHIN:g} at 1200 steps, both corpora | ladder: >= {KEEP:.0%} kept on "
              "both rungs | target |",
              "|---|---|---|---|"]
    for m, t in fin["target"].items():
        text = "-" if t["text"] is None else ("yes" if t["text"] else "no")
        verdict = "pending (1200-step runs)" if t["met"] is None else ("MET" if t["met"] else "not met")
        lines.append(f"| {m} | {text} | {'yes' if t['ladder'] else 'no'} | {verdict} |")
    return lines


def size_step(out: Path, res: dict, fin: dict) -> dict:
    """The size step (OUT/<corpus>-1200-d256): per corpus, the size candidate's and the best softmax's 3-seed
    bits/byte at d_model 256 and the candidate's gap (Welch 95% interval), beside its d_model-128 gap and the
    change of the gap from d_model 128 to 256 (the contrast (1, -1, -1, 1) of the four 3-seed groups, Welch).
    Whether the gap "shrinks or grows with size" is read off that change (descriptive: the protocol fixed no
    rule for it)."""
    m0 = fin["size_candidate"]
    if m0 is None:
        return {"candidate": None, "rows": {}, "complete": False}
    runs = stage_runs(out, "1200-d256", res)
    rows, complete = {}, True
    for c in CORPORA:
        m1 = res["best_softmax"][c]
        bar = _summary(runs[c].get(m1, {}))["vals"]
        for m in (m0, m1):
            row = {**_summary(runs[c].get(m, {})), "gap128": None, "change": None}
            complete &= row["n"] == len(SEEDS)
            if m == m0:
                small = fin["rows"][(1200, c, m)]  # the final stage's 1200-step rows (d_model 128)
                row["gap128"] = small["gap"]
                if row["n"] > 1 and len(bar) > 1:
                    row["gap"] = gap_interval(row["vals"], bar)
                    row["change"] = contrast_interval([row["vals"], bar, small["vals"], fin["rows"][(1200, c, m1)]["vals"]],
                                                      [1.0, -1.0, -1.0, 1.0])
            rows[(c, m)] = row
    return {"candidate": m0, "rows": rows, "complete": complete}


def size_table(res: dict, sz: dict) -> list[str]:
    """The size step: d_model 256 beside d_model 128 (1200 steps, 3 seeds, the d_model-128 lrs)."""
    lines = ["| corpus | mechanism | lr | seeds | d_model 256: bits/byte (mean ± std) | gap at d_model 256 [95% CI] "
             "| gap at d_model 128 [95% CI] | change of the gap, 256 - 128 [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for c in CORPORA:
        for m in (sz["candidate"], res["best_softmax"][c]):
            r = sz["rows"][(c, m)]
            if m == sz["candidate"]:
                gaps = ["-" if g is None else g.fmt() for g in (r["gap"], r["gap128"], r["change"])]
            else:
                gaps = ["(the bar)", "(the bar)", ""]
            lines.append(f"| {c} | {m} | {res['lr'][c][m]:g} | {r['n']} | {_fmt_bpb(r)} | " + " | ".join(gaps) + " |")
    return lines


def pareto_front(points: dict) -> set:
    """The labels no other label dominates; points: {label: (text gap, kept on pointer, kept on lagged)}, a
    smaller gap and larger kept fractions being better (dominated = no better anywhere, worse somewhere)."""
    def better(a, b):  # a dominates b
        ge = a[0] <= b[0] and all(x >= y for x, y in zip(a[1:], b[1:]))
        return ge and a != b
    return {m for m, p in points.items() if not any(better(q, p) for n, q in points.items() if n != m)}


def pareto_table(res: dict, fin: dict, sz: dict | None = None) -> list[str]:
    """The protocol's Pareto table: every mechanism's text gap to the best softmax (screen: seed 0; final stage:
    3-seed means at 300 and 1200 steps, and the size step's, where run) against its ladder kept fractions.
    "front": not dominated on (screen gap, kept on pointer, kept on lagged_digits), the measures every
    mechanism has."""
    points = {m: (res["gap"][m], *(res["kept"].get(m, {}).get(f, 0.0) for f in TARGET_RUNGS))
              for _, m, _ in MECHANISMS if m in res["gap"]}
    front = pareto_front(points)
    lines = ["| id | mechanism | screen gap prose / code (seed 0) | 300 steps: gap prose / code (3 seeds) "
             "| 1200 steps: gap prose / code (3 seeds) | d_model 256: gap prose / code | pointer T=16 kept "
             "| lagged_digits N=5 kept | front |", "|---|---|---|---|---|---|---|---|---|"]

    def pair(get):
        vals = [get(c) for c in CORPORA]
        return "-" if all(v is None for v in vals) else " / ".join("-" if v is None else f"{v:+.3f}" for v in vals)

    def gap(row):  # a row's gap estimate, None where there is no row or no gap
        return row["gap"].estimate if row and row["gap"] else None

    fin_rows, sz_rows = fin.get("rows", {}), (sz or {}).get("rows", {})
    for i, m, _ in MECHANISMS:
        scr = pair(lambda c: res["bpb"][c][m] - res["bpb"][c][res["best_softmax"][c]]
                   if m in res["bpb"][c] and res["best_softmax"][c] else None)
        if all(res["best_softmax"][c] == m for c in CORPORA):  # the bar of every stage that has run
            staged = ["(the bar)" if fin_rows else "-"] * 2 + ["(the bar)" if sz_rows else "-"]
        else:
            staged = [pair(lambda c: gap(fin_rows.get((steps, c, m)))) for steps in (300, 1200)]
            staged.append(pair(lambda c: gap(sz_rows.get((c, m)))))
        kept = ["-" if res["kept"].get(m, {}).get(f) is None else f"{res['kept'][m][f]:.0%}" for f in TARGET_RUNGS]
        lines.append(f"| {i} | {m} | {scr} | " + " | ".join(staged) + " | " + " | ".join(kept) +
                     f" | {'yes' if m in front else ''} |")
    return lines


def plot_pareto(res: dict, fin: dict, path: Path) -> None:
    """The Pareto table as a figure: per target rung, the kept share of the paper's EA's ladder lead against the
    text gap to the best softmax (filled: the screen, seed 0, mean over corpora; hollow, joined to it: the
    finalists' 1200-step 3-seed gap); the shaded corner is the target (gap <= WITHIN, kept >= KEEP)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(TARGET_RUNGS), figsize=(11, 4.5), sharey=True)
    for ax, (f, rung) in zip(axes, TARGET_RUNGS.items()):
        ax.fill_between([-0.05, WITHIN], KEEP * 100, 160, color="tab:green", alpha=0.12, label="target")
        for i, m, _ in MECHANISMS:
            k = res["kept"].get(m, {}).get(f)
            if k is None or m not in res["gap"]:
                continue
            color = "tab:blue" if m in SOFTMAX else ("tab:gray" if m == CONTROL else "tab:red")
            ax.scatter(res["gap"][m], 100 * k, color=color, zorder=3)
            ax.annotate(i, (res["gap"][m], 100 * k), textcoords="offset points", xytext=(4, 4), fontsize=8)
            rows = [fin.get("rows", {}).get((1200, c, m)) for c in CORPORA]
            if all(r and r["gap"] for r in rows):
                g = statistics.mean(r["gap"].estimate for r in rows)
                ax.plot([res["gap"][m], g], [100 * k, 100 * k], color=color, lw=0.8, zorder=2)
                ax.scatter(g, 100 * k, facecolors="white", edgecolors=color, zorder=3)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{f} {rung}")
        ax.set_xlabel("text gap to the best softmax (bits/byte)")
        ax.set_xlim(-0.05, 0.3)
        ax.set_ylim(-300, 160)
    axes[0].set_ylabel("% of the paper's EA's ladder lead kept")
    axes[0].scatter([], [], color="k", label="screen (300 steps, seed 0)")
    axes[0].scatter([], [], facecolors="white", edgecolors="k", label="1200 steps, 3 seeds")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Issue #21: text gap vs ladder lead (red: EA candidates, blue: softmax, gray: odd control)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(res: dict) -> list[str]:
    """The Pareto table: screen bits/byte per corpus (selected lr), mean gap to the best softmax, ladder
    token accuracy (mean ± std over seeds) and the kept fraction of the paper's EA's lead."""
    lines = ["| id | mechanism | prose bits/byte (lr) | code bits/byte (lr) | gap to best softmax | pointer T=16 "
             "± std (kept) | lagged_digits N=5 ± std (kept) | recall K=2 ± std |", "|---|---|---|---|---|---|---|---|"]
    rows = [*MECHANISMS, ("ref", "ea", ""), ("ref", "ea-exp_squared", "")]
    for i, m, _ in rows:
        cells = []
        for c in CORPORA:
            b = res["bpb"][c].get(m)
            cells.append("-" if b is None else f"{b:.3f} ({res['lr'][c][m]:g})")
        g = res["gap"].get(m)
        cells.append("-" if g is None else f"{g:+.3f}")
        for f in (*TARGET_RUNGS, "recall"):
            acc = res["ladder"].get(f, {}).get(m)
            k = res["kept"].get(m, {}).get(f)
            sd = res["ladder_sd"].get(f, {}).get(m, 0.0)
            cells.append("-" if acc is None else f"{acc:.3f} ± {sd:.3f}" + ("" if k is None else f" ({k:.0%})"))
        lines.append(f"| {i} | {m} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("stage1", "select", "final", "report", "size"))
    ap.add_argument("queue", nargs="?", help="the queue folder (stage1, final)")
    ap.add_argument("--out", default="runs/levers")
    ap.add_argument("--plot", metavar="PNG", help="report: also draw the Pareto table to PNG (needs matplotlib)")
    a = ap.parse_args(argv)
    if a.step == "select":
        res = select(Path(a.out))
        print("\n".join(table(res)))
        print(f"\nbest softmax: {res['best_softmax']}; complete: {res['complete']}; finalists: {res['finalists']}")
        return
    if a.step == "report":
        res = select(Path(a.out))
        if not res["finalists"]:
            raise SystemExit("the screen or the ladder stage is not complete: no finalists yet")
        fin = final(Path(a.out), res)
        print("\n".join(final_table(res, fin)))
        print(f"\nfinal stage complete: {fin['complete']}; size-step candidate: {fin['size_candidate']}")
        sz = size_step(Path(a.out), res, fin)
        if sz["candidate"]:
            print("\nsize step (d_model 256, 1200 steps):\n" + "\n".join(size_table(res, sz)))
            print(f"\nsize step complete: {sz['complete']}")
        print("\nPareto table:\n" + "\n".join(pareto_table(res, fin, sz)))
        if a.plot:
            plot_pareto(res, fin, Path(a.plot))
            print(f"\nwrote {a.plot}")
        return
    if a.queue is None:
        ap.error(f"{a.step} needs the queue folder")
    q = Path(a.queue)
    q.mkdir(parents=True, exist_ok=True)
    if a.step == "stage1":
        jobs = stage1_jobs(a.out)
    elif a.step == "size":
        res = select(Path(a.out))
        fin = final(Path(a.out), res)
        if not fin["complete"]:
            raise SystemExit("the final stage is not complete: no size-step candidate yet")
        jobs = size_jobs(res, fin, a.out)
    else:
        res = select(Path(a.out))
        if not res["complete"]:
            raise SystemExit("the screen or the ladder stage is not complete: no finalists yet")
        jobs = final_jobs(res, a.out)
    with open(q / "jobs", "a") as fh:
        fh.write("".join(j + "\n" for j in jobs))
    print(f"{len(jobs)} jobs appended to {q / 'jobs'}")


if __name__ == "__main__":
    main()
