"""The ladder's executors: Ray (a local 2-CPU instance) gives the pool's records; failures and lost
workers are reported or retried while the rest goes on; a killed Ray driver resumes; Ray stays
unimported unless asked for; the CLI refuses flags that do not apply."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ladder_tiny_tasks import tiny_preset  # registers "tiny_lag"
from sweep_kill import kill_after_first_record, ladder_cmd, support_env, write_preset

from expressive_attention.cli import main
from expressive_attention.experiments import Family, Preset, ResultsStore, run_ladder
from expressive_attention.experiments.executors import RayExecutor, make_executor



@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_executor(**kw):
    return RayExecutor(imports=["ladder_tiny_tasks"], **kw)


def test_ray_gives_the_pool_records_and_checkpoints(tmp_path, local_ray):
    preset = tiny_preset(seeds=1)
    pool = run_ladder(preset, tmp_path / "pool", workers=2, imports=["ladder_tiny_tasks"], progress=False,
                      report=False)
    ray_res = run_ladder(preset, tmp_path / "ray", executor=_ray_executor(), progress=True, report=False)  # the progress actor too
    assert pool["ran"] == ray_res["ran"] == 6 and not pool["failed"] and not ray_res["failed"]
    a = {r["key"]: r for r in ResultsStore(tmp_path / "pool").read()}
    b = {r["key"]: r for r in ResultsStore(tmp_path / "ray").read()}
    assert set(a) == set(b) == {p.config.key() for p in preset.grid()}
    for key in a:
        assert a[key]["metrics"] == b[key]["metrics"]  # one torch thread per run in both: same numbers
        assert a[key]["curve"] == b[key]["curve"]
        assert b[key]["ladder"] == a[key]["ladder"]
        # the checkpoint travelled back to the driver's --out
        assert Path(b[key]["checkpoint"]) == tmp_path / "ray" / "checkpoints" / f"{key}.pt"
        sa = torch.load(a[key]["checkpoint"], weights_only=True)["state_dict"]
        sb = torch.load(b[key]["checkpoint"], weights_only=True)["state_dict"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    sweep = json.loads((tmp_path / "ray" / "sweeps.jsonl").read_text().splitlines()[-1])
    assert sweep["executor"].startswith("ray") and sweep["ran"] == 6

    again = run_ladder(preset, tmp_path / "ray", executor=_ray_executor(), progress=False, report=False)
    assert again["ran"] == 0 and again["skipped"] == 6


def test_ray_failures_are_reported_lost_workers_retried(tmp_path, local_ray):
    marker = tmp_path / "died-once"
    rungs = [{"lag": 1}, {"lag": 1, "fail": "raise"}, {"lag": 1, "fail": "die"},
             {"lag": 2, "fail": f"die-once:{marker}"}]
    preset = Preset(name="faults", seeds=1, kinds=("dpa",),
                    base={"d_model": 16, "n_layers": 1, "n_heads": 2, "steps": 4, "warmup": 1, "batch_size": 8,
                          "eval_sequences": 16},
                    families={"tiny": Family("tiny_lag", rungs, labels=["ok", "raises", "dies", "dies-once"])})
    storage = tmp_path / "shared"
    res = run_ladder(preset, tmp_path / "out", executor=_ray_executor(max_retries=1, ship_checkpoints=False),
                     storage=storage, progress=False, report=False)
    failed = dict(res["failed"])
    assert sorted(failed) == ["tiny dies dpa s0", "tiny raises dpa s0"]
    assert "RuntimeError: injected failure" in failed["tiny raises dpa s0"]  # the run's own traceback
    assert "Traceback" in failed["tiny dies dpa s0"] and "died" in failed["tiny dies dpa s0"].lower()
    assert marker.exists()  # the first attempt of "dies-once" died; Ray's retry finished it
    records = {r["ladder"]["rung_label"]: r for r in ResultsStore(tmp_path / "out").read()}
    assert sorted(records) == ["dies-once", "ok"] and res["ran"] == 2
    for r in records.values():  # with shared storage the tasks wrote the checkpoints themselves
        assert Path(r["checkpoint"]).parent == storage / "checkpoints" and Path(r["checkpoint"]).exists()


def test_ray_warns_when_no_run_fits_the_cluster(local_ray):
    with pytest.warns(RuntimeWarning, match="1 GPUs, but the cluster has 2 CPUs and 0 GPUs"):
        _ray_executor(gpus_per_run=1)._check_resources(local_ray)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ray_executor(cpus_per_run=2)._check_resources(local_ray)


@pytest.mark.slow
def test_killed_ray_driver_restarts_to_one_record_per_config(tmp_path):
    preset = tiny_preset(name="killray", steps=20, delay=0.05)  # >= 1 s per run on any machine
    preset_file = write_preset(preset, tmp_path / "p.json")
    out = tmp_path / "out"
    flags = ("--executor", "ray", "--address", "local")  # a fresh local instance, whatever else runs
    store = ResultsStore(out)
    n_before = kill_after_first_record(ladder_cmd(preset_file, out, *flags), store, tmp_path / "first.log")
    assert 1 <= n_before < 12, "the sweep was not interrupted mid-way"

    done = subprocess.run(ladder_cmd(preset_file, out, *flags), env=support_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: {n_before} of 12" in done.stdout + done.stderr
    keys = [json.loads(line)["key"] for line in store.path.read_text().splitlines()]
    assert sorted(keys) == sorted(p.config.key() for p in preset.grid())  # each exactly once
    assert (out / "report.md").exists()


def test_ray_is_not_imported_unless_asked_for(tmp_path):
    preset_file = tmp_path / "p.json"
    preset_file.write_text(json.dumps(tiny_preset(name="noray", seeds=1, steps=2).to_dict()))
    code = f"""
