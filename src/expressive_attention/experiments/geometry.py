"""Attention geometry of trained models: where, in cos(q, k), does the attention go?

For each layer, over held-out sequences, every causal query-key pair (i, j <= i) contributes its
cosine cos(q_i, k_j) with weight a_ij (the attention it receives; each query row sums to <= 1).
DPA's weights grow monotonically with q.k, so it can only match parallel keys; EA's f(s) is even in
s, so antiparallel keys (cos ~ -1) are matches too, and orthogonal keys (s ~ 0) are suppressed.

    stats = attention_geometry(model, task)        # one dict per layer
    ea geometry runs/ladder-quick                  # CLI: picks checkpoints, writes geometry.png/.md
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..extras import has, install_hint
from ..nn import DecoderLM, MultiheadAttention
from ..nn.attention import weights_of_call
from ..ops import KINDS, expressive_weights
from ..ops.reference import causal_mask, repeat_kv
from ..tasks import eval_generator

BINS = np.linspace(-1.0, 1.0, 41)
ANTI, ORTHO, PARA = -0.5, 0.25, 0.5  # cos < -0.5: antiparallel; |cos| < 0.25: orthogonal; > 0.5: parallel


def attention_weights(q: torch.Tensor, k: torch.Tensor, kind: str, variant: str = "saturating",
                      eps: float = 1e-6, power: float | None = None) -> torch.Tensor:
    """Causal attention weights (B, H, T, T) as the model computes them; q (B,H,T,E), k (B,Hkv,T,E).
    EA: the library's own weights (ops.expressive_weights); DPA: softmax of the scaled scores."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    if kind == "ea":
        return expressive_weights(q, k, is_causal=True, variant=variant, eps=eps, power=power)
    if kind != "dpa":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    T = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, T, T)
    return torch.softmax(s.masked_fill(~causal_mask(T, T, q.device), float("-inf")), dim=-1)


def _fractions(cos: np.ndarray, w: np.ndarray) -> dict:
    total = w.sum()
    return {"antiparallel": float(w[cos < ANTI].sum() / total), "orthogonal": float(w[abs(cos) < ORTHO].sum() / total),
            "parallel": float(w[cos > PARA].sum() / total)}


