"""Countdown: seeded generator with guaranteed solutions, and the safe-parser reward."""

from __future__ import annotations

import json
import time
from collections import Counter
from fractions import Fraction

import pytest

from cs336_alignment.data import CountdownTask, format_prompt, generate_countdown, load_template, render_expression
from cs336_alignment.rewards.countdown import (
    MAX_EXPRESSION_CHARS,
    ExpressionError,
    countdown_reward_fn,
    evaluate_expression,
    parse_countdown_ground_truth,
)

GT = {"numbers": [3, 5, 7], "target": 32}


def respond(answer: str) -> str:
    return f" some reasoning </think> <answer> {answer} </answer>"


# ------------------------------------------------------------------ reward


@pytest.mark.parametrize("answer", ["5 * 7 - 3", "(7*5)-3", "7 × 5 - 3", "5 * 7 - 3 = 32", " ( ( 5 ) * 7 ) - 3 "])
def test_correct_expression_scores_one(answer):
    assert countdown_reward_fn(respond(answer), GT) == {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}


@pytest.mark.parametrize(
    "answer, why",
    [
        ("5 * 7 - 4", "value right but number 4 not given"),
        ("5 * 7", "number 3 unused"),
        ("5 * 7 - 3 + 3 - 3", "number 3 used three times"),
        ("35 - 3", "35 is not a given number"),
        ("5 * 7 + 3", "wrong value"),
        ("5 * 7 - 3 = 33", "claimed result is not the target"),
        ("(5 + 7) * 3", "wrong value 36"),
        ("3 / (7 - 7) + 5", "division by zero (and wrong numbers)"),
        ("", "empty"),
        ("thirty-two", "not arithmetic"),
        ("__import__('os').system('true')", "code"),
        ("5 * 7 - 3.0", "decimal literal"),
        ("5 * 7 - 3)", "unbalanced"),
        ("(5 * 7 - 3", "unbalanced"),
        ("5 7 - 3", "missing operator"),
        ("5 ** 7 - 3", "exponentiation"),
        ("5 ^ 7 - 3", "caret"),
        ("5 * 7 - ３", "unicode digit"),
    ],
)
def test_wrong_answers_score_zero_with_format_one(answer, why):
    assert countdown_reward_fn(respond(answer), GT) == {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}, why


def test_division_by_zero_scores_zero():
    gt = {"numbers": [4, 4, 9], "target": 9}
    assert countdown_reward_fn(respond("9 / (4 - 4)"), gt)["reward"] == 0.0
    assert countdown_reward_fn(respond("9 + 4 - 4"), gt)["reward"] == 1.0
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate_expression("9 / (4 - 4)")


def test_exact_rational_arithmetic():
    # 1/3 * 3 is exactly 1 (floats would give 0.9999999999999999 for some orders)
    gt = {"numbers": [1, 3, 3, 6], "target": 7}
    assert countdown_reward_fn(respond("1 / 3 * 3 + 6"), gt)["reward"] == 1.0
    assert evaluate_expression("1/3 + 1/6") == Fraction(1, 2)
    assert countdown_reward_fn(respond("6 / 4 * 2"), {"numbers": [6, 4, 2], "target": 3})["reward"] == 1.0
    assert countdown_reward_fn(respond("7 / 2"), {"numbers": [7, 2], "target": 3})["reward"] == 0.0


def test_unary_minus_and_negative_intermediate():
    assert countdown_reward_fn(respond("-3 + 5 * 7"), GT)["reward"] == 1.0
    assert countdown_reward_fn(respond("(3 - 5) * -7 + 18"), {"numbers": [3, 5, 7, 18], "target": 32})["reward"] == 1.0


def test_format_is_required():
    assert countdown_reward_fn("5 * 7 - 3", GT)["format_reward"] == 0.0
    assert countdown_reward_fn("<answer> 5 * 7 - 3 </answer>", GT)["reward"] == 0.0
    assert countdown_reward_fn(" x </think><answer> 5 * 7 - 3 </answer>", GT)["reward"] == 0.0  # no space
    assert countdown_reward_fn(" x </think> <answer> 5 * 7 - 3", GT)["reward"] == 0.0  # unclosed
    # the last <answer> is graded
    two = " x </think> <answer> 1 </answer> <answer> 5 * 7 - 3 </answer>"
    assert countdown_reward_fn(two, GT)["reward"] == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "99999999999 * 99999999999 * 99999999999",  # big, but bounded: just wrong
        "9" * 13,  # literal too long
        "2 ** 9999999999",
        "2 ** 2 ** 2 ** 2 ** 2 ** 2 ** 2 ** 99",
        "9 ^ 9 ^ 9 ^ 9",
        "(" * 150 + "3" + ")" * 150,  # deep nesting
        "-" * 190 + "3",  # deep unary chain
        "3 + " * 100 + "3",  # too long
        "1" + "*1" * 150,
    ],
)
def test_adversarial_inputs_score_zero_quickly(answer):
    start = time.perf_counter()
    out = countdown_reward_fn(respond(answer), GT)
    assert out["reward"] == 0.0
    assert time.perf_counter() - start < 0.5


