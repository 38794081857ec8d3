"""The package's shape (issue #11): no import cycle between modules, no module importing another
package's private (underscore) names, and every backend module declaring itself in the table."""
import ast
from pathlib import Path

import pytest

import expressive_attention

PKG = Path(expressive_attention.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, module_level_only: bool):
    """(imported module, [imported names]) for each import in the file; relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
            continue
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


def test_no_import_cycle_between_modules():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for base, names in _imports(name, path, module_level_only=True):
            for n in names:  # `from . import blocked` imports a module
                if f"{base}.{n}" in mods:
                    deps.add(f"{base}.{n}")
            if base in mods and base != name:
                deps.add(base)
        graph[name] = deps
    # a package's __init__ importing its own submodules is how packages work; a cycle through
    # two modules is what we rule out
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in graph[m]:
            if d.startswith(m + ".") or m.startswith(d + ".") or d == m:
                continue  # package <-> its own submodule
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_no_private_names_imported_from_another_package():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        pkg = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
        for base, names in _imports(name, path, module_level_only=False):
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