@torch.no_grad()
def attention_geometry(model: DecoderLM, task, n_sequences: int = 128, seed: int = 0) -> list[dict]:
    """Per layer: histograms over BINS of cos(q, k) weighted by attention ("attention") and over all
    causal pairs ("pairs"), and the share of each in antiparallel / orthogonal / parallel pairs."""
    mods = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
    was = model.training
    model.eval()
    captured: list[tuple[torch.Tensor, ...]] = []  # (q, k, weights) per layer, in call order
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: captured.append(weights_of_call(m, a, kw)), with_kwargs=True)
             for m in mods]
    try:
        x, _, _ = task.sample(n_sequences, eval_generator(seed))
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = []
    for layer, (q, k, a) in enumerate(captured):  # a: (B, H, T, T), the layer's own mechanism (its kind,
        # head split, forget gate and learned gain included)
        kk = repeat_kv(k, q.shape[1] // k.shape[1])
        cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(kk, dim=-1).transpose(-1, -2)
        T = q.shape[-2]
        causal = causal_mask(T, T, cos.device).expand_as(cos)
        c = cos[causal].numpy()
        w = a[causal].numpy()
        ones = np.ones_like(c)
        out.append({
            "layer": layer,
            "attention": np.histogram(c, BINS, weights=w)[0] / w.sum(),
            "pairs": np.histogram(c, BINS, weights=ones)[0] / ones.sum(),
            "fractions": {"attention": _fractions(c, w), "pairs": _fractions(c, ones)},
        })
    return out


def suppression(stats: dict) -> float:
    """Attention share of orthogonal pairs / their share of all pairs (< 1: suppressed)."""
    f = stats["fractions"]
    return f["attention"]["orthogonal"] / max(1e-12, f["pairs"]["orthogonal"])


_COLORS = {"dpa": "tab:blue", "ea": "tab:red", "ea-squared": "tab:orange"}


def plot_geometry(panels: dict[str, dict[str, list[dict]]], path: str | Path, title: str = "") -> None:
    """panels: row title -> {kind label -> per-layer stats}; one column per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = max(len(s) for kinds in panels.values() for s in kinds.values())
    fig, axes = plt.subplots(len(panels), n_layers, figsize=(3.6 * n_layers, 2.7 * len(panels)),
                             squeeze=False, sharex=True)
    centers = (BINS[:-1] + BINS[1:]) / 2
    for row, (name, kinds) in enumerate(panels.items()):
        for layer in range(n_layers):
            ax = axes[row][layer]
            for kind, stats in kinds.items():
                if layer >= len(stats):
                    continue
                st = stats[layer]
                color = _COLORS.get(kind)
                ax.step(centers, st["attention"], where="mid", color=color, label=f"{kind}: attention-weighted")
                ax.step(centers, st["pairs"], where="mid", color=color, ls=":", alpha=0.7,
                        label=f"{kind}: all causal pairs")
            ax.axvspan(-ORTHO, ORTHO, color="grey", alpha=0.08)
            ax.set_title(f"{name} — layer {layer}", fontsize=9)
            if row == len(panels) - 1:
                ax.set_xlabel("cos(q, k)")
            if layer == 0:
                ax.set_ylabel("share")
    axes[0][-1].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_lines(panels: dict[str, dict[str, list[dict]]]) -> list[str]:
    lines = ["| run | kind | layer | attention on antiparallel (cos < -0.5) | on orthogonal (abs cos < 0.25) "
             "| on parallel (cos > 0.5) | orthogonal share of all pairs | orthogonal suppression (attention / pairs) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, kinds in panels.items():
        for kind, stats in kinds.items():
            for st in stats:
                fa, fp = st["fractions"]["attention"], st["fractions"]["pairs"]
                lines.append(f"| {name} | {kind} | {st['layer']} | {fa['antiparallel']:.3f} | {fa['orthogonal']:.3f} | "
                             f"{fa['parallel']:.3f} | {fp['orthogonal']:.3f} | {suppression(st):.2f} |")
    return lines


def _load(path: Path):
    from .train import load_checkpoint
    from ..tasks import make_task
    model, cfg = load_checkpoint(path)
    return model, cfg, make_task(cfg.task, **cfg.task_params)


def pick_checkpoints(out: Path, rows: list[dict], preset=None) -> dict[str, dict[str, Path]]:
    """Per family: the rung with the largest EA - DPA token-accuracy gap; seed-0 checkpoint per kind."""
    from .results import ResultsStore
    records = ResultsStore(out).read()
    chosen: dict[str, dict[str, Path]] = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        fr = [r for r in rows if r["family"] == fam and r["n"]]
        by = {(r["rung"], r["label"]): r for r in fr}
        gaps = [(by[(r, "ea")]["token_acc_mean"] - by[(r, "dpa")]["token_acc_mean"], r)
                for r in sorted({r["rung"] for r in fr}) if (r, "ea") in by and (r, "dpa") in by]
        if not gaps:
            continue
        rung = max(gaps)[1]
        rung_label = by[(rung, "dpa")]["rung_label"]
        for rec in records:
            lad = rec.get("ladder", {})
            if (lad.get("family") == fam and lad.get("rung") == rung and rec["config"]["seed"] == 0
                    and not lad.get("point")  # the preset's base settings, not another budget / size
                    and rec.get("checkpoint") and Path(rec["checkpoint"]).exists()
                    and (preset is None or lad.get("preset") == preset.name)):
                chosen.setdefault(f"{fam} {rung_label}", {})[rec["label"]] = Path(rec["checkpoint"])
    return chosen


def geometry_for(checkpoints: dict[str, dict[str, Path]], out: Path, n_sequences: int = 128,
                 title: str = "") -> dict:
    """Analyse {row name: {kind: checkpoint}}; write geometry.png and geometry.json into out."""
    panels: dict[str, dict[str, list[dict]]] = {}
    for name, kinds in checkpoints.items():
        for kind, path in sorted(kinds.items()):
            model, cfg, task = _load(path)
            panels.setdefault(name, {})[kind] = attention_geometry(model, task, n_sequences, seed=cfg.eval_seed)
    if not panels:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "geometry.png" if has("matplotlib") else None
    if plot is not None:
        plot_geometry(panels, plot, title=title)
    blob = {name: {kind: [{"layer": s["layer"], "attention": s["attention"].tolist(), "pairs": s["pairs"].tolist(),
                           "fractions": s["fractions"]} for s in stats] for kind, stats in kinds.items()}
            for name, kinds in panels.items()}
    (out / "geometry.json").write_text(json.dumps({"bins": BINS.tolist(), "panels": blob}, indent=1))
    figure = ("![geometry](geometry.png)" if plot is not None
              else f"(plot skipped: matplotlib is not installed; {install_hint('cli')})")
    return {"plot": None if plot is None else str(plot), "json": str(out / "geometry.json"), "panels": panels,
            "lines": ["Share of attention by cos(q, k) on held-out sequences (seed-0 models at the rung with the "
                      "largest EA - DPA gap of each family; all causal pairs of every head).", "",
                      figure, ""] + summary_lines(panels)}


def ladder_geometry(preset, out: str | Path, rows: list[dict]) -> dict:
    out = Path(out)
    return geometry_for(pick_checkpoints(out, rows, preset), out, title=f"attention geometry, preset {preset.name}")
