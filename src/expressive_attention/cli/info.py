"""`ea info`: versions, available backends (and why not), the kernel build folder; `--build`
(see expressive_attention.info)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..info import __doc__ as doc
    from ..info import add_arguments

    p = subparsers.add_parser("info", help="versions, available backends (and why not), kernel build folder",
                              description=doc)
    add_arguments(p)
    return p
