"""The `ea lm` study: every (seed, lr, mechanism) in ``seeds`` x ``lrs`` x ``runs()`` is one run of
text_lm.train_one; each finished run is appended to OUT/results.jsonl at once, and a rerun skips the
runs already there (an interrupted study resumes). Summary, tables, plot and OUT/report.md cover
every run in the file with the same setting.

Protocol the report applies (fixed before any result was seen, see docs/real-text.md): each
mechanism's learning rate is the one with the lowest held-out bits/byte on the *selection seed*
(the smallest seed run, normally 0); its figure is the mean ± sample std over every seed run at
that lr. Verdict: the best EA-family mean against the best SDPA mean; target within 0.02 bits/byte.
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from .results import RESULTS_FILE, ResultsStore, serialised
from .text_data import corpus_description, load_text, tokenize
from .text_lm import TextLMConfig, auto_threads, eval_windows, hf_implementation, label_of_impl, run_key, setting, train_one

TARGET_GAP = 0.02  # bits/byte: "EA-family within this of SDPA" is the target


def label(record: dict) -> str:
    """A record's mechanism label ("dpa", "ea-power4", ...); older records stored only the HF name."""
    return record.get("label") or label_of_impl(record["attn_implementation"])


def grid(records: list[dict]) -> list[dict]:
    """One row per (mechanism, lr): the seeds run, their bits/byte, mean, std, and the selection
    seed's value. ("mech" in these rows is the mechanism label.)"""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        cells.setdefault((label(r), float(r["lr"])), []).append(r)
    out = []
    for (mech, lr), rs in cells.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        vals = [r["val_bpb"] for r in rs]
        out.append(dict(label=mech, attn_implementation=rs[0]["attn_implementation"], lr=lr, seeds=[r["seed"] for r in rs], val_bpb=vals,
                        mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        n=len(vals), selection_seed=rs[0]["seed"], selection_bpb=vals[0],
                        val_loss=statistics.fmean(r["val_loss"] for r in rs),
                        train_seconds=statistics.fmean(r["train_seconds"] for r in rs),
                        wall_seconds=statistics.fmean(r["wall_seconds"] for r in rs)))
    return out


def best_per_mechanism(rows: list[dict], order: list[str]) -> dict[str, dict]:
    """Each mechanism's row at its selected lr (lowest bits/byte of the common selection seed)."""
    best = {}
    for mech in order + sorted({r["label"] for r in rows} - set(order)):
        mine = [r for r in rows if r["label"] == mech]
        if not mine:
            continue
        sel = min(r["selection_seed"] for r in mine)
        eligible = [r for r in mine if r["selection_seed"] == sel]
        best[mech] = min(eligible, key=lambda r: r["selection_bpb"])
    return best


SOFTMAX = ("dpa", "dpa+gain")  # the softmax side of the verdict; every other mechanism is EA-family


def is_softmax(label: str) -> bool:
    """A softmax mechanism: "dpa" and its options ("dpa+gain", "dpa+gate", "dpa+gain@-1+gate", ...)."""
    return label in SOFTMAX or label.startswith("dpa+")


def verdict(best: dict[str, dict]) -> str:
    dpa = {k: v for k, v in best.items() if is_softmax(k)}
    ea = {k: v for k, v in best.items() if not is_softmax(k)}
    if not dpa or not ea:
        return "no verdict: needs a softmax (dpa) and an EA-family mechanism"
    d_mech, d = min(dpa.items(), key=lambda kv: kv[1]["mean"])
    ea_mech, ea = min(ea.items(), key=lambda kv: kv[1]["mean"])
    gap = ea["mean"] - d["mean"]
    seeds = min(d["n"], ea["n"])
    status = "meets" if gap <= TARGET_GAP else "misses"
    text = (f"best EA-family: {ea_mech} (lr {ea['lr']:g}) {ea['mean']:.3f} ± {ea['std']:.3f} vs best softmax: "
            f"{d_mech} (lr {d['lr']:g}) {d['mean']:.3f} ± {d['std']:.3f} bits/byte: gap {gap:+.3f}, "
            f"{status} the {TARGET_GAP} target")
    if seeds < 3:
        text += f" (provisional: {seeds} seed{'s' if seeds != 1 else ''}; the protocol asks for 3)"
    return text


