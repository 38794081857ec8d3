"""Issue #21's study (docs/levers.md, pre-registered): its queue and its selection rule, from the records.

    python benchmarks/levers/study.py stage1 QUEUE [--out runs/levers]   # the screen + the ladder stage
    python benchmarks/levers/study.py select [--out runs/levers]         # lrs, gaps, ladder leads, Pareto
    python benchmarks/levers/study.py final QUEUE [--out runs/levers]    # append the final stage's jobs

Each job line is one `ea` command (benchmarks/levers/worker.sh runs a queue); every `ea lm` / `ea ladder`
call skips the runs its --out already holds, so a queue resumes. The rules below are docs/levers.md's.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

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
    return dict(lr=sel, bpb=bpb, best_softmax=best_softmax, gap=gap, ladder=mean, kept=kept, complete=complete,
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


def table(res: dict) -> list[str]:
    """The Pareto table: screen bits/byte per corpus (selected lr), mean gap to the best softmax, ladder
    token accuracy and the kept fraction of the paper's EA's lead."""
    lines = ["| id | mechanism | prose bits/byte (lr) | code bits/byte (lr) | gap to best softmax | pointer T=16 "
             "(kept) | lagged_digits N=5 (kept) | recall K=2 |", "|---|---|---|---|---|---|---|---|"]
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
            cells.append("-" if acc is None else f"{acc:.3f}" + ("" if k is None else f" ({k:.0%})"))
        lines.append(f"| {i} | {m} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("stage1", "select", "final"))
    ap.add_argument("queue", nargs="?", help="the queue folder (stage1, final)")
    ap.add_argument("--out", default="runs/levers")
    a = ap.parse_args(argv)
    if a.step == "select":
        res = select(Path(a.out))
        print("\n".join(table(res)))
        print(f"\nbest softmax: {res['best_softmax']}; complete: {res['complete']}; finalists: {res['finalists']}")
        return
    if a.queue is None:
        ap.error(f"{a.step} needs the queue folder")
    q = Path(a.queue)
    q.mkdir(parents=True, exist_ok=True)
    if a.step == "stage1":
        jobs = stage1_jobs(a.out)
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
