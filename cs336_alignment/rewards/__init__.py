"""Rewards: answer grading for math reasoning, and choosing a reward function by name.

The two handout reward functions give the CS336 reference grader's verdicts by default,
and every call is bounded in time (default 5 s) from any thread or process::

    >>> r1_zero_reward_fn("... </think> <answer>\\\\frac{1}{2}</answer>", "0.5")
    {'format_reward': 1.0, 'answer_reward': 1.0, 'reward': 1.0}

``mode="lenient"`` additionally accepts what math-verify proves equal (needs the
``lenient`` extra). :func:`grade_batch` grades many responses over a worker pool and
reports timeouts and errors; :func:`resolve_reward_fn` turns a name or an import path
into a reward function. The rules are documented in ``docs/grading.md``.

Importing this package is cheap: sympy is only imported by grading worker processes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .grader import (
    DEFAULT_TIMEOUT_S,
    BatchResult,
    GradeResult,
    GraderFailures,
    Mode,
    grade_answer,
    grade_batch,
    grade_response,
    grader_failures,
    grading_stats,
    reset_grading_stats,
)
from .sandbox import get_pool, shutdown_pool

__all__ = [
    "BatchResult",
    "DEFAULT_TIMEOUT_S",
    "GradeResult",
    "GraderFailures",
    "RewardFn",
    "grade_answer",
    "grade_batch",
    "grade_response",
    "grader_failures",
    "grading_stats",
    "question_only_lenient_reward_fn",
    "question_only_reward_fn",
    "r1_zero_lenient_reward_fn",
    "r1_zero_reward_fn",
    "reset_grading_stats",
    "resolve_reward_fn",
    "shutdown_pool",
    "warm_up",
]


RewardFn = Callable[[str, Any], dict[str, float]]


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


def resolve_reward_fn(spec: str | RewardFn) -> RewardFn:
    """A reward function from a name, an import path or a callable.

    Accepted: a callable (returned unchanged); a built-in name (``r1_zero``,
    ``question_only``, ``r1_zero_lenient``, ``question_only_lenient``, ``countdown``);
    ``package.module:function``; or ``path/to/file.py:function`` (for example the
    official ``drgrpo_grader.py:r1_zero_reward_fn``). Raises ``ValueError`` naming the
    spec when it cannot be resolved.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"cannot resolve reward function {spec!r}: expected a name, 'module:function' or a callable")
    target = _BUILTIN_REWARDS.get(spec.strip(), spec.strip())
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        known = ", ".join(sorted(_BUILTIN_REWARDS))
        raise ValueError(
            f"cannot resolve reward function {spec!r}: not a known name ({known}) "
            "and not of the form 'module:function' or 'path/to/file.py:function'"
        )
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
    return fn
