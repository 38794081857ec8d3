"""benchmarks/ladder_lr_check.py: the verify preset's learning-rate check (docs/ladder.md), the one script
that uses this analysis, tested on synthetic records."""
import importlib.util
from pathlib import Path

import pytest
from ladder_records import synthetic_record  # tests/support

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "ladder_lr_check.py"
_spec = importlib.util.spec_from_file_location("ladder_lr_check", SCRIPT)
lr_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lr_check)
lr_rule_gaps, lr_rule_lines = lr_check.lr_rule_gaps, lr_check.lr_rule_lines


def test_lr_rule_gaps_each_kind_at_its_better_lr():
    """DPA is better at lr 3e-3 (0.80 vs 0.60), EA at 1e-3 (0.90 vs 0.85): the same-lr gap at 1e-3 is
    +0.30, the better-lr gap +0.10; axis points (here a 4050-step run) are ignored."""
    recs = []
    for s, j in enumerate((-0.01, 0.0, 0.01)):
        for kind, lr, acc in (("dpa", 1e-3, 0.6), ("dpa", 3e-3, 0.8), ("ea", 1e-3, 0.9), ("ea", 3e-3, 0.85)):
            r = synthetic_record(kind, s, 100, 64, 100_000, acc + j * (1 + lr * 100), 0.0, ["budget"], {})
            r["config"]["lr"] = lr
            recs.append(r)
        far = synthetic_record("dpa", s, 900, 64, 100_000, 0.99, 1.0, ["budget"], {"steps": 900})
        far["config"]["lr"] = 3e-3
        recs.append(far)
    (row,) = lr_rule_gaps(recs, preregistered_lr=1e-3)
    assert row["best_lr"] == {"dpa": 3e-3, "ea": 1e-3}
    assert row["same_lr"].estimate == pytest.approx(0.30) and row["same_lr"].sign == 1
    assert row["best"].estimate == pytest.approx(0.10)
    assert row["means"]["dpa"] == pytest.approx({1e-3: 0.6, 3e-3: 0.8})
    lines = lr_rule_lines([row])
    assert len(lines) == 3 and "| fam K=2 | ea | 0.001: 0.600, 0.003: 0.800 |" in lines[2]
    assert "DPA at 0.003, ea at 0.001" in lines[2]
    one_seed = [r for r in recs if r["label"] == "dpa" or r["config"]["seed"] == 0]
    (row,) = lr_rule_gaps(one_seed, preregistered_lr=1e-3)
    assert row["same_lr"] is None and row["best"] is None and "| n/a | n/a |" in lr_rule_lines([row])[2]


def test_the_script_prints_the_table_of_records_files(tmp_path, capsys):
    import json

    recs = [synthetic_record(kind, s, 100, 64, 1, acc + 0.01 * s, 0.0, [], {}) for s in range(3)
            for kind, acc in (("dpa", 0.5), ("ea", 0.7))]
    for r in recs:
        r["config"]["lr"] = 1e-3
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lr_check.main([str(tmp_path / "results.jsonl")])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].startswith("| fam K=2 | ea | 0.001: 0.510 | 0.001: 0.710 |")
