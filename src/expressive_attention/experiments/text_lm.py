"""`ea lm`: one small Hugging Face causal LM, trained with each attention implementation on the same
text (same initial weights, same batches, same number of steps), compared on held-out bits per byte.

The model is built from a config (no downloaded weights); one run per mechanism of ``kinds`` x
``variants`` (as in the ladder: "dpa", "ea", "ea-squared"), switched with transformers'
``attn_implementation`` ("sdpa", "expressive", "expressive_squared"), so only the attention rule
differs between runs. The text is any local files; the default corpus is the Python standard
library's own source files, which every machine running this has. Tokens are bytes (vocab 256) or
characters (vocab from the training text). The last ``val_fraction`` of the text (whole files,
in a fixed pseudo-random file order) is held out.
"""
from __future__ import annotations

import copy
import csv
import fnmatch
import functools
import json
import math
import os
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..deprecation import warn_renamed
from ..extras import has, install_hint
from .kinds import kind_label, kind_specs

# the old `impls` names (attn_implementation names) -> (kind, variant)
IMPLEMENTATIONS = {"sdpa": ("dpa", None), "expressive": ("ea", "saturating"),
                   "expressive_squared": ("ea", "squared")}
ARCHS = ("llama", "qwen2", "mistral", "gpt2")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def kinds_from_impls(impls) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(kinds, variants) for the old `impls` list, e.g. ("sdpa", "expressive_squared")."""
    bad = [i for i in impls if i not in IMPLEMENTATIONS]
    if bad or not impls:
        raise ValueError(f"impls must be a non-empty subset of {tuple(IMPLEMENTATIONS)}, got {list(impls)}")
    specs = [IMPLEMENTATIONS[i] for i in impls]
    kinds = tuple(dict.fromkeys(k for k, _ in specs))
    return kinds, tuple(dict.fromkeys(v for _, v in specs if v is not None)) or ("saturating",)


def hf_implementation(kind: str, variant: str | None) -> str:
    """transformers' attn_implementation name for a run: "sdpa" for DPA, else the registered EA name."""
    if kind == "dpa":
        return "sdpa"
    from ..integrations import transformers as ea_hf

    defaults = {v: name for name, v in ea_hf.DEFAULT_NAMES.items()}
    return ea_hf.register(defaults.get(variant, f"expressive_{variant}"), variant=variant)


