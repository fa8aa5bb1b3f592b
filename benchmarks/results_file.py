"""A benchmark's results file: its header when the file starts, then one block per run (appended with --append)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_results"]


def write_results(out: str | Path, text: str, *, header: str, append: bool) -> Path:
    """Write ``text`` (one run's block) to ``out``: after ``header`` in a new file (or one that is
    not appended to), after a blank line at the end of an existing one with ``append``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = not append or not out.exists() or out.stat().st_size == 0
    with open(out, "w" if fresh else "a", encoding="utf-8") as f:
        f.write((header.rstrip("\n") + "\n\n" if fresh else "\n") + text)
    print(f"wrote {out}")
    return out
