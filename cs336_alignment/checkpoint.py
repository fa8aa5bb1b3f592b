"""Checkpoints that survive kills, crashes and full disks; exact resume; time budgets.

A checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding

- ``model/``: a Hugging Face folder (``save_pretrained``: safetensors, config, generation config,
  tokenizer) of the fp32 master weights, the very tensors resume loads: ``from_pretrained``,
  vLLM, ``eval --model <checkpoint>`` and ``export`` open any checkpoint;
- ``optimizer.pt``: the optimizer state;
- ``trainer.pt``: every RNG state and the run loop's counters (``recipes/loop.py``'s
  ``RunState``: steps done, training clock, and how many bytes of metrics.jsonl existed at
  that moment).

It is
written to a temporary directory next to it, fsynced, then renamed into place: a kill
during the write leaves the previous checkpoint untouched, and a directory without the
``COMPLETE`` marker is never loaded. A manifest records every file's size and SHA-256 (hashed
while writing); on resume a checkpoint that no longer matches is skipped for the newest intact
one. Files load with ``weights_only=True``: a checkpoint cannot run code. On resume, metrics.jsonl is cut back to its length at
the checkpoint, so a resumed run writes exactly the records an uninterrupted run would.

Also here: ``RunControl`` (checkpoint cadence, resume, time budget, non-finite policy),
fault injection for the kill tests, the non-finite check, and the progress bar with ETA.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from .console import bars_enabled
from .distributed import copy_full_into, is_sharded, load_full_optimizer_state
from .errors import UserError

if TYPE_CHECKING:
    from .distributed import DistContext
from .export import save_model_folder
from .hf_compat import make_compatible
from .models import SHARDED_DIR, is_sharded_checkpoint
from .run_dir import ForeignFiles, RunFiles, move_aside

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "NoIntactCheckpoint",
    "NonFiniteError",
    "Progress",
    "RunControl",
    "RunDirectoryInUse",
    "UnsafeCheckpoint",
    "check_finite",
    "fault_point",
    "format_seconds",
    "load_weights",
    "parse_duration",
    "rng_state",
    "set_rng_state",
    "refuse_foreign",
    "start_fresh",
    "truncate_metrics",
    "verify",
]


COMPLETE = "COMPLETE"
MODEL_DIR = "model"  # a checkpoint's Hugging Face folder of the master weights
MANIFEST = "manifest.json"  # {file: {"bytes": size, "sha256": hex digest}}, written with the files
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """Writing a checkpoint failed; the previous checkpoint is intact."""


class NoIntactCheckpoint(CheckpointError):
    """``--resume`` found checkpoints, but none whose files match their manifest."""

    exit_code = 2  # found before the run starts


class UnsafeCheckpoint(UserError, RuntimeError):
    """A checkpoint file that would need arbitrary objects unpickled: refused, no fallback."""

    exit_code = 2  # the run directory was tampered with: the user's to inspect


class NonFiniteError(UserError, RuntimeError):
    """A loss or gradient was NaN or infinite."""


@dataclass
class RunControl:
    """How a run survives interruptions and when it stops (shared by every recipe)."""

    resume: bool = False  # continue from the last complete checkpoint in the run directory
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end or when the budget runs out)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    time_budget: str = ""  # e.g. "4h", "90m": stop training once the budget clock reaches this
    budget_clock: Literal["train", "wall"] = "train"  # what the budget counts: training steps only, or the wall clock
    # since the run started (model loading, validation and start-up included; each resumed session adds its own)
    skip_nonfinite: bool = False  # skip (and count) optimizer steps with NaN/inf loss or gradient instead of stopping
    progress: bool = True  # progress bar with ETA
    overwrite: bool = False  # start over in a directory holding another run or other files (moved aside to <out>.old-<time>/)
    allow_config_change: bool = False  # --resume with changed learning rate, batch sizes, data, ...: go on and record it

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        parse_duration(self.time_budget)  # fails early on a malformed budget

    @property
    def budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget)


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from "4h", "90m", "1h30m", "45s", "3600" (seconds); None or "" -> no budget."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != s.replace(" ", ""):
        raise ValueError(f"cannot read duration {text!r}: use e.g. 4h, 90m, 1h30m, 45s or plain seconds")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fault_point(point: str, step: int) -> None:
    """Fault injection for the kill-and-resume tests: CS336_ALIGNMENT_FAULT="<point>:<step>"
    makes the process kill itself with SIGKILL at that point; "<point>:<step>@<rank>" only the
    process of that rank (torchrun's ``RANK``) of a multi-process run. Unset in normal runs."""
    spec = os.environ.get("CS336_ALIGNMENT_FAULT")
    if not spec:
        return
    where, _, rank = spec.partition("@")
    if where == f"{point}:{step}" and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and finds checkpoints of one run.

    Args:
        run_path: the run directory.
        keep_last: how many complete checkpoints to keep (older ones are deleted).
    """

    def __init__(self, run_path: str | Path, keep_last: int = 2):
        self.root = Path(run_path) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.exists():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / COMPLETE).exists():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def latest_intact(self, warn: Callable[[str], None] = lambda message: None) -> Path | None:
        """The newest complete checkpoint whose files match their manifest. Each newer one that does
        not (truncated, corrupted, a file missing) is moved aside to ``.corrupt_<name>_<time>``
        (kept for inspection, never loaded, pruned or counted again) with
        ``warn(<one line: file, reason, where it went>)``."""
        for _, path in reversed(self.complete()):
            problem = verify(path)
            if problem is None:
                return path
            aside = self.root / f".corrupt_{path.name}_{time.time_ns()}"
            os.replace(path, aside)
            warn(f"skipping checkpoint {path}: {problem} (moved aside to {aside.name})")
        return None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        state: dict[str, Any],
        *,
        tokenizer: Any = None,
        ctx: DistContext | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically: the model's folder (with ``tokenizer``, when
        given), the optimizer and the trainer state, with a manifest of every file's size and
        SHA-256. Any failure raises CheckpointError, removes the partial temporary directory and
        leaves the previous checkpoint intact. In a multi-process run (``ctx``), every rank calls
        it: see :meth:`_save_sharded`."""
        if ctx is not None and ctx.world_size > 1:
            return self._save_sharded(step, model, optimizer, state, tokenizer=tokenizer, ctx=ctx)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp_step_{step:06d}_{os.getpid()}_{time.time_ns()}"
        try:
            tmp.mkdir()
            manifest = {p.relative_to(tmp).as_posix(): _seal(p) for p in save_model_folder(model, tokenizer, tmp / MODEL_DIR)}
            fault_point("checkpoint", step)
            if optimizer is not None:
                manifest["optimizer.pt"] = _save(tmp / "optimizer.pt", optimizer.state_dict())
            manifest["trainer.pt"] = _save(tmp / "trainer.pt", {"state": state, "rng": rng_state(), "step": step})
            self._publish(tmp, final, manifest, step)
        except Exception as e:  # a full disk surfaces as torch's RuntimeError as often as an OSError
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"writing the checkpoint of step {step} to {self.root} failed ({_why(e)}); "
                f"the previous checkpoint {self.latest() or '(none)'} is intact"
            ) from e
        except BaseException:  # Ctrl-C mid-write: no partial directory left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def _save_sharded(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any], *,
        tokenizer: Any, ctx: DistContext,
    ) -> Path:
        """The multi-process checkpoint, in the same atomic scheme: every rank writes its shard of
        the model and optimizer state into ``<tmp>/dcp/`` (torch.distributed.checkpoint, loadable
        at any world size); rank 0 then writes the model's config and tokenizer (``model/``,
        without weights: ``export`` turns the checkpoint into a servable folder), ``trainer.pt``
        (every rank's RNG states), the manifest and the marker, and renames the directory into
        place. Each rank learns whether every rank's part was written, so all raise the same
        CheckpointError or none does."""
        from .distributed import barrier, gather, save_sharded

        name = gather([f".tmp_step_{step:06d}_{os.getpid()}_{time.time_ns()}"], ctx)[0]  # rank 0's, for all
        tmp, final = self.root / name, self.root / f"step_{step:06d}"
        rngs = gather([rng_state()], ctx)  # one per rank, in rank order

        def agreed(error: BaseException | None) -> None:
            problems = [why for why in gather([None if error is None else _why(error)], ctx) if why]
            if problems:
                if ctx.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(f"writing the checkpoint of step {step} to {self.root} failed ({problems[0]}); "
                                      f"the previous checkpoint {self.latest() or '(none)'} is intact") from error

        error = None
        if ctx.is_main:
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        agreed(error)
        fault_point("checkpoint", step)  # the kill tests: a rank dies before its shard is written
        try:
            save_sharded(tmp / SHARDED_DIR, model, optimizer)
        except Exception as e:  # noqa: BLE001 - reported on every rank by agreed()
            error = e
        agreed(error)
        if ctx.is_main:
            try:
                for part in (getattr(model, "config", None), getattr(model, "generation_config", None), tokenizer):
                    if part is not None:  # what export needs besides the weights
                        part.save_pretrained(tmp / MODEL_DIR)
                if (tmp / MODEL_DIR / "config.json").exists():
                    make_compatible(tmp / MODEL_DIR)
                trainer = {"state": state, "rng": rngs[0], "rngs": rngs, "step": step, "world_size": ctx.world_size}
                _save(tmp / "trainer.pt", trainer)
                files = sorted(p for p in tmp.rglob("*") if p.is_file())
                self._publish(tmp, final, {p.relative_to(tmp).as_posix(): _seal(p) for p in files}, step)
            except Exception as e:  # noqa: BLE001 - reported on every rank by agreed()
                error = e
        agreed(error)
        if ctx.is_main:
            self.prune()
        barrier(ctx)
        return final

    def _publish(self, tmp: Path, final: Path, manifest: dict[str, Any], step: int) -> None:
        """Seal the written directory ``tmp`` (manifest, then the COMPLETE marker, fsynced) and
        rename it to ``final``. A re-run of the same step sets the old one aside until the new one
        is in place."""
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _write_synced(tmp / COMPLETE, f"{step}\n")
        _fsync_dir(tmp)
        stale = None
        if final.exists():
            stale = self.root / f".tmp_replaced_{final.name}_{os.getpid()}_{time.time_ns()}"
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)

    def prune(self) -> None:
        for _, path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in [*self.root.glob(".tmp_step_*"), *self.root.glob(".tmp_replaced_*")]:  # left by a killed writer
            if f"_{os.getpid()}_" not in stale.name:
                shutil.rmtree(stale, ignore_errors=True)

    def load(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ctx: DistContext | None = None
    ) -> dict[str, Any]:
        """Restore weights, optimizer and RNG states from ``path``; returns the recipe state.

        Every file loads with ``weights_only=True``: tensors and plain Python values only. A file
        that would need anything else unpickled (code could run) raises UnsafeCheckpoint.
        """
        device = next(model.parameters()).device
        if is_sharded_checkpoint(path):  # a multi-process run's: resharded to this run's world size
            from .distributed import load_sharded

            try:
                load_sharded(path / SHARDED_DIR, model, optimizer)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpoint(f"{path / SHARDED_DIR} holds objects that are not tensors or plain values "
                                       "(loading them could run code); refusing to load it: inspect the run directory") from e
        elif (path / "model.pt").exists():  # written before checkpoints held a model folder
            saved, own = _load(path / "model.pt", device), model.state_dict()
            differ = sorted(saved.keys() ^ own.keys())
            if differ:
                raise CheckpointError(f"{path / 'model.pt'} does not hold this model's weights: {len(differ)} names differ "
                                      f"({differ[0]}...)")
            with torch.no_grad():
                for name, tensor in saved.items():
                    copy_full_into(own[name], tensor)  # a sharded model keeps its slices
        else:
            load_weights(path / MODEL_DIR, model)  # into this rank's shards when the model is sharded
        if optimizer is not None and (path / "optimizer.pt").exists():  # a one-process checkpoint
            saved = _load(path / "optimizer.pt", torch.device("cpu") if is_sharded(model) else device)
            if is_sharded(model):  # resumed on several processes: each keeps its slices (the rest never reaches the GPU)
                load_full_optimizer_state(model, optimizer, saved)
            else:
                optimizer.load_state_dict(saved)
        trainer = _load(path / "trainer.pt", None)
        rngs, rank = trainer.get("rngs"), ctx.rank if ctx is not None else 0
        same_world = rngs is not None and len(rngs) == (ctx.world_size if ctx is not None else 1)
        set_rng_state(rngs[rank] if same_world else trainer["rng"])  # another world size: rank 0's streams
        return trainer["state"]


