"""The text LM of `ea lm`: one small Hugging Face causal LM per attention mechanism, trained on
the same text (same initial weights, same batches, same number of steps) and scored on held-out bits
per byte. The study over seeds x lrs x mechanisms, its results file and report: text_study.py; the
text and its tokens: text_data.py.

The model is built from a config (no downloaded weights); one run per mechanism of ``kinds`` x
``variants`` x ``scales`` (as in the ladder: "dpa", "ea", "ea-squared", "ea-power4",
"ea-exp_squared", "+gain" for a learned per-head score gain), switched with transformers'
``attn_implementation`` ("sdpa", "expressive", "expressive_squared", ...; see `hf_implementation`),
so only the attention rule differs between runs. Issue #21's levers multiply the runs the same way
(``gates``, ``ea_heads``, ``layer_kinds``, ``scales`` with "learned@G"; labels such as "ea+gate",
"ea[h2]", "ea[first]", "ea-exp_squared+gain@-1.1513"; see kinds.py and docs/real-text.md). Each run
also records per-layer attention statistics at init and at the end (attention_stats.py).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from ..ops.variants import variant_label
from .kinds import (
    kind_specs, mechanism_label, parse_ea_heads, parse_gate, parse_layer_kinds, parse_scale, parse_variant,
    resolve_layer_kinds,
)
from .results import TEXT_KEY_NAMES, config_key, rename_keys
from .text_data import CORPORA, TOKENIZERS

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
SCALES = ("fixed", "learned")  # the score scale: 1/sqrt(E), or times a learned per-head gain (also learned@G)


@dataclass(frozen=True)
class Mechanism:
    """One run's attention: kind, EA variant (and degree), learned score gain or not; issue #21's
    levers: the gain's initial log value, EA heads of a hybrid layer, per-layer kinds (a pattern,
    see kinds.parse_layer_kinds), forget gate (and its initial bias)."""

    kind: str
    variant: str | None
    power: float | None = None
    learn_scale: bool = False
    gain_init: float = 0.0
    n_ea_heads: int | None = None
    layer_kinds: str | None = None
    forget_gate: bool = False
    gate_bias_init: float = 0.0

    @property
    def label(self) -> str:
        """The mechanism's label (kinds.mechanism_label): "dpa", "ea", "ea-power4", "ea[h2]+gate", ..."""
        return mechanism_label(self.kind, self.variant, self.power, n_ea_heads=self.n_ea_heads,
                               layer_kinds=self.layer_kinds, learn_scale=self.learn_scale, gain_init=self.gain_init,
                               forget_gate=self.forget_gate, gate_bias_init=self.gate_bias_init)

    @property
    def hybrid(self) -> bool:
        return self.n_ea_heads is not None or self.layer_kinds is not None

    def levers(self) -> dict:
        """The levers not visible in the attn_implementation name (for the results key; {} when off)."""
        out = {}
        if self.gain_init:
            out["gain_init"] = self.gain_init
        if self.n_ea_heads is not None:
            out["n_ea_heads"] = self.n_ea_heads
        if self.layer_kinds is not None:
            out["layer_kinds"] = self.layer_kinds
        if self.gate_bias_init:
            out["gate_bias_init"] = self.gate_bias_init
        return out


def hf_implementation(m: Mechanism) -> str:
    """transformers' attn_implementation name for a run, registered on first use: "sdpa" (DPA),
    "softmax_gain" (DPA with a learned gain), else "expressive[_<variant>][_gain]" (the paper's
    saturating EA is "expressive")."""
    from ..integrations import transformers as ea_hf

    if m.kind == "dpa":
        if not m.learn_scale and not m.forget_gate:
            return "sdpa"
        name = "softmax" + ("_gain" if m.learn_scale else "") + ("_gate" if m.forget_gate else "")
        return ea_hf.register(name, kind="dpa", learn_scale=m.learn_scale, forget_gate=m.forget_gate)
    defaults = {spec: name for name, spec in ea_hf.DEFAULT_NAMES.items()}
    name = defaults.get((m.variant, m.power)) or f"expressive_{variant_label(m.variant, m.power)}"
    if m.hybrid:
        name += "_hybrid"
    if m.learn_scale:
        name += "_gain"
    if m.forget_gate:
        name += "_gate"
    return ea_hf.register(name, variant=m.variant, power=m.power, learn_scale=m.learn_scale,
                          forget_gate=m.forget_gate, hybrid=m.hybrid)


