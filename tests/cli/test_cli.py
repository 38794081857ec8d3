"""The `ea` command: every subcommand module is listed and parses; `ea tasks` runs."""
import subprocess
import sys

import pytest

from expressive_attention.cli import SUBCOMMANDS, main


def test_every_subcommand_is_registered_with_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in SUBCOMMANDS)


def test_tasks_lists_every_rung(capsys):
    assert main(["tasks", "--batch", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "pointer" in out and "recall" in out and "multitask" in out
    with pytest.raises(SystemExit):
        main(["tasks", "--batch", "0"])


def test_module_entry_points_run():
    for mod in ("expressive_attention.cli", "expressive_attention.tasks"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout, r.stderr
