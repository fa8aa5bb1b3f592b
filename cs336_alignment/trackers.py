"""Where a run's metrics go: metrics.jsonl always, and wandb, trackio or TensorBoard when asked.

A run's config names them in ``trackers`` (a non-empty ``wandb_project`` turns wandb on too)::

    jsonl        <run>/metrics.jsonl, one JSON object per record: always on (resume relies on it)
    wandb        wandb.init(project, name, id kept in <run>/wandb_id.txt); its files under WANDB_DIR
    trackio      trackio.init(project, name kept in <run>/trackio_run.txt); its database under TRACKIO_DIR
    tensorboard  <run>/tensorboard/<kind>/events.out.tfevents.* (torch.utils.tensorboard.SummaryWriter)

Every tracker is a small class with ``log(kind, step, metrics)``, ``rewind(last_steps)`` and
``close()`` (:class:`Tracker`). A record of kind "train" is logged as ``train/<key>`` against the
``train_step`` axis, one of kind "eval" as ``eval/<key>`` against ``eval_step`` (and so on for
the other kinds: "data", "ei"). Only numbers reach wandb, trackio and TensorBoard; metrics.jsonl
holds every value.

A resumed run continues the same tracker run: wandb through the id in wandb_id.txt, trackio
through the run name in trackio_run.txt (``resume="allow"``). Before its first record the resumed
run *rewinds* each tracker to the checkpoint (metrics.jsonl is cut back to it by then): TensorBoard
discards every event of a kind after that kind's last step in metrics.jsonl (SummaryWriter's
``purge_step``, one event folder per kind, since each kind has its own step axis), and trackio's
local database drops the rows logged after it, so that both show what an uninterrupted run shows.
wandb keeps what it was sent (its history cannot be cut offline).

:func:`check_trackers` refuses unknown names, duplicates and a tracker whose package is missing
(one line, exit 2) before the run directory is touched; each optional package is imported only
when its tracker is on. Everything a tracker writes inside the run directory is recorded in the
run's file manifest first. This module is the ground floor: it imports nothing from the recipes,
the CLI or the report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .config import ConfigError

if TYPE_CHECKING:
    from .run_dir import RunDir

__all__ = [
    "DEFAULT_PROJECT",
    "TRACKERS",
    "JsonlTracker",
    "TensorBoardTracker",
    "Tracker",
    "TrackioTracker",
    "WandbTracker",
    "check_trackers",
    "enabled_trackers",
    "open_trackers",
]

TRACKERS = ("jsonl", "wandb", "trackio", "tensorboard")  # the names ``trackers`` accepts
DEFAULT_PROJECT = "cs336_alignment"  # the wandb and trackio project when wandb_project is empty
_PACKAGE = {"wandb": "wandb", "trackio": "trackio", "tensorboard": "tensorboard"}  # tracker -> the module it needs


class Tracker(Protocol):
    """Where :class:`~cs336_alignment.run_dir.MetricsSink` sends every record."""

    def log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        """Log one record of ``kind`` ("train", "eval", ...) at ``step`` of the ``<kind>_step`` axis."""

    def rewind(self, last_steps: dict[str, int]) -> None:
        """A resumed run, before its first record: forget what was logged after the checkpoint,
        where ``last_steps`` maps each kind to its last step in metrics.jsonl (a kind not in it: all)."""

    def close(self) -> None:
        """Flush and finish (idempotent)."""


# ---------------------------------------------------------------------------------- the checks


def enabled_trackers(names: Iterable[str] = (), wandb_project: str | None = "") -> list[str]:
    """The trackers a run uses: "jsonl" first (always on), then ``names`` in their order, with
    "wandb" added when ``wandb_project`` is non-empty; each once."""
    on = ["jsonl"]
    for name in [*names, *(["wandb"] if wandb_project else [])]:
        if name not in on:
            on.append(name)
    return on


def check_trackers(names: Iterable[str], *, wandb_project: str | None = "", installed: bool = True) -> None:
    """Refuse (ConfigError, one line naming the field) a ``trackers`` list with an unknown name or
    a name given twice, and, with ``installed``, a tracker whose package is not installed (wandb
    turned on by a non-empty ``wandb_project`` included). Imports nothing: a config's
    ``__post_init__`` calls it with ``installed=False``; the run calls it before its directory is
    touched."""
    if isinstance(names, str):
        raise ConfigError(f"field 'trackers': expected a list of names, got {names!r}; e.g. trackers=[{names}]")
    names = list(names)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"field 'trackers': unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"field 'trackers': {', '.join(map(repr, twice))} given twice; name each tracker once")
    if not installed:
        return
    for name in enabled_trackers(names, wandb_project):
        module = _PACKAGE.get(name)
        if module is None or _installed(module):
            continue
        if name == "wandb" and "wandb" not in names:  # turned on by wandb_project alone
            raise ConfigError(f"field 'wandb_project': {wandb_project!r} needs wandb, which is not installed: "
                              "pip install wandb, or set wandb_project=''")
        extra = "" if name == "wandb" else " (or pip install 'cs336-alignment[trackers]')"
        raise ConfigError(f"field 'trackers': {name!r} needs the {module} package, which is not installed: "
                          f"pip install {module}{extra}, or remove {name!r} from trackers")


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (one already imported counts; one
    set to None in sys.modules, as tests do to simulate its absence, does not)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------- the trackers


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record (0-d tensors and numpy scalars as Python numbers); strings, booleans,
    lists and None are left to metrics.jsonl."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def _record_if_inside(run_dir: RunDir, path: str | os.PathLike[str] | None) -> None:
    """Record a tracker's own folder (WANDB_DIR, TRACKIO_DIR) in the run's manifest when it lies
    inside the run directory, before anything is written there."""
    if not path:
        return
    path = Path(path).expanduser().resolve()
    try:
        rel = path.relative_to(run_dir.path.resolve())
    except ValueError:
        return
    if rel.parts:
        run_dir.files.record(rel.as_posix() + "/")


class JsonlTracker:
    """metrics.jsonl: ``{"kind": kind, "<kind>_step": step, **metrics}`` per line (every value, not
    only numbers), plus ``"wall_clock": clock()`` when a clock is given. ``last_record`` is the
    JSON-safe copy of the latest line. Rewinding is the run loop's (it cuts the file back)."""

    def __init__(self, run_dir: RunDir, clock: Callable[[], float] | None = None):
        self.run_dir = run_dir
        self.clock = clock
        self.last_record: dict[str, Any] = {}

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        clock = {"wall_clock": self.clock()} if self.clock is not None else {}
        self.last_record = self.run_dir.log_metrics({"kind": kind, f"{kind}_step": step, **metrics, **clock})

    def rewind(self, last_steps: dict[str, int]) -> None:
        pass  # the run loop cuts metrics.jsonl back to its length at the checkpoint

    def close(self) -> None:
        pass