import sys
from expressive_attention.cli import main
assert main({ladder_cmd(preset_file, tmp_path / 'o', '--workers', '1')[3:]!r}) == 0
assert main({ladder_cmd(preset_file, tmp_path / 'o', '--list')[3:]!r}) == 0
assert main(['train', '--task', 'tiny_lag', '--import', 'ladder_tiny_tasks', '--steps', '2', '--d-model', '8',
             '--n-heads', '2', '--n-layers', '1', '--eval-sequences', '8', '--out', {str(tmp_path / 't')!r},
             '--no-progress']) == 0
import expressive_attention.experiments.executors
bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))
assert not bad, bad
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], env=support_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    assert len(ResultsStore(tmp_path / "o").read()) == 6


def test_executor_flags_that_do_not_apply_are_errors(tmp_path, capsys, monkeypatch):
    base = ["ladder", "--preset", "quick", "--out", str(tmp_path)]
    for flags, msg in ((["--address", "auto"], "--address apply to --executor ray only"),
                       (["--executor", "pool", "--cpus-per-run", "2"], "--cpus-per-run apply"),
                       (["--executor", "ray", "--workers", "2"], "--workers sets the local pool"),
                       (["--executor", "ray", "--threads", "2"], "--cpus-per-run sets each run's threads"),
                       (["--executor", "serial", "--workers", "2"], "drop --workers"),
                       (["--storage", str(tmp_path), "--no-checkpoints"], "contradicts --no-checkpoints")):
        assert main(base + flags + ["--list"]) == 2  # one line, before any work
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--executor", "ray", "--gpus-per-run", "-1"])
    assert "--gpus-per-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--executor", "dask"])
    assert "--executor" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ray executor only"):
        make_executor("pool", workers=2, address="auto")
    with pytest.raises(ValueError, match="executor must be one of"):
        make_executor("dask")
    with pytest.raises(ValueError, match="cpus_per_run"):
        RayExecutor(cpus_per_run=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(base + ["--executor", "ray", "--list"]) == 2  # named before any work
    assert 'pip install "expressive-attention[ray]"' in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"expressive-attention\[ray\]"):
        RayExecutor().run([], lambda *a: None, progress=False)


def test_threads_flag_reaches_the_runs(tmp_path, monkeypatch):
    """`--threads N` is each local run's torch thread count (the serial run sets it in this process)."""
    import expressive_attention.experiments.ladder as ladder_mod

    seen = {}

    def fake_run_ladder(preset, out, **kw):
        seen.update(kw)
        return {"ran": 0, "skipped": 0, "failed": []}

    monkeypatch.setattr(ladder_mod, "run_ladder", fake_run_ladder)  # the command imports it at call time
    assert main(["ladder", "--preset", "quick", "--out", str(tmp_path), "--workers", "1", "--threads", "1"]) == 0
    assert seen["threads"] == 1 and seen["workers"] == 1
