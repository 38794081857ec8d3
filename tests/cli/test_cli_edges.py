"""The `ea` command at its edges (issue #13): missing extras are named before any work, no
matplotlib still gives report.md and tables, user errors are one line with exit status 2, Ctrl-C says
how to resume, a second sweep on one --out is refused, no key is written twice, `ea --version`."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

import expressive_attention
from expressive_attention.cli import main
from expressive_attention.experiments import ResultsStore
from expressive_attention.experiments.results import exclusive
from expressive_attention.extras import EXTRAS
from ladder_tiny_tasks import tiny_preset  # tests/support, on pytest's pythonpath (registers "tiny_lag")

TESTS = Path(__file__).parents[1]

SRC = str(Path(expressive_attention.__file__).parents[1])  # the package under test
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(TESTS / "support")])}  # for `--import ladder_tiny_tasks`


def _hidden(*modules: str) -> list[str]:
    """`python -c` that runs `ea` with `modules` hidden, as in an install without their extra."""
    code = (f"import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
            "from expressive_attention.cli import main\nsys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code]


def _preset_file(tmp_path, **kw) -> Path:
    pf = tmp_path / "tiny.json"
    pf.write_text(json.dumps(tiny_preset(**kw).to_dict()))
    return pf


def _ladder_args(pf, out, *extra):
    return ["ladder", "--preset", str(pf), "--out", str(out), "--import", "ladder_tiny_tasks", "--workers", "1",
            "--no-checkpoints", *extra]


def test_extras_table_matches_pyproject():
    meta = tomllib.loads((Path(SRC).parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = {req.split(">")[0].split("=")[0].split("<")[0].strip() for req in meta[extra]}
        assert names == set(modules), extra


@pytest.mark.parametrize("command,extra", [("ladder", "cli"), ("lm", "hf")])
def test_missing_extras_are_named_before_any_work(tmp_path, command, extra):
    out = tmp_path / "out"
    args = _ladder_args(_preset_file(tmp_path), out) if command == "ladder" else ["lm", "--out", str(out)]
    r = subprocess.run(_hidden("tqdm", "matplotlib", "transformers") + args, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f'pip install "expressive-attention[{extra}]"' in lines[0], r.stderr
    assert not (out / "results.jsonl").exists() and not (out / "lm_curves.csv").exists()  # no work done


def test_ladder_without_matplotlib_writes_report_and_skips_plots(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(_hidden("matplotlib") + _ladder_args(_preset_file(tmp_path, seeds=1, steps=3), out),
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "plot skipped: matplotlib is not installed" in report and "| tiny | lag=2 |" in report
    assert not (out / "ladder.png").exists() and (out / "summary.csv").exists()
    assert len(ResultsStore(out).read()) == 6


def test_lm_outputs_without_matplotlib(tmp_path, monkeypatch, capsys):
    from dataclasses import asdict

    from expressive_attention import extras
    from expressive_attention.experiments import text_lm, text_study

    monkeypatch.setattr(extras, "has", lambda m: m != "matplotlib")
    rec = dict(key="k", label="dpa", attn_implementation="sdpa", lr=2e-3, seed=0, val_loss=1.0, val_bpb=1.5, train_seconds=3.0,
               wall_seconds=4.0, curve=[{"label": "dpa", "step": 1, "val_bpb": 1.5, "train_loss": 1.0}], diagnosis={})
    summary = dict(config=asdict(text_lm.TextLMConfig()), runs=["dpa"], corpus="code", tokens_per_run=1,
                   train_bytes=1, val_bytes=1, torch="t", transformers="t", threads=1)
    summary = text_study.write_outputs([rec], summary, tmp_path)
    assert set(summary["paths"]) == {"csv", "json", "report"} and "plot skipped" in capsys.readouterr().out
    assert "| dpa | 0.002 | 1.500 ± 0.000 |" in text_study.format_table(summary)
    assert "lm_curves.png" not in (tmp_path / "report.md").read_text()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from expressive_attention import __version__
    assert capsys.readouterr().out.startswith(f"expressive-attention {__version__} (torch ")


def _bad_preset(tmp_path, text: str) -> str:
    p = tmp_path / f"bad{len(list(tmp_path.glob('bad*.json')))}.json"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("case", ["unknown preset", "missing file", "malformed json", "not an object",
                                  "unknown field", "unknown task family", "unknown kind", "bad variant",
                                  "unknown task", "unknown task parameter", "heads do not divide d_model",
                                  "out is a file", "geometry of a non-checkpoint", "geometry of nothing"])
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, case):
    pf = str(_preset_file(tmp_path))
    d = tiny_preset().to_dict()
    args, match = {
        "unknown preset": (["ladder", "--preset", "huge", "--list"], "preset must be one of"),
        "missing file": (["ladder", "--preset", "missing.json", "--list"], "preset file missing.json does not exist"),
        "malformed json": (["ladder", "--preset", _bad_preset(tmp_path, "{oops"), "--list"], "not valid JSON"),
        "not an object": (["ladder", "--preset", _bad_preset(tmp_path, "[1]"), "--list"], "JSON object"),
        "unknown field": (["ladder", "--preset", _bad_preset(tmp_path, json.dumps({**d, "colour": 1})), "--list"],
                          "colour"),
        "unknown task family": (["ladder", "--preset", "quick", "--tasks", "nope", "--list"], "unknown task families"),
        "unknown kind": (["ladder", "--preset", "quick", "--kinds", "softmax", "--list"], "kinds"),
        "bad variant": (["ladder", "--preset", "quick", "--variants", "cubed", "--list"], "variant must be one of"),
        "unknown task": (["ladder", "--preset", _bad_preset(tmp_path, json.dumps(
            {**d, "families": {"x": {"task": "no_such_task", "rungs": [{}]}}})), "--list"], "no_such_task"),
        "unknown task parameter": (["ladder", "--preset", _bad_preset(tmp_path, json.dumps(
            {**d, "families": {"x": {"task": "pointer", "rungs": [{"T": 2}, {"T": 4, "colour": 3}]}}})), "--list"],
            "colour"),
        "heads do not divide d_model": (["ladder", "--preset", _bad_preset(tmp_path, json.dumps(
            {**d, "base": {**d["base"], "d_model": 18, "n_heads": 4}})), "--import", "ladder_tiny_tasks", "--list"],
            "divisible"),
        "out is a file": (["ladder", "--preset", pf, "--import", "ladder_tiny_tasks", "--out", pf, "--list"],
                          "not a directory"),
        "geometry of a non-checkpoint": (["geometry", pf], "not a checkpoint"),
        "geometry of nothing": (["geometry", str(tmp_path / "missing")], "neither"),
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ea {args[0]}: error:") and match in err[0], err


def test_list_validates_the_whole_grid_before_any_work(tmp_path, capsys):
    # rung 2 of 3 is broken: a real run used to train rung 1 and then fail; now nothing runs
    d = tiny_preset().to_dict()
    d["families"]["tiny"]["rungs"][1]["colour"] = 1
    out = tmp_path / "out"
    pf = _bad_preset(tmp_path, json.dumps(d))
    assert main(["ladder", "--preset", pf, "--import", "ladder_tiny_tasks", "--out", str(out), "--workers", "1"]) == 2
    assert "rung lag=2" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()


def test_a_second_sweep_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with exclusive(out, "ladder sweep"):  # as another live sweep holds it
        assert main(_ladder_args(_preset_file(tmp_path), out)) == 2
        err = capsys.readouterr().err
        assert "is in use by another ladder sweep" in err and f"pid {os.getpid()}" in err
    assert not (out / "results.jsonl").exists()


def test_duplicate_keys_are_never_written(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.append({"key": "a" * 16, "config": {}})
    with pytest.warns(RuntimeWarning, match="not writing a duplicate"):
        assert not store.append({"key": "a" * 16, "config": {"other": 1}})
    assert len(store.path.read_text().splitlines()) == 1
    # a grid listing one config twice trains it once
    from expressive_attention.experiments import run_ladder
    p = tiny_preset(seeds=1, steps=2)
    p.families["again"] = p.families["tiny"]
    res = run_ladder(p, tmp_path / "grid", workers=1, progress=False, report=False, checkpoints=False)
    keys = [json.loads(x)["key"] for x in (tmp_path / "grid" / "results.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 6 and res["ran"] == 6


def _default_sigint():
    """In the child before exec: SIGINT at its default and not blocked, as in a terminal. Both survive exec:
    a process that ignores SIGINT passes that on (Python then installs no KeyboardInterrupt handler), and one
    whose thread has SIGINT blocked passes on the mask (the signal would stay pending for ever); a test run
    may do either (an xdist worker after some in-process Ray, pool or multiprocessing test)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sigint_state(pid: int) -> dict[str, bool]:
    """Whether `pid` blocks, ignores and catches SIGINT (Linux: the masks of /proc/PID/status)."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    bit = 1 << (signal.SIGINT - 1)
    return {name: bool(int(fields[key], 16) & bit)
            for name, key in (("blocked", "SigBlk"), ("ignored", "SigIgn"), ("caught", "SigCgt"))}


@pytest.mark.parametrize("workers", ["1", "2"], ids=["serial", "pool"])
def test_ctrl_c_ends_with_one_line_saying_how_to_resume(tmp_path, workers):
    # The signal goes to a run known to be blocked (the task creates `blocked` when it starts to wait for it),
    # after rung 1 has finished: deterministic however loaded the machine. Serial: the run is in the process
    # that gets the signal; pool: it is in a worker (which ignores SIGINT) and the parent ends the pool. The
    # sweep runs with PYTHONFAULTHANDLER set: if it outlives the signal, SIGABRT makes it print every thread's
    # stack into the log that the failure shows (where it was, not only that it hung).
    out, blocked, log_path = tmp_path / "out", tmp_path / "blocked", tmp_path / "log"
    pf = _preset_file(tmp_path, steps=20, hang=str(blocked))  # rung 1 finishes, later runs block until the signal
    log = open(log_path, "w")
    args = [*_ladder_args(pf, out)]
    args[args.index("--workers") + 1] = workers
    proc = subprocess.Popen([sys.executable, "-m", "expressive_attention.cli", *args],
                            env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=log, stderr=log,
                            start_new_session=True, preexec_fn=_default_sigint)

    def tail() -> str:
        return log_path.read_text()[-4000:]

    try:
        store, deadline = ResultsStore(out), time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (
                blocked.exists() and store.path.exists() and len(store.read()) >= 2):
            time.sleep(0.05)
        assert proc.poll() is None and blocked.exists(), tail()
        state = _sigint_state(proc.pid)  # Python's own KeyboardInterrupt handler, nothing masking it
        assert state == {"blocked": False, "ignored": False, "caught": True}, state
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        try:
            status = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            state = _sigint_state(proc.pid)
            os.kill(proc.pid, signal.SIGABRT)  # faulthandler: every thread's stack into the log
            proc.wait(timeout=30)
            pytest.fail(f"the sweep did not end within 120 s of Ctrl-C (SIGINT {state}); its output:\n{tail()}")
        assert status == 130, f"exit status {status}; its output:\n{tail()}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("ea ladder: interrupted.") and "run the same command again to resume" in last
    assert str(out / "results.jsonl") in last
    assert len(ResultsStore(out).read()) == 2  # rung 1's runs kept; nothing of the interrupted ones


def test_info_lists_versions_backends_and_build_folder(capsys):
    from expressive_attention import __version__
    from expressive_attention.ops import BACKENDS, fused_cpu

    assert main(["info", "--build"]) == 0  # the kernel is built already (the suite's other tests)
    out = capsys.readouterr().out
    assert f"expressive-attention {__version__}" in out and "torch " in out
    for name in BACKENDS:
        assert re.search(rf"^  {name} +(available|unavailable: .+|not built yet.*)", out, re.M), name
    assert re.search(r"^  triton +unavailable: .*CUDA", out, re.M)  # says why not (no GPU here)
    assert f"build folder: {fused_cpu.build_dir()} (built)" in out
    assert "fused CPU kernel ready in" in out
    assert "C++ feature helpers, in the fused kernel's build: built" in out  # the linear form's
    assert re.search(r"^  \[cli\] ", out, re.M)


def test_info_says_how_to_build_when_not_built(tmp_path, monkeypatch, capsys):
    from expressive_attention.ops import fused_cpu

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fused_cpu, "_STATE", {"module": None, "error": None, "warned": False})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fused_cpu  not built yet" in out and "ea info --build" in out
    assert "C++ feature helpers, in the fused kernel's build: not built yet" in out
    assert fused_cpu._STATE["module"] is None  # `ea info` alone builds nothing
