"""Grading worker process: ``python -m cs336_alignment.rewards._worker``.

Reads length-prefixed JSON requests ``{"tasks": [...]}`` from stdin and writes one
length-prefixed JSON answer per task to its (private) stdout, in order. A task is
``{"answer": str, "truths": [str, ...], "mode": "default" | "lenient"}`` and its answer is
``{"value": bool}`` or ``{"error": str}``. See :mod:`cs336_alignment.rewards.sandbox`.

The process is disposable: the parent kills it when a task overruns. It exits by itself
when its input closes or its parent process disappears, ignores SIGINT (so Ctrl-C in a
training terminal does not spray tracebacks) and caps its address space when
``CS336_GRADER_WORKER_MEMORY_MB`` is set.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time
from typing import Any, BinaryIO

__all__ = [
    "main",
    "run_task",
]

_HEADER = struct.Struct(">I")


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data.extend(chunk)
    return bytes(data)


def _watch_parent(parent_pid: int) -> None:
    """Exit as soon as the parent process is gone (we were re-parented)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def _limit_memory() -> None:
    limit_mb = os.environ.get("CS336_GRADER_WORKER_MEMORY_MB")
    if not limit_mb:
        return
    try:
        import resource

        limit = int(limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Grade one task; never raises."""
    from .equivalence import reference_equivalent, sympy_equal

    try:
        answer = task["answer"]
        truths = task["truths"]
        mode = task.get("mode", "default")
        for truth in truths:
            if reference_equivalent(answer, truth, sympy_equal):
                return {"value": True}
        if mode == "lenient":
            from .lenient import math_verify_equivalent

            return {"value": any(math_verify_equivalent(answer, truth) for truth in truths)}
        return {"value": False}
    except MemoryError:
        return {"error": "MemoryError"}
    except RecursionError:
        return {"error": "RecursionError"}
    except Exception as exc:  # noqa: BLE001 - the worker must answer every task
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def main() -> None:
    # Keep the protocol channel private: anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    _limit_memory()

    def send(message: Any) -> None:
        import json

        body = json.dumps(message, ensure_ascii=True).encode("ascii")
        channel.write(_HEADER.pack(len(body)) + body)
        channel.flush()

    # Import the heavy parts before announcing readiness, so task time is grading time.
    import sympy  # noqa: F401
    from sympy.parsing import sympy_parser  # noqa: F401

    from . import equivalence  # noqa: F401

    send({"ready": True, "pid": os.getpid()})
    stdin = sys.stdin.buffer
    import json

    while True:
        header = _read_exact(stdin, _HEADER.size)
        if header is None:
            return
        (length,) = _HEADER.unpack(header)
        body = _read_exact(stdin, length)
        if body is None:
            return
        request = json.loads(body)
        for task in request.get("tasks", []):
            send(run_task(task))


if __name__ == "__main__":
    main()