class WandbTracker:
    """A wandb run: ``train/*`` on the ``train_step`` axis, ``eval/*`` on ``eval_step`` (each kind its
    own). Its id is kept in <run>/wandb_id.txt, so a resumed run continues it (``resume="allow"``);
    its files go where wandb puts them (WANDB_DIR, WANDB_MODE=offline for no network)."""

    ID_FILE = "wandb_id.txt"

    def __init__(self, run_dir: RunDir, *, project: str, run_name: str = "", config: dict[str, Any] | None = None,
                 resume: bool = False):
        import wandb  # optional extra: only when on

        id_file = run_dir.path / self.ID_FILE
        run_dir.files.record(id_file.name)
        _record_if_inside(run_dir, os.environ.get("WANDB_DIR"))
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=run_name or None, config=config, id=run_id, resume="allow")
        self._axes: set[str] = set()
        for kind in ("train", "eval"):
            self._define_axis(kind)

    def _define_axis(self, kind: str) -> None:
        if kind not in self._axes:
            self._axes.add(kind)
            self.run.define_metric(f"{kind}_step")
            self.run.define_metric(f"{kind}/*", step_metric=f"{kind}_step")

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self._define_axis(kind)
        self.run.log({f"{kind}_step": step, **{f"{kind}/{k}": v for k, v in _scalars(metrics).items()}})

    def rewind(self, last_steps: dict[str, int]) -> None:
        pass  # offline, wandb cannot cut a run's history: points after the checkpoint are logged again

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TrackioTracker:
    """A trackio run (local-first, wandb's init/log/finish API): each record is logged as
    ``{"<kind>_step": step, "<kind>/<key>": value, ...}`` at ``step``. The database lives in
    TRACKIO_DIR (trackio's default: ~/.cache/huggingface/trackio); nothing is sent anywhere unless
    trackio's own TRACKIO_SPACE_ID / TRACKIO_SERVER_URL say so. The run's name (``run_name``, or the
    one trackio picks) is kept in <run>/trackio_run.txt, so a resumed run continues it. Trackio's
    console lines go to the run's log."""

    NAME_FILE = "trackio_run.txt"

    def __init__(self, run_dir: RunDir, *, project: str, run_name: str = "", config: dict[str, Any] | None = None,
                 resume: bool = False):
        import trackio  # optional extra: only when on

        self._trackio = trackio
        self.logger = run_dir.logger
        name_file = run_dir.path / self.NAME_FILE
        run_dir.files.record(name_file.name)
        _record_if_inside(run_dir, getattr(getattr(trackio, "utils", None), "TRACKIO_DIR", None))
        saved = name_file.read_text(encoding="utf-8").split() if resume and name_file.exists() else []
        self.project = project
        self.continued = bool(saved)  # a resumed run logging into its own trackio run (which rewind may cut)
        with self._console():
            self.run = trackio.init(project=project, name=saved[0] if saved else run_name or None, config=config,
                                    resume="allow" if saved else "never", embed=False)
        if len(saved) > 1 and str(self.run.id) != saved[1]:  # trackio resumes by name: another run took it since
            self.logger.warning("trackio: run name %r now names another run in project %r; continuing in a new run "
                                "instead of touching that one", saved[0], project)
            with self._console():
                self.run.finish()
                self.run = trackio.init(project=project, name=f"{saved[0]}-{uuid.uuid4().hex[:6]}", config=config,
                                        embed=False)
            self.continued = False
        name_file.write_text(f"{self.run.name}\n{self.run.id}\n", encoding="utf-8")  # name, then id: checked on resume

    @contextlib.contextmanager
    def _console(self):
        """Trackio prints its progress to stdout: send those lines to the run's log instead."""
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                yield
        finally:
            for line in buffer.getvalue().splitlines():
                line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
                if line:
                    self.logger.info("trackio: %s", line.lstrip("* "))

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({f"{kind}_step": step, **{f"{kind}/{k}": v for k, v in _scalars(metrics).items()}}, step=step)

    def rewind(self, last_steps: dict[str, int]) -> None:
        """Delete this run's rows logged after the checkpoint from trackio's local database (a row's
        kind is the one whose ``<kind>_step`` it holds). Best effort: a database trackio has changed
        the layout of is left as it is, with a warning."""
        if not self.continued:
            return
        mode = getattr(getattr(self._trackio, "utils", None), "get_storage_mode", lambda: "sqlite")()
        if mode != "sqlite":
            self.logger.warning("trackio stores this project as %s fragments (TRACKIO_DIR on a network filesystem): "
                                "the steps logged after the checkpoint stay in its dashboard", mode)
            return
        db = self._trackio.SQLiteStorage.get_project_db_path(self.project)
        if not Path(db).exists():
            return
        try:
            with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as conn, conn:
                rows = conn.execute("SELECT id, step, metrics FROM metrics WHERE run_id = ?", (self.run.id,)).fetchall()
                drop = []
                for row_id, step, text in rows:
                    values = json.loads(text)
                    kinds = [k[: -len("_step")] for k in values if k.endswith("_step") and "/" not in k]
                    if kinds and step > last_steps.get(kinds[0], -1):
                        drop.append((row_id,))
                conn.executemany("DELETE FROM metrics WHERE id = ?", drop)
        except (sqlite3.Error, ValueError, TypeError) as e:
            self.logger.warning("trackio: could not drop the records logged after the checkpoint (%s); "
                                "its dashboard may show those steps twice", e)

    def close(self) -> None:
        if self.run is None:
            return
        with self._console():
            current = getattr(getattr(self._trackio, "context_vars", None), "current_run", None)
            if current is not None and current.get() is self.run:
                self._trackio.finish()  # also clears trackio's current run
            else:
                self.run.finish()
        self.run = None


