"""Run `ea ladder` on a tiny preset in a subprocess, and kill it mid-sweep (tests of resuming)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SUPPORT = Path(__file__).parent  # ladder_tiny_tasks, for subprocesses and Ray workers
SRC = Path(__file__).parents[2] / "src"


def ladder_cmd(preset_file, out, *flags) -> list[str]:
    """`ea ladder` on `preset_file` into `out`, with the tiny tasks imported and no checkpoints."""
    return [sys.executable, "-m", "expressive_attention.cli", "ladder", "--preset", str(preset_file), "--out",
            str(out), "--import", "ladder_tiny_tasks", "--no-checkpoints", *flags]


def support_env() -> dict[str, str]:
    """The environment with tests/support and src on PYTHONPATH (a subprocess imports the tiny tasks)."""
    path = [str(SUPPORT), str(SRC), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def write_preset(preset, path: Path) -> Path:
    path.write_text(json.dumps(preset.to_dict()))
    return path


def kill_after_first_record(cmd: list[str], store, log_path: Path, timeout: float = 300) -> int:
    """Start `cmd` in its own session, SIGKILL it and its children once `store` holds one record,
    and return how many records it left. Fails if the sweep ended before it could be killed."""
    with open(log_path, "w") as log:  # a file, not a pipe: progress output never blocks the sweep
        proc = subprocess.Popen(cmd, env=support_env(), stdout=log, stderr=log, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and proc.poll() is None:
                if store.path.exists() and store.path.read_bytes().count(b"\n") >= 1:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, log_path.read_text()[-2000:]
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers (or Ray instance), mid-sweep
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return len(store.read())
