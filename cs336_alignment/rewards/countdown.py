"""Countdown reward: is the answer an arithmetic expression that uses each given number exactly
once and evaluates to the target?

``countdown_reward_fn(response, ground_truth)`` returns ``{"format_reward", "answer_reward",
"reward"}`` (floats in {0, 1}) like the MATH grader.

Ground truth: a dict ``{"numbers": [int, ...], "target": int}``, or the same dict as a JSON
string (``Example.ground_truth`` of the generated Countdown examples is the dict).

Format (same rule as the r1_zero grader): the response must contain ``</think> <answer>`` and
``</answer>``; the answer is the text after the last ``<answer>`` with ``</answer>`` removed.
The answer may optionally end with ``= <target>`` (e.g. ``(5 * 7) - 3 = 32``).

Expression language (parsed by a small recursive-descent parser; nothing is ever passed to
``eval``): non-negative integer literals, ``+ - * /`` (``×`` and ``÷`` are read as ``*`` and
``/``), unary minus, parentheses and whitespace. Exponentiation (``**``, ``^``) and anything
else is rejected, so huge powers cannot be built. Arithmetic is exact (``fractions.Fraction``);
division by zero scores 0. Bounds: at most :data:`MAX_EXPRESSION_CHARS` characters,
:data:`MAX_LITERAL_DIGITS` digits per literal and :data:`MAX_DEPTH` nesting levels. The number
check (multiset equality with the given numbers) runs before evaluation.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from typing import Any, Mapping

__all__ = [
    "ExpressionError",
    "check_countdown_answer",
    "countdown_reward_fn",
    "evaluate_expression",
    "expression_numbers",
    "extract_answer",
    "parse_countdown_ground_truth",
    "tokenize_expression",
]

MAX_EXPRESSION_CHARS = 200
MAX_LITERAL_DIGITS = 12
MAX_DEPTH = 32

_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()×÷]))")


class ExpressionError(ValueError):
    """The text is not a valid, bounded Countdown expression (or cannot be evaluated)."""


def tokenize_expression(text: str) -> list[str]:
    """Split an expression into integer literals and operator/parenthesis tokens.

    Raises:
        ExpressionError: a character outside the language, ``**``, a too-long input or a
            too-long literal.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExpressionError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        tok = m.group(1) or m.group(2)
        if m.group(1) and len(tok) > MAX_LITERAL_DIGITS:
            raise ExpressionError(f"number literal longer than {MAX_LITERAL_DIGITS} digits")
        tok = {"×": "*", "÷": "/"}.get(tok, tok)
        if tok == "*" and tokens and tokens[-1] == "*":
            raise ExpressionError("exponentiation is not allowed")
        tokens.append(tok)
        pos = m.end()
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := '-' unary | atom ; atom := INT | '(' expr ')'."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("unexpected end of expression")
        self.pos += 1
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"expression nested deeper than {MAX_DEPTH}")

    def parse(self) -> Fraction:
        value = self.expr()
        if self.peek() is not None:
            raise ExpressionError(f"unexpected token {self.peek()!r}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ExpressionError("division by zero")
                value = value / rhs
        return value

    def unary(self) -> Fraction:
        if self.peek() == "-":
            self.take()
            self.enter()
            value = -self.unary()
            self.depth -= 1
            return value
        return self.atom()

    def atom(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            self.enter()
            value = self.expr()
            if self.take() != ")":
                raise ExpressionError("expected ')'")
            self.depth -= 1
            return value
        if tok.isdigit():
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected token {tok!r}")


def evaluate_expression(text: str) -> Fraction:
    """Evaluate a Countdown expression exactly (see module docstring for the language).

    Raises:
        ExpressionError: invalid syntax, disallowed operator, bounds exceeded, or division
            by zero.
    """
    return _Parser(tokenize_expression(text)).parse()


def expression_numbers(text: str) -> list[int]:
    """The integer literals of an expression, in order (validates the tokens, not the syntax)."""
    return [int(t) for t in tokenize_expression(text) if t.isdigit()]


def parse_countdown_ground_truth(ground_truth: Any) -> tuple[list[int], int]:
    """``(numbers, target)`` from a dict ``{"numbers": [...], "target": N}`` or its JSON string.

    Raises:
        ValueError: a ground truth of another shape (a programming error, not a model error).
    """
    gt = ground_truth
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise ValueError(f"countdown ground truth is not JSON: {ground_truth!r}") from e
    if not isinstance(gt, Mapping) or "numbers" not in gt or "target" not in gt:
        raise ValueError(f"countdown ground truth must be {{'numbers': [...], 'target': N}}, got {ground_truth!r}")
    numbers, target = gt["numbers"], gt["target"]
    if not isinstance(numbers, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in numbers
    ):
        raise ValueError(f"countdown 'numbers' must be a list of ints, got {numbers!r}")
    if not isinstance(target, int) or isinstance(target, bool):
        raise ValueError(f"countdown 'target' must be an int, got {target!r}")
    return list(numbers), target


def extract_answer(response: str) -> str | None:
    """The answer text of an r1_zero-formatted response, or ``None`` if the format is wrong."""
    if "</think> <answer>" not in response or "</answer>" not in response:
        return None
    return response.split("<answer>")[-1].replace("</answer>", "").strip()


def check_countdown_answer(answer: str, numbers: list[int], target: int) -> bool:
    """True iff ``answer`` (optionally ``expr = target``) uses each of ``numbers`` exactly once
    and evaluates exactly to ``target``. Never raises on model output."""
    expression = answer
    if "=" in answer:
        expression, _, rhs = answer.partition("=")
        if rhs.strip() != str(target):
            return False
    try:
        if sorted(expression_numbers(expression)) != sorted(numbers):
            return False
        return evaluate_expression(expression) == target
    except ExpressionError:
        return False


def countdown_reward_fn(response: str, ground_truth: Any) -> dict[str, float]:
    """Score a Countdown response: format 1 if r1_zero-formatted; answer 1 if correct.

    ``reward`` equals ``answer_reward`` (which is 0 whenever the format is wrong).
    """
    numbers, target = parse_countdown_ground_truth(ground_truth)
    answer = extract_answer(response)
    if answer is None:
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    correct = 1.0 if check_countdown_answer(answer, numbers, target) else 0.0
    return {"format_reward": 1.0, "answer_reward": correct, "reward": correct}
