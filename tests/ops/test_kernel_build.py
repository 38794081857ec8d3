"""The fused CPU kernel's build never surprises (issue #13): an interrupted build does not make later
calls hang, environments never share a build folder, `build_dir()` is stable, every build announces
itself, tiny problems never wait for a build, a failed build's warning carries the compiler's own
error and points at the caller's line.

The slow compile itself is replaced by stand-ins (a build that sleeps, a compiler that fails) so that
these tests take seconds; the real build is exercised by test_fused_cpu.py."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from expressive_attention import expressive_attention, reference_attention
from expressive_attention.ops import choose_backend, fused_cpu
from expressive_attention.ops.problem import normalise

SRC = str(Path(fused_cpu.__file__).parents[2])  # the package under test

# A child that starts a build whose compile step sleeps (like a long compile), or fails fast.
CHILD = textwrap.dedent("""
    import sys, time, torch
    import torch.utils.cpp_extension as ce
    from expressive_attention import expressive_attention
    mode = sys.argv[1]
    def compile_step(*a, **k):
        if mode == "sleep":
            print("compiling", flush=True)
            time.sleep(600)
        raise RuntimeError("Error building extension: x.cpp:1:1: error: simulated compiler failure")
    ce._write_ninja_file_and_build_library = compile_step
    q = k = v = torch.randn(2, 4, 128, 32)
    out = expressive_attention(q, k, v, is_causal=True)  # big enough for "auto" to want the kernel
    print("done", tuple(out.shape), flush=True)
