"""Renamed public arguments and fields: the old name keeps working and issues a DeprecationWarning.

    kind = renamed_kwarg(deprecated, "attention", "kind", kind, default="ea", owner="MultiheadAttention")
    @renamed_fields(attention="kind")            # on a dataclass: old keyword, old attribute, old dict key
"""
from __future__ import annotations

import functools
import warnings
from typing import Any


def warn_renamed(owner: str, old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{owner}: `{old}` is deprecated, use `{new}` (same values)", DeprecationWarning,
                  stacklevel=stacklevel + 1)


def renamed_kwarg(kwargs: dict, old: str, new: str, value: Any, default: Any, owner: str) -> Any:
    """The value of argument `new`, taking it from `kwargs[old]` (popped, with a warning) when the caller
    used the old name. Passing both names with different values is a TypeError."""
    if old not in kwargs:
        return value
    old_value = kwargs.pop(old)
    warn_renamed(owner, old, new)
    if value != default and value != old_value:
        raise TypeError(f"{owner}: got {new}={value!r} and its deprecated name {old}={old_value!r}; pass {new} only")
    return old_value


def reject_unknown(kwargs: dict, owner: str) -> None:
    if kwargs:
        raise TypeError(f"{owner}() got unexpected keyword argument(s) {sorted(kwargs)}")


def renamed_fields(**renames: str):
    """Class decorator for a dataclass whose fields `renames[old]` were once called `old`: the old name
    is accepted as a keyword of the constructor and as an attribute (both warn), and `rename_keys`
    maps a stored dict (a checkpoint, a results record) from old to new names, silently."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    warn_renamed(cls.__name__, old, new, stacklevel=2)
                    if new in kwargs and kwargs[new] != kwargs[old]:
                        raise TypeError(f"{cls.__name__}: got {new}= and its deprecated name {old}=; pass {new} only")
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        for old, new in renames.items():
            setattr(cls, old, deprecated_alias(cls.__name__, old, new))
        cls.renamed_fields = dict(renames)
        return cls

    return decorate


def rename_keys(d: dict, renames: dict[str, str]) -> dict:
    """`d` with each old key of `renames` replaced by its new name (a copy)."""
    return {renames.get(k, k): v for k, v in d.items()}


def deprecated_alias(owner: str, old: str, new: str) -> property:
    def get(self):
        warn_renamed(owner, old, new, stacklevel=2)
        return getattr(self, new)

    def set_(self, value):
        warn_renamed(owner, old, new, stacklevel=2)
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated name of `{new}`.")
