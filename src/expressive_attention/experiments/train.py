"""Train one DecoderLM on one task and return a plain-dict record (the unit of the ladder).

    rec = train_run(RunConfig(task="pointer", task_params={"T": 8}, kind="ea", steps=600))
    rec["metrics"]["seq_acc"]      # every scored token right ("100%" means 1.0)

Same config (seed included) and same thread count => same numbers.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..info import machine, versions
from ..nn import DecoderLM, LMConfig
from ..ops import KINDS
from ..ops.reference import resolve_power
from .kinds import mechanism_label, parse_layer_kinds, resolve_layer_kinds
from .results import RUN_KEY_NAMES, config_key, current_names, rename_keys

if TYPE_CHECKING:
    from .distributed import Shard

_OPTIONAL_FIELDS = ("power", "qk_norm", "learn_scale")  # left out of to_dict() when off
# issue #21's options: left out of to_dict() at these (off) values, so earlier configs keep their keys
_LEVER_DEFAULTS = {"gain_init": 0.0, "n_ea_heads": None, "layer_kinds": None, "forget_gate": False,
                   "gate_bias_init": 0.0}


@dataclass
class RunConfig:
    """Everything that determines a run's numbers. `key()` hashes it (the results-file key)."""

    task: str
    task_params: dict = field(default_factory=dict)
    kind: str = "ea"  # the mechanism: "ea" or "dpa"
    variant: str | None = "saturating"  # EA variant; None for dpa
    power: float | None = None  # degree of variant="power" (None: 4)
    qk_norm: bool = False  # RMSNorm of each head's q and k (EA and DPA)
    learn_scale: bool = False  # learned per-head score gain (EA and DPA)
    # model
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    pos: str = "learned"
    # optimisation: AdamW, linear warm-up then cosine to 0, grad clip
    steps: int | None = None  # default 600 when tokens is not given either
    tokens: int | None = None  # token budget instead of steps: steps = ceil(tokens / (batch * seq_len))
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation on held-out sequences (the same stream for every run: eval_seed)
    eval_sequences: int = 1024
    eval_seed: int = 0
    # issue #21's levers (EA and DPA alike unless noted; off: left out of to_dict(), keys unchanged)
    gain_init: float = 0.0  # initial log gain of learn_scale (e.g. -1.1513: exp_squared's beta = 0.1)
    n_ea_heads: int | None = None  # EA on the first n_ea_heads heads of each EA layer, softmax on the rest
    layer_kinds: str | None = None  # per-layer kinds: "ends", "first", "last" or e.g. "dpa-ea" (kinds.py)
    forget_gate: bool = False  # data-dependent forget gate (FoX) in every layer (EA and DPA)
    gate_bias_init: float = 0.0  # the forget gate's initial bias (0: 1/2 per step at init; 4: 0.982)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "dpa":
            self.variant = None  # DPA has no variant: keeps dpa configs (and keys) unique
        elif self.variant is None:
            self.variant = "saturating"
        if self.kind == "dpa" and self.power is not None:
            raise ValueError(f"power={self.power!r} applies to kind='ea' (variant='power') only")
        if self.kind == "ea":
            self.power = resolve_power(self.variant, self.power)
        if self.kind == "dpa" and (self.n_ea_heads is not None or self.layer_kinds is not None):
            raise ValueError("n_ea_heads and layer_kinds mix EA into a model: they apply to kind='ea' only")
        if self.layer_kinds is not None:
            self.layer_kinds = parse_layer_kinds(self.layer_kinds)
            resolve_layer_kinds(self.layer_kinds, int(self.n_layers))
        if self.gain_init and not self.learn_scale:
            raise ValueError(f"gain_init={self.gain_init!r} is the initial log gain of learn_scale=True")
        self.gain_init = float(self.gain_init)
        if self.gate_bias_init and not self.forget_gate:
            raise ValueError(f"gate_bias_init={self.gate_bias_init!r} is the initial bias of forget_gate=True")
        self.gate_bias_init = float(self.gate_bias_init)
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give steps or tokens, not both")
        if self.steps is None and self.tokens is None:
            self.steps = 600
        for name in ("steps", "tokens"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        for name in ("batch_size", "d_model", "n_layers", "n_heads", "eval_sequences"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        self.betas = tuple(float(b) for b in self.betas)
        self.task_params = dict(self.task_params)

    @property
    def label(self) -> str:
        """The run's mechanism as one label (kinds.mechanism_label; "label" in results records and
        summary.csv): "dpa", "ea", "ea-squared", "ea-power4", "ea[h2]", "ea-exp_squared+gain@-1.1513", ..."""
        return mechanism_label(self.kind, self.variant, self.power, n_ea_heads=self.n_ea_heads,
                               layer_kinds=self.layer_kinds, qk_norm=self.qk_norm, learn_scale=self.learn_scale,
                               gain_init=self.gain_init, forget_gate=self.forget_gate,
                               gate_bias_init=self.gate_bias_init)

    def to_dict(self) -> dict:
        """The config as a dict; the options added for the real-text study (power, qk_norm,
        learn_scale) appear only when set, so every earlier config keeps its results-file key."""
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        for name in _OPTIONAL_FIELDS:
            if d[name] is None or d[name] is False:
                del d[name]
        for name, off in _LEVER_DEFAULTS.items():
            if d[name] == off and type(d[name]) is type(off):
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """From `to_dict()` output, including that of older records (results.RUN_KEY_NAMES: `attention`)."""
        d = current_names(d, RUN_KEY_NAMES)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RunConfig fields: {sorted(unknown)}")
        return cls(**d)

    def key(self) -> str:
        return config_key(rename_keys(self.to_dict(), RUN_KEY_NAMES))


def build(cfg: RunConfig):
    """The task and the (seeded) model of a run."""
    from ..tasks import make_task
    task = make_task(cfg.task, **cfg.task_params)
    torch.manual_seed(cfg.seed)
    return task, build_model(cfg, task)


def build_model(cfg: RunConfig, task) -> DecoderLM:
    """The run's model for `task` (unseeded: `build` seeds it)."""
    lm = LMConfig(vocab_size=task.vocab_size, context_length=task.seq_len, d_model=cfg.d_model,
                  n_layers=cfg.n_layers, n_heads=cfg.n_heads, pos=cfg.pos, kind=cfg.kind,
                  variant=cfg.variant or "saturating", power=cfg.power, qk_norm=cfg.qk_norm,
                  learn_scale=cfg.learn_scale, gain_init=cfg.gain_init, n_ea_heads=cfg.n_ea_heads,
                  layer_kinds=resolve_layer_kinds(cfg.layer_kinds, cfg.n_layers), forget_gate=cfg.forget_gate,
                  gate_bias_init=cfg.gate_bias_init)
    return DecoderLM(lm)


def _generator(split: str, seed: int) -> torch.Generator:
    """The task package's seeded generator for the train or held-out (eval) stream."""
    from .. import tasks
    return tasks.train_generator(seed) if split == "train" else tasks.eval_generator(seed)


def num_steps(cfg: RunConfig, seq_len: int) -> int:
    return int(cfg.steps) if cfg.steps is not None else math.ceil(cfg.tokens / (cfg.batch_size * seq_len))


def lr_at(step: int, cfg: RunConfig, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    # weight decay on matrices only (nanoGPT): not on norms, biases
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # logits (B, T, V), targets/mask (B, T) -> mean cross-entropy over scored positions
    return F.cross_entropy(logits[mask], targets[mask])


def _sample(task, batch: int, gen: torch.Generator, groups: bool):
    """(inputs, targets, mask, groups (B, T) long or None)."""
    if groups and hasattr(task, "sample_with_groups"):
        x, y, m, g = task.sample_with_groups(batch, gen)
        g = torch.as_tensor(g, dtype=torch.long)
        if g.dim() == 1:
            g = g[:, None].expand_as(y)
        return x, y, m.bool(), g
    x, y, m = task.sample(batch, gen)
    return x, y, m.bool(), None


def group_names(task) -> list[str] | None:
    if not hasattr(task, "score_groups") or not hasattr(task, "sample_with_groups"):
        return None
    names = task.score_groups()
    if names is None:
        return None
    if isinstance(names, dict):
        return [str(names[i]) for i in sorted(names)]
    return [str(n) for n in names]


@torch.no_grad()
def evaluate(model: DecoderLM, task, n_sequences: int, gen: torch.Generator, batch: int = 256) -> dict:
    """Token accuracy on scored positions, sequence accuracy (every scored token right), loss;
    per score group when the task defines groups (multitask)."""
    was_training = model.training
    model.eval()
    names = group_names(task)
    tok_right = tok_total = seq_right = seq_total = 0
    loss_sum = 0.0
    g_tok = np.zeros((len(names or []), 2))  # (right, total) per group
    g_seq = np.zeros((len(names or []), 2))
    done = 0
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))  # a stub may have none
    while done < n_sequences:
        b = min(batch, n_sequences - done)
        x, y, m, g = _sample(task, b, gen, groups=names is not None)
        x, y, m, g = x.to(dev), y.to(dev), m.to(dev), (None if g is None else g.to(dev))
        logits = model(x)  # (b, T, V)
        right = (logits.argmax(-1) == y) & m  # (b, T)
        loss_sum += F.cross_entropy(logits[m], y[m], reduction="sum").item()
        tok_right += int(right.sum())
        tok_total += int(m.sum())
        scored = m.any(1)  # sequences with something to score
        seq_ok = (right | ~m).all(1) & scored
        seq_right += int(seq_ok.sum())
        seq_total += int(scored.sum())
        if g is not None:
            for i in range(len(names)):
                gm = m & (g == i)
                g_tok[i] += (int((right & gm).sum()), int(gm.sum()))
                has = gm.any(1)
                g_seq[i] += (int(((right | ~gm).all(1) & has).sum()), int(has.sum()))
        done += b
    model.train(was_training)
    out = {"token_acc": tok_right / max(1, tok_total), "seq_acc": seq_right / max(1, seq_total),
           "loss": loss_sum / max(1, tok_total), "scored_tokens": tok_total, "sequences": seq_total}
    if names is not None:
        out["groups"] = {n: {"token_acc": g_tok[i, 0] / max(1, g_tok[i, 1]),
                             "seq_acc": g_seq[i, 0] / max(1, g_seq[i, 1])} for i, n in enumerate(names)}
    return out


def train_run(
    cfg: RunConfig,
    *,
    checkpoint: str | Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    curve_points: int = 20,
    device: str | torch.device = "cpu",
    shard: "Shard | None" = None,
) -> dict | None:
    """Train, evaluate on held-out data, optionally save a checkpoint; return the run's record.

    progress(step, total_steps, recent_loss) is called about 50 times per run.
    shard: this process's part of a data-parallel run (distributed.Shard, under torchrun): the model
    is wrapped in DistributedDataParallel and each rank trains on its slice of every global batch;
    rank 0 alone evaluates, writes the checkpoint and returns the record (the other ranks: None)."""
    t0, c0 = time.perf_counter(), time.process_time()
    task, model = build(cfg)
    steps = num_steps(cfg, task.seq_len)
    device = shard.device if shard is not None else torch.device(device)
    model.to(device)
    opt = _optimizer(model, cfg)
    net = model
    if shard is not None:
        from torch.nn.parallel import DistributedDataParallel
        shard.check_batch(cfg.batch_size)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    main = shard is None or shard.is_main
    train_gen = _generator("train", cfg.seed)
    model.train()
    every = max(1, steps // curve_points)
    report_every = max(1, steps // 50)
    curve, win_loss, win_right, win_total, win_n = [], 0.0, 0, 0, 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, steps)
        x, y, m, _ = _sample(task, cfg.batch_size, train_gen, groups=False)  # the global batch
        if shard is not None:
            x, y, m = shard.take(x), shard.take(y), shard.take(m)  # this rank's rows
        else:
            x, y, m = x.to(device), y.to(device), m.to(device)
        logits = net(x)  # (B, T, V)
        right, scored = (logits[m].argmax(-1) == y[m]).sum(), m.sum()
        if shard is None:
            loss = objective = masked_loss(logits, y, m)
        else:  # this slice's share of the global batch's mean loss (DDP averages gradients: * world size)
            right, scored = shard.sum(right), shard.sum(scored.float())
            objective = F.cross_entropy(logits[m], y[m], reduction="sum") / scored
            loss = shard.sum(objective.detach().clone())  # the global batch's loss (logs, NaN check)
            objective = objective * shard.world_size
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} ({cfg.task}, {cfg.label})")
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            win_loss += loss.item()
            win_right += int(right)
            win_total += int(scored)
            win_n += 1
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": win_loss / win_n, "token_acc": win_right / max(1, win_total)})
            win_loss, win_right, win_total, win_n = 0.0, 0, 0, 0
        if main and progress is not None and ((step + 1) % report_every == 0 or step + 1 == steps):
            progress(step + 1, steps, loss.item())
    train_s = time.perf_counter() - t0
    if not main:
        shard.barrier()  # rank 0 evaluates and writes
        return None
    metrics = evaluate(model, task, cfg.eval_sequences, _generator("eval", cfg.eval_seed))
    metrics["train_loss"] = curve[-1]["loss"]
    record = {
        "key": cfg.key(),
        "config": cfg.to_dict(),
        "label": cfg.label,
        "task": {"name": task.name, "params": dict(task.params()), "vocab_size": task.vocab_size,
                 "seq_len": task.seq_len, "describe": task.describe()},
        "metrics": metrics,
        "curve": curve,
        "steps": steps,
        "tokens": steps * cfg.batch_size * task.seq_len,
        "params": model.num_params(),
        "wall_s": time.perf_counter() - t0,
        "train_s": train_s,
        "cpu_s": time.process_time() - c0,  # this process's CPU time: ~ wall time on an idle machine
        "versions": versions(),
        "machine": machine(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type != "cpu":
        record["device"] = str(device)
    if shard is not None:
        record["distributed"] = {"world_size": shard.world_size, "backend": torch.distributed.get_backend()}
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, cfg)
        record["checkpoint"] = str(checkpoint)
    if shard is not None:
        shard.barrier()
    return record


def save_checkpoint(path: str | Path, model: DecoderLM, cfg: RunConfig) -> None:
    """state_dict + configs as plain dicts: loads with torch.load(weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"run_config": cfg.to_dict(), "model_config": model.cfg.to_dict(),
                "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[DecoderLM, RunConfig]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DecoderLM(LMConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, RunConfig.from_dict(blob["run_config"])