""")


def _env(tmp_path, **extra):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=SRC, **extra)
    return env


def _start_sleeping_build(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, "sleep"], env=_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "compiling", child.stderr.read()
    return child


def _build_dir_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return fused_cpu.build_dir()


def test_a_build_killed_midway_does_not_hang_the_next_call(tmp_path, monkeypatch):
    d = _build_dir_for(tmp_path, monkeypatch)
    child = _start_sleeping_build(tmp_path)
    assert (d / "lock").exists()  # torch's lock, held by the build in progress
    child.send_signal(signal.SIGKILL)  # as a killed job / timeout would
    child.wait()
    assert (d / "lock").exists()  # left behind: before the fix every later call waited forever
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", CHILD, "fail"], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "done (2, 4, 128, 32)" in r.stdout
    assert "simulated compiler failure" in r.stderr  # it went on to build (and fell back)
    assert not (d / "lock").exists()
    assert time.monotonic() - t0 < 120


def test_waiting_for_another_build_is_bounded_and_names_the_folder(tmp_path, monkeypatch):
    d = _build_dir_for(tmp_path, monkeypatch)
    child = _start_sleeping_build(tmp_path)
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, "fail"], env=_env(tmp_path, EA_BUILD_TIMEOUT="2"),
                           capture_output=True, text=True, timeout=120)
    finally:
        child.kill()
        child.wait()
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout
    assert "for more than 2 s" in r.stderr and str(d) in r.stderr and "EA_BUILD_TIMEOUT" in r.stderr


def test_two_interpreter_paths_get_two_build_folders(tmp_path):
    # A second environment: a venv whose interpreter has another path, seeing the same torch.
    venv = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "parent.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    code = "import sys; from expressive_attention.ops import fused_cpu; print(sys.executable); print(fused_cpu.build_dir())"
    env = _env(tmp_path / "ext")

    def ask(py):
        return subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()

    here, there = ask(sys.executable), ask(venv / "bin" / "python")
    assert here[0] != there[0]  # two interpreter paths in two environments ...
    assert here[1] != there[1]  # ... never share (and rebuild) one folder
    assert ask(sys.executable) == here  # the same interpreter always finds its own
    # `python` and `python3` of one environment (the `ea` script runs the latter) share their build
    python3 = venv / "bin" / "python3"
    assert python3.exists() and ask(python3)[1] == there[1] and ask(python3)[0] != there[0]


def test_build_key_covers_what_the_build_depends_on(monkeypatch):
    d = fused_cpu.build_dir()
    for attr, value in (("executable", "/elsewhere/bin/python"), ("version", sys.version + "+x")):
        with monkeypatch.context() as m:
            m.setattr(sys, attr, value)
            assert fused_cpu.build_dir() != d, attr
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        assert fused_cpu.build_dir() != d
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.1")
        assert fused_cpu.build_dir() != d
    assert fused_cpu.build_dir() == d


def test_build_dir_is_stable_across_loading_the_kernel():
    before, flags = fused_cpu.build_dir(), (fused_cpu.CFLAGS, fused_cpu.LDFLAGS)
    assert fused_cpu.is_available()
    assert fused_cpu.build_dir() == before and (fused_cpu.CFLAGS, fused_cpu.LDFLAGS) == flags
    assert fused_cpu.is_built()


def test_the_build_names_no_checkout_path():
    # Checkouts with the same source share a build folder: the build must compile the folder's own copy,
    # or build.ninja would name each checkout's path in turn and every checkout would rebuild the others'.
    assert fused_cpu.is_available()
    d = fused_cpu.build_dir()
    ninja = (d / "build.ninja").read_text()
    for src in fused_cpu.SOURCES:
        assert str(src) not in ninja
        assert str(d / src.name) in ninja
        assert (d / src.name).read_bytes() == src.read_bytes()


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not loaded the kernel, with an empty cache folder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fused_cpu, "_STATE", {"module": None, "error": None, "warned": False})
    return tmp_path


def test_every_build_announces_itself(fresh_state, monkeypatch, capsys):
    import torch.utils.cpp_extension as ce

    calls = []

    def fake_load(name, **kw):
        calls.append(name)
        if len(calls) < 3:
            raise RuntimeError("simulated failure")
        (Path(kw["build_directory"]) / f"{name}.so").write_bytes(b"")  # what a finished build leaves
        return object()

    monkeypatch.setattr(ce, "load", fake_load)
    for expect_message in (True, True, True, False):  # fails twice, builds, then loads the cached build
        monkeypatch.setattr(fused_cpu, "_STATE", {"module": None, "error": None, "warned": True})
        fused_cpu.load_extension()
        err = capsys.readouterr().err
        assert ("building the fused CPU kernel" in err) == expect_message, (len(calls), err)
    for so in fused_cpu.build_dir().glob("*.so"):  # the library is gone: the next load builds, and says so
        so.unlink()
    monkeypatch.setattr(fused_cpu, "_STATE", {"module": None, "error": None, "warned": True})
    assert not fused_cpu.is_built()
    fused_cpu.load_extension()
    assert "building the fused CPU kernel" in capsys.readouterr().err


def test_tiny_problems_never_wait_for_a_build(fresh_state, monkeypatch):
    def must_not_build():
        raise AssertionError("a tiny problem started the build")

    monkeypatch.setattr(fused_cpu, "_build", must_not_build)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))  # the 2x4x16x8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = expressive_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, reference_attention(q, k, v, is_causal=True))
    assert fused_cpu._STATE["module"] is None and fused_cpu._STATE["error"] is None
    # a problem big enough to gain does start it (here: the stand-in fails, auto falls back)
    big = [torch.randn(2, 4, 256, 32) for _ in range(3)]
    p = normalise(*big, None, 0.0, True, None, False, "saturating", 1e-6)
    with pytest.warns(RuntimeWarning, match="a tiny problem started the build"):
        assert choose_backend(p).name == "blocked"


def test_a_failed_build_warns_with_the_compiler_error_at_the_callers_line(fresh_state, monkeypatch):
    fake = fresh_state / "fakecc"
    fake.write_text("#!/bin/sh\n"  # answers torch's version checks like gcc, fails to compile (under ninja)
                    "case \"$*\" in *dumpfullversion*|*dumpversion*) echo 12.2.0; exit 0;; "
                    "*--version*) echo 'g++ (GCC) 12.2.0'; exit 0;; esac\n"
                    "echo 'ea_cpu.cpp:1:1: error: simulated compiler failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    q, k, v = (torch.randn(2, 4, 256, 32) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expressive_attention(q, k, v, is_causal=True)  # the caller's line
    ours = [w for w in caught if "fused CPU kernel could not be built" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "error: simulated compiler failure" in str(ours[0].message)
    assert "ninja: build stopped" not in str(ours[0].message)
    assert ours[0].filename == __file__