def _cell(r: dict | None, bold: bool = False) -> str:
    if r is None:
        return "—"
    s = f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["n"] > 1 else "") + f" ({r['n']})"
    return f"**{s}**" if bold else s


def tables(summary: dict) -> str:
    """Markdown: mechanism x lr (mean ± std (seeds)), then each mechanism at its selected lr."""
    rows, best = summary["grid"], summary["results"]
    lrs = sorted({r["lr"] for r in rows})
    mechs = list(best)
    at = {(r["label"], r["lr"]): r for r in rows}
    lines = ["| mechanism | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for mech in mechs:
        lines.append(f"| {mech} | " + " | ".join(_cell(at.get((mech, lr)), best[mech]["lr"] == lr) for lr in lrs) + " |")
    sdpa = best.get("dpa")
    lines += ["", "| mechanism | lr | held-out bits/byte (mean ± std) | seeds | vs dpa (SDPA) | train s / run |",
              "|---|---|---|---|---|---|"]
    for mech, r in best.items():
        gap = f"{r['mean'] - sdpa['mean']:+.3f}" if sdpa and mech != "dpa" else ""
        lines.append(f"| {mech} | {r['lr']:g} | {r['mean']:.3f} ± {r['std']:.3f} | "
                     f"{','.join(map(str, r['seeds']))} | {gap} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def format_table(summary: dict) -> str:
    return tables(summary)


def diagnosis_table(records: list[dict], best: dict[str, dict]) -> str:
    """Per mechanism (at its selected lr, selection seed) and layer: |s|, top-key weight, entropy at
    init -> after training, and the top-key weight the final scores would get under each function."""
    lines = []
    for mech, b in best.items():
        rec = _selected_record(records, mech, b)
        if rec is None:
            continue
        d = rec["diagnosis"]
        from .attention_stats import COUNTERFACTUALS

        got = d["final"][0]["top_weight_if"]
        names = [n for n in COUNTERFACTUALS if n in got] + sorted(set(got) - set(COUNTERFACTUALS))
        if not lines:
            lines = ["| mechanism | layer | median \\|s\\| init → final | p99 \\|s\\| | top-key weight init → final | "
                     "entropy / uniform (nats) | row mass | " + " | ".join(f"top if {n}" for n in names) + " |",
                     "|---|---|---|---|---|---|---|" + "---|" * len(names)]
        for i0, f in zip(d["init"], d["final"]):
            lines.append(
                f"| {mech} | {f['layer']} | {i0['abs_s_median']:.3g} → {f['abs_s_median']:.3g} | {f['abs_s_p99']:.3g} | "
                f"{i0['top_weight']:.3f} → {f['top_weight']:.3f} | {f['entropy']:.2f} / {f['log_keys']:.2f} | "
                f"{i0.get('mass', float('nan')):.2f} → {f.get('mass', float('nan')):.2f} | "
                + " | ".join(f"{f['top_weight_if'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def _selected_record(records: list[dict], mech: str, b: dict) -> dict | None:
    return next((r for r in records if label(r) == mech and float(r["lr"]) == b["lr"]
                 and r["seed"] == b["selection_seed"] and r.get("diagnosis")), None)


def diagnosis_overview(records: list[dict], best: dict[str, dict]) -> str:
    """One line per mechanism, averaged over layers (max |s|: the largest layer's): how large the
    scores grow, how much weight the top key gets, how spread the rows are, and the contrast
    check: the top-key weight the *same final scores* would get under softmax and the EA family."""
    from .attention_stats import COUNTERFACTUALS

    selected = [rec for mech, b in best.items() if (rec := _selected_record(records, mech, b)) is not None]
    # the weight functions every selected record has (older records lack those added since)
    names = [n for n in COUNTERFACTUALS
             if all(n in r["top_weight_if"] for rec in selected for r in rec["diagnosis"]["final"])]
    lines = ["| mechanism | median \\|s\\| init → final | max \\|s\\| | top-key weight init → final | "
             "entropy / uniform (nats) | " + " | ".join(f"top if {n}" for n in names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for mech, b in best.items():
        rec = _selected_record(records, mech, b)
        if rec is None:
            continue
        init, final = rec["diagnosis"]["init"], rec["diagnosis"]["final"]

        def mean(rows, key):
            return statistics.fmean(r[key] for r in rows)
        lines.append(
            f"| {mech} | {mean(init, 'abs_s_median'):.2g} → {mean(final, 'abs_s_median'):.2g} | "
            f"{max(r['abs_s_max'] for r in final):.3g} | {mean(init, 'top_weight'):.3f} → {mean(final, 'top_weight'):.3f} | "
            f"{mean(final, 'entropy'):.2f} / {mean(final, 'log_keys'):.2f} | "
            + " | ".join(f"{statistics.fmean(r['top_weight_if'][n] for r in final):.3f}" for n in names) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(records: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = summary["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mech, b in best.items():
        curves = [r["curve"] for r in records if label(r) == mech and float(r["lr"]) == b["lr"]]
        steps = [x["step"] for x in curves[0]]
        val = [statistics.fmean(c[i]["val_bpb"] for c in curves) for i in range(len(steps))]
        line, = axes[0].plot(steps, val, marker="o", ms=3, label=f"{mech} (lr {b['lr']:g}, {len(curves)} seeds)")
        if len(curves) > 1:
            lo = [min(c[i]["val_bpb"] for c in curves) for i in range(len(steps))]
            hi = [max(c[i]["val_bpb"] for c in curves) for i in range(len(steps))]
            axes[0].fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        tr = [statistics.fmean(c[i]["train_loss"] for c in curves) for i in range(1, len(steps))]
        axes[1].plot(steps[1:], tr, color=line.get_color(), label=mech)
        mine = sorted((r for r in summary["grid"] if r["label"] == mech), key=lambda r: r["lr"])
        axes[2].errorbar([r["lr"] for r in mine], [r["mean"] for r in mine], yerr=[r["std"] for r in mine],
                         marker="o", capsize=3, color=line.get_color(), label=mech)
    axes[0].set(xlabel="step", ylabel="held-out bits per byte", title="validation (mean, band: min-max over seeds)")
    axes[1].set(xlabel="step", ylabel="train loss (nats/token, smoothed)", title="training")
    axes[2].set(xscale="log", xlabel="peak learning rate", ylabel="final held-out bits/byte",
                title="learning rate (mean ± std over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    c = summary["config"]
    fig.suptitle(f"{summary['corpus']} — {c['arch']} d={c['d_model']} L={c['n_layers']} ctx={c['context_length']}, "
                 f"{c['steps']} steps, {c['tokenizer']}-level")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(records: list[dict], summary: dict, out: Path) -> dict:
    """Fill ``summary`` (grid, results per mechanism at its selected lr, verdict) from ``records``
    and write lm_curves.csv, lm_curves.png, lm_summary.json and report.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = grid(records)
    best = best_per_mechanism(rows, list(summary["runs"]))
    summary.update(grid=rows, results=best, verdict=verdict(best), records=len(records))
    paths = {"csv": out / "lm_curves.csv", "png": out / "lm_curves.png", "json": out / "lm_summary.json",
             "report": out / "report.md"}
    fields = ["label", "attn_implementation", "lr", "seed", "step", "tokens", "train_loss", "val_loss", "val_bpb", "train_seconds"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerows(r["curve"])
    from ..extras import has, install_hint

    if has("matplotlib"):
        plot(records, summary, paths["png"])
    else:  # the tables, CSV and JSON do not need it
        del paths["png"]
        print(f"plot skipped: matplotlib is not installed ({install_hint('cli')})")
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    c = summary["config"]
    command = summary.get("command") or "(run through the Python API)"
    report = [
        f"# `ea lm` study: {summary['corpus']}", "",
        f"Command: `{command}`", "",
        f"{c['arch']}, d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads / {c['n_kv_heads']} KV heads, "
        f"context {c['context_length']}, batch {c['batch_size']}, {c['steps']} steps ({summary['tokens_per_run']:,} tokens "
        f"per run), {c['tokenizer']}-level; {summary['train_bytes']:,} train / {summary['val_bytes']:,} held-out bytes; "
        f"torch {summary['torch']}, transformers {summary['transformers']}, {summary['threads']} thread(s). "
        f"{summary['records']} runs in results.jsonl with this setting.", "",
        "Held-out bits per byte after the last step (lower is better): mean ± sample std (number of seeds). "
        "Bold: the lr selected for the mechanism (lowest on the selection seed).", "",
        tables(summary), "",
        f"**Verdict (protocol of docs/real-text.md):** {summary['verdict']}.", "",
    ]
    diag = diagnosis_table(records, best)
    if diag:
        report += ["## Attention statistics (selected lr, selection seed)", "",
                   "On 16 held-out windows; top-key weight and entropy over query rows with at least half the "
                   "window as keys; `top if X`: the top-key weight the same final scores would get under weight "
                   "function X. Mean over layers (max \\|s\\|: over layers):", "",
                   diagnosis_overview(records, best), "", "Per layer:", "", diag, ""]
    if "png" in paths:
        report += ["![curves](lm_curves.png)", ""]
    paths["report"].write_text("\n".join(report))
    return summary


def run(cfg: TextLMConfig, progress: bool = True, log=print, command: str = "") -> dict:
    """Train every (seed, lr, mechanism) not yet in OUT/results.jsonl, appending each record as it
    finishes; then write the summary, curves, plot and report of every run with this setting."""
    cfg.check()
    torch.set_num_threads(cfg.threads or auto_threads())
    train, val, n_files = load_text(cfg)
    train_ids, val_ids, vocab, bytes_per_token = tokenize(train, val, cfg.tokenizer)
    windows = eval_windows(val_ids, cfg)
    log(f"text: {corpus_description(cfg)}: {n_files} documents, {len(train):,} train / {len(val):,} held-out "
        f"bytes; {cfg.tokenizer}-level, vocab {vocab}; {len(windows)} held-out windows of {cfg.context_length}")
    out = Path(cfg.out)
    store = ResultsStore(out / RESULTS_FILE)
    store.repair()
    done = store.keys()
    mechs = [(m, hf_implementation(m)) for m in cfg.runs()]
    todo = [(seed, lr, m, impl) for seed in cfg.seeds for lr in cfg.lrs for m, impl in mechs]
    skipped = sum(run_key(cfg, impl, lr, seed, m.levers()) in done for seed, lr, m, impl in todo)
    if skipped:
        log(f"{skipped} of {len(todo)} runs already in {store.path}: skipped")
    import transformers

    for seed, lr, mech, impl in todo:
        key = run_key(cfg, impl, lr, seed, mech.levers())
        if key in done:
            continue
        rows, diagnosis = train_one(cfg, mech, impl, lr, seed, train_ids, windows, vocab, bytes_per_token, progress)
        last = rows[-1]
        with serialised(out):
            store.append(dict(
                key=key, setting=setting(cfg), label=mech.label, attn_implementation=impl, lr=float(lr), seed=int(seed),
                mechanism=asdict(mech),
                val_loss=last["val_loss"], val_bpb=last["val_bpb"], train_seconds=last["train_seconds"],
                wall_seconds=last["wall_seconds"], curve=rows, diagnosis=diagnosis, vocab=vocab,
                train_bytes=len(train), val_bytes=len(val), files=n_files, threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__,
            ))
        done.add(key)
        log(f"{mech.label} lr={lr:g} seed={seed}: held-out {last['val_bpb']:.4f} bits/byte "
            f"({last['wall_seconds']:.0f} s) -> {store.path}")
    summary = dict(config=asdict(cfg), runs=[m.label for m, _ in mechs], vocab=vocab, train_bytes=len(train),
                   val_bytes=len(val), files=n_files, corpus=corpus_description(cfg),
                   tokens_per_run=cfg.steps * cfg.batch_size * cfg.context_length, torch=torch.__version__,
                   transformers=transformers.__version__, threads=torch.get_num_threads(), command=command)
    with serialised(out):  # the records as they are now, including those other commands appended meanwhile
        records = [r for r in store.read() if r.get("setting") == setting(cfg)]
        return write_outputs(records, summary, out)
