"""Experiments: train a DecoderLM on a task (train.py), the complexity ladder (presets.py,
ladder.py), its report (report.py), attention geometry (geometry.py)."""
from .ladder import run_ladder
from .presets import PRESETS, Family, Preset, get_preset
from .results import ResultsStore, config_key
from .train import RunConfig, evaluate, load_checkpoint, train_run

__all__ = ["PRESETS", "Family", "Preset", "ResultsStore", "RunConfig", "config_key", "evaluate",
           "get_preset", "load_checkpoint", "run_ladder", "train_run"]
