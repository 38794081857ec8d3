"""`ea train`: one run (one RunConfig, from flags and/or a JSON file) -> OUT/results.jsonl and
OUT/checkpoints/KEY.pt, the layout of a ladder directory (a ladder over OUT skips the run).

    ea train --task pointer --task-params '{"T": 8}' --kind ea --steps 600 --out runs/one
    ea train --config run.json --steps 2000            # flags override the file
    torchrun --nproc_per_node 4 -m expressive_attention.cli train --config run.json   # DDP, same result

Under torchrun each process trains on its slice of every global batch (gloo on CPU, nccl with
--device cuda, one GPU per local rank); rank 0 alone evaluates and writes (docs/scale.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..ops import KINDS, VARIANTS
from .args import add_import_option, csv_of, positive_float, positive_int


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"T\": 8}}': {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# argparse type and help of each RunConfig field (a field without an entry fails the CLI tests)
FIELDS: dict[str, tuple] = {
    "task": (str, "task name (see `ea tasks`)"),
    "task_params": (_json_object, "task parameters as a JSON object, e.g. '{\"T\": 8}'"),
    "kind": (str, f"attention mechanism, one of {', '.join(KINDS)}"),
    "variant": (str, f"EA variant, one of {', '.join(VARIANTS)}"),
    "power": (positive_float, "degree of variant=power (default 4)"),
    "qk_norm": (_bool, "RMSNorm of each head's q and k: true or false"),
    "learn_scale": (_bool, "learned per-head score gain: true or false"),
    "gain_init": (_float, "initial log gain of --learn-scale (e.g. -1.1513: exp_squared starts at beta 0.1)"),
    "n_ea_heads": (_int, "EA on the first N query heads of each EA layer, softmax on the rest"),
    "layer_kinds": (str, "per-layer kinds: ends, first, last, or ea/dpa per layer joined by '-'"),
    "forget_gate": (_bool, "data-dependent forget gate (FoX) in every layer: true or false"),
    "gate_bias_init": (_float, "the forget gate's initial bias (0: 1/2 per step at init; 4: 0.982)"),
    "d_model": (positive_int, "model width"),
    "n_layers": (positive_int, "layers"),
    "n_heads": (positive_int, "attention heads"),
    "pos": (str, "positions: learned or rope"),
    "steps": (positive_int, "training steps"),
    "tokens": (positive_int, "token budget instead of --steps"),
    "batch_size": (positive_int, "global batch size (split over torchrun processes)"),
    "lr": (positive_float, "peak learning rate"),
    "weight_decay": (_float, "AdamW weight decay (matrices only)"),
    "betas": (csv_of(_float), "AdamW betas, e.g. 0.9,0.95"),
    "warmup": (_int, "linear warm-up steps"),
    "grad_clip": (_float, "gradient-norm clip (0: none)"),
    "seed": (_int, "seed of the model and the training stream"),
    "eval_sequences": (positive_int, "held-out sequences to evaluate on"),
    "eval_seed": (_int, "seed of the held-out stream"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..experiments.train import RunConfig

    p = subparsers.add_parser("train", help="train one run (one RunConfig); runs under torchrun with DDP too",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a RunConfig as JSON (the `config` of a results.jsonl record, or a whole record)")
    g = p.add_argument_group("run config", "RunConfig fields; each overrides --config (defaults: RunConfig's)")
    for f in dataclasses.fields(RunConfig):
        kind, text = FIELDS[f.name]
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None, help=text)
    p.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    p.add_argument("--no-checkpoint", action="store_true", help="do not save the model")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu, or cuda (under torchrun: the GPU of each local rank, nccl)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per process (default: torch's; torchrun sets 1 per process)")
    add_import_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train_cmd)
    return p


def run_config(args):
    """The RunConfig from --config and the field flags; a bad value is a one-line error."""
    from ..errors import UserError
    from ..experiments.train import RunConfig

    d: dict = {}
    if args.config:
        try:
            d = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--config {args.config}: {e}") from None
        if isinstance(d, dict) and isinstance(d.get("config"), dict) and "key" in d:
            d = d["config"]  # a whole results record
        if not isinstance(d, dict):
            raise UserError(f"--config {args.config} must hold a JSON object")
    d.update({name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None})
    if "task" not in d:
        raise UserError("give --task (or a --config file with one)")
    try:
        return RunConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def train_cmd(args) -> int:
    from ..tasks import import_task_modules

    import torch

    from ..errors import UserError
    from ..experiments.distributed import Shard, under_torchrun
    from ..experiments.ladder import CHECKPOINT_DIR
    from ..experiments.results import ResultsStore
    from ..experiments.train import train_run

    import_task_modules(args.imports)
    cfg = run_config(args)
    out = Path(args.out)
    store = ResultsStore(out)
    if cfg.key() in store.keys():
        print(f"ea train: run {cfg.key()} is already in {store.path}; nothing to do "
              "(remove its line, or use another --out, to train it again)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but CUDA is not available")
    shard = Shard.from_env(args.device) if under_torchrun() else None
    main = shard is None or shard.is_main
    checkpoint = None if args.no_checkpoint else out / CHECKPOINT_DIR / f"{cfg.key()}.pt"
    bar = None
    if main and not args.no_progress:
        from ..extras import require
        require("cli", "ea train's progress bar (or --no-progress)", ("tqdm",))
        from tqdm.auto import tqdm
        bar = tqdm(desc=f"{cfg.task} {cfg.label} s{cfg.seed}", unit="step", dynamic_ncols=True)

    def progress(step, total, loss):
        bar.total = total
        bar.n = step
        bar.set_postfix_str(f"loss {loss:.3f}", refresh=True)

    try:
        record = train_run(cfg, checkpoint=checkpoint, progress=progress if bar else None, device=args.device,
                           shard=shard)
    finally:
        if bar is not None:
            bar.close()
        if shard is not None:
            shard.close()
    if not main:
        return 0
    record["command"] = args.command_line
    store.append(record)
    m = record["metrics"]
    on = f" on {shard.world_size} processes" if shard is not None else ""
    print(f"{cfg.task} {cfg.label} s{cfg.seed}: token {m['token_acc']:.4f} seq {m['seq_acc']:.4f} "
          f"loss {m['loss']:.4f} ({record['steps']} steps, {record['wall_s']:.0f} s{on})")
    print(f"record: {store.path} (key {record['key']})" + (f"\ncheckpoint: {checkpoint}" if checkpoint else ""))
    return 0
