"""Errors a user can act on: a bad config, bad data, a busy run directory, a missing backend, ...

Each module raises its own subclass of :class:`UserError` (``ConfigError``, ``DataError``,
``CheckpointError``, ...). The CLI catches ``UserError`` in one place, prints the one-line
message and exits with the class's ``exit_code``, without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "UserError",
]


class UserError(Exception):
    """An error with a one-line message the user can act on."""

    exit_code: int = 1  # the CLI's exit status for this error
