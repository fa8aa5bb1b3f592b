"""Rewards: answer grading for math reasoning, and choosing a reward function by name.

The two handout reward functions give the CS336 reference grader's verdicts by default,
and every call is bounded in time (default 5 s) from any thread or process::

    >>> r1_zero_reward_fn("... </think> <answer>\\\\frac{1}{2}</answer>", "0.5")
    {'format_reward': 1.0, 'answer_reward': 1.0, 'reward': 1.0}

``mode="lenient"`` additionally accepts what math-verify proves equal (needs the
``lenient`` extra). :func:`grade_batch` grades many responses over a worker pool and
reports timeouts and errors; :func:`resolve_reward_fn` turns a name or an import path
into a reward function (a user's reward runs in the same worker pool, as a
:class:`SandboxedReward`). The rules are documented in ``docs/grading.md``.

Importing this package is cheap: sympy is only imported by grading worker processes.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import logging
import math
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .grader import (
    DEFAULT_TIMEOUT_S,
    BatchResult,
    GradeResult,
    GraderFailures,
    Mode,
    _count_failure,
    grade_answer,
    grade_batch,
    grade_response,
    grader_failures,
    grading_stats,
    reset_grading_stats,
)
from .sandbox import TaskOutcome, get_pool, shutdown_pool

__all__ = [
    "BatchResult",
    "DEFAULT_TIMEOUT_S",
    "GradeResult",
    "GraderFailures",
    "RewardFn",
    "SandboxedReward",
    "grade_answer",
    "grade_batch",
    "grade_response",
    "grader_failures",
    "grading_stats",
    "is_correct",
    "question_only_lenient_reward_fn",
    "question_only_reward_fn",
    "r1_zero_lenient_reward_fn",
    "r1_zero_reward_fn",
    "reset_grading_stats",
    "resolve_reward_fn",
    "score_pairs",
    "shutdown_pool",
    "warm_up",
]


RewardFn = Callable[[str, Any], dict[str, float]]


def is_correct(reward: Any) -> bool:
    """Whether one graded response counts as correct: ``answer_reward > 0``, or ``reward > 0``
    for a reward without an ``answer_reward`` key (a user's reward function)."""
    value = reward["answer_reward"] if "answer_reward" in reward else reward.get("reward", 0.0)
    return float(value) > 0


def _mode(fast: bool, mode: Mode | None) -> Mode:
    if mode is not None:
        return mode
    return "default" if fast else "lenient"


def r1_zero_reward_fn(
    response: str,
    ground_truth: Any,
    fast: bool = True,
    *,
    mode: Mode | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, float]:
    """Reward for an R1-Zero formatted response (``... </think> <answer>X</answer>``).

    Formatted (the response contains ``</think> <answer>`` and ``</answer>``) and correct:
    all three rewards 1; formatted and wrong (or an unparsable ``\\boxed``): format 1,
    answer and reward 0; unformatted: all 0. ``ground_truth`` is a string, a number or a
    list of acceptable answers. ``fast=False`` (the handout's flag) selects lenient mode,
    as does ``mode="lenient"``. Returns within about ``timeout`` seconds; timeouts and
    internal errors count as wrong and are counted in :func:`grading_stats`.
    """
    return grade_response(response, ground_truth, kind="r1_zero", mode=_mode(fast, mode), timeout=timeout).reward


def question_only_reward_fn(
    response: str,
    ground_truth: Any,
    fast: bool = True,
    *,
    mode: Mode | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, float]:
    """Reward for a free-form response graded on its last ``\\boxed{...}``.

    No (parsable) box: all zeros; otherwise format 1 and answer/reward 1 when correct.
    Same ground-truth forms, modes and time bound as :func:`r1_zero_reward_fn`.
    """
    return grade_response(response, ground_truth, kind="question_only", mode=_mode(fast, mode), timeout=timeout).reward


def r1_zero_lenient_reward_fn(response: str, ground_truth: Any) -> dict[str, float]:
    """:func:`r1_zero_reward_fn` in lenient mode (math-verify also consulted)."""
    return r1_zero_reward_fn(response, ground_truth, mode="lenient")


def question_only_lenient_reward_fn(response: str, ground_truth: Any) -> dict[str, float]:
    """:func:`question_only_reward_fn` in lenient mode (math-verify also consulted)."""
    return question_only_reward_fn(response, ground_truth, mode="lenient")


def warm_up(workers: int | None = None, timeout: float = 60.0) -> int:
    """Start grading workers ahead of time (e.g. before training); returns how many run."""
    return get_pool().warm_up(workers, timeout=timeout)


# --- choosing a reward function by name ------------------------------------------------------

# Built-in names. Rewards defined elsewhere in the package are listed by import path and
# imported only when asked for.
_BUILTIN_REWARDS: dict[str, str] = {
    "r1_zero": f"{__name__}:r1_zero_reward_fn",
    "question_only": f"{__name__}:question_only_reward_fn",
    "r1_zero_lenient": f"{__name__}:r1_zero_lenient_reward_fn",
    "question_only_lenient": f"{__name__}:question_only_lenient_reward_fn",
    "countdown": f"{__name__}.countdown:countdown_reward_fn",
}


def _load_from_file(path: Path, spec: str) -> Any:
    module_name = f"_cs336_reward_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    if file_spec is None or file_spec.loader is None:
        raise ValueError(f"cannot resolve reward function {spec!r}: {path} is not an importable file")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[module_name] = module
    try:
        file_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


_logger = logging.getLogger(__name__)
_ZERO = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
_reported: set[tuple[str, str]] = set()  # (spec, first line) of user-reward errors logged
_reported_lock = threading.Lock()


def _report_error(spec: str, detail: str) -> None:
    """Log a user reward's error once per distinct first line (at most 100 lines in all)."""
    line = (detail.strip().splitlines() or ["unknown error"])[0]
    with _reported_lock:
        if (spec, line) in _reported or len(_reported) >= 100:
            return
        _reported.add((spec, line))
    _logger.warning("reward %s failed (scored as wrong; logged once per message): %s", spec, line)


@dataclass(frozen=True)
class SandboxedReward:
    """A user's reward function, called in a worker of the grader pool.

    ``spec`` is ``package.module:function`` or ``/absolute/path/file.py:function``; each
    worker imports it once (``import_root``, the ``sys.path`` entry the parent found the
    module on, is added to the worker's path). A call returns the reward's dict with its
    values as floats, within about ``timeout`` seconds: a call that overruns (the worker
    is killed and replaced), raises, or returns anything but a dict with a numeric
    "reward" scores as wrong (all three handout rewards 0) and is counted as a timeout or
    an error in :func:`grading_stats` (so in :func:`grader_failures`); errors are also
    logged once per distinct message. Picklable; never raises.
    """

    spec: str
    timeout: float = DEFAULT_TIMEOUT_S
    import_root: str = ""

    def __call__(self, response: Any, ground_truth: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``reward(response, ground_truth, ...)`` in a worker (extra arguments are passed on)."""
        deadline = time.monotonic() + self.timeout
        try:
            task = self._task((response, ground_truth, *args), kwargs)
            (outcome,) = get_pool().run([task], task_timeout=self.timeout, deadline=deadline)
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            outcome = TaskOutcome("error", detail=f"{type(exc).__name__}: {exc}")
        return self._score(outcome)

    def score_batch(self, responses: Sequence[Any], ground_truths: Sequence[Any]) -> list[dict[str, float]]:
        """``[self(r, g) for r, g in zip(responses, ground_truths)]``, faster: 64 calls per
        worker round trip, all workers in parallel, each call with ``timeout`` seconds."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        outcomes: list[TaskOutcome | None] = []
        tasks, sent = [], []
        for index, (response, truth) in enumerate(zip(responses, ground_truths)):
            try:
                tasks.append(self._task((response, truth), {}))
                sent.append(index)
                outcomes.append(None)
            except Exception as exc:  # noqa: BLE001 - an unpicklable argument scores as an error
                outcomes.append(TaskOutcome("error", detail=f"{type(exc).__name__}: {exc}"))
        for index, outcome in zip(sent, get_pool().run_parallel(tasks, task_timeout=self.timeout)):
            outcomes[index] = outcome
        return [self._score(outcome) for outcome in outcomes if outcome is not None]

    def _task(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        payload = base64.b64encode(pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")
        return {"reward": self.spec, "root": self.import_root, "args": payload}

    def _score(self, outcome: TaskOutcome) -> dict[str, float]:
        if outcome.status == "ok" and isinstance(outcome.value, dict):
            return {str(k): float(v) for k, v in outcome.value.items()}
        status = "timeout" if outcome.status == "timeout" else "error"
        _count_failure(status)
        if status == "error":
            _report_error(self.spec, outcome.detail)
        return dict(_ZERO)


def _import_root(module_part: str) -> str:
    """The ``sys.path`` entry this process imported ``module_part``'s top package from."""
    top = sys.modules.get(module_part.partition(".")[0])
    file = getattr(top, "__file__", None)
    if not file:
        return ""
    where = os.path.dirname(os.path.abspath(file))
    return os.path.dirname(where) if os.path.basename(file).startswith("__init__.") else where


def resolve_reward_fn(
    spec: str | RewardFn, *, in_process: bool = False, timeout: float = DEFAULT_TIMEOUT_S
) -> RewardFn:
    """A reward function from a name, an import path or a callable.

    Accepted: a callable (returned unchanged); a built-in name (``r1_zero``,
    ``question_only``, ``r1_zero_lenient``, ``question_only_lenient``, ``countdown``);
    ``package.module:function``; or ``path/to/file.py:function`` (for example the
    official ``drgrpo_grader.py:r1_zero_reward_fn``). Raises ``ValueError`` naming the
    spec when it cannot be resolved (the spec is imported here, once, to check it).

    Built-in names and functions of this package bound their own time and are returned
    as they are. A user's function (any other import path) is user code: by default it
    comes back as a :class:`SandboxedReward`, which runs each call in the grader worker
    pool within ``timeout`` seconds (overruns and errors score as wrong and are
    counted); ``in_process=True`` returns the function itself, to run in this process
    without a time bound (for rewards that need state shared with the caller).
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"cannot resolve reward function {spec!r}: expected a name, 'module:function' or a callable")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    target = _BUILTIN_REWARDS.get(spec.strip(), spec.strip())
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        known = ", ".join(sorted(_BUILTIN_REWARDS))
        raise ValueError(
            f"cannot resolve reward function {spec!r}: not a known name ({known}) "
            "and not of the form 'module:function' or 'path/to/file.py:function'"
        )
    path: Path | None = None
    try:
        if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
            path = Path(module_part).expanduser()
            if not path.is_file():
                raise ValueError(f"cannot resolve reward function {spec!r}: no file {path}")
            module = _load_from_file(path, spec)
        else:
            module = importlib.import_module(module_part)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot resolve reward function {spec!r}: importing {module_part!r} failed: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"cannot resolve reward function {spec!r}: {module_part!r} has no callable {attr!r}")
    if in_process or module_part == __name__ or module_part.startswith(f"{__name__}."):
        return fn
    if path is not None:
        return SandboxedReward(f"{path.resolve()}:{attr}", timeout=timeout)
    return SandboxedReward(target, timeout=timeout, import_root=_import_root(module_part))


def score_pairs(reward_fn: RewardFn, responses: Sequence[str], ground_truths: Sequence[Any]) -> list[dict[str, float]]:
    """``[reward_fn(r, g) for r, g in zip(responses, ground_truths)]``, through the reward's
    ``score_batch`` when it has one (a :class:`SandboxedReward`: many calls per worker round trip)."""
    if hasattr(reward_fn, "score_batch"):
        return reward_fn.score_batch(list(responses), list(ground_truths))
    return [reward_fn(r, g) for r, g in zip(responses, ground_truths)]
