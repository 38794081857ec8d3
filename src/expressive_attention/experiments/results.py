"""The results store: one JSON record per line, keyed by a hash of the run's config.

Appends are flushed and fsync'ed one record at a time, so an interrupted sweep loses at most the
run in flight. A line that does not parse (a writer killed mid-line) is dropped with a warning;
`repair()` cuts a torn tail off the file before new records are appended after it.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".sweep.lock"


class OutputInUse(UserError):
    """Another live process is writing into this output folder."""


@contextlib.contextmanager
def _flock(path: Path, blocking: bool):
    """An exclusive OS lock on `path` (created with its folder) for the duration; yields the open file
    (read/append), or None where fcntl is unavailable. Not blocking: raises OSError if another process
    holds it. The OS releases the lock when its holder dies."""
    try:
        import fcntl
    except ImportError:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(out: str | os.PathLike, what: str = "sweep"):
    """Hold an OS lock on OUT/.sweep.lock for the duration: a second sweep into the same folder is
    refused (OutputInUse) instead of training every run twice. The OS releases the lock when its
    holder dies, so a killed sweep never blocks the next one. (No-op where fcntl is unavailable.)"""
    path = Path(out) / LOCK_FILE
    with contextlib.ExitStack() as stack:
        try:
            fh = stack.enter_context(_flock(path, blocking=False))
        except OSError:
            holder = path.read_text().strip() or "unknown process"
            raise OutputInUse(f"{Path(out)} is in use by another {what} ({holder}); wait for it to finish "
                              "or choose another output folder") from None
        if fh is None:
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


WRITE_LOCK_FILE = ".write.lock"


@contextlib.contextmanager
def serialised(out: str | os.PathLike):
    """Wait for, then hold, an OS lock on OUT/.write.lock: for the short steps in which a run appends
    its record or a command rewrites the folder's summary from the records. Two commands writing
    into one folder at once (e.g. workers sharing a queue of runs) then never write a report that
    misses a record the other appended meanwhile. (No-op where fcntl is unavailable.)"""
    with _flock(Path(out) / WRITE_LOCK_FILE, blocking=True):
        yield


# ---------------------------------------------------------------- old field names
# The one place where old names live on. A config is hashed (its results key) under the field names
# it had when results files were first written, so renaming a field changes no key: files on disk
# resume, and their records read. Each map: current name -> name in the hash and in old records.
RUN_KEY_NAMES = {"kind": "attention"}  # RunConfig (experiments/train.py)
# the text LM's config (experiments/text_lm.py), whose fields took nn.LMConfig's names
TEXT_KEY_NAMES = {"n_layers": "layers", "n_heads": "heads", "n_kv_heads": "kv_heads", "context_length": "context"}


# record fields (current -> old): the mechanism's label ("ea-squared") was stored as "kind" (in a
# record and in each row of its curve), a text-LM run's HF implementation name as "impl", a ladder
# rung's label ("T=16") as ladder["label"]. ResultsStore.read() gives every record today's names.
RECORD_NAMES = {"label": "kind", "attn_implementation": "impl"}
LADDER_NAMES = {"rung_label": "label"}


def rename_keys(d: dict, renames: dict[str, str]) -> dict:
    """`d` with each key of `renames` replaced by its value (a copy)."""
    return {renames.get(k, k): v for k, v in d.items()}


def current_names(d: dict, renames: dict[str, str]) -> dict:
    """`d` (a stored config, possibly with old names) under the current names of map `renames`."""
    return rename_keys(d, {old: new for new, old in renames.items()})


def current_record(record: dict) -> dict:
    """A stored record under today's field names (RECORD_NAMES, LADDER_NAMES); its config and key
    stay as stored."""
    r = current_names(record, RECORD_NAMES)
    if isinstance(r.get("ladder"), dict):
        r["ladder"] = current_names(r["ladder"], LADDER_NAMES)
    if isinstance(r.get("curve"), list):
        r["curve"] = [current_names(row, RECORD_NAMES) if isinstance(row, dict) else row for row in r["curve"]]
    return r


def config_key(config: dict[str, Any]) -> str:
    """A stable 16-hex-digit key for a config dict (canonical JSON: sorted keys, no spaces)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ResultsStore:
    """Append-only JSONL store of run records (each a dict with at least "key" and "config")."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path / RESULTS_FILE if path.is_dir() or path.suffix == "" else path

    def _lines(self) -> Iterator[tuple[int, int, bytes]]:
        """(line number, byte offset of the line's start, raw line) for each line in the file."""
        if not self.path.exists():
            return
        offset = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                yield number, offset, line
                offset += len(line)

    @staticmethod
    def _parse(line: bytes) -> dict | None:
        if not line.endswith(b"\n"):
            return None  # a torn write: the newline is written with the record
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and "key" in record else None

    def read(self) -> list[dict]:
        """Every well-formed record, in file order, under today's field names (`current_record`);
        malformed lines are skipped with a warning.

        If one config key appears twice (two sweeps racing on one file), the first record wins."""
        records, seen = [], set()
        for number, _, line in self._lines():
            if not line.strip():
                continue
            record = self._parse(line)
            if record is None:
                warnings.warn(f"{self.path}:{number}: dropping a corrupt or truncated record "
                              f"({len(line)} bytes)", RuntimeWarning, stacklevel=2)
                continue
            if record["key"] not in seen:
                seen.add(record["key"])
                records.append(current_record(record))
        return records

    def keys(self) -> set[str]:
        return {r["key"] for r in self.read()}

    def repair(self) -> int:
        """Cut a torn last line (no trailing newline, or not JSON) off the file, so appends start on
        a fresh line. Returns the number of bytes removed. Corrupt lines in the middle are left in
        place (the reader skips them)."""
        last = collections.deque(self._lines(), maxlen=1)
        if not last:
            return 0
        number, offset, line = last[0]
        if self._parse(line) is not None or not line.strip():
            return 0
        warnings.warn(f"{self.path}:{number}: removing a truncated last record ({len(line)} bytes); "
                      "its run will be redone", RuntimeWarning, stacklevel=2)
        with open(self.path, "r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        return len(line)

    def append(self, record: dict) -> bool:
        """Write one record as one line, then flush and fsync. A key already in the file is never
        written twice: returns False (nothing written) in that case, True otherwise."""
        if "key" not in record:
            raise ValueError("record must have a 'key' (use config_key(config))")
        if any((r := self._parse(line)) and r["key"] == record["key"] for _, _, line in self._lines()):
            warnings.warn(f"{self.path}: a record with key {record['key']} is already there; not "
                          "writing a duplicate", RuntimeWarning, stacklevel=2)
            return False
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return True
