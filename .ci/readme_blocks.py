"""Run the README's ```python blocks in order, in one namespace (CI's core-only smoke test).

A block that imports a module which is not installed (e.g. transformers, from the [hf] extra) is
skipped with a line saying so; any other error fails. Usage: python .ci/readme_blocks.py README.md
"""
import importlib.util
import re
import sys
import time
from pathlib import Path

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", re.M)


def main(path: str) -> int:
    blocks = BLOCK.findall(Path(path).read_text())
    if not blocks:
        print(f"{path}: no python blocks found", file=sys.stderr)
        return 1
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for i, code in enumerate(blocks, 1):
        missing = sorted({m for m in IMPORT.findall(code) if importlib.util.find_spec(m) is None})
        if missing:
            print(f"block {i}: skipped (needs {', '.join(missing)}, not installed)")
            continue
        t0 = time.perf_counter()
        exec(compile(code, f"{path}:block{i}", "exec"), namespace)
        ran += 1
        print(f"block {i}: ok ({time.perf_counter() - t0:.1f} s)")
    print(f"{ran} of {len(blocks)} blocks ran")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