class TensorBoardTracker:
    """TensorBoard event files in <run>/tensorboard/<kind>/: ``<kind>/<key>`` scalars at
    ``global_step=<kind>_step``. One folder (one SummaryWriter) per kind, because each kind has its
    own step axis and a writer's ``purge_step`` discards the events of every tag in its folder.
    Open the dashboard with ``tensorboard --logdir <run>/tensorboard``."""

    DIR = "tensorboard"

    def __init__(self, run_dir: RunDir):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: only when on

        self._SummaryWriter = SummaryWriter
        run_dir.files.record(self.DIR + "/")
        self.root = run_dir.path / self.DIR
        self.writers: dict[str, Any] = {}
        self._purge: dict[str, int] = {}  # kind -> the first step whose old events are discarded (a resumed run)

    def _writer(self, kind: str) -> Any:
        if kind not in self.writers:
            self.writers[kind] = self._SummaryWriter(log_dir=str(self.root / kind), purge_step=self._purge.get(kind))
        return self.writers[kind]

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        writer = self._writer(kind)
        for key, value in _scalars(metrics).items():
            writer.add_scalar(f"{kind}/{key}", value, global_step=step)
        writer.flush()  # a record is on disk (and on the dashboard) once logged

    def rewind(self, last_steps: dict[str, int]) -> None:
        """Open a writer for every kind already here, with ``purge_step`` one past the kind's last
        step in metrics.jsonl (0 when it has none), so TensorBoard drops the later events."""
        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name not in self.writers:
                self._purge[folder.name] = last_steps.get(folder.name, -1) + 1
                self._writer(folder.name).flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


