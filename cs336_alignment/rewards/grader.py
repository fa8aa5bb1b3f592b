"""Grading entry points: single responses, batches, and the statistics they keep.

Every call is bounded in time. Cheap decisions (format checks, string normalisation,
integer and short-decimal comparisons) run in the calling process on inputs of at most
``INLINE_MAX_CHARS`` characters; everything else (sympy, math-verify, very long inputs)
runs in the sandboxed worker pool of :mod:`cs336_alignment.rewards.sandbox`, where an
overrunning task is killed. Timeouts and internal errors count as wrong answers, are
recorded in the result (and in :func:`grading_stats`) and never raise.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .equivalence import NeedsSympy, cheap_sympy_equal, reference_equivalent
from .extract import question_only_answer, r1_zero_answer
from .sandbox import TaskOutcome, get_pool

__all__ = [
    "BatchResult",
    "DEFAULT_TIMEOUT_S",
    "GradeResult",
    "GraderFailures",
    "INLINE_MAX_CHARS",
    "grade_answer",
    "grade_batch",
    "grade_response",
    "grader_failures",
    "grading_stats",
    "reset_grading_stats",
]


Mode = Literal["default", "lenient"]
RewardKind = Literal["r1_zero", "question_only"]

DEFAULT_TIMEOUT_S = 5.0
# Longest answer / ground truth (in characters) graded in the calling process; longer
# inputs go to a worker. The in-process rules are at worst quadratic in this length.
INLINE_MAX_CHARS = 1000
# Bytes of answer text sent per worker round trip in batch mode (keeps messages small).
_BATCH_CHUNK_ITEMS = 64

_MODES = ("default", "lenient")
_KINDS = ("r1_zero", "question_only")


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one response.

    ``status`` is "ok", "timeout" (the time limit was hit), "error" (the grader failed
    internally) or "bad_input" (the response or ground truth had an unusable type); only
    "ok" results can be correct. ``where`` says whether sympy/math-verify workers were
    needed ("worker") or the calling process decided ("inline").
    """

    formatted: bool
    correct: bool
    status: str = "ok"
    where: str = "inline"
    detail: str = ""

    @property
    def reward(self) -> dict[str, float]:
        """The handout's reward dict: format_reward, answer_reward, reward."""
        value = 1.0 if (self.formatted and self.correct) else 0.0
        return {"format_reward": 1.0 if self.formatted else 0.0, "answer_reward": value, "reward": value}


@dataclass
class BatchResult:
    """Per-item results (in input order) with counts and timing of one batch."""

    results: list[GradeResult]
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rewards(self) -> list[dict[str, float]]:
        return [r.reward for r in self.results]

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.results) / max(1, len(self.results))


# --- statistics -----------------------------------------------------------------------

_STAT_KEYS = ("graded", "correct", "timeouts", "errors", "bad_inputs", "worker_items")
_stats_lock = threading.Lock()
_stats = dict.fromkeys(_STAT_KEYS, 0)


def _count(results: Sequence[GradeResult]) -> dict[str, int]:
    counts = dict.fromkeys(_STAT_KEYS, 0)
    for r in results:
        counts["graded"] += 1
        counts["correct"] += int(r.correct)
        counts["timeouts"] += int(r.status == "timeout")
        counts["errors"] += int(r.status == "error")
        counts["bad_inputs"] += int(r.status == "bad_input")
        counts["worker_items"] += int(r.where == "worker")
    with _stats_lock:
        for key, value in counts.items():
            _stats[key] += value
    return counts


def _count_failure(status: str) -> None:
    """Count one "timeout" or "error" of a user reward (which has no GradeResult)."""
    with _stats_lock:
        _stats["timeouts" if status == "timeout" else "errors"] += 1


def grading_stats() -> dict[str, int]:
    """Process-wide totals since start (or the last reset): graded, correct, timeouts,
    errors, bad_inputs, worker_items. The plain reward functions return only the
    handout's three floats; this is where their timeouts and errors are counted. User
    rewards run in the worker pool add to timeouts and errors only."""
    with _stats_lock:
        return dict(_stats)


