"""End-to-end cost: one DecoderLM training step (forward, backward, AdamW) with EA vs with DPA.

Both models are built from the same config and seed; only `kind` differs. Steps alternate between
the two models so that machine load drifts affect both alike; the median of each is reported.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..nn import DecoderLM, LMConfig

# (label, config overrides, batch): the ladder's quick-preset size, and a longer context.
SIZES = [
    ("quick-ladder size (d64, 2 layers, T=64, batch 32)", dict(context_length=64), 32),
    ("long context (d128, 4 layers, T=1024, batch 4)", dict(context_length=1024, d_model=128, n_layers=4), 4),
]


def _step(model, opt, idx):
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_training_steps(overrides: dict, batch: int, variant: str = "saturating", backend: str = "auto",
                        steps: int = 10, warmup: int = 2) -> dict:
    base = {**dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4), **overrides}
    T = base["context_length"] + 1
    models, opts = {}, {}
    for kind in ("dpa", "ea"):
        torch.manual_seed(0)
        extra = dict(variant=variant, backend=backend) if kind == "ea" else {}
        models[kind] = DecoderLM(LMConfig(kind=kind, **{**base, "context_length": T}, **extra)).train()
        opts[kind] = torch.optim.AdamW(models[kind].parameters(), lr=1e-3)
    idx = torch.randint(0, base["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(0))
    times = {"dpa": [], "ea": []}
    for i in range(warmup + steps):
        for kind in ("dpa", "ea"):
            t0 = time.perf_counter()
            _step(models[kind], opts[kind], idx)
            if i >= warmup:
                times[kind].append(time.perf_counter() - t0)
    dpa, ea = statistics.median(times["dpa"]), statistics.median(times["ea"])
    return {"dpa_ms": 1e3 * dpa, "ea_ms": 1e3 * ea, "ratio": ea / dpa, "params": models["ea"].num_params()}


def run_model_benchmark(variant: str = "saturating", backend: str = "auto", repeats: int = 3) -> list[dict]:
    """`ea bench model`: time_training_steps at each of SIZES (repeats + 5 timed steps); prints a table."""
    print(f"DecoderLM training step, EA ({variant}, backend={backend}) vs DPA (SDPA)")
    print(f"{'size':<52} {'DPA ms':>8} {'EA ms':>8} {'EA/DPA':>7}")
    rows = []
    for label, overrides, batch in SIZES:
        r = time_training_steps(overrides, batch, variant=variant, backend=backend, steps=repeats + 5)
        print(f"{label:<52} {r['dpa_ms']:>8.1f} {r['ea_ms']:>8.1f} {r['ratio']:>7.2f}")
        rows.append({"size": label, **r})
    return rows
