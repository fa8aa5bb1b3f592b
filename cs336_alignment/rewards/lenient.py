"""Opt-in lenient equivalence backed by math-verify (the ``lenient`` extra).

Lenient mode accepts everything the default mode accepts, plus what math-verify proves
equal: sets in any order, intervals, matrices, ``\\sqrt3``-style shorthands, equations
written the other way round, and so on. It corresponds to the reference grader's
``fast=False`` mode. math-verify is imported only here, only when lenient mode is used,
and only inside grading worker processes (its own timeouts rely on signals, which is why
they are switched off: the worker pool enforces the time limit instead).
"""

from __future__ import annotations

from typing import Any

from .extract import last_boxed_content

__all__ = [
    "math_verify_available",
    "math_verify_equivalent",
]


_CONFIGS: Any = None


def math_verify_available() -> bool:
    """Whether the optional math-verify package can be imported (imports it if so)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _extraction_configs() -> Any:
    global _CONFIGS
    if _CONFIGS is None:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        _CONFIGS = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return _CONFIGS


def _as_math(text: str) -> str:
    return text if "$" in text else f"${text}$"


def math_verify_equivalent(answer: str, truth: str) -> bool:
    """Whether math-verify proves ``answer`` equal to ``truth`` (first match of each).

    Raises ``ImportError`` with an installation hint when math-verify is missing.
    """
    try:
        from math_verify import parse, verify
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lenient grading needs math-verify: pip install 'cs336-alignment[lenient]'"
        ) from exc
    if "\\boxed" in truth:
        resolved = last_boxed_content(truth)
        if resolved is None:
            return False
        truth = resolved
    configs = _extraction_configs()
    options: dict[str, Any] = {
        "extraction_config": configs,
        "fallback_mode": "no_fallback",
        "extraction_mode": "first_match",
        "parsing_timeout": None,
    }
    gold = parse(_as_math(truth), **options)
    predicted = parse(_as_math(answer), **options)
    return bool(verify(gold, predicted, timeout_seconds=None))
