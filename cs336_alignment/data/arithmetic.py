"""Multi-digit arithmetic (``a + b``, ``a - b``, ``a * b``) with short r1_zero reasoning traces.

Questions look like ``What is 47 + 85?``; the ground truth is the integer as a string
(``"132"``), graded by the r1_zero grader (:func:`arithmetic_reward_fn`). The reference
response (for SFT warm-up) is the text that follows the r1_zero prompt's ``Assistant: <think>``:
column arithmetic, right to left, then the answer::

     7 + 5 = 12, write 2 carry 1. 4 + 8 + 1 = 13. </think> <answer> 132 </answer>
     12 - 7 = 5, write 5 borrow 1. 8 - 1 - 4 = 3. </think> <answer> 35 </answer>      (82 - 47)
     7 * 6 = 42, write 2 carry 4. 4 * 6 + 4 = 28. </think> <answer> 282 </answer>     (47 * 6)
     47 * 5 = 235. 47 * 80 = 3760. 235 + 3760 = 3995. </think> <answer> 3995 </answer>

Difficulty knobs: ``operations``, ``digits`` / ``digits_b`` (digits per operand, an int or an
inclusive range), ``allow_carry`` (``False`` draws only carry-free additions and borrow-free
subtractions), ``allow_negative`` (subtractions with ``a < b``). A tiny model learns
2-digit addition quickly; 3-digit addition with carries or 2-digit by 1-digit multiplication
leave room for RL to improve after a brief SFT warm-up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ..rewards import r1_zero_reward_fn
from .examples import Example

__all__ = [
    "ArithmeticTask",
    "addition_trace",
    "arithmetic_response",
    "arithmetic_reward_fn",
    "arithmetic_trace",
    "generate_arithmetic",
    "multiplication_trace",
    "subtraction_trace",
]

OPERATIONS: tuple[str, ...] = ("+", "-", "*")


def _digits(n: int) -> list[int]:
    """Decimal digits of a non-negative int, least significant first."""
    return [int(c) for c in reversed(str(n))]


def addition_trace(a: int, b: int) -> str:
    """Column addition steps for non-negative ``a + b`` (no answer tags)."""
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    steps, carry = [], 0
    for k in range(width):
        s = da[k] + db[k] + carry
        text = f"{da[k]} + {db[k]}" + (f" + {carry}" if carry else "") + f" = {s}"
        if k < width - 1:
            text += f", write {s % 10}" + (f" carry {s // 10}" if s >= 10 else "")
        steps.append(text)
        carry = s // 10
    return ". ".join(steps) + "."


def subtraction_trace(a: int, b: int) -> str:
    """Column subtraction steps with borrows for ``a - b`` where ``a >= b >= 0``."""
    if not a >= b >= 0:
        raise ValueError("subtraction_trace needs a >= b >= 0")
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    steps, borrow = [], 0
    for k in range(len(da)):
        x, y = da[k], db[k]
        v = x - borrow - y
        new_borrow = 1 if v < 0 else 0
        top = x + 10 * new_borrow
        text = f"{top}" + (" - 1" if borrow else "") + f" - {y} = {v + 10 * new_borrow}"
        if k < len(da) - 1:
            text += f", write {v + 10 * new_borrow}" + (" borrow 1" if new_borrow else "")
        steps.append(text)
        borrow = new_borrow
    return ". ".join(steps) + "."


def multiplication_trace(a: int, b: int) -> str:
    """Steps for non-negative ``a * b``: column steps when one factor has one digit,
    otherwise partial products (one per digit of the shorter factor) and their sum."""
    big, small = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
    if small < 10:
        steps, carry = [], 0
        digits = _digits(big)
        for k, x in enumerate(digits):
            p = x * small + carry
            text = f"{x} * {small}" + (f" + {carry}" if carry else "") + f" = {p}"
            if k < len(digits) - 1:
                text += f", write {p % 10}" + (f" carry {p // 10}" if p >= 10 else "")
            steps.append(text)
            carry = p // 10
        return ". ".join(steps) + "."
    partials = [big * d * 10**k for k, d in enumerate(_digits(small))]
    steps = [f"{big} * {d * 10**k} = {p}" for (k, d), p in zip(enumerate(_digits(small)), partials)]
    steps.append(" + ".join(str(p) for p in partials) + f" = {big * small}")
    return ". ".join(steps) + "."


def arithmetic_trace(a: int, op: str, b: int) -> str:
    """The reasoning for ``a op b`` (a negative difference is computed as ``-(b - a)``)."""
    if op == "+":
        return addition_trace(a, b)
    if op == "-":
        if a >= b:
            return subtraction_trace(a, b)
        return f"{a} < {b}, so compute {b} - {a} and negate. " + subtraction_trace(b, a)
    if op == "*":
        return multiplication_trace(a, b)
    raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")


def arithmetic_response(a: int, op: str, b: int) -> str:
    """The full reference response (follows ``Assistant: <think>``): trace, then the answer."""
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f" {arithmetic_trace(a, op, b)} </think> <answer> {result} </answer>"


def arithmetic_reward_fn(response: str, ground_truth: Any) -> dict[str, float]:
    """Grade with the project's r1_zero grader (:func:`cs336_alignment.rewards.r1_zero_reward_fn`)."""
    return r1_zero_reward_fn(response, ground_truth)