@dataclass
class TextLMConfig:
    paths: list[str] = field(default_factory=list)  # files or directories; empty = the stdlib
    glob: str = "*.py"  # files taken from directories
    max_bytes: int = 4_000_000
    val_fraction: float = 0.1
    tokenizer: str = "byte"  # "byte" | "char"
    arch: str = "llama"
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    context: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3  # peak; linear warmup over the first 10% of steps, cosine to 10%
    eval_every: int = 25
    eval_windows: int = 128
    kinds: tuple[str, ...] = ("dpa", "ea")
    variants: tuple[str, ...] = ("saturating",)  # EA variants, each its own run
    seed: int = 0
    threads: int | None = None  # torch threads; None: 1 on a busy machine, else torch's default
    out: str = "runs/lm"

    def runs(self) -> list[tuple[str, str, str | None]]:
        """(label, kind, variant) of every run, e.g. [("dpa", "dpa", None), ("ea", "ea", "saturating")]."""
        return [(kind_label(k, v), k, v) for k, v in kind_specs(self.kinds, self.variants)]

    def check(self) -> None:
        if self.tokenizer not in ("byte", "char"):
            raise ValueError(f"tokenizer must be 'byte' or 'char', got {self.tokenizer!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        self.runs()  # kinds and variants
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.d_model % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"d_model ({self.d_model}) must divide by heads ({self.heads}), "
                             f"heads by kv_heads ({self.kv_heads})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("max_bytes", "context", "batch_size", "steps", "eval_every", "eval_windows", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _accept_impls(init):
    """TextLMConfig(impls=...): the deprecated way to name the runs, converted to kinds and variants."""

    @functools.wraps(init)
    def __init__(self, *args, impls=None, **kwargs):
        init(self, *args, **kwargs)
        if impls is not None:
            warn_renamed("TextLMConfig", "impls", "kinds and variants", stacklevel=2)
            self.kinds, self.variants = kinds_from_impls(impls)

    return __init__


TextLMConfig.__init__ = _accept_impls(TextLMConfig.__init__)


def __getattr__(name: str):
    if name == "LMConfig":  # the old name of TextLMConfig (nn.LMConfig is the DecoderLM's config)
        warn_renamed(__name__, "LMConfig", "TextLMConfig", stacklevel=2)
        return TextLMConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def auto_threads() -> int:
    """torch's default thread count, or 1 when the machine is already busy (load average >= cores):
    OpenMP threads spinning against other processes can make each step many times slower."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


# ---------------------------------------------------------------- text


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_files(paths: list[str], glob: str) -> list[Path]:
    """Files named in ``paths`` plus ``glob`` matches under directories (site-packages skipped), in
    a fixed pseudo-random order (crc32 of the relative path) so a byte budget samples widely."""
    roots = [Path(p) for p in paths] if paths else [stdlib_dir()]
    files: list[tuple[int, str, Path]] = []
    for root in roots:
        if root.is_file():
            files.append((zlib.crc32(root.name.encode()), root.name, root))
        elif root.is_dir():
            for d, subdirs, names in os.walk(root):
                subdirs[:] = [s for s in subdirs if s not in _SKIP_DIRS]
                for n in fnmatch.filter(names, glob):
                    f = Path(d) / n
                    rel = f.relative_to(root).as_posix()
                    files.append((zlib.crc32(rel.encode()), rel, f))
        else:
            raise FileNotFoundError(f"text path {str(root)!r} does not exist")
    if not files:
        raise ValueError(f"no files matching {glob!r} under {[str(r) for r in roots]}")
    return [f for _, _, f in sorted(files)]


def load_text(cfg: TextLMConfig) -> tuple[bytes, bytes, int]:
    """(train bytes, held-out bytes, number of files read) within ``cfg.max_bytes``."""
    chunks, total = [], 0
    for f in collect_files(cfg.paths, cfg.glob):
        data = f.read_bytes()[: cfg.max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= cfg.max_bytes:
            break
    text = b"\n".join(chunks)
    n_val = int(len(text) * cfg.val_fraction)
    if len(text) - n_val < cfg.context + 1 or n_val < cfg.context + 1:
        raise ValueError(f"{len(text)} bytes of text is too little for context {cfg.context}")
    return text[:-n_val], text[-n_val:], len(chunks)


def tokenize(train: bytes, val: bytes, kind: str):
    """-> (train ids, val ids, vocab size, held-out bytes per token)."""
    if kind == "byte":
        t = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
        v = torch.frombuffer(bytearray(val), dtype=torch.uint8).long()
        return t, v, 256, 1.0
    tr, va = train.decode("utf-8", errors="replace"), val.decode("utf-8", errors="replace")
    vocab = {c: i + 1 for i, c in enumerate(sorted(set(tr)))}  # 0 = unknown
    t = torch.tensor([vocab[c] for c in tr])
    v = torch.tensor([vocab.get(c, 0) for c in va])
    return t, v, len(vocab) + 1, len(val) / len(va)


# ---------------------------------------------------------------- model


def model_config(cfg: TextLMConfig, vocab: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if cfg.arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=cfg.d_model, n_layer=cfg.layers, n_head=cfg.heads,
                          n_positions=cfg.context, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[cfg.arch]
    return cls(vocab_size=vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.layers,
               num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
               intermediate_size=4 * cfg.d_model, max_position_embeddings=cfg.context,
               tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None)


def build_model(cfg: TextLMConfig, vocab: int, impl: str):
    """The same initial weights for every ``impl`` (an attn_implementation name, seeded)."""
    from transformers import AutoModelForCausalLM

    from ..integrations import transformers as ea_hf

    ea_hf.register()
    torch.manual_seed(cfg.seed)
    # a fresh config per model: from_config writes attn_implementation into the object it gets
    model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config(cfg, vocab)), attn_implementation=impl)
    if impl != "sdpa":
        ea_hf.verify(model)  # EA really runs in every layer
    return model


# ---------------------------------------------------------------- training


def batches(ids: torch.Tensor, cfg: TextLMConfig):
    """Random training windows (B, context), the same sequence for every implementation."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    while True:
        start = torch.randint(0, len(ids) - cfg.context, (cfg.batch_size,), generator=g)
        yield torch.stack([ids[s : s + cfg.context] for s in start.tolist()])


def eval_windows(ids: torch.Tensor, cfg: TextLMConfig) -> torch.Tensor:
    """Fixed, evenly spaced held-out windows (N, context)."""
    n = min(cfg.eval_windows, len(ids) // cfg.context)
    starts = torch.linspace(0, len(ids) - cfg.context, n).long()
    return torch.stack([ids[s : s + cfg.context] for s in starts.tolist()])


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


def lr_at(step: int, cfg: TextLMConfig) -> float:
    warmup = max(1, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_one(cfg: TextLMConfig, label: str, impl: str, train_ids, val_windows, vocab: int,
              bytes_per_token: float, progress=True) -> list[dict]:
    """Train the run `label` (attn_implementation `impl`); its curve as rows."""
    from tqdm.auto import tqdm

    model = build_model(cfg, vocab, impl).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    to_bpb = 1.0 / (math.log(2) * bytes_per_token)  # nats/token -> bits/byte
    rows, t0, train_time = [], time.perf_counter(), 0.0

    def record(step, train_loss):
        val = evaluate(model, val_windows, cfg.batch_size)
        rows.append(dict(kind=label, attn_implementation=impl, step=step, tokens=step * cfg.batch_size * cfg.context,
                         train_loss=train_loss, val_loss=val, val_bpb=val * to_bpb,
                         train_seconds=round(train_time, 2)))
        return val

    record(0, float("nan"))
    data = batches(train_ids, cfg)
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{label:>10}", disable=not progress, dynamic_ncols=True)
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
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
    rows[-1]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return rows


# ---------------------------------------------------------------- outputs


def write_outputs(rows: list[dict], summary: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "lm_curves.csv", "png": out / "lm_curves.png", "json": out / "lm_summary.json"}
    fields = ["kind", "attn_implementation", "step", "tokens", "train_loss", "val_loss", "val_bpb", "train_seconds"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    if not has("matplotlib"):  # the table and the CSV/JSON do not need it
        del paths["png"]
        print(f"plot skipped: matplotlib is not installed ({install_hint('cli')})")
        return paths
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in summary["runs"]:
        r = [x for x in rows if x["kind"] == label]
        axes[0].plot([x["step"] for x in r], [x["val_bpb"] for x in r], marker="o", ms=3, label=label)
        axes[1].plot([x["step"] for x in r[1:]], [x["train_loss"] for x in r[1:]], label=label)
    axes[0].set(xlabel="step", ylabel="held-out bits per byte", title="validation")
    axes[1].set(xlabel="step", ylabel="train loss (nats/token, smoothed)", title="training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    c = summary["config"]
    fig.suptitle(f"{c['arch']} d={c['d_model']} L={c['layers']} ctx={c['context']}, "
                 f"{c['tokenizer']}-level, {summary['train_bytes'] / 1e6:.1f} MB text, seed {c['seed']}")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def run(cfg: TextLMConfig, progress: bool = True, log=print) -> dict:
    """Train one model per mechanism of ``cfg.runs()``; write CSV/PNG/JSON to ``cfg.out``; return the summary."""
    cfg.check()
    torch.set_num_threads(cfg.threads or auto_threads())
    train, val, n_files = load_text(cfg)
    train_ids, val_ids, vocab, bytes_per_token = tokenize(train, val, cfg.tokenizer)
    windows = eval_windows(val_ids, cfg)
    source = ", ".join(cfg.paths) if cfg.paths else f"Python stdlib ({stdlib_dir()})"
    log(f"text: {source}: {n_files} files, {len(train):,} train / {len(val):,} held-out bytes; "
        f"{cfg.tokenizer}-level, vocab {vocab}; {len(windows)} held-out windows of {cfg.context}")
    rows, results = [], {}
    for label, kind, variant in cfg.runs():
        impl = hf_implementation(kind, variant)
        r = train_one(cfg, label, impl, train_ids, windows, vocab, bytes_per_token, progress)
        rows += r
        results[label] = dict(attn_implementation=impl, val_loss=r[-1]["val_loss"], val_bpb=r[-1]["val_bpb"],
                             train_seconds=r[-1]["train_seconds"], wall_seconds=r[-1]["wall_seconds"])
    summary = dict(config=asdict(cfg), runs=list(results), results=results, vocab=vocab,
                   train_bytes=len(train), val_bytes=len(val), files=n_files,
                   tokens_per_run=cfg.steps * cfg.batch_size * cfg.context,
                   torch=torch.__version__, threads=torch.get_num_threads())
    import transformers

    summary["transformers"] = transformers.__version__
    summary["paths"] = {k: str(v) for k, v in write_outputs(rows, summary, Path(cfg.out)).items()}
    return summary


def format_table(summary: dict) -> str:
    lines = ["| attention | val loss (nats/token) | val bits/byte | train time (s) |",
             "|---|---|---|---|"]
    for label, r in summary["results"].items():
        lines.append(f"| {label} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)
