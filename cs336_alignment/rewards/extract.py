"""Pulling the answer out of a response (format rules of the two reward functions).

All functions here are linear-time string scans and safe to run on any input size.
"""

from __future__ import annotations

__all__ = [
    "R1_ZERO_CLOSE",
    "R1_ZERO_OPEN",
    "last_boxed_content",
    "question_only_answer",
    "r1_zero_answer",
]


R1_ZERO_OPEN = "</think> <answer>"
R1_ZERO_CLOSE = "</answer>"


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``; None when there is none or it is malformed.

    The last occurrence of ``\\boxed`` is located (``\\fbox`` if there is no
    ``\\boxed``); its braces are matched by counting; the result must have the exact form
    ``\\boxed{...}``: ``\\boxed 5``, ``\\boxed {5}``, an ``\\fbox`` and unbalanced braces
    all give None.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    end = -1
    for pos in range(start, len(text)):
        ch = text[pos]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                end = pos
                break
    if end < 0:
        return None
    boxed = text[start : end + 1]
    prefix = "\\boxed{"
    if not boxed.startswith(prefix) or not boxed.endswith("}"):
        return None
    return boxed[len(prefix) : -1]


def r1_zero_answer(response: str) -> tuple[bool, str | None]:
    """``(formatted, answer)`` for an R1-Zero response.

    Formatted means the response contains both ``</think> <answer>`` and ``</answer>``.
    The answer is everything after the last ``<answer>`` with every ``</answer>`` removed;
    if it contains ``\\boxed`` the box content is the answer, and an unparsable box gives
    ``(True, None)``. Unformatted responses give ``(False, None)``.
    """
    if R1_ZERO_OPEN not in response or R1_ZERO_CLOSE not in response:
        return False, None
    answer = response.split("<answer>")[-1].replace(R1_ZERO_CLOSE, "")
    if "\\boxed" in answer:
        return True, last_boxed_content(answer)
    return True, answer


def question_only_answer(response: str) -> str | None:
    """Content of the last ``\\boxed{}`` of a question-only response, None without one."""
    if "\\boxed" not in response:
        return None
    return last_boxed_content(response)
