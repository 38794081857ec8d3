"""The blocked backend as a plain user measures it (issue #23, item 8): the script runs, and the table in
docs/blocked.md is the rendering of its recorded runs, docs/bench/blocked-plain-user.jsonl."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "docs" / "bench" / "blocked-plain-user.jsonl"


def _row_key(r: dict) -> tuple:
    s, env = r["shape"], r["env"]
    threads = f"{r['threads']} (torch's default)" if env["OMP_NUM_THREADS"] is None else \
        f"{r['threads']} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']})"
    return s["L"], s["E"], threads, env["OMP_WAIT_POLICY"] or "unset", env["EA_COMPILE"] != "0"


def render_table(records: list[dict]) -> str:
    """One row per (shape, threads, OMP_WAIT_POLICY, tiles): each run's median EA/SDPA ratio in run order,
    the range of the single rounds, SDPA's median time and the 1-minute load average (before/after)."""
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault(_row_key(r), []).append(r)
    lines = ["| L, E | threads | OMP_WAIT_POLICY | tiles | EA / SDPA, median of 10 rounds, each run | single rounds | "
             "SDPA ms (median) | load |", "|---|---|---|---|---|---|---|---|"]
    for (L, E, threads, wait, compiled), rs in rows.items():
        lo = min(x["ratio_range"][0] for x in rs)
        hi = max(x["ratio_range"][1] for x in rs)
        sdpa = sorted(ms for x in rs for ms in x["sdpa_ms"])
        loads = [x[k][0] for x in rs for k in ("load_before", "load_after")]
        medians = ", ".join(f"{x['ratio_median']:.2f}" for x in rs)
        tiles = "compiled" if compiled else "plain (EA_COMPILE=0)"
        lines.append(f"| {L}, {E} | {threads} | {wait} | {tiles} | {medians} | {lo:.2f}-{hi:.2f} | "
                     f"{sdpa[len(sdpa) // 2]:.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def test_docs_table_is_the_recorded_runs():
    records = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]
    assert len(records) >= 10
    assert all(len(r["ea_ms"]) == len(r["sdpa_ms"]) == 10 for r in records)
    table = render_table(records)
    assert table in (ROOT / "docs" / "blocked.md").read_text(), "docs/blocked.md: paste render_table(records):\n" + table


def test_script_runs_and_reports_ratios(tmp_path):
    env = {**os.environ, "EA_COMPILE": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "blocked_plain_user.py"), "--L", "128",
                           "--E", "8", "--rounds", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["shape"]["L"] == 128 and r["threads"] == 1 and r["env"]["EA_COMPILE"] == "0"
    assert len(r["ea_ms"]) == len(r["sdpa_ms"]) == 2 and r["ratio_median"] > 0
    assert r["compiled_tiles"] == []