class _HashingWriter:
    """A binary file that hashes and counts what is written to it (so nothing is read twice)."""

    def __init__(self, f: Any):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _save(path: Path, obj: Any) -> dict[str, Any]:
    """torch.save ``obj`` to ``path``, fsynced; returns its manifest entry {"bytes", "sha256"}."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": writer.bytes, "sha256": writer.sha256.hexdigest()}


def _why(error: BaseException) -> str:
    """One line saying why a write failed (a full disk by name; torch's C++ location prefix dropped)."""
    if isinstance(error, OSError):
        return "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first_line)


def _seal(path: Path) -> dict[str, Any]:
    """fsync a file just written (by another library) and return its manifest entry."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:  # read-only: fsync needs no write access (a umask may have removed it)
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
            size += len(block)
        os.fsync(f.fileno())
    return {"bytes": size, "sha256": digest.hexdigest()}


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    """Copy the weights of ``folder``'s ``*.safetensors`` files into ``model``, tensor by tensor
    (no second copy of the model in memory). Every parameter and persistent buffer must be in
    the files, except a tied one (the same tensor as one that is: stored once); a tensor the
    model lacks, or of another shape, is a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors weights; move that checkpoint aside to resume from an older one")
    own = model.state_dict(keep_vars=True)
    loaded: set[str] = set()
    try:
        with torch.no_grad():
            for file in files:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        if name not in own:
                            raise CheckpointError(f"{file} holds {name}, which the model does not have")
                        tensor = f.get_tensor(name)
                        if tensor.shape != own[name].shape:
                            raise CheckpointError(f"{file}: {name} has shape {tuple(tensor.shape)}, "
                                                  f"the model's is {tuple(own[name].shape)}")
                        copy_full_into(own[name], tensor)  # a sharded model keeps its slices
                        loaded.add(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {folder} ({e}); move that checkpoint aside to resume from an older one") from e
    stored = {own[name].data_ptr() for name in loaded}
    missing = [name for name in own if name not in loaded and own[name].data_ptr() not in stored]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}...)")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _load(path: Path, device: torch.device | None) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(
            f"{path} holds objects that are not tensors or plain values (loading them could run code); "
            "refusing to load it: inspect the run directory"
        ) from e
    except (OSError, RuntimeError, EOFError) as e:  # e.g. a truncated file of a checkpoint without a manifest
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read {path} ({first_line}); move that checkpoint aside to resume from an older one") from e