def label_of_impl(impl: str) -> str:
    """The run label of an attn_implementation name from `hf_implementation` (for records that
    stored only the name): "sdpa" -> "dpa", "expressive_exp_squared_gain" -> "ea-exp_squared+gain"."""
    gain = impl.endswith("_gain")
    base = impl[: -len("_gain")] if gain else impl
    if base in ("sdpa", "softmax"):
        label = "dpa"
    elif base == "expressive":
        label = "ea"
    elif base.startswith("expressive_"):
        label = "ea-" + base[len("expressive_"):]
    else:
        label = base
    return label + ("+gain" if gain else "")


@dataclass
class TextLMConfig:
    """Everything `ea lm` trains: the text, the model (nn.LMConfig's field names), the optimisation and
    the runs (kinds x variants x levers x lrs x seeds). Its results key (`run_key`) hashes `setting()`
    under the field names the first results files were written with (results.TEXT_KEY_NAMES)."""

    paths: list[str] = field(default_factory=list)  # files or directories; empty = `corpus`
    corpus: str = "code"  # without paths: "code" (stdlib source) or "prose" (pydoc topics)
    glob: str = "*.py"  # files taken from directories
    max_bytes: int = 4_000_000
    val_fraction: float = 0.1
    tokenizer: str = "byte"  # "byte" | "char"
    arch: str = "llama"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    context_length: int = 128
    batch_size: int = 16
    steps: int = 300
    lrs: tuple[float, ...] = (2e-3,)  # peak lrs; linear warmup over the first 10% of steps, cosine to 10%
    eval_every: int = 25
    eval_windows: int = 128
    kinds: tuple[str, ...] = ("dpa", "ea")
    variants: tuple[str, ...] = ("saturating",)  # EA variants, each its own run (see parse_variant)
    scales: tuple[str, ...] = ("fixed",)  # "fixed", "learned" (per-head gain), "learned@G" (initial log gain G)
    gates: tuple[str, ...] = ("off",)  # forget gate "off" / "on" / "on@B" (initial bias B), each its own run
    ea_heads: tuple[str, ...] = ("all",)  # EA runs: "all" or M (EA on the first M heads, softmax on the rest)
    layer_kinds: tuple[str, ...] = ("all",)  # EA runs: "all", "ends", "first", "last" or e.g. "dpa-ea-ea-ea"
    seeds: tuple[int, ...] = (0,)
    diagnose: bool = True  # per-layer attention statistics at init and at the end (attention_stats)
    threads: int | None = None  # torch threads; None: 1 on a busy machine, else torch's default
    out: str = "runs/lm"

    def runs(self) -> list[Mechanism]:
        """The mechanism of every run, in order: kinds x variants (dpa once), for each scale and gate;
        EA runs also for each ea_heads x layer_kinds value (see kinds.py for the values)."""
        specs = {s: parse_variant(s) for s in self.variants}
        for name in ("scales", "gates", "ea_heads", "layer_kinds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        scales = [parse_scale(s) for s in self.scales]
        gates = [parse_gate(g) for g in self.gates]
        heads = [parse_ea_heads(h) for h in self.ea_heads]
        layers = [parse_layer_kinds(x) for x in self.layer_kinds]
        base = kind_specs(self.kinds, [v for v, _ in specs.values()])
        powers = iter(p for _, p in specs.values())
        mechs = [(k, v, None if k == "dpa" else next(powers)) for k, v in base]
        out: list[Mechanism] = []
        for learn, g in scales:
            for gate, gb in gates:
                for k, v, p in mechs:
                    for h in heads if k == "ea" else [None]:
                        for lk in layers if k == "ea" else [None]:
                            out.append(Mechanism(k, v, p, learn, g, h, lk, gate, gb))
        return out

    def check(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        runs = self.runs()  # kinds, variants, scales, levers
        labels = [m.label for m in runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"the runs repeat a mechanism: {labels}")
        group = self.n_heads // self.n_kv_heads if self.n_kv_heads and self.n_heads % self.n_kv_heads == 0 else 1
        for m in runs:
            if m.n_ea_heads is not None and not (m.n_ea_heads <= self.n_heads and m.n_ea_heads % group == 0):
                raise ValueError(f"ea-heads {m.n_ea_heads}: must be at most n_heads ({self.n_heads}) and a multiple of "
                                 f"n_heads / n_kv_heads ({group})")
            resolve_layer_kinds(m.layer_kinds, self.n_layers)
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA}, got {self.corpus!r}")
        if self.paths and self.corpus != "code":
            raise ValueError(f"corpus={self.corpus!r} and paths exclude each other: give one or the other")
        if not self.lrs or not all(isinstance(x, (int, float)) and 0 < x < 1 for x in self.lrs):
            raise ValueError(f"lrs must be a non-empty list of learning rates in (0, 1), got {list(self.lrs)}")
        if not self.seeds or not all(isinstance(x, int) and x >= 0 for x in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {list(self.seeds)}")
        for name in ("lrs", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {list(values)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}), "
                             f"n_heads by n_kv_heads ({self.n_kv_heads})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("max_bytes", "context_length", "batch_size", "steps", "eval_every", "eval_windows", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def auto_threads() -> int:
    """torch's default thread count, or 1 when the machine is already busy (load average >= cores):
    OpenMP threads spinning against other processes can make each step many times slower."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


# ---------------------------------------------------------------- model


def model_config(cfg: TextLMConfig, vocab: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if cfg.arch == "qwen3":  # Qwen2 plus RMSNorm of each head's q and k
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                           num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                           head_dim=cfg.d_model // cfg.n_heads, intermediate_size=4 * cfg.d_model,
                           max_position_embeddings=cfg.context_length, tie_word_embeddings=True,
                           bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if cfg.arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                          n_positions=cfg.context_length, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[cfg.arch]
    return cls(vocab_size=vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
               num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
               intermediate_size=4 * cfg.d_model, max_position_embeddings=cfg.context_length,
               tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None)


def build_model(cfg: TextLMConfig, vocab: int, impl: str, seed: int, learn_scale: bool = False,
                mech: Mechanism | None = None):
    """The same initial weights for every ``impl`` (an attn_implementation name, seeded); with
    ``learn_scale`` the per-head score gains (zeros: the same initial function) are added. ``mech``
    (the run's Mechanism) adds its levers: the gain's initial value, the forget gate (its weights
    drawn after the model's, so the model's own weights stay the same), the hybrid split (written
    into the config: ``ea_layer_kinds``, ``n_ea_heads``)."""
    from transformers import AutoModelForCausalLM

    from ..integrations import transformers as ea_hf

    ea_hf.register()
    torch.manual_seed(seed)
    config = copy.deepcopy(model_config(cfg, vocab))  # a fresh config per model: from_config writes into it
    if mech is not None and mech.hybrid:
        config.ea_layer_kinds = resolve_layer_kinds(mech.layer_kinds, cfg.n_layers)
        config.n_ea_heads = mech.n_ea_heads
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    if learn_scale:
        ea_hf.add_score_gain(model, init=mech.gain_init if mech is not None else 0.0)
    if mech is not None and mech.forget_gate:
        ea_hf.add_forget_gate(model, bias_init=mech.gate_bias_init)
    if impl != "sdpa":
        ea_hf.verify(model)  # EA (or the gained softmax) really runs in every layer
    return model


# ---------------------------------------------------------------- training


def batches(ids: torch.Tensor, cfg: TextLMConfig, seed: int):
    """Random training windows (B, context), the same sequence for every implementation."""
    g = torch.Generator().manual_seed(seed + 1)
    while True:
        start = torch.randint(0, len(ids) - cfg.context_length, (cfg.batch_size,), generator=g)
        yield torch.stack([ids[s : s + cfg.context_length] for s in start.tolist()])


def eval_windows(ids: torch.Tensor, cfg: TextLMConfig) -> torch.Tensor:
    """Fixed, evenly spaced held-out windows (N, context)."""
    n = min(cfg.eval_windows, len(ids) // cfg.context_length)
    starts = torch.linspace(0, len(ids) - cfg.context_length, n).long()
    return torch.stack([ids[s : s + cfg.context_length] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats) over every predicted position of ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size]
        total += model(input_ids=x, labels=x, use_cache=False).loss.item() * x.numel()
        count += x.numel()
    model.train()
    return total / count


def lr_at(step: int, cfg: TextLMConfig, lr: float) -> float:
    warmup = max(1, cfg.steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


DIAGNOSIS_WINDOWS = 16  # held-out windows the attention statistics are measured on


def train_one(cfg: TextLMConfig, mech: Mechanism, impl: str, lr: float, seed: int, train_ids, val_windows,
              vocab: int, bytes_per_token: float, progress=True) -> tuple[list[dict], dict]:
    """Train the run `mech` (attn_implementation `impl`) at peak lr `lr`, seed `seed`; returns its
    curve as rows and its diagnosis {"init": [...], "final": [...]} (or {} with diagnose off)."""
    from tqdm.auto import tqdm

    from .attention_stats import attention_stats

    label = mech.label
    model = build_model(cfg, vocab, impl, seed, mech.learn_scale, mech).train()
    diagnosis = {}
    if cfg.diagnose:
        diagnosis["init"] = attention_stats(model, impl, val_windows[:DIAGNOSIS_WINDOWS])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    to_bpb = 1.0 / (math.log(2) * bytes_per_token)  # nats/token -> bits/byte
    rows, t0, train_time = [], time.perf_counter(), 0.0

    def record(step, train_loss):
        val = evaluate(model, val_windows, cfg.batch_size)
        rows.append(dict(label=label, attn_implementation=impl, lr=lr, seed=seed, step=step, tokens=step * cfg.batch_size * cfg.context_length,
                         train_loss=train_loss, val_loss=val, val_bpb=val * to_bpb,
                         train_seconds=round(train_time, 2)))
        return val

    record(0, float("nan"))
    data = batches(train_ids, cfg, seed)
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{label} lr={lr:g} seed={seed}", disable=not progress,
               dynamic_ncols=True)
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg, lr)
        x = next(data)
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_time += time.perf_counter() - t
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{label}: training loss became {loss.item()} at step {step}")
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = record(step, running)
            bar.set_postfix(train=f"{running:.3f}", val_bpb=f"{val * to_bpb:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(train=f"{running:.3f}", val_bpb=f"{rows[-1]['val_bpb']:.3f}")
    if cfg.diagnose:
        diagnosis["final"] = attention_stats(model, impl, val_windows[:DIAGNOSIS_WINDOWS])
    rows[-1]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return rows, diagnosis


# ---------------------------------------------------------------- the study loop


def setting(cfg: TextLMConfig) -> dict:
    """Everything besides (mechanism, lr, seed) that determines a run's numbers, under the names the
    results files were first written with (results.TEXT_KEY_NAMES: "layers", "context", ...): the
    `setting` of every record, and part of its key."""
    keep = ("paths", "corpus", "glob", "max_bytes", "val_fraction", "tokenizer", "arch", "d_model", "n_layers",
            "n_heads", "n_kv_heads", "context_length", "batch_size", "steps", "eval_every", "eval_windows")
    d = {k: v for k, v in asdict(cfg).items() if k in keep}
    if d["paths"]:
        d.pop("corpus")
    return rename_keys(d, TEXT_KEY_NAMES)


def run_key(cfg: TextLMConfig, impl: str, lr: float, seed: int, levers: dict | None = None) -> str:
    """The results-file key of one run (its attn_implementation name stands for the mechanism, with
    ``levers``, Mechanism.levers(), the options the name does not show; left out when empty, so
    earlier keys stay as they were)."""
    return config_key({**setting(cfg), "impl": impl, "lr": float(lr), "seed": int(seed),
                       **({"levers": levers} if levers else {})})
