"""Grading worker process: ``python -m cs336_alignment.rewards._worker``.

Reads length-prefixed JSON requests ``{"tasks": [...]}`` from stdin and writes one
length-prefixed JSON answer per task to its (private) stdout, in order. A grading task is
``{"answer": str, "truths": [str, ...], "mode": "default" | "lenient"}`` and its answer is
``{"value": bool}`` or ``{"error": str}``. A user-reward task is ``{"reward": spec,
"root": str, "args": base64 pickle of (args, kwargs)}``: the reward named by ``spec``
(``module:function`` or ``/abs/path.py:function``, imported once per worker, with
``root`` appended to ``sys.path`` when given) is called, and its answer is ``{"value":
{key: float}}`` or ``{"error": str}``. See :mod:`cs336_alignment.rewards.sandbox`.

The process is disposable: the parent kills it when a task overruns. It exits by itself
when its input closes or its parent process disappears, ignores SIGINT (so Ctrl-C in a
training terminal leaves it to the parent) and caps its address space when
``CS336_GRADER_WORKER_MEMORY_MB`` is set.
"""

from __future__ import annotations

import base64
import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

__all__ = [
    "main",
    "reward_dict",
    "run_reward",
    "run_task",
]

_HEADER = struct.Struct(">I")
_rewards: dict[str, Callable[..., Any]] = {}  # spec -> the imported user reward


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


def reward_dict(value: Any) -> dict[str, float]:
    """A user reward's return value as ``{key: float}``; raises ``TypeError`` unless it is
    a dict whose "reward" is a number. Other entries that are not numbers are dropped."""
    if not isinstance(value, dict):
        raise TypeError(f"the reward returned {type(value).__name__}, expected a dict with a 'reward'")
    try:
        reward = float(value["reward"])
    except (KeyError, TypeError, ValueError):
        raise TypeError(f"the reward returned {sorted(map(str, value))[:10]} without a numeric 'reward'") from None
    out: dict[str, float] = {}
    for key, item in value.items():
        try:
            out[str(key)] = float(item)
        except (TypeError, ValueError):
            pass
    out["reward"] = reward
    return out


def run_reward(task: dict[str, Any]) -> dict[str, Any]:
    """Call one user reward (imported on first use in this worker); never raises."""
    try:
        spec = task["reward"]
        fn = _rewards.get(spec)
        if fn is None:
            root = task.get("root")
            if root and root not in sys.path:
                sys.path.append(root)
            from . import resolve_reward_fn

            fn = _rewards[spec] = resolve_reward_fn(spec, in_process=True)
        args, kwargs = pickle.loads(base64.b64decode(task["args"]))
        return {"value": reward_dict(fn(*args, **kwargs))}
    except BaseException as exc:  # noqa: BLE001 - user code: SystemExit and the like included
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol channels private: what a library prints goes to stderr, and user
    # code reading stdin reads nothing.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
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
    import json

    while True:
        header = _read_exact(requests, _HEADER.size)
        if header is None:
            return
        (length,) = _HEADER.unpack(header)
        body = _read_exact(requests, length)
        if body is None:
            return
        request = json.loads(body)
        for task in request.get("tasks", []):
            send(run_reward(task) if "reward" in task else run_task(task))


if __name__ == "__main__":
    main()