def reset_grading_stats() -> None:
    """Zero the totals reported by :func:`grading_stats`."""
    with _stats_lock:
        for key in _STAT_KEYS:
            _stats[key] = 0


@dataclass
class GraderFailures:
    """Grader timeouts and errors during a ``with grader_failures()`` block (each scored as wrong)."""

    timeouts: int = 0
    errors: int = 0


@contextlib.contextmanager
def grader_failures() -> Iterator[GraderFailures]:
    """Count the grader timeouts and errors of the block (from :func:`grading_stats`)::

        with grader_failures() as failures:
            rewards = [reward_fn(r, gt) for r, gt in pairs]
        failures.timeouts, failures.errors
    """
    before = grading_stats()
    failures = GraderFailures()
    try:
        yield failures
    finally:
        after = grading_stats()
        failures.timeouts = after["timeouts"] - before["timeouts"]
        failures.errors = after["errors"] - before["errors"]


# --- input handling ---------------------------------------------------------------------


def _truth_strings(ground_truth: Any) -> list[str] | None:
    """Ground truth(s) as strings: a string, a number, or a list/tuple of those.

    Numbers become ``str(number)`` (so ``0.5`` is "0.5"). Returns None for anything else.
    """
    if isinstance(ground_truth, str):
        return [ground_truth]
    if isinstance(ground_truth, (int, float)):
        return [str(ground_truth)]
    if isinstance(ground_truth, (list, tuple)):
        truths = []
        for item in ground_truth:
            if isinstance(item, str):
                truths.append(item)
            elif isinstance(item, (int, float)):
                truths.append(str(item))
            else:
                return None
        return truths
    return None


@dataclass
class _Item:
    """One response on its way through grading."""

    formatted: bool = False
    answer: str | None = None
    truths: list[str] = field(default_factory=list)
    result: GradeResult | None = None


def _prepare(response: Any, ground_truth: Any, kind: str) -> _Item:
    if not isinstance(response, str):
        return _Item(result=GradeResult(False, False, "bad_input", detail=f"response is {type(response).__name__}"))
    if kind == "r1_zero":
        formatted, answer = r1_zero_answer(response)
        if not formatted:
            return _Item(result=GradeResult(False, False))
        if answer is None:
            return _Item(result=GradeResult(True, False, detail="unparsable \\boxed"))
    else:
        answer = question_only_answer(response)
        if answer is None:
            return _Item(result=GradeResult(False, False))
    truths = _truth_strings(ground_truth)
    if truths is None:
        detail = f"ground truth is {type(ground_truth).__name__}"
        return _Item(result=GradeResult(False, False, "bad_input", detail=detail))
    return _Item(formatted=True, answer=answer, truths=truths)


def _decide_inline(answer: str, truths: list[str], mode: str) -> bool | None:
    """The verdict if the calling process can reach it cheaply, else None."""
    if len(answer) > INLINE_MAX_CHARS or any(len(t) > INLINE_MAX_CHARS for t in truths):
        return None
    undecided = False
    for truth in truths:
        try:
            if reference_equivalent(answer, truth, cheap_sympy_equal):
                return True
        except NeedsSympy:
            undecided = True
        except Exception:  # noqa: BLE001 - let the worker reproduce and report it
            undecided = True
    if undecided or mode == "lenient":
        return None
    return False


def _from_outcome(outcome: TaskOutcome) -> GradeResult:
    if outcome.status == "ok":
        return GradeResult(True, bool(outcome.value), where="worker")
    return GradeResult(True, False, outcome.status, where="worker", detail=outcome.detail)


_lenient_checked = False


def _require_lenient_support() -> None:
    """Fail loudly (once, at the first lenient call) when math-verify is not installed."""
    global _lenient_checked
    if _lenient_checked:
        return
    from .lenient import math_verify_available

    if not math_verify_available():
        raise ImportError("lenient grading needs math-verify: pip install 'cs336-alignment[lenient]'")
    _lenient_checked = True