def open_trackers(
    run_dir: RunDir,
    names: Iterable[str] = (),
    *,
    wandb_project: str | None = "",
    run_name: str | None = "",
    config: dict[str, Any] | None = None,
    resume: bool = False,
    clock: Callable[[], float] | None = None,
) -> list[Tracker]:
    """The trackers of :func:`enabled_trackers` for ``run_dir``, jsonl first; checked with
    :func:`check_trackers` (ConfigError). ``wandb_project`` (else :data:`DEFAULT_PROJECT`) names
    the wandb and trackio project, ``run_name`` the run; ``resume`` continues their runs. When one
    fails to open, those already open are closed."""
    names = list(names)
    check_trackers(names, wandb_project=wandb_project)
    project = wandb_project or DEFAULT_PROJECT
    opened: list[Tracker] = []
    try:
        for name in enabled_trackers(names, wandb_project):
            if name == "jsonl":
                opened.append(JsonlTracker(run_dir, clock))
            elif name == "wandb":
                opened.append(WandbTracker(run_dir, project=project, run_name=run_name or "", config=config, resume=resume))
            elif name == "trackio":
                opened.append(TrackioTracker(run_dir, project=project, run_name=run_name or "", config=config, resume=resume))
            else:
                opened.append(TensorBoardTracker(run_dir))
    except BaseException:
        for tracker in reversed(opened):
            tracker.close()
        raise
    return opened
