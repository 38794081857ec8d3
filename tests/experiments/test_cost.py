"""`ea ladder --dry-run` and the numbers the docs give about the presets: run counts come from the grids,
the cost model's constants from the recorded runs (issue #23, item 6)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from expressive_attention.cli import main
from expressive_attention.experiments import cost
from expressive_attention.experiments.presets import PRESETS, ladder_grid

ROOT = Path(__file__).resolve().parents[2]
VERIFY_RECORDS = ROOT / "docs" / "ladder-verify" / "results.jsonl"
QUICK_RECORDS = ROOT / "docs" / "ladder-quick-exp" / "results.jsonl"  # the quick preset, 3 seeds, ea-exp_squared


def _runs(name: str, **overrides) -> int:
    return len({p.config.key() for p in ladder_grid(name, **overrides)[1]})


def _cpu_minutes(path: Path) -> float:
    return sum(json.loads(line)["cpu_s"] for line in path.read_text().splitlines() if line.strip()) / 60


def test_constants_are_the_fit_to_the_recorded_runs():
    ms, overhead = cost.fit_from_records(VERIFY_RECORDS)
    assert sorted(ms) == sorted(cost.STEP_CPU_MS)
    for d, v in ms.items():
        assert cost.STEP_CPU_MS[d] == pytest.approx(v, abs=0.05), d
    assert cost.RUN_OVERHEAD_S == pytest.approx(overhead, abs=0.05)


@pytest.mark.parametrize("records,preset,overrides", [
    (VERIFY_RECORDS, "verify", {}),
    (QUICK_RECORDS, "quick", {"kinds": ["dpa", "ea"], "variants": ["exp_squared"], "seeds": 3}),
])
def test_estimate_is_within_15_percent_of_the_recorded_cpu_time(records, preset, overrides):
    _, grid = ladder_grid(preset, **overrides)
    runs = cost.grid_costs(grid)
    assert len(runs) == sum(1 for line in records.read_text().splitlines() if line.strip())
    estimate = sum(c.cpu_s for _, c in runs) / 60
    assert estimate == pytest.approx(_cpu_minutes(records), rel=0.15)
    assert not any(c.extrapolated for _, c in runs)


def test_step_cost_interpolates_and_says_when_it_extrapolates():
    assert cost.step_ms(64) == (cost.STEP_CPU_MS[64], False)
    mid, extra = cost.step_ms(96)
    assert cost.STEP_CPU_MS[64] < mid < cost.STEP_CPU_MS[128] and not extra
    big, extra = cost.step_ms(256)
    assert big > cost.STEP_CPU_MS[128] and extra
    assert cost.run_cost(64, 4, 450, 32, 64).extrapolated  # another depth
    two_layers = cost.run_cost(64, 2, 450, 32, 64).cpu_s - cost.RUN_OVERHEAD_S
    assert cost.run_cost(64, 4, 450, 32, 64).cpu_s - cost.RUN_OVERHEAD_S == pytest.approx(2 * two_layers)


def test_makespan_schedules_runs_in_order_on_free_workers():
    assert cost.makespan([3, 1, 1, 1], 2) == 3
    assert cost.makespan([1, 1, 1, 1], 4) == 1
    assert cost.makespan([1, 1, 1, 1], 4, cores=2) == 2  # more workers than cores: the cores are the limit
    assert cost.makespan([], 2) == 0
    with pytest.raises(ValueError, match="workers"):
        cost.makespan([1], 0)


def test_dry_run_prints_counts_and_estimate_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ladder", "--preset", "quick", "--dry-run", "--workers", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n = _runs("quick")
    assert f"preset quick: {n} runs" in text
    assert f"pointer: {n // 4}" in text and f"dpa: {n // 2}, ea: {n // 2}" in text
    total = re.search(r"estimated CPU time: ([\d.]+) min", text)
    wall = re.search(r"estimated wall time with --workers 2: ([\d.]+) min", text)
    assert total and wall
    expected = sum(c.cpu_s for _, c in cost.grid_costs(ladder_grid("quick")[1])) / 60
    assert float(total.group(1)) == pytest.approx(expected, abs=0.05)
    assert float(wall.group(1)) < float(total.group(1))
    assert not out.exists()  # nothing written


def test_dry_run_counts_runs_already_in_the_store(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _, grid = ladder_grid("quick")
    with open(out / "results.jsonl", "w") as f:
        for p in grid[:5]:
            f.write(json.dumps({"key": p.config.key(), "config": p.config.to_dict()}) + "\n")
    assert main(["ladder", "--preset", "quick", "--dry-run", "--workers", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"already in the results store: 5; to train: {len(grid) - 5}" in text
    assert f"({len(grid) - 5} runs, one thread each)" in text


# --- the run counts written in prose are the grids' --------------------------------------------------------

def _formula_runs(text: str) -> list[tuple[int, int, str]]:
    """(product of the factors, stated count, the formula) for each 'A x B x {c, d} x E = N runs' in text."""
    found = []
    for m in re.finditer(r"((?:(?:\d+|\{[^}]*\})[\w\s-]*?\s+x\s+)+(?:\d+|\{[^}]*\})[\w\s-]*?)\s*=\s*(\d+) runs", text):
        factors = [f.strip() for f in re.split(r"\s+x\s+", m.group(1))]
        product = math.prod(len(f[1:f.index("}")].split(",")) if f.startswith("{") else int(re.match(r"\d+", f).group())
                            for f in factors)
        found.append((product, int(m.group(2)), m.group(0)))
    return found


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_descriptions_count_the_runs_of_their_grid(name):
    formulas = _formula_runs(PRESETS[name].description)
    assert len(formulas) == 1, PRESETS[name].description
    product, stated, formula = formulas[0]
    assert product == stated == _runs(name), formula


def test_docs_preset_table_counts_the_runs_of_each_grid():
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)`.*$", (ROOT / "docs/ladder.md").read_text(), re.M)}
    assert set(PRESETS) <= set(rows)
    for name in PRESETS:
        (product, stated, formula), = _formula_runs(rows[name])
        assert product == stated == _runs(name), formula


@pytest.mark.parametrize("path,pattern,expected", [
    ("README.md", r"trains (\d+) small\s+decoder LMs", lambda: _runs("quick")),
    ("README.md", r"took \*\*[\d.]+ min\*\* for the (\d+)\s+runs", lambda: _runs("quick")),
    ("README.md", r"point, (\d+) runs \(", lambda: _runs("verify")),
    ("README.md", r"point, \d+ runs \((\d+) CPU-minutes", lambda: round(_cpu_minutes(VERIFY_RECORDS))),
    ("docs/ladder.md", r"Measured: \*\*[\d.]+ min\*\* for the (\d+) runs", lambda: _runs("quick")),
    ("docs/ladder.md", r"complete: (\d+) runs", lambda: _runs("verify")),
    ("docs/ladder.md", r"(\d+) runs add up to \*\*\d+ CPU-minutes", lambda: _runs("verify")),
    ("docs/ladder.md", r"\d+ runs add up to \*\*(\d+) CPU-minutes", lambda: round(_cpu_minutes(VERIFY_RECORDS))),
    ("docs/ladder.md", r"CPU times, one thread per run, add up to (\d+) min", lambda: round(_cpu_minutes(VERIFY_RECORDS))),
    ("docs/scale.md", r"(\d+) runs \(4 families x 6 rungs", lambda: _runs("paper")),
    ("docs/scale.md", r"pointer: 5 rungs x \{DPA, EA\} x 2 seeds = (\d+) runs", lambda: _runs("quick", families=["pointer"])),
    ("docs/real-text.md", r"ea-exp_squared as the EA kind against DPA, 3 seeds \((\d+) runs",
     lambda: _runs("quick", kinds=["dpa", "ea"], variants=["exp_squared"], seeds=3)),
])
def test_prose_numbers_match_the_grid_and_the_records(path, pattern, expected):
    hits = re.findall(pattern, (ROOT / path).read_text())
    assert hits, f"{path}: no match for {pattern!r} (reworded? update this test with it)"
    assert all(int(h) == expected() for h in hits), (path, pattern, hits, expected())