def _check_options(kind: str, mode: str, timeout: float) -> None:
    if mode == "lenient":
        _require_lenient_support()
    if kind not in _KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {_KINDS}")
    if mode not in _MODES:
        raise ValueError(f"unknown grading mode {mode!r}; expected one of {_MODES}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _run_one(task: dict[str, Any], deadline: float) -> TaskOutcome:
    try:
        remaining = max(0.0, deadline - time.monotonic())
        (outcome,) = get_pool().run([task], task_timeout=remaining, deadline=deadline)
        return outcome
    except Exception as exc:  # noqa: BLE001 - never raise into the training loop
        return TaskOutcome("error", detail=f"{type(exc).__name__}: {exc}")


# --- public entry points ------------------------------------------------------------------


def grade_response(
    response: Any,
    ground_truth: Any,
    *,
    kind: RewardKind = "r1_zero",
    mode: Mode = "default",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> GradeResult:
    """Grade one response; returns within about ``timeout`` seconds whatever the input.

    ``kind`` picks the format rules ("r1_zero" or "question_only"), ``mode`` the
    equivalence ("default" = the reference verdicts, "lenient" = also math-verify).
    The time limit covers the whole call, including waiting for a free worker.
    """
    _check_options(kind, mode, timeout)
    deadline = time.monotonic() + timeout
    item = _prepare(response, ground_truth, kind)
    if item.result is None:
        assert item.answer is not None
        verdict = _decide_inline(item.answer, item.truths, mode)
        if verdict is not None:
            item.result = GradeResult(True, verdict)
        else:
            task = {"answer": item.answer, "truths": item.truths, "mode": mode}
            item.result = _from_outcome(_run_one(task, deadline))
    _count([item.result])
    return item.result


def grade_answer(
    answer: str, ground_truth: Any, *, mode: Mode = "default", timeout: float = DEFAULT_TIMEOUT_S
) -> GradeResult:
    """Grade a bare answer (already extracted, no format rules) against the ground truth."""
    if not isinstance(answer, str):
        result = GradeResult(False, False, "bad_input", detail=f"answer is {type(answer).__name__}")
        _count([result])
        return result
    _check_options("r1_zero", mode, timeout)
    deadline = time.monotonic() + timeout
    truths = _truth_strings(ground_truth)
    if truths is None:
        result = GradeResult(False, False, "bad_input", detail=f"ground truth is {type(ground_truth).__name__}")
    else:
        verdict = _decide_inline(answer, truths, mode)
        if verdict is not None:
            result = GradeResult(True, verdict)
        else:
            result = _from_outcome(_run_one({"answer": answer, "truths": truths, "mode": mode}, deadline))
    _count([result])
    return result


def grade_batch(
    responses: Sequence[Any],
    ground_truths: Sequence[Any],
    *,
    kind: RewardKind = "r1_zero",
    mode: Mode = "default",
    timeout: float = DEFAULT_TIMEOUT_S,
    chunk_size: int = _BATCH_CHUNK_ITEMS,
) -> BatchResult:
    """Grade many (response, ground truth) pairs; results keep the input order.

    Items the calling process can decide cheaply are decided inline; the rest are sent
    to the worker pool in chunks, several workers in parallel. Each worker-graded item
    gets ``timeout`` seconds of its own; an overrunning item is a timeout and only that
    item is lost. ``counts`` holds graded/correct/timeouts/errors/bad_inputs/worker_items.
    """
    _check_options(kind, mode, timeout)
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    start = time.monotonic()
    items = [_prepare(r, g, kind) for r, g in zip(responses, ground_truths)]
    pending: list[int] = []
    for index, item in enumerate(items):
        if item.result is not None:
            continue
        assert item.answer is not None
        verdict = _decide_inline(item.answer, item.truths, mode)
        if verdict is None:
            pending.append(index)
        else:
            item.result = GradeResult(True, verdict)
    if pending:
        tasks = [{"answer": items[i].answer, "truths": items[i].truths, "mode": mode} for i in pending]
        outcomes = get_pool().run_parallel(tasks, task_timeout=timeout, chunk_size=chunk_size)
        for index, outcome in zip(pending, outcomes):
            items[index].result = _from_outcome(outcome)
    results = [item.result if item.result is not None else GradeResult(True, False, "error") for item in items]
    return BatchResult(results=results, seconds=time.monotonic() - start, counts=_count(results))
