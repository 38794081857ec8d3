"""`ea bench gpu` and benchmarks/gpu_check.sh: without CUDA they stop at once with one line and a
non-zero status; the run's bookkeeping (time budget, records, JSON + markdown) is checked here with
the GPU measurements replaced by stand-ins (the measurements themselves need a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expressive_attention.bench import gpu
from expressive_attention.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_gpu_check_script_without_cuda_exits_nonzero_with_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing was run or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_ea_bench_gpu_without_cuda(capsys, tmp_path):
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


def test_bad_spec_is_named():
    with pytest.raises(ValueError, match="contexts"):
        gpu.GpuBench(contexts=[]).check()
    with pytest.raises(ValueError, match="dtype"):
        gpu.GpuBench(dtype="int8").check()
    with pytest.raises(ValueError, match="variants"):
        gpu.GpuBench(variants=["cubic"]).check()  # not in the variant table
    gpu.GpuBench(variants=["power", "exp_odd"]).check()  # flex-EA runs every variant (triton: its refusal)
    with pytest.raises(ValueError, match="modes"):
        gpu.GpuBench(modes=["bwd"]).check()


def test_gpu_cases_run_the_variants_in_turn_at_each_shape():
    spec = gpu.GpuBench(L=[1024, 2048], E=[64], contexts=[1024], decode_B=[1])
    assert list(spec.variants) == ["saturating", "exp_squared"]  # the paper's EA and the text recommendation
    assert list(spec.modes) == ["fwdbwd", "fwd"]
    what = [(part, w.get("L", w.get("S")), w["variant"]) for part, _, w in gpu.cases(spec)]
    assert what == [("fwdbwd", 1024, "saturating"), ("fwd", 1024, "saturating"),
                    ("fwdbwd", 1024, "exp_squared"), ("fwd", 1024, "exp_squared"),
                    ("fwdbwd", 2048, "saturating"), ("fwd", 2048, "saturating"),
                    ("fwdbwd", 2048, "exp_squared"), ("fwd", 2048, "exp_squared"),
                    ("decode", 1024, "saturating"), ("decode", 1024, "exp_squared")]


def test_ratio_records_triton_flex_and_the_faster():
    r = gpu._ratio({"ea": {"ms": 3.0}, "flex": {"ms": 2.0}, "sdpa": {"ms": 1.0}}, 1e9)
    assert r["ratio"] == 3.0 and r["ratio_flex"] == 2.0 and r["faster"] == "flex" and r["flex"]["tflops"] > 0
    r = gpu._ratio({"ea": {"error": "ValueError: variant='exp_odd' is not implemented"}, "flex": {"ms": 2.0},
                    "sdpa": {"ms": 1.0}}, 1e9)
    assert "ratio" not in r and r["ratio_flex"] == 2.0 and "faster" not in r
    md = gpu.format_markdown([{"part": "fwd", "L": 1024, "E": 64, "B": 16, "variant": "exp_odd", **r}],
                             {"device": "Fake", "torch": "t", "triton": "x", "dtype": "bfloat16", "H": 16,
                              "repeats": 3, "command": "c"})
    assert "## Forward, causal" in md and "| 2.000 | 2.00 | - |" in md and "not implemented" in md


def test_run_records_budget_and_files(monkeypatch, tmp_path):
    # stand-ins for the two GPU measurements; the second training case raises (as an OOM would)
    def training(spec, L, E, variant, mode="fwdbwd"):
        if L == 2048:
            raise RuntimeError("CUDA out of memory\nmore")
        ms = {"ms": 2.0, "repeats": 3, "tflops": 1.0}
        return {"part": "fwdbwd", "L": L, "E": E, "B": spec.tokens // L, "H": spec.H, "variant": variant,
                "ea": dict(ms, ms=3.0), "sdpa": ms, "ratio": 1.5}

    def decode(spec, S, E, B, variant):
        ms = {"ms": 0.01, "repeats": 3, "tflops": 0.1}
        return {"part": "decode", "L": 1, "S": S, "E": E, "B": B, "H": spec.H, "variant": variant,
                "ea": ms, "sdpa": ms, "ratio": 1.0}

    monkeypatch.setattr(gpu, "_training_case", training)
    monkeypatch.setattr(gpu, "_decode_case", decode)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    pytest.importorskip("triton")
    spec = gpu.GpuBench(out=str(tmp_path), L=[1024, 2048], E=[64], contexts=[1024, 4096], decode_B=[1],
                        variants=["saturating"], modes=["fwdbwd"])
    result = gpu.run_gpu_benchmark(spec, progress=False)
    recs = result["records"]
    assert [r["part"] for r in recs] == ["fwdbwd", "fwdbwd", "decode", "decode"]
    assert recs[0]["ratio"] == 1.5 and "out of memory" in recs[1]["error"] and "\n" not in recs[1]["error"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == "Fake GPU" and len(saved["records"]) == 4
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| saturating | 1024 | 64 | 16 | 3.000 | 2.000 | 1.50 |" in md and "out of memory" in md
    # a spent total budget skips the cases left, and says so
    spec.total_budget_s = 0.0
    recs = gpu.run_gpu_benchmark(spec, progress=False)["records"]
    assert all(r.get("skipped") == "total time budget spent" for r in recs)
