"""`ea train`: one RunConfig from flags or a file; under torchrun (2 processes, gloo) it trains the
same model as one process on the same global batch."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expressive_attention.cli import main
from expressive_attention.cli.train import FIELDS
from expressive_attention.experiments import ResultsStore, RunConfig, train_run
from expressive_attention.experiments.distributed import Shard

SRC = Path(__file__).parent.parent.parent / "src"
# pointer recurrence with a sparse score mask: the two halves of a batch score different token counts
TINY = {"task": "pointer", "task_params": {"T": 4, "V": 8, "seq_len": 16}, "kind": "ea", "d_model": 16,
        "n_layers": 1, "n_heads": 2, "steps": 6, "warmup": 2, "batch_size": 8, "eval_sequences": 64, "lr": 3e-3}


def test_every_run_config_field_has_a_flag():
    assert set(FIELDS) == {f.name for f in dataclasses.fields(RunConfig)}


def test_train_from_flags_and_file(tmp_path, capsys):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({**TINY, "steps": 50}))
    out = tmp_path / "o"
    args = ["train", "--config", str(cfg_file), "--steps", "3", "--kind", "dpa", "--betas", "0.8,0.9",
            "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    (rec,) = ResultsStore(out).read()
    want = RunConfig.from_dict({**TINY, "steps": 3, "kind": "dpa", "betas": (0.8, 0.9)})
    assert rec["key"] == want.key() and rec["steps"] == 3 and rec["label"] == "dpa"
    assert rec["command"].startswith("ea train --config")
    assert Path(rec["checkpoint"]).exists() and "distributed" not in rec
    assert "token" in capsys.readouterr().out
    assert main(args) == 0  # done already: nothing trained, nothing appended
    assert "already in" in capsys.readouterr().out and len(ResultsStore(out).read()) == 1
    # a whole results record works as --config too
    rec_file = tmp_path / "rec.json"
    rec_file.write_text(json.dumps(rec))
    assert main(["train", "--config", str(rec_file), "--out", str(out), "--no-progress"]) == 0
    assert "already in" in capsys.readouterr().out


def test_train_rejects_bad_input(tmp_path, capsys):
    for args, msg in ((["--out", str(tmp_path)], "give --task"),
                      (["--task", "pointer", "--kind", "softmax"], "kind must be one of"),
                      (["--config", str(tmp_path / "nope.json")], "nope.json")):
        assert main(["train", *args, "--out", str(tmp_path)]) == 2  # one line, no traceback
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--task", "pointer", "--task-params", "[1, 2]"])
    assert "--task-params" in capsys.readouterr().err


def test_shard_slices_and_checks_the_batch():
    s = Shard(rank=1, world_size=2, device=torch.device("cpu"))
    assert s.take(torch.arange(8)).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="batch_size 7 must be a multiple of the world size 2"):
        s.check_batch(7)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps(TINY))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "expressive_attention.cli", "train", "--config", str(cfg_file), "--out", str(tmp_path / "ddp"),
           "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (ddp,) = ResultsStore(tmp_path / "ddp").read()  # rank 0 alone wrote
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo"}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_run(RunConfig.from_dict(TINY), checkpoint=tmp_path / "one.pt")
    finally:
        torch.set_num_threads(threads)
    assert ddp["key"] == one["key"]
    for a, b in zip(ddp["curve"], one["curve"]):  # the training loss of the global batch, step by step
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["token_acc"] == b["token_acc"]
    assert ddp["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-4)
    assert abs(ddp["metrics"]["token_acc"] - one["metrics"]["token_acc"]) <= 2 / one["metrics"]["scored_tokens"]
    sa = torch.load(ddp["checkpoint"], weights_only=True)["state_dict"]
    sb = torch.load(one["checkpoint"], weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the weights did move: the comparison is not of two untrained models
    init = RunConfig.from_dict(TINY)
    from expressive_attention.experiments.train import build
    _, model0 = build(init)
    assert any((model0.state_dict()[k] - sb[k]).abs().max() > 1e-3 for k in sb)
