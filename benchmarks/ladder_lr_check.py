"""The verify preset's learning-rate check (docs/ladder.md): the base-point gap EA - DPA with both kinds
at the pre-registered lr 1e-3, and with each kind at its better lr, from the records of both sweeps.

    python benchmarks/ladder_lr_check.py docs/ladder-verify/results.jsonl docs/ladder-lrcheck/results.jsonl
"""
import argparse

from expressive_attention.experiments.results import ResultsStore
from expressive_attention.experiments.scaling import lr_rule_gaps, lr_rule_lines

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("results", nargs="+", help="results.jsonl files (or their folders)")
parser.add_argument("--lr", type=float, default=1e-3, help="the pre-registered lr (default 1e-3)")
args = parser.parse_args()
records = [r for path in args.results for r in ResultsStore(path).read()]
print("\n".join(lr_rule_lines(lr_rule_gaps(records, args.lr))))
