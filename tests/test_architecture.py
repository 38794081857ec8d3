"""The package's shape (issues #11, #23): no import cycle between modules, counting every import
(module-level, inside functions, under TYPE_CHECKING); the layering of docs/architecture.md ("Layers"):
a module imports only from its own layer or a lower one; no module importing another package's private
(underscore) names; and every backend module declaring itself in the table."""
import ast
import re
from pathlib import Path

import pytest

import expressive_attention

PKG = Path(expressive_attention.__file__).parent
ROOT = PKG.name  # "expressive_attention"
DOC = PKG.parents[1] / "docs" / "architecture.md"

# Import cycles known and being removed elsewhere (each a set of modules, without the package prefix).
# The test fails on any other cycle, and on an entry here that is no longer exactly a cycle, so the list
# cannot go stale: delete an entry once the branch that removes its cycle has landed.
KNOWN_CYCLES: list[set[str]] = []  # cycles tolerated for now (none): the test fails if one is no longer a cycle


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path):
    """(imported module, [imported names]) for every import in the file, wherever it is (module level,
    in a function, under `if TYPE_CHECKING:`); relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports. `from pkg import x` imports the module pkg.x where x
    is one, else pkg itself (its __init__)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for base, names in _imports(name, path):
            for n in names or [None]:
                if n is not None and f"{base}.{n}" in mods:
                    deps.add(f"{base}.{n}")
                elif base in mods:
                    deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): every module of one lies on
    a cycle through the others."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _short(name: str) -> str:
    return name[len(ROOT) + 1:] if name != ROOT else ROOT


def test_no_import_cycle_between_modules():
    cycles = [{_short(m) for m in c} for c in _cycles(_graph())]
    unknown = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not unknown, f"import cycles (counting every import): {unknown}"
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not stale, f"KNOWN_CYCLES entries that are no longer a cycle (delete them): {stale}"


def test_cycle_finder_counts_function_level_and_type_checking_imports(tmp_path):
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
    (tmp_path / "a.py").write_text(src)
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    assert dict(_imports("p.a", tmp_path / "a.py"))["p.b"] == ["X"]
    assert dict(_imports("p.b", tmp_path / "b.py"))["p"] == ["a"]
    assert _cycles({"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}) == [{"p.a", "p.b"}]


def layers() -> dict[str, int]:
    """The layer of each top-level module and subpackage (without the package prefix; the package's own
    __init__ is `expressive_attention`), read from the table in docs/architecture.md's "Layers" section:
    rows | number | `name`, `name`, ... | what lives there |, lowest first."""
    text = DOC.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    out = {}
    for row in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", text, flags=re.M):
        for name in re.findall(r"`([\w.]+?)(?:/|\.py)?`", row[1]):
            assert name not in out, f"{name} is in two layers"
            out[name] = int(row[0])
    return out


def _unit(name: str) -> str:
    """The top-level module or subpackage a module belongs to ("ops" for ops.problem)."""
    return ROOT if name == ROOT else _short(name).split(".")[0]


def test_every_module_has_a_layer():
    table = layers()
    assert len(set(table.values())) >= 5 and ROOT in table, table
    missing = sorted({_unit(m) for m in _modules()} - set(table))
    assert not missing, f"not in docs/architecture.md's layer table: {missing}"
    stale = sorted(set(table) - {_unit(m) for m in _modules()})
    assert not stale, f"in the layer table but not in the package: {stale}"


def test_modules_import_only_their_own_layer_or_lower():
    """Every import counts (function-level and TYPE_CHECKING ones too); `__main__` modules are entry
    points and may import anything."""
    table = layers()
    bad = []
    for name, deps in _graph().items():
        if name.endswith(".__main__"):
            continue
        for d in deps:
            if table[_unit(d)] > table[_unit(name)]:
                bad.append(f"{_short(name)} (layer {table[_unit(name)]}) imports {_short(d)} (layer {table[_unit(d)]})")
    assert not bad, bad


def test_no_private_names_imported_from_another_package():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        pkg = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
        for base, names in _imports(name, path):
            if not base.startswith("expressive_attention"):
                continue
            target_pkg = base if (base in mods and mods[base].name == "__init__.py") else base.rsplit(".", 1)[0]
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in base.split(".") if p.startswith("_") and not p.startswith("__")]
            if private and target_pkg != pkg:
                bad.append(f"{name}: from {base} import {private}")
    assert not bad, bad


@pytest.mark.parametrize("name", ["reference", "blocked", "fused_cpu", "triton_ea", "linear"])
def test_every_backend_module_declares_itself(name):
    import importlib

    from expressive_attention.ops import BACKENDS, Backend

    mod = importlib.import_module(f"expressive_attention.ops.{name}")
    assert isinstance(mod.BACKEND, Backend) and BACKENDS[mod.BACKEND.name] is mod.BACKEND
    src = (PKG / "ops" / f"{name}.py").read_text()
    assert "dispatch" not in src.split('"""', 2)[-1]  # backends never import the dispatcher
