"""`ea info` (or `python -m expressive_attention.info`): versions, which backends can run here and
why not, the fused CPU kernel's build folder; `--build` compiles that kernel ahead of time."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import time

from .extras import EXTRAS, has, install_hint


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    """The versions a record or report names: this package, torch, numpy, Python."""
    import numpy as np
    import torch

    from . import __version__

    return {"expressive_attention": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def machine() -> dict:
    """The machine a record or report was made on: platform, processor, cores, torch threads."""
    import os

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _probe(device: str, variant: str):
    """A small checked problem for asking each backend whether it could run here."""
    import torch

    from .ops.problem import normalise

    x = torch.zeros(1, 1, 8, 16, device=device)
    return normalise(x, x, x, None, 0.0, True, None, False, variant, 1e-6)


def backend_lines() -> list[str]:
    """One line per registered backend: available (and for what), or why not."""
    import torch

    from .ops import BACKENDS
    from .ops import fused_cpu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = []
    for name, b in BACKENDS.items():
        if name == "fused_cpu" and not fused_cpu.is_built() and fused_cpu.build_error() is None:
            lines.append(f"  {name:<10} not built yet: builds on first use (~1 min) or now with `ea info --build`"
                         f" (into {fused_cpu.build_dir()})")
            continue
        variant = "squared" if name == "linear" else "saturating"
        reason = b.unsupported(_probe("cpu" if name == "fused_cpu" else device, variant))
        status = "available" if reason is None else f"unavailable: {reason}"
        if name == "linear" and reason is None:
            helpers = "built" if fused_cpu.is_built() else "not built yet: torch ops until then"
            status += f" (variant='squared' only; C++ feature helpers, in the fused kernel's build: {helpers})"
        if name == "flex" and reason is None:
            status += (" (CUDA: forward + backward; auto picks it where triton cannot run a call)" if device == "cuda"
                       else " (CPU: forward only, no gradients; auto never picks it on CPU)")
        variants = "all" if b.variants is None else ",".join(b.variants)
        lines.append(f"  {name:<10} {status}   [{b.description}; variants: {variants}]")
    return lines


def variant_lines() -> list[str]:
    """One line per entry of the variant table (ops/variants.py)."""
    from .ops.variants import VARIANT_TABLE

    lines = []
    for name, v in VARIANT_TABLE.items():
        tags = ["exp-type" if v.exp_type else None, "control, not EA" if not v.paper else None,
                f"params: {', '.join(v.params)}" if v.params else None, "has a linear form" if v.linear else None]
        tags = "; ".join(t for t in tags if t)
        lines.append(f"  {name:<12} {v.description}" + (f" ({tags})" if tags else ""))
    return lines


def report() -> str:
    import torch

    from . import __version__
    from .ops import fused_cpu

    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available() else "no CUDA device")
    lines = [
        f"expressive-attention {__version__}",
        f"Python {platform.python_version()} ({sys.executable}), {platform.platform()}",
        f"torch {torch.__version__} ({cuda}; {torch.get_num_threads()} CPU threads)",
        f"numpy {_version('numpy')}, ninja {_version('ninja')}",
        "extras:",
    ]
    for extra, modules in EXTRAS.items():
        gone = [m for m in modules if not has(m)]
        found = ", ".join(f"{m} {_version(m)}" for m in modules if m not in gone)
        status = "ok" if not gone else f"missing {', '.join(gone)}: {install_hint(extra)}"
        lines.append(f"  [{extra}] {status}" + (f" ({found})" if found and gone else f": {found}" if found else ""))
    lines += ["backends (backend=\"auto\" picks the fastest that supports a call):", *backend_lines()]
    lines += ["variants (variant=..., the table in ops/variants.py):", *variant_lines()]
    lines.append(f"fused CPU kernel build folder: {fused_cpu.build_dir()}"
                 + (" (built)" if fused_cpu.is_built() else " (not built)"))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", action="store_true",
                   help="compile the fused CPU kernel now (one time, ~1 min) instead of on first use")
    p.set_defaults(func=run)


def run(args) -> int:
    from .ops import fused_cpu

    if args.build:
        t0 = time.perf_counter()
        if not fused_cpu.is_available():
            print(f"ea info: the fused CPU kernel could not be built: {fused_cpu.build_error()}", file=sys.stderr)
            print(report())
            return 1
        print(f"fused CPU kernel ready in {fused_cpu.build_dir()} ({time.perf_counter() - t0:.0f} s)")
    print(report())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expressive_attention.info", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
