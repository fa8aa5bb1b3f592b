"""What a run prints to the terminal: log lines above the progress bars, never inside them,
and ``--quiet`` for batch jobs (no bars; only warnings and errors; log.txt keeps everything).

The setting is the process's, not the run's: it is never written to config.yaml and may change
between a run and its resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = [
    "bars_enabled",
    "is_quiet",
    "lines_above_bars",
    "set_quiet",
    "warnings_only",
]

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress bars (ours, and transformers' and the Hugging Face hub's, such as
    "Loading weights"), and only warnings and errors on the console."""
    global _quiet
    _quiet = quiet
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        if "transformers" in sys.modules:  # already imported: switch its bars off directly
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def is_quiet() -> bool:
    return _quiet


def bars_enabled(wanted: bool = True) -> bool:
    """Whether to draw a progress bar the caller ``wanted``: never under ``--quiet``."""
    return wanted and not _quiet


def warnings_only(record: logging.LogRecord) -> bool:
    """A console handler's filter under ``--quiet``: warnings and errors pass."""
    return record.levelno >= logging.WARNING


@contextlib.contextmanager
def lines_above_bars(*loggers: logging.Logger) -> Iterator[None]:
    """While open, the console handlers of ``loggers`` print through ``tqdm.write``: each line
    goes above the progress bars instead of into the middle of one (their filters, such as
    :func:`warnings_only`, carry over)."""
    with logging_redirect_tqdm(loggers=list(loggers)):
        yield
