"""`ea bench` runs end to end on tiny shapes and writes well-formed records."""
import json

import pytest

from expressive_attention.bench.compare import format_table
from expressive_attention.cli import main


def test_bench_tiny_run_writes_records(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "ops", "--E", "16", "--L", "48", "--B", "1", "--H", "2", "--modes", "fwdbwd",
               "--variants", "squared", "--backends", "blocked", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    recs = data["records"]
    assert [r["kind"] for r in recs] == ["dpa", "ea"]
    assert all("error" not in r for r in recs), recs
    ea = recs[1]
    assert ea["backend"] == "blocked" and ea["variant"] == "squared" and ea["L"] == 48
    assert ea["time_ms"] > 0 and ea["peak_mb"] >= 0 and data["matmul_peak_gflops"] > 0
    text = capsys.readouterr().out
    assert "ea squared [blocked]" in text and "x SDPA" in text


def test_bench_interleaved_run_times_each_shape_in_one_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "ops", "--E", "8", "--L", "40,72", "--B", "1", "--H", "2", "--modes", "fwd,fwdbwd",
               "--backends", "blocked,reference", "--repeats", "2", "--interleave", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())["records"]
    assert [(r["L"], r["mode"], r["kind"], r["backend"]) for r in recs[:3]] == [
        (40, "fwd", "dpa", "auto"), (40, "fwd", "ea", "blocked"), (40, "fwd", "ea", "reference")]
    assert len(recs) == 12 and all("error" not in r for r in recs), recs
    assert all(r["time_ms"] > 0 and r["first_ms"] > 0 and r["peak_mb"] >= 0 for r in recs)
    assert "interleaved in one fresh process" in capsys.readouterr().out


def test_interleaved_case_that_raises_is_recorded_and_the_others_run():
    from expressive_attention.bench.measure import Case, run_interleaved_in_process

    base = Case("dpa", 1, 2, 24, 8, repeats=2)
    bad = Case("ea", 1, 2, 24, 8, backend="no-such-backend", repeats=2)
    good = Case("ea", 1, 2, 24, 8, backend="blocked", repeats=2)
    recs = run_interleaved_in_process([base, bad, good])
    assert "no-such-backend" in recs[1]["error"] and "time_ms" not in recs[1]
    assert recs[0]["time_ms"] > 0 and recs[2]["time_ms"] > 0


def test_table_ratios_are_relative_to_sdpa_on_the_same_shape():
    base = dict(E=32, L=256, mode="fwd", variant="saturating", backend="auto")
    recs = [
        {**base, "kind": "dpa", "time_ms": 2.0, "peak_mb": 4.0, "gflops": 10.0},
        {**base, "kind": "ea", "time_ms": 3.0, "peak_mb": 2.0, "gflops": 5.0},
        {**base, "L": 512, "kind": "dpa", "time_ms": 8.0, "peak_mb": 8.0, "gflops": 10.0},
        {**base, "L": 512, "kind": "ea", "time_ms": 4.0, "peak_mb": 16.0, "gflops": 20.0},
    ]
    format_table(recs, peak=100.0)
    assert (recs[1]["time_ratio"], recs[1]["mem_ratio"]) == (1.5, 0.5)
    assert (recs[3]["time_ratio"], recs[3]["mem_ratio"]) == (0.5, 2.0)


def test_model_step_timing_compares_same_model_both_kinds():
    from expressive_attention.bench.model_step import time_training_steps

    r = time_training_steps(dict(context_length=16, d_model=32), batch=2, steps=1, warmup=1)
    assert r["dpa_ms"] > 0 and r["ea_ms"] > 0
    assert abs(r["ratio"] - r["ea_ms"] / r["dpa_ms"]) < 1e-9 and r["params"] > 0


def test_bench_long_tiny_run(tmp_path):
    out = tmp_path / "long.json"
    rc = main(["bench", "long", "--E", "8", "--L", "64", "--B", "1", "--H", "1", "--backends", "linear,sdpa",
               "--repeats", "1", "--rounds", "2", "--contexts", "16,32", "--decode-E", "8", "--decode-steps", "2",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["attention"]] == ["linear", "sdpa"]
    assert all("time_ms" in r for r in data["attention"]), data["attention"]
    for r in data["attention"]:  # two interleaved rounds, the median of their times
        assert len(r["time_ms_rounds"]) == 2 and r["time_ms"] == sum(r["time_ms_rounds"]) / 2
    assert data["threads"] >= 1 and data["load_start"] >= 0
    assert [r["context"] for r in data["decode"]] == [16, 32] and data["decode"][0]["recurrent_ea_us"] > 0


def test_bench_decode_tiny_run(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode", "--contexts", "16,40", "--E", "8", "--B", "1", "--H", "2", "--kv-heads", "2,1",
               "--steps", "5", "--no-flush", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    recs = data["records"]
    assert [(r["Hkv"], r["S"]) for r in recs] == [(2, 16), (2, 40), (1, 16), (1, 40)]
    for r in recs:
        assert r["sdpa_us"] > 0 and r["ea_us"] > 0 and r["ratio"] > 0 and r["L"] == 1 and r["H"] == 2
    assert data["spec"]["steps"] == 5 and data["spec"]["kv_heads"] == [2, 1]
    assert "EA/SDPA over 4 cases" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [(["ops", "--E", "0"], "--E"), (["ops", "--modes", "bwd"], "--modes"),
                                        (["long", "--backends", "flash"], "--backends"),
                                        (["ops", "--variants", "cubic"], "variant"),
                                        (["decode", "--steps", "3"], "steps"),
                                        (["decode", "--H", "4", "--kv-heads", "3"], "kv_heads"),
                                        (["decode", "--variant", "cubic"], "variant")])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    """argparse's own checks and the specs' checks alike: one line on stderr naming the flag, status 2."""
    try:
        status = main(["bench", *argv])
    except SystemExit as e:  # argparse exits by itself
        status = e.code
    assert status == 2
    assert flag in capsys.readouterr().err
