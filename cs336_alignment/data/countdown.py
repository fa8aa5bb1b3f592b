"""Countdown: reach a target by combining given numbers with + - * /, each number used once.

A generated example always has a solution: the generator samples the numbers, combines them
in random order with random operations into one expression tree (every intermediate result
a positive integer), and uses the tree's value as the target. The tree also gives the
reference response for SFT warm-up, in r1_zero format, e.g. for numbers 3, 5, 7 and target 32::

     5 * 7 = 35. 35 - 3 = 32. </think> <answer> 5 * 7 - 3 </answer>

(the r1_zero prompt ends with ``Assistant: <think>``; the response is what follows it).

``Example.ground_truth`` is ``{"numbers": [...], "target": N}``; score responses with
:func:`cs336_alignment.rewards.countdown.countdown_reward_fn` (also :meth:`CountdownTask.reward_fn`).
Generation is pure and deterministic: ``generate(n, seed)`` depends only on the task's knobs,
``n`` and ``seed``, and ``generate(m, seed)`` is a prefix of ``generate(n, seed)`` for m < n.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Union

from ..rewards.countdown import countdown_reward_fn
from .examples import Example

__all__ = [
    "CountdownTask",
    "generate_countdown",
    "render_expression",
]

# An expression tree: an int leaf, or (op, left, right).
Node = Union[int, tuple[str, "Node", "Node"]]

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
MAX_ATTEMPTS = 1000


def _apply(op: str, a: int, b: int) -> int | None:
    """Result of ``a op b`` if it is a positive integer, else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    raise ValueError(f"unknown operation {op!r}")


def render_expression(node: Node) -> str:
    """Infix text of an expression tree with only the parentheses it needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    lhs, rhs = render_expression(left), render_expression(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        lhs = f"({lhs})"
    if not isinstance(right, int) and (
        _PRECEDENCE[right[0]] < _PRECEDENCE[op]
        or (_PRECEDENCE[right[0]] == _PRECEDENCE[op] and op in "-/")
    ):
        rhs = f"({rhs})"
    return f"{lhs} {op} {rhs}"


@dataclass(frozen=True)
class CountdownTask:
    """Countdown problem generator and reward.

    Attributes:
        num_numbers: How many numbers per problem: an int, or an inclusive ``(min, max)``.
        min_number: Smallest number that can be drawn.
        max_number: Largest number that can be drawn.
        max_target: Largest allowed target (targets are integers in ``[1, max_target]``).
        operations: Operations the generator may use (the reward accepts all four anyway).

    Difficulty: fewer numbers, smaller ranges and only ``+``/``-`` make it easier.
    """

    num_numbers: int | tuple[int, int] = (3, 4)
    min_number: int = 1
    max_number: int = 20
    max_target: int = 100
    operations: tuple[str, ...] = ("+", "-", "*", "/")

    name = "countdown"
    template_name = "r1_zero"

    def __post_init__(self) -> None:
        lo, hi = self._count_range()
        if lo < 2 or hi < lo:
            raise ValueError(f"num_numbers must be >= 2 (or a (min, max) range), got {self.num_numbers}")
        if not 0 <= self.min_number <= self.max_number:
            raise ValueError("need 0 <= min_number <= max_number")
        if self.max_target < 1:
            raise ValueError("max_target must be >= 1")
        if not self.operations or any(op not in _PRECEDENCE for op in self.operations):
            raise ValueError(f"operations must be a non-empty subset of + - * /, got {self.operations}")
        if "+" not in self.operations:
            raise ValueError("operations must include '+' (used as fallback to guarantee a solution)")

    def _count_range(self) -> tuple[int, int]:
        if isinstance(self.num_numbers, int):
            return self.num_numbers, self.num_numbers
        lo, hi = self.num_numbers
        return int(lo), int(hi)

    def sample_problem(self, rng: random.Random) -> tuple[list[int], int, Node, list[str]]:
        """Draw ``(numbers, target, tree, steps)``; ``steps`` are lines like ``"5 * 7 = 35"``.

        Raises:
            ValueError: no target within ``max_target`` found in :data:`MAX_ATTEMPTS` draws
                (the knobs make it impossible or very unlikely).
        """
        lo, hi = self._count_range()
        for _ in range(MAX_ATTEMPTS):
            k = rng.randint(lo, hi)
            numbers = [rng.randint(self.min_number, self.max_number) for _ in range(k)]
            pool: list[tuple[int, Node]] = [(v, v) for v in numbers]
            steps: list[str] = []
            while len(pool) > 1:
                i, j = rng.sample(range(len(pool)), 2)
                (a, ta), (b, tb) = pool[i], pool[j]
                ops = list(self.operations)
                rng.shuffle(ops)
                for op in ops:
                    value = _apply(op, a, b)
                    if value is not None and value > 0:
                        break
                else:
                    op, value = "+", a + b
                steps.append(f"{a} {op} {b} = {value}")
                for idx in sorted((i, j), reverse=True):
                    pool.pop(idx)
                pool.append((value, (op, ta, tb)))
            target, tree = pool[0]
            if 1 <= target <= self.max_target:
                return numbers, target, tree, steps
        raise ValueError(
            f"could not generate a Countdown target <= {self.max_target} in {MAX_ATTEMPTS} attempts; "
            "raise max_target or lower max_number / num_numbers"
        )

    @staticmethod
    def question_text(numbers: list[int], target: int) -> str:
        """The problem statement for ``numbers`` and ``target``."""
        listed = ", ".join(str(n) for n in numbers)
        return (
            f"Using the numbers {listed}, make {target}. "
            "Use each number exactly once, with + - * / and parentheses."
        )

    def make_example(self, numbers: list[int], target: int, tree: Node | None, steps: list[str] | None,
                     meta: dict[str, Any] | None = None) -> Example:
        """Build the Example for a problem; with ``tree``/``steps``, include the reference response."""
        solution = render_expression(tree) if tree is not None else None
        response = None
        if solution is not None and steps is not None:
            response = f" {'. '.join(steps)}. </think> <answer> {solution} </answer>"
        return Example(
            question=self.question_text(numbers, target),
            ground_truth={"numbers": list(numbers), "target": int(target)},
            solution=solution,
            response=response,
            source=self.name,
            meta=dict(meta or {}),
        )

    def generate(self, n: int, seed: int) -> list[Example]:
        """``n`` examples, deterministic from ``seed`` (prefix-stable in ``n``)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(seed)
        out = []
        for index in range(n):
            numbers, target, tree, steps = self.sample_problem(rng)
            out.append(self.make_example(numbers, target, tree, steps, {"task": self.name, "seed": seed, "index": index}))
        return out

    @staticmethod
    def reward_fn(response: str, ground_truth: Any) -> dict[str, float]:
        """:func:`cs336_alignment.rewards.countdown.countdown_reward_fn`."""
        return countdown_reward_fn(response, ground_truth)


def generate_countdown(n: int, seed: int, **knobs: Any) -> list[Example]:
    """``CountdownTask(**knobs).generate(n, seed)``."""
    return CountdownTask(**knobs).generate(n, seed)