def _as_range(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} must be >= 1 (or an inclusive (min, max) range), got {value}")
    return lo, hi


@dataclass(frozen=True)
class ArithmeticTask:
    """Multi-digit arithmetic generator and reward.

    Attributes:
        operations: Subset of ``("+", "-", "*")``; each example picks one uniformly.
        digits: Digits of the first operand: an int or an inclusive ``(min, max)`` range.
        digits_b: Digits of the second operand (default: same as ``digits``).
        allow_carry: If False, additions have no carries and subtractions no borrows
            (ignored for ``*``).
        allow_negative: If False, subtractions are drawn with ``a >= b``.
    """

    operations: tuple[str, ...] = ("+",)
    digits: int | tuple[int, int] = 2
    digits_b: int | tuple[int, int] | None = None
    allow_carry: bool = True
    allow_negative: bool = False

    name = "arithmetic"
    template_name = "r1_zero"

    def __post_init__(self) -> None:
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")
        _as_range(self.digits, "digits")
        if self.digits_b is not None:
            _as_range(self.digits_b, "digits_b")

    @staticmethod
    def _number(rng: random.Random, n_digits: int) -> int:
        return rng.randint(0, 9) if n_digits == 1 else rng.randint(10 ** (n_digits - 1), 10**n_digits - 1)

    def sample_problem(self, rng: random.Random) -> tuple[int, str, int]:
        """Draw ``(a, op, b)``."""
        op = rng.choice(self.operations)
        wa = rng.randint(*_as_range(self.digits, "digits"))
        wb = rng.randint(*_as_range(self.digits_b if self.digits_b is not None else self.digits, "digits_b"))
        if op == "-" and not self.allow_negative and wb > wa:
            wa, wb = wb, wa
        if self.allow_carry or op == "*":
            a, b = self._number(rng, wa), self._number(rng, wb)
            if op == "-" and not self.allow_negative and a < b:
                a, b = b, a
            return a, op, b
        # carry-free / borrow-free: draw column by column (a has the wider or equal width)
        swap = wb > wa
        wide, narrow = (wb, wa) if swap else (wa, wb)
        top, bottom = [], []
        for k in range(wide):
            lead_top = k == wide - 1 and wide > 1
            lead_bottom = k == narrow - 1 and narrow > 1
            if k >= narrow:
                top.append(rng.randint(1 if lead_top else 0, 9))
                bottom.append(0)
                continue
            if op == "+":
                x = rng.randint(1 if lead_top else 0, 9 - (1 if lead_bottom else 0))
                y = rng.randint(1 if lead_bottom else 0, 9 - x)
            else:  # "-": top digit >= bottom digit
                x = rng.randint(max(1 if lead_top else 0, 1 if lead_bottom else 0), 9)
                y = rng.randint(1 if lead_bottom else 0, x)
            top.append(x)
            bottom.append(y)
        a = int("".join(str(d) for d in reversed(top)))
        b = int("".join(str(d) for d in reversed(bottom[:narrow])))
        if swap and op == "+":
            a, b = b, a
        return a, op, b

    def make_example(self, a: int, op: str, b: int, meta: dict[str, Any] | None = None) -> Example:
        """The Example for ``a op b`` with ground truth and reference response."""
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Example(
            question=f"What is {a} {op} {b}?",
            ground_truth=str(result),
            solution=f"{a} {op} {b} = {result}",
            response=arithmetic_response(a, op, b),
            source=self.name,
            meta=dict(meta or {}),
        )

    def generate(self, n: int, seed: int) -> list[Example]:
        """``n`` examples, deterministic from ``seed`` (prefix-stable in ``n``)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(seed)
        return [
            self.make_example(*self.sample_problem(rng), meta={"task": self.name, "seed": seed, "index": i})
            for i in range(n)
        ]

    @staticmethod
    def reward_fn(response: str, ground_truth: Any) -> dict[str, float]:
        """:func:`arithmetic_reward_fn`."""
        return arithmetic_reward_fn(response, ground_truth)


def generate_arithmetic(n: int, seed: int, **knobs: Any) -> list[Example]:
    """``ArithmeticTask(**knobs).generate(n, seed)``."""
    return ArithmeticTask(**knobs).generate(n, seed)
