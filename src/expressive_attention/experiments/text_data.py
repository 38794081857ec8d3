"""The text of `ea lm`: corpora and tokenizers (no model, no training).

The text is any local files, or one of two corpora every Python install has offline (``corpus``):
"code", the standard library's own source files, and "prose", the English help texts of
``pydoc_data/topics.py`` (the pages `help("topic")` shows, ~0.47 MB). Documents are taken in a fixed
pseudo-random order (crc32 of the name), so a byte budget samples widely; the last ``val_fraction``
of the text (whole files / topics) is held out. Tokens are bytes (vocab 256) or characters (vocab
from the training text).
"""
from __future__ import annotations

import fnmatch
import os
import sysconfig
import zlib
from pathlib import Path

import torch

CORPORA = ("code", "prose")
TOKENIZERS = ("byte", "char")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_files(paths: list[str], glob: str) -> list[Path]:
    """Files named in ``paths`` plus ``glob`` matches under directories (site-packages skipped), in
    a fixed pseudo-random order (crc32 of the relative path) so a byte budget samples widely."""
    roots = [Path(p) for p in paths] if paths else [stdlib_dir()]
    files: list[tuple[int, str, Path]] = []
    for root in roots:
        if root.is_file():
            files.append((zlib.crc32(root.name.encode()), root.name, root))
        elif root.is_dir():
            for d, subdirs, names in os.walk(root):
                subdirs[:] = [s for s in subdirs if s not in _SKIP_DIRS]
                for n in fnmatch.filter(names, glob):
                    f = Path(d) / n
                    rel = f.relative_to(root).as_posix()
                    files.append((zlib.crc32(rel.encode()), rel, f))
        else:
            raise FileNotFoundError(f"text path {str(root)!r} does not exist")
    if not files:
        raise ValueError(f"no files matching {glob!r} under {[str(r) for r in roots]}")
    return [f for _, _, f in sorted(files)]


def prose_documents() -> list[bytes]:
    """The "prose" corpus: the help topics of the standard library's ``pydoc_data/topics.py``
    (English reference text, shipped with every CPython), in a fixed pseudo-random order."""
    from pydoc_data.topics import topics

    return [topics[k].encode("utf-8") for k in sorted(topics, key=lambda k: (zlib.crc32(k.encode()), k))]


def corpus_description(cfg) -> str:
    """One line naming the text of `cfg` (see load_text)."""
    if cfg.paths:
        return ", ".join(cfg.paths)
    if cfg.corpus == "prose":
        return "prose: Python's pydoc help topics (pydoc_data/topics.py)"
    return f"code: Python stdlib source ({stdlib_dir()})"


def load_text(cfg) -> tuple[bytes, bytes, int]:
    """(train bytes, held-out bytes, number of files read) within ``cfg.max_bytes``. ``cfg``: anything
    with ``paths``, ``corpus``, ``glob``, ``max_bytes``, ``val_fraction`` and ``context_length`` (the text LM's
    config): the last ``val_fraction`` of the text is held out, and each part must hold a window."""
    chunks, total = [], 0
    if cfg.paths or cfg.corpus == "code":
        docs = (f.read_bytes() for f in collect_files(cfg.paths, cfg.glob))
    else:
        docs = iter(prose_documents())
    for doc in docs:
        data = doc[: cfg.max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= cfg.max_bytes:
            break
    text = b"\n".join(chunks)
    n_val = int(len(text) * cfg.val_fraction)
    if len(text) - n_val < cfg.context_length + 1 or n_val < cfg.context_length + 1:
        raise ValueError(f"{len(text)} bytes of text is too little for context_length {cfg.context_length}")
    return text[:-n_val], text[-n_val:], len(chunks)


def tokenize(train: bytes, val: bytes, tokenizer: str):
    """-> (train ids, val ids, vocab size, held-out bytes per token); ``tokenizer``: "byte" | "char"."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "byte":
        t = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
        v = torch.frombuffer(bytearray(val), dtype=torch.uint8).long()
        return t, v, 256, 1.0
    tr, va = train.decode("utf-8", errors="replace"), val.decode("utf-8", errors="replace")
    vocab = {c: i + 1 for i, c in enumerate(sorted(set(tr)))}  # 0 = unknown
    t = torch.tensor([vocab[c] for c in tr])
    v = torch.tensor([vocab.get(c, 0) for c in va])
    return t, v, len(vocab) + 1, len(val) / len(va)