def test_bounds_are_enforced_by_the_parser():
    with pytest.raises(ExpressionError, match="longer than"):
        evaluate_expression("1+" * MAX_EXPRESSION_CHARS + "1")
    with pytest.raises(ExpressionError, match="nested deeper"):
        evaluate_expression("(" * 40 + "1" + ")" * 40)
    with pytest.raises(ExpressionError, match="exponentiation"):
        evaluate_expression("2**3")
    assert evaluate_expression("(" * 20 + "1" + ")" * 20) == 1


def test_ground_truth_representations():
    as_json = json.dumps(GT)
    assert countdown_reward_fn(respond("5*7-3"), as_json)["reward"] == 1.0
    assert parse_countdown_ground_truth(as_json) == ([3, 5, 7], 32)
    for bad in ["32", {"numbers": [3, 5]}, {"numbers": "3 5", "target": 8}, {"numbers": [3], "target": 1.5}, None]:
        with pytest.raises(ValueError):
            countdown_reward_fn(respond("3"), bad)


# ------------------------------------------------------------------ generator


def test_generated_problems_are_solvable_and_reference_scores_one():
    task = CountdownTask()
    exs = task.generate(300, seed=0)
    counts = Counter(len(e.ground_truth["numbers"]) for e in exs)
    assert set(counts) == {3, 4}
    for ex in exs:
        nums, target = ex.ground_truth["numbers"], ex.ground_truth["target"]
        assert all(task.min_number <= n <= task.max_number for n in nums)
        assert isinstance(target, int) and 1 <= target <= task.max_target
        assert evaluate_expression(ex.solution) == target
        assert ex.response.endswith(f"</think> <answer> {ex.solution} </answer>")
        assert task.reward_fn(ex.response, ex.ground_truth)["reward"] == 1.0
        assert str(target) in ex.question and all(str(n) in ex.question for n in nums)
        assert ex.source == "countdown" and ex.line is None and ex.prompt is None


def test_generator_is_deterministic_and_prefix_stable():
    a = generate_countdown(50, seed=123)
    assert a == generate_countdown(50, seed=123)
    assert generate_countdown(20, seed=123) == a[:20]
    assert a != generate_countdown(50, seed=124)


def test_generator_knobs():
    exs = CountdownTask(num_numbers=3, min_number=1, max_number=9, max_target=30, operations=("+", "-")).generate(100, 1)
    for ex in exs:
        assert len(ex.ground_truth["numbers"]) == 3
        assert ex.ground_truth["target"] <= 30
        assert "*" not in ex.solution and "/" not in ex.solution
        assert countdown_reward_fn(ex.response, ex.ground_truth)["reward"] == 1.0
    with pytest.raises(ValueError):
        CountdownTask(num_numbers=1)
    with pytest.raises(ValueError):
        CountdownTask(operations=("*", "%"))
    with pytest.raises(ValueError, match="could not generate"):
        CountdownTask(min_number=50, max_number=60, max_target=5, operations=("+",)).generate(1, 0)


def test_reference_trace_steps_are_correct_arithmetic():
    for ex in generate_countdown(100, seed=9):
        think = ex.response.split("</think>")[0]
        steps = [s.strip() for s in think.strip().rstrip(".").split(". ")]
        assert len(steps) == len(ex.ground_truth["numbers"]) - 1
        for step in steps:
            lhs, rhs = step.split(" = ")
            assert evaluate_expression(lhs) == int(rhs) > 0
        assert int(steps[-1].split(" = ")[1]) == ex.ground_truth["target"]


def test_render_expression_minimal_parentheses():
    assert render_expression(("-", 10, ("-", 5, 2))) == "10 - (5 - 2)"
    assert render_expression(("-", ("-", 10, 5), 2)) == "10 - 5 - 2"
    assert render_expression(("*", ("+", 1, 2), 3)) == "(1 + 2) * 3"
    assert render_expression(("/", 12, ("*", 2, 3))) == "12 / (2 * 3)"
    assert render_expression(("+", 1, ("*", 2, 3))) == "1 + 2 * 3"


def test_prompt_for_countdown_example():
    ex = generate_countdown(1, seed=0)[0]
    prompt = format_prompt(load_template("r1_zero"), ex)
    assert prompt.endswith(f"User: {ex.question}\nAssistant: <think>")
    assert ex.response.startswith(" ")
