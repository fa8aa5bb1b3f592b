"""A pool of grading worker processes with hard per-task time limits.

Anything that may run for unbounded time (sympy parsing and simplification, math-verify)
runs in worker processes started with ``subprocess.Popen([sys.executable, "-m",
"cs336_alignment.rewards._worker"])``. That works from any thread, inside daemonic
processes (such as DataLoader workers, which may not use ``multiprocessing`` to start
children) and after CUDA has been initialised (fork+exec, never a bare fork).

Protocol: each message is a 4-byte big-endian length followed by that many bytes of
ASCII JSON. The parent sends ``{"tasks": [...]}``; the worker answers with one message
per task, in order, as soon as each finishes. The parent gives every task its own
deadline; a worker that overruns is killed (SIGKILL) and the remaining tasks go to a
fresh worker. Workers also exit on their own when the parent goes away. They run in
their own process group and ignore SIGINT, so Ctrl-C in a terminal reaches only the
parent; a worker that dies anyway (any signal) makes its task an "error", never an
exception.

The module-level pool (:func:`get_pool`) starts lazily, is safe to use from several
threads at once, is shut down at interpreter exit and is forgotten (not touched) in a
forked child, which starts its own pool when it needs one.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GraderPool",
    "TaskOutcome",
    "default_max_workers",
    "encode_frame",
    "get_pool",
    "shutdown_pool",
]


_HEADER = struct.Struct(">I")
_WORKER_MODULE = "cs336_alignment.rewards._worker"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_STARTUP_TIMEOUT_S = 60.0
_KILL_MARGIN_S = 0.05


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one task: ``status`` is "ok", "timeout" or "error"."""

    status: str
    value: Any = None
    detail: str = ""


class _WorkerDied(Exception):
    pass


def encode_frame(message: Any) -> bytes:
    """Serialise one protocol message (ASCII JSON survives lone surrogates and NULs)."""
    body = json.dumps(message, ensure_ascii=True).encode("ascii")
    return _HEADER.pack(len(body)) + body