def verify(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted (a file missing, truncated or changed), or None.

    Checks each file's size, then its SHA-256, against the manifest written with it; a checkpoint
    written before manifests existed is accepted as it is.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for name, expected in manifest.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written"
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != expected["sha256"]:
            return f"{name} does not match its checksum (changed or corrupted)"
    return None


def truncate_metrics(metrics_path: Path, size: int) -> None:
    """Cut metrics.jsonl back to ``size`` bytes (its length when the checkpoint was taken)."""
    if metrics_path.exists() and metrics_path.stat().st_size > size:
        with open(metrics_path, "r+b") as f:
            f.truncate(size)


class RunDirectoryInUse(UserError, RuntimeError):
    """A fresh run was pointed at a directory that holds another run's checkpoints or a finished run."""

    exit_code = 2  # found before anything is written


def refuse_foreign(path: Path, control: RunControl) -> list[str]:
    """The files in ``path`` that no run wrote; ForeignFiles (one line) when there are any and
    ``control.overwrite`` is off. Read-only: a fresh run calls it before creating its lock file."""
    foreign = RunFiles(path).foreign()
    if foreign and not control.overwrite:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ForeignFiles(
            f"field 'out': {path} holds files that no run wrote ({listed}); choose another out=..., "
            f"or set control.overwrite=true to move everything in it aside to {path.name}.old-<time>/"
        )
    return foreign


def start_fresh(path: Path, control: RunControl, *, model: str = "") -> list[str]:
    """Prepare the run directory ``path`` (locked by the caller, nothing opened in it yet) for a
    run from step 0; returns lines for the run's log.

    Deletes only what a run wrote (its manifest, :class:`~cs336_alignment.run_dir.RunFiles`):

    - an earlier attempt that neither checkpointed nor finished: its outputs are removed and its
      metrics cut to nothing, so nothing is duplicated (log.txt goes on);
    - files no run wrote, complete or quarantined checkpoints, or a finished run (final.json):
      refused in one line, unless ``control.overwrite``, which moves all of it aside to
      ``<path>.old-<time>/`` (the lock file stays). ``model`` inside ``path`` is then refused,
      as it would be moved away before it is loaded.
    """
    foreign = refuse_foreign(path, control)
    files = RunFiles(path)
    done = Checkpointer(path).complete()
    quarantined = sorted((path / "checkpoints").glob(".corrupt_*"))
    finished = (path / "final.json").exists()
    notes = []
    if control.resume:
        notes.append(f"resume requested but {path / 'checkpoints'} has no complete checkpoint: starting from scratch")
    if foreign or done or quarantined or finished:
        if not control.overwrite:
            held = (f"checkpoints (latest: step {done[-1][0]})" if done else
                    f"a finished run (final.json){' whose checkpoints were removed' if control.resume else ''}" if finished else
                    f"checkpoints that failed their integrity check ({quarantined[0].name})")
            hint = "pass --resume to continue it, " if done else ""
            raise RunDirectoryInUse(
                f"{path} already holds {held}; {hint}choose another out=..., "
                f"or set control.overwrite=true to move it aside to {path.name}.old-<time>/ and start over"
            )
        if model and Path(model).resolve().is_relative_to(path.resolve()):
            raise RunDirectoryInUse(
                f"model {model} is inside out={path}, which control.overwrite would move aside before it is loaded; "
                "choose another out=..."
            )
        aside = move_aside(path)
        notes.append(f"control.overwrite: moved the earlier contents of {path} aside to {aside}")
        return notes
    keep = {"config.yaml", "log.txt", "metrics.jsonl", RunFiles.FILE}  # rewritten, appended to, cut
    removed = []
    for rel in sorted(files.recorded() - keep):
        target = path / rel.rstrip("/")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(rel)
    metrics = path / "metrics.jsonl"
    if removed or (metrics.exists() and metrics.stat().st_size > 0):
        notes.append(f"{path} holds an earlier attempt that never checkpointed; starting over "
                     f"(removed its {', '.join(removed) or 'nothing'}; metrics.jsonl cut)")
    truncate_metrics(metrics, 0)
    return notes


def check_finite(name: str, value: float, step: int) -> None:
    """Raise NonFiniteError with a clear message if ``value`` is NaN or infinite."""
    if not torch.isfinite(torch.tensor(value)):
        raise NonFiniteError(
            f"{name} is {value} at step {step}: stopping before the optimizer step so the weights stay finite. "
            "Lower the learning rate, check the rewards for NaN, or set skip_nonfinite=true to skip such steps."
        )


class Progress:
    """A progress bar over a run's steps with one ETA: ours, from the training clock (validation
    excluded), in place of tqdm's, which would count validation time as step time. None under
    ``--quiet``."""

    BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, total: int, start: int, enabled: bool, desc: str):
        self.total, self.start = total, start
        self.bar = None
        if bars_enabled(enabled):
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, bar_format=self.BAR_FORMAT)

    def eta_seconds(self, done: int, clock_this_session: float) -> float | None:
        steps = done - self.start
        return clock_this_session / steps * (self.total - done) if steps > 0 else None

    def update(self, done: int, clock_this_session: float, **postfix: float) -> str:
        eta = self.eta_seconds(done, clock_this_session)
        text = f"ETA {format_seconds(eta)}" if eta is not None else "ETA ?"
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()} | {"eta": format_seconds(eta)}, refresh=False)
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
