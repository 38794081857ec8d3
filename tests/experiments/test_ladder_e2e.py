"""A tiny end-to-end ladder: results, summary, plot, report; resume; a killed sweep restarted."""
import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from ladder_tiny_tasks import tiny_preset  # registers "tiny_lag"
from sweep_kill import kill_after_first_record, ladder_cmd, support_env, write_preset

from expressive_attention.cli import main
from expressive_attention.experiments import ResultsStore, run_ladder

torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared


def test_tiny_ladder_writes_everything_and_resumes(tmp_path):
    preset = tiny_preset()
    res = run_ladder(preset, tmp_path, workers=1, progress=False, command="ea ladder --tiny")
    assert res["total"] == 12 and res["ran"] == 12 and not res["failed"]
    records = ResultsStore(tmp_path).read()
    assert len(records) == 12
    assert {r["key"] for r in records} == {p.config.key() for p in preset.grid()}
    assert all(r["ladder"]["family"] == "tiny" for r in records)
    assert all(Path(r["checkpoint"]).exists() for r in records)

    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6  # 3 rungs x 2 kinds
    assert {r["label"] for r in rows} == {"dpa", "ea"}
    assert [r["rung_label"] for r in rows if r["label"] == "dpa"] == ["lag=1", "lag=2", "lag=3"]
    for r in rows:
        assert r["n"] == "2"
        assert 0.0 <= float(r["token_acc_mean"]) <= 1.0 and float(r["token_acc_std"]) >= 0.0
        assert 0.0 <= float(r["seq_acc_mean"]) <= 1.0

    assert (tmp_path / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "geometry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "`ea ladder --tiny`" in report
    assert "| tiny | lag=2 |" in report and "![ladder](ladder.png)" in report
    assert "**tiny**, ea vs dpa" in report and "torch" in report
    assert "antiparallel" in report

    assert "`ea ladder --tiny` on serial (in-process)" in report and "wall time" in report

    again = run_ladder(preset, tmp_path, workers=1, progress=False)
    assert again["ran"] == 0 and again["skipped"] == 12
    assert len((tmp_path / "sweeps.jsonl").read_text().splitlines()) == 2  # one line per invocation
    assert len(ResultsStore(tmp_path).read()) == 12

    more = run_ladder(tiny_preset(seeds=3), tmp_path, workers=1, progress=False, report=False)
    assert more["ran"] == 6 and more["skipped"] == 12  # only the new seed runs


@pytest.mark.slow
def test_killed_sweep_restarts_to_one_record_per_config(tmp_path):
    preset = tiny_preset(name="killme", steps=20, delay=0.05)  # >= 1 s per run on any machine
    preset_file = write_preset(preset, tmp_path / "p.json")
    out = tmp_path / "out"
    store = ResultsStore(out)
    n_before = kill_after_first_record(ladder_cmd(preset_file, out, "--workers", "2"), store, tmp_path / "first.log")
    assert 1 <= n_before < 12, "the sweep was not interrupted mid-way"
    torn = json.dumps({"key": "x" * 16, "config": {}, "metrics": {}})
    with open(store.path, "a") as f:  # as if killed in the middle of a write
        f.write(torn[:25])

    done = subprocess.run(ladder_cmd(preset_file, out, "--workers", "2"), env=support_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "truncated" in done.stderr  # the warning
    assert f"resuming: {n_before} of 12" in done.stdout + done.stderr
    lines = store.path.read_text().splitlines()
    assert len(lines) == 12  # the torn tail is gone, nothing twice
    keys = [json.loads(line)["key"] for line in lines]
    assert sorted(keys) == sorted(p.config.key() for p in preset.grid())
    assert (out / "report.md").exists() and (out / "summary.csv").exists()


def test_cli_list_report_only_and_geometry(tmp_path, capsys):
    preset = tiny_preset(name="cli", seeds=1)
    pf = tmp_path / "cli.json"
    pf.write_text(json.dumps(preset.to_dict()))
    out = tmp_path / "o"
    assert main(["ladder", "--preset", str(pf), "--list", "--kinds", "ea", "--variants", "saturating,squared"]) == 0
    text = capsys.readouterr().out
    assert "6 runs" in text and "ea-squared" in text
    assert main(["ladder", "--preset", str(pf), "--out", str(out), "--steps", "3", "--workers", "1"]) == 0
    recs = ResultsStore(out).read()
    assert len(recs) == 6 and all(r["steps"] == 3 for r in recs)
    (out / "report.md").unlink()
    assert main(["ladder", "--preset", str(pf), "--out", str(out), "--steps", "3", "--report-only"]) == 0
    assert "| tiny | lag=3 |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["geometry", str(out), "--out", str(tmp_path / "g"), "--sequences", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| dpa |" in printed and "| ea |" in printed
    assert (tmp_path / "g" / "geometry.png").exists()
    blob = json.loads((tmp_path / "g" / "geometry.json").read_text())
    assert len(blob["bins"]) == 41


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["ladder", "--workers", "0"])
    assert "--workers" in capsys.readouterr().err
    for args, match in ((["--tasks", "nope"], "unknown task families"), (["--kinds", "softmax"], "kinds"),
                        (["--preset", "huge"], "preset")):
        assert main(["ladder", "--preset", "quick", *args, "--list"]) == 2  # one line, no traceback
        assert match in capsys.readouterr().err
    assert main(["geometry", str(tmp_path / "missing")]) == 2
    assert "neither" in capsys.readouterr().err


def test_report_only_on_a_committed_old_results_file(tmp_path):
    """docs/ladder-quick-exp was written before the renames (records: `kind` for the mechanism's label,
    ladder.label for the rung's; configs with `attention`): `--report-only` finds every run by its key
    and rebuilds the committed summary.csv, now with the columns rung_label and label."""
    old = Path(__file__).parents[2] / "docs" / "ladder-quick-exp"
    out = tmp_path / "old"
    out.mkdir()
    (out / "results.jsonl").write_bytes((old / "results.jsonl").read_bytes())
    assert main(["ladder", "--preset", "quick", "--kinds", "dpa,ea", "--variants", "exp_squared", "--seeds", "3",
                 "--out", str(out), "--report-only"]) == 0
    with open(old / "summary.csv") as f:
        before = list(csv.DictReader(f))
    with open(out / "summary.csv") as f:
        after = list(csv.DictReader(f))
    assert len(after) == len(before) and all(r["n"] == "3" for r in after)
    for b, a in zip(before, after):
        assert (a["family"], a["rung_label"], a["label"]) == (b["family"], b["label"], b["kind"])
        assert a["token_acc_mean"] == b["token_acc_mean"] and a["seq_acc_mean"] == b["seq_acc_mean"]