class _Worker:
    """One worker process and the parent's end of its pipes."""

    def __init__(self, memory_limit_mb: int | None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        if memory_limit_mb:
            env["CS336_GRADER_WORKER_MEMORY_MB"] = str(memory_limit_mb)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", _WORKER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            # Its own process group: Ctrl-C in the terminal (SIGINT to the foreground
            # group) reaches only the parent, which decides what to do.
            process_group=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin
        self._out_fd = self.proc.stdout.fileno()
        self._buffer = bytearray()
        self.ready = False

    def wait_ready(self, deadline: float) -> bool:
        """Wait for the worker's hello message; False if it does not arrive in time."""
        message = self.receive(deadline)
        if message is None:
            return False
        self.ready = bool(message.get("ready"))
        return self.ready

    def send(self, message: Any) -> None:
        try:
            self._in.write(encode_frame(message))
            self._in.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise _WorkerDied(str(exc)) from exc

    def receive(self, deadline: float) -> Any | None:
        """The next message, or None if ``deadline`` (time.monotonic) passes first."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= _HEADER.size + length:
                    body = bytes(self._buffer[_HEADER.size : _HEADER.size + length])
                    del self._buffer[: _HEADER.size + length]
                    return json.loads(body)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                readable, _, _ = select.select([self._out_fd], [], [], remaining)
            except (OSError, ValueError) as exc:
                raise _WorkerDied(str(exc)) from exc
            if not readable:
                return None
            try:
                chunk = os.read(self._out_fd, 1 << 16)
            except OSError as exc:
                raise _WorkerDied(str(exc)) from exc
            if not chunk:
                raise _WorkerDied("worker closed its output")
            self._buffer.extend(chunk)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the process (SIGKILL) now; it is reaped on a helper thread."""
        try:
            self.proc.kill()
        except OSError:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        threading.Thread(target=self.proc.wait, name="grader-worker-reap", daemon=True).start()

    def close(self) -> None:
        """Ask an idle worker to exit (end of input), then make sure it has."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        try:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        except OSError:
            pass


def default_max_workers() -> int:
    """``CS336_GRADER_WORKERS`` if set, else the CPU count clamped to [2, 8]."""
    configured = os.environ.get("CS336_GRADER_WORKERS")
    if configured:
        return max(1, int(configured))
    return max(2, min(8, os.cpu_count() or 2))


class GraderPool:
    """Lazily started worker processes, handed out to one caller at a time.

    ``run(tasks, ...)`` takes a worker (starting one if fewer than ``max_workers`` exist,
    otherwise waiting for one to become free), sends it the tasks and collects one
    outcome per task. Every task has its own deadline: ``task_timeout`` seconds from the
    moment it starts (the previous task's answer), and never past ``deadline`` when one
    is given. On overrun the worker is killed, the task is a "timeout", and the remaining
    tasks continue on a fresh worker. Worker crashes make the current task an "error".
    """

    def __init__(self, max_workers: int | None = None, memory_limit_mb: int | None = 4096) -> None:
        self.max_workers = max_workers or default_max_workers()
        self.memory_limit_mb = memory_limit_mb
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._starting = 0
        self._closed = False
        self.pid = os.getpid()
        self.started_workers = 0
        self.killed_workers = 0
        self.last_start_error = ""
        self._last_failure = -1e9

    # worker bookkeeping ----------------------------------------------------------------
    def _spawn_in_background(self) -> None:
        """Start one worker on a helper thread; it joins the idle list when ready.

        Called with ``self._cond`` held. A start-up is never tied to one caller's
        deadline, so a short time limit does not waste the worker it began starting.
        """
        self._starting += 1

        def start() -> None:
            worker: _Worker | None = None
            try:
                worker = _Worker(self.memory_limit_mb)
                ok = worker.wait_ready(time.monotonic() + _STARTUP_TIMEOUT_S)
            except (OSError, _WorkerDied) as exc:
                ok = False
                self.last_start_error = str(exc)
            with self._cond:
                self._starting -= 1
                if ok and worker is not None and not self._closed:
                    self._all.add(worker)
                    self._idle.append(worker)
                    self.started_workers += 1
                    worker = None
                elif not ok:
                    self._last_failure = time.monotonic()
                self._cond.notify_all()
            if worker is not None:
                worker.kill()

        threading.Thread(target=start, name="grader-worker-start", daemon=True).start()

    def _acquire(self, deadline: float) -> _Worker | None:
        """An idle worker for exclusive use, or None if none is free before ``deadline``."""
        with self._cond:
            while not self._closed:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    self._all.discard(worker)
                    worker.kill()
                recently_failed = time.monotonic() - self._last_failure < 1.0
                if len(self._all) + self._starting < self.max_workers and not recently_failed:
                    self._spawn_in_background()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.5) if recently_failed else remaining)
            return None

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed or worker not in self._all:
                discard = True
            else:
                self._idle.append(worker)
                discard = False
            self._cond.notify()
        if discard:
            worker.close()

    def _discard(self, worker: _Worker) -> None:
        with self._cond:
            self._all.discard(worker)
            self.killed_workers += 1
            self._cond.notify()
        worker.kill()

    # public API ------------------------------------------------------------------------
    def warm_up(self, n: int | None = None, timeout: float = _STARTUP_TIMEOUT_S) -> int:
        """Start workers until ``n`` (default ``max_workers``) exist; returns how many do."""
        n = min(n or self.max_workers, self.max_workers)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed and len(self._all) < n:
                if len(self._all) + self._starting < n:
                    self._spawn_in_background()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return len(self._all)

    def run(self, tasks: list[Any], task_timeout: float, deadline: float | None = None) -> list[TaskOutcome]:
        """Run ``tasks`` in order on one worker at a time; one outcome per task, in order."""
        outcomes: list[TaskOutcome] = []
        # Leave a little time to kill an overrunning worker and return before the deadline.
        hard_deadline = deadline - _KILL_MARGIN_S if deadline is not None else float("inf")
        while len(outcomes) < len(tasks):
            start_by = min(hard_deadline, time.monotonic() + max(task_timeout, 30.0))
            worker = self._acquire(start_by)
            if worker is None:
                if self.last_start_error and self.size == 0:
                    status, reason = "error", f"grading workers fail to start: {self.last_start_error}"
                else:
                    status, reason = "timeout", "no grading worker became available in time"
                outcomes.extend(TaskOutcome(status, detail=reason) for _ in tasks[len(outcomes) :])
                break
            pending = tasks[len(outcomes) :]
            try:
                healthy = self._converse(
                    worker, pending=pending, outcomes=outcomes, task_timeout=task_timeout, hard_deadline=hard_deadline
                )
            except BaseException:
                self._discard(worker)  # interrupted mid-conversation (e.g. KeyboardInterrupt)
                raise
            if healthy:
                self._release(worker)
            if time.monotonic() >= hard_deadline and len(outcomes) < len(tasks):
                outcomes.extend(TaskOutcome("timeout", detail="call deadline passed") for _ in tasks[len(outcomes) :])
        return outcomes

    def _converse(
        self,
        worker: _Worker,
        pending: list[Any],
        outcomes: list[TaskOutcome],
        task_timeout: float,
        hard_deadline: float,
    ) -> bool:
        """Send ``pending`` to ``worker`` and append its outcomes; False if it was discarded."""
        try:
            worker.send({"tasks": pending})
        except _WorkerDied as exc:
            self._discard(worker)
            outcomes.append(TaskOutcome("error", detail=f"worker failed: {exc}"))
            return False
        for _ in pending:
            task_deadline = min(time.monotonic() + task_timeout, hard_deadline)
            try:
                message = worker.receive(task_deadline)
            except _WorkerDied as exc:
                self._discard(worker)
                outcomes.append(TaskOutcome("error", detail=f"worker died: {exc}"))
                return False
            if message is None:
                self._discard(worker)
                outcomes.append(TaskOutcome("timeout", detail=f"exceeded {task_timeout:g}s"))
                return False
            if "error" in message:
                outcomes.append(TaskOutcome("error", detail=str(message["error"])))
            else:
                outcomes.append(TaskOutcome("ok", value=message.get("value")))
        return True

    def run_parallel(self, tasks: list[Any], task_timeout: float, chunk_size: int = 64) -> list[TaskOutcome]:
        """Run ``tasks`` in chunks of ``chunk_size`` (one worker round trip each), on all
        workers in parallel; one outcome per task, in order, each task with ``task_timeout``
        seconds of its own. Never raises: a failure makes its chunk's outcomes "error"."""
        outcomes: list[TaskOutcome] = [TaskOutcome("error", detail="not run")] * len(tasks)
        starts = range(0, len(tasks), chunk_size)

        def run_chunk(start: int) -> None:
            chunk = tasks[start : start + chunk_size]
            try:
                done = self.run(chunk, task_timeout=task_timeout)
            except Exception as exc:  # noqa: BLE001 - never raise into the training loop
                done = [TaskOutcome("error", detail=f"{type(exc).__name__}: {exc}")] * len(chunk)
            outcomes[start : start + len(chunk)] = done

        if tasks:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(starts)), thread_name_prefix="grader") as ex:
                for future in [ex.submit(run_chunk, start) for start in starts]:
                    future.result()
        return outcomes

    def shutdown(self) -> None:
        """Stop every worker; the pool cannot be used afterwards."""
        with self._cond:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._cond.notify_all()
        for worker in workers:
            worker.close()

    @property
    def size(self) -> int:
        with self._cond:
            return len(self._all)


_pool: GraderPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> GraderPool:
    """The process-wide pool, created on first use (and anew in a forked child)."""
    global _pool
    pool = _pool
    if pool is not None and pool.pid == os.getpid() and not pool._closed:
        return pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid() or _pool._closed:
            _pool = GraderPool()
        return _pool


def shutdown_pool() -> None:
    """Stop the process-wide pool's workers (a later call starts a new pool)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


def _forget_pool_in_child() -> None:
    # The parent's workers belong to the parent: never signal or close them from here.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


atexit.register(shutdown_pool)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)
