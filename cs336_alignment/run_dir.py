"""The run directory: where a run writes its resolved config, metrics and log.

    runs/<name>/
      config.yaml      the fully resolved config (defaults + file + overrides) that ran
      metrics.jsonl    one JSON object per line: every logged step, train and eval
      log.txt          human-readable log (also printed to the console)

Later recipes add ``checkpoints/`` and evaluation outputs beside these.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import dump_yaml


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part.

    Writes a temporary file in the same directory, fsyncs it, then renames it over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers; NaN and inf become strings JSON can hold."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class RunDir:
    """A run's output directory, its metrics stream and its logger.

    Args:
        path: the directory (created if missing).
        name: logger name; defaults to the directory name.
        console: also log to stderr.
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    LOG = "log.txt"

    def __init__(self, path: str | Path, name: str | None = None, console: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / self.METRICS
        self.logger = logging.getLogger(f"cs336_alignment.run.{name or self.path.name}.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(self.path / self.LOG, encoding="utf-8")
        file_handler.setFormatter(fmt)
        self.logger.addHandler(file_handler)
        if console:
            stream = logging.StreamHandler()
            stream.setFormatter(fmt)
            self.logger.addHandler(stream)

    def save_config(self, cfg: Any) -> Path:
        """Write the resolved config dataclass as YAML (atomically)."""
        out = self.path / self.CONFIG
        atomic_write_text(out, dump_yaml(cfg))
        return out

    def log_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one record to metrics.jsonl (flushed at once) and return the JSON-safe copy."""
        safe = _json_safe({**record, "time": record.get("time", time.time())})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(safe, sort_keys=False) + "\n")
        return safe

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record in metrics.jsonl; a torn last line (from a crash mid-write) is ignored."""
        return read_metrics(self.metrics_path)

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file. A malformed line other than the last raises, naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # torn final write
                break
            raise ValueError(f"{path}:{i}: invalid JSON in metrics file: {e.msg}") from e
    return records
