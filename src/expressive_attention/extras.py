"""Optional dependencies, grouped as pip extras (pyproject.toml): check them before any work.

    require("cli", "ea ladder")           # raises MissingExtra naming `pip install "expressive-attention[cli]"`
    has("matplotlib")                     # optional niceties (plots) are skipped with a note instead
"""
from __future__ import annotations

import importlib.util

from .errors import MissingExtra

PACKAGE = "expressive-attention"
# extra -> the modules it brings (kept equal to pyproject.toml's optional-dependencies by a test)
EXTRAS: dict[str, tuple[str, ...]] = {
    "cli": ("tqdm", "matplotlib", "scipy"),
    "hf": ("transformers",),
    "triton": ("triton",),
    "ray": ("ray",),
}


def has(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[module] = None
        return False


def install_hint(extra: str) -> str:
    return f'pip install "{PACKAGE}[{extra}]"'


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of `extra` (or the given subset of them) that are not installed."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    return [m for m in (modules or EXTRAS[extra]) if not has(m)]


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtra, naming the pip command, unless every module of `extra` is installed."""
    gone = missing(extra, modules)
    if gone:
        raise MissingExtra(f"{what} needs {', '.join(gone)}, from the [{extra}] extra: {install_hint(extra)}")
