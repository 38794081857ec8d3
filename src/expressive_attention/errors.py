"""Errors a user can fix. The `ea` command prints them as one line and exits with status 2."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the command line, a preset, an output folder, ... (not a bug: no traceback)."""


class MissingExtra(UserError, ImportError):
    """An optional dependency (a pip "extra") that this command needs is not installed."""
