"""The run directory: where a run writes its resolved config, metrics and log.

    runs/<name>/
      config.yaml      the fully resolved config (defaults + file + overrides) that ran
      metrics.jsonl    one JSON object per line: every logged step, train and eval
      log.txt          human-readable log (also printed to the console)
      .lock            held (flock) by the process running in the directory; never deleted
      .files.jsonl     the manifest of every path the run wrote here (RunFiles)

Recipes add ``checkpoints/``, ``eval/`` and ``model/`` beside these. ``MetricsSink`` writes each
record to metrics.jsonl and to the trackers the run turns on (wandb, trackio, TensorBoard: see
:mod:`cs336_alignment.trackers`; ``wandb_id.txt``, ``trackio_run.txt`` and ``tensorboard/`` are theirs).

A run deletes or replaces only what its manifest holds: a fresh start in a directory holding
anything else is refused, unless told to overwrite, which moves the old contents aside
(:func:`move_aside`) rather than deleting them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, dump_yaml, to_dict
from .console import is_quiet, warnings_only
from .errors import UserError
from .trackers import JsonlTracker, open_trackers

__all__ = [
    "MetricsSink",
    "RunDir",
    "ForeignFiles",
    "RunDirectoryLocked",
    "RunFiles",
    "RunLock",
    "atomic_write_text",
    "checked_out_dir",
    "claim_directory",
    "move_aside",
    "read_jsonl",
    "umask_mode",
]


def umask_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0o666 less the process umask (mkstemp's
    temporary files are 0o600, which teammates on a shared cluster could not read).

    The umask is read from /proc/self/status where Linux has it: setting and restoring it, the
    only portable read, leaves it 0 for an instant in every thread of the process."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part.

    Writes a temporary file in the same directory, fsyncs it, then renames it over ``path``;
    the file gets the mode the umask allows (as ``open()`` would), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDirectoryLocked(UserError, RuntimeError):
    """Another process holds the run directory."""

    exit_code = 2  # found before the run starts


class RunLock:
    """An exclusive ``flock`` on ``<directory>/.lock``: one process per run directory.

    The lock file is opened without truncation and close-on-exec, and never deleted or moved;
    it records the holder's pid, host and start time. The kernel drops the lock when the
    holder exits, however it exits (kill -9 included), so a lock is never stale. On a
    filesystem that refuses ``flock`` (ENOLCK / ENOSYS / EOPNOTSUPP, e.g. some network
    filesystems) it warns once and goes on unlocked.
    """

    FILE = ".lock"

    def __init__(self, directory: str | Path):
        self.fd: int | None = None
        self.directory = Path(directory)
        self.path = self.directory / self.FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text(encoding="utf-8", errors="replace").strip() or "holder unknown"
            os.close(self.fd)
            self.fd = None
            raise RunDirectoryLocked(
                f"{self.directory} is in use by another process ({holder}); wait for it to finish or choose another out=..."
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                os.close(self.fd)
                raise
            logging.getLogger(__name__).warning("%s: this filesystem refuses file locks (%s); running unlocked",
                                                self.directory, e.strerror)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())

    def __del__(self) -> None:  # a lock never outlives its object, even when nobody released it
        self.release()

    def release(self) -> None:
        """Unlock (idempotent); the file stays."""
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:  # a filesystem without locks: there was nothing to unlock
                pass
            os.close(self.fd)
            self.fd = None


def checked_out_dir(out: str | Path) -> Path:
    """``out`` as a path, refused (ConfigError) when empty (it would be the current directory) or
    an existing file."""
    if isinstance(out, str) and not out.strip():
        raise ConfigError("field 'out': empty; name the run's directory (an empty out would be the current directory)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"field 'out': {path} is a file, not a directory; choose another out=...")
    return path


def claim_directory(out: str | Path) -> RunLock:
    """:func:`checked_out_dir`, then create the directory and lock it for this process (a
    directory that cannot be created or written: ConfigError)."""
    path = checked_out_dir(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return RunLock(path)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EPERM, errno.EACCES, errno.ENOTDIR):
            raise
        raise ConfigError(f"field 'out': cannot write in {path} ({e.strerror}); choose a directory you can write") from None


class ForeignFiles(UserError, RuntimeError):
    """A fresh run was pointed at a directory holding files that no run wrote."""

    exit_code = 2  # found before anything is written


class RunFiles:
    """The manifest of what a run wrote in its directory: ``<directory>/.files.jsonl``.

    One JSON line per path, relative to the directory, appended (flushed and fsynced) *before*
    the path is created, so a kill between the two leaves a listed path that does not exist,
    never an existing one that is not listed. A path ending in "/" is a directory the run owns
    with everything in it (a checkpoint folder, an evaluation folder); any other path is one file.
    The lock file and the manifest itself are the run's too.
    """

    FILE = ".files.jsonl"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / self.FILE

    def record(self, *paths: str | Path) -> None:
        """Add ``paths`` (relative to the directory, or inside it; "x/" for a whole directory)."""
        owned = self.recorded()
        new = [rel for rel in (self._relative(p) for p in paths) if rel not in owned]
        if not new:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"path": rel, "time": time.time()}) + "\n" for rel in new))
            f.flush()
            os.fsync(f.fileno())

    def _relative(self, path: str | Path) -> str:
        whole_dir = str(path).endswith("/")
        path = Path(path)
        try:
            rel = path.relative_to(self.directory)
        except ValueError:
            if path.is_absolute():
                raise ValueError(f"{path} is not inside the run directory {self.directory}") from None
            rel = path  # already relative to the directory
        return rel.as_posix() + ("/" if whole_dir else "")

    def recorded(self) -> set[str]:
        """Every path in the manifest (a torn last line, from a kill mid-append, is ignored)."""
        return {r["path"] for r in read_jsonl(self.path) if isinstance(r, dict) and "path" in r}

    def owns(self, rel: str, owned: set[str] | None = None) -> bool:
        """Whether the file ``rel`` (relative, posix) is listed or inside a listed directory."""
        owned = self.recorded() if owned is None else owned
        if rel in (RunLock.FILE, self.FILE) or rel in owned:
            return True
        parts = rel.split("/")
        return any("/".join(parts[:i]) + "/" in owned for i in range(1, len(parts)))

    def foreign(self) -> list[str]:
        """The files in the directory (recursively, sorted) that no run of this directory wrote."""
        if not self.directory.is_dir():
            return []
        owned = self.recorded()
        found = []
        for root, dirs, files in os.walk(self.directory):
            dirs.sort()
            for name in sorted(files):
                rel = (Path(root) / name).relative_to(self.directory).as_posix()
                if not self.owns(rel, owned):
                    found.append(rel)
        return found


def move_aside(directory: str | Path) -> Path:
    """Move everything in ``directory`` except its lock file into a new sibling
    ``<directory>.old-<YYYYmmdd-HHMMSS>[-N]/`` (a rename on the same filesystem: nothing is
    copied or deleted); returns that folder."""
    directory = Path(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = directory.parent / f"{directory.name}.old-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = directory.parent / f"{directory.name}.old-{stamp}-{n}"
    aside.mkdir()
    for entry in sorted(directory.iterdir()):
        if entry.name != RunLock.FILE:
            os.replace(entry, aside / entry.name)
    return aside


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
        self.files = RunFiles(self.path)  # the manifest: what this run wrote here
        self.files.record(self.CONFIG, self.METRICS, self.LOG)
        self.metrics_path = self.path / self.METRICS
        self.logger = logging.getLogger(f"cs336_alignment.run.{name or self.path.name}.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        self.file_handler = logging.FileHandler(self.path / self.LOG, encoding="utf-8")
        self.file_handler.setFormatter(fmt)
        self.logger.addHandler(self.file_handler)
        if console:
            stream = logging.StreamHandler()
            stream.setFormatter(fmt)
            if is_quiet():  # --quiet: the console shows warnings and errors only
                stream.addFilter(warnings_only)
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
        return read_jsonl(self.metrics_path)

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (metrics.jsonl, generations.jsonl); [] when it is missing.

    Blank lines are skipped and a torn last line (a crash mid-write) is ignored; a malformed
    line anywhere else raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # torn final write
                break
            raise ValueError(f"{path}:{i}: invalid JSON: {e.msg}") from e
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsSink:
    """Every metric goes to the run's metrics.jsonl, and to the other trackers the run turns on
    (:mod:`cs336_alignment.trackers`: wandb, trackio, TensorBoard).

    Train records carry ``train_step`` and eval records ``eval_step``; in the trackers they are
    logged as ``train/*`` and ``eval/*`` against those axes. A non-empty ``wandb_project`` turns
    wandb on and names the wandb and trackio project ("cs336_alignment" when empty); ``run_name``
    names the run. A resumed run continues the same tracker runs (their ids are kept in the run
    directory) and, at its first record (metrics.jsonl cut back to the checkpoint by then), rewinds
    them to the checkpoint: what was logged after it is dropped where the tracker allows.
    """

    def __init__(
        self, run_dir: RunDir, wandb_project: str | None = None, run_name: str | None = None, config: Any = None,
        resume: bool = False,
        clock: Callable[[], float] | None = None,
        trackers: Sequence[str] = ("jsonl",),
    ):
        self.run_dir = run_dir
        self.clock = clock  # when given, every record gets "wall_clock": clock()
        self.trackers = open_trackers(run_dir, trackers, wandb_project=wandb_project or "", run_name=run_name or "",
                                      config=to_dict(config) if config else None, resume=resume, clock=clock)
        self.jsonl: JsonlTracker = self.trackers[0]  # metrics.jsonl: always on, always first
        self._rewound = not resume  # a resumed run rewinds its trackers before its first record

    def _rewind(self) -> None:
        """Tell every tracker each kind's last step in metrics.jsonl (as the checkpoint left it)."""
        last: dict[str, int] = {}
        for record in self.run_dir.read_metrics():
            kind = record.get("kind")
            step = record.get(f"{kind}_step")
            if isinstance(kind, str) and isinstance(step, int) and not isinstance(step, bool):
                last[kind] = max(step, last.get(kind, step))
        for tracker in self.trackers:
            tracker.rewind(last)
        self._rewound = True

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append ``{"kind": kind, "<kind>_step": step, **metrics}``; returns the JSON-safe record."""
        if not self._rewound:
            self._rewind()
        for tracker in self.trackers:
            tracker.log(kind, step, metrics)
        return self.jsonl.last_record

    def close(self) -> None:
        """Close every tracker (idempotent)."""
        trackers, self.trackers = self.trackers, self.trackers[:1]
        for tracker in trackers:
            tracker.close()
