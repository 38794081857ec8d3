"""`ea bench` runs end to end on tiny shapes and writes well-formed records."""
import json

from expressive_attention.bench.compare import format_table
from expressive_attention.cli import main


def test_bench_tiny_run_writes_records(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--E", "16", "--L", "48", "--B", "1", "--H", "2", "--modes", "fwdbwd",
               "--variants", "squared", "--backends", "blocked", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    recs = data["records"]
    assert [r["impl"] for r in recs] == ["sdpa", "ea"]
    assert all("error" not in r for r in recs), recs
    ea = recs[1]
    assert ea["backend"] == "blocked" and ea["variant"] == "squared" and ea["L"] == 48
    assert ea["time_ms"] > 0 and ea["peak_mb"] >= 0 and data["matmul_peak_gflops"] > 0
    text = capsys.readouterr().out
    assert "ea squared [blocked]" in text and "x SDPA" in text


def test_table_ratios_are_relative_to_sdpa_on_the_same_shape():
    base = dict(E=32, L=256, mode="fwd", variant="saturating", backend="auto")
    recs = [
        {**base, "impl": "sdpa", "time_ms": 2.0, "peak_mb": 4.0, "gflops": 10.0},
        {**base, "impl": "ea", "time_ms": 3.0, "peak_mb": 2.0, "gflops": 5.0},
        {**base, "L": 512, "impl": "sdpa", "time_ms": 8.0, "peak_mb": 8.0, "gflops": 10.0},
        {**base, "L": 512, "impl": "ea", "time_ms": 4.0, "peak_mb": 16.0, "gflops": 20.0},
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
    rc = main(["bench", "--long", "--long-E", "8", "--long-L", "64", "--long-B", "1", "--long-H", "1",
               "--impls", "linear,sdpa", "--long-repeats", "1", "--contexts", "16,32", "--decode-E", "8",
               "--decode-steps", "2", "--long-json", str(out)])
    assert rc == 0
    text = out.read_text()
    assert '"linear"' in text and '"sdpa"' in text and "recurrent" in text
