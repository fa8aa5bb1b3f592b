"""Multi-digit arithmetic task: generator knobs, reasoning traces, reward via the grader."""

from __future__ import annotations

import re

import pytest

from cs336_alignment.data import (
    ArithmeticTask,
    arithmetic_response,
    encode_prompt,
    format_prompt,
    generate_arithmetic,
    load_template,
    make_task,
)
from cs336_alignment.rewards.countdown import evaluate_expression

QUESTION = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")


def _operands(question: str) -> tuple[int, str, int]:
    m = QUESTION.fullmatch(question)
    assert m, question
    return int(m.group(1)), m.group(2), int(m.group(3))


def test_pinned_traces():
    assert arithmetic_response(47, "+", 85) == " 7 + 5 = 12, write 2 carry 1. 4 + 8 + 1 = 13. </think> <answer> 132 </answer>"
    assert arithmetic_response(82, "-", 47) == " 12 - 7 = 5, write 5 borrow 1. 8 - 1 - 4 = 3. </think> <answer> 35 </answer>"
    assert arithmetic_response(47, "*", 6) == " 7 * 6 = 42, write 2 carry 4. 4 * 6 + 4 = 28. </think> <answer> 282 </answer>"
    assert arithmetic_response(47, "*", 85) == (
        " 47 * 5 = 235. 47 * 80 = 3760. 235 + 3760 = 3995. </think> <answer> 3995 </answer>"
    )
    assert arithmetic_response(3, "-", 10).endswith("</think> <answer> -7 </answer>")
    assert arithmetic_response(100, "-", 1) == (
        " 10 - 1 = 9, write 9 borrow 1. 10 - 1 - 0 = 9, write 9 borrow 1. 1 - 1 - 0 = 0. </think> <answer> 99 </answer>"
    )


def _check_trace(a: int, op: str, b: int, response: str) -> None:
    """Every step is correct arithmetic, and the written digits spell the answer."""
    think, answer_part = response.split(" </think> <answer> ")
    answer = int(answer_part.removesuffix(" </answer>"))
    assert answer == {"+": a + b, "-": a - b, "*": a * b}[op]
    steps = think.strip().rstrip(".").split(". ")
    if steps[0].endswith("and negate"):
        steps, sign, (a, b) = steps[1:], -1, (b, a)
    else:
        sign = 1
    written: list[int] = []
    last = None
    for step in steps:
        lhs, _, rest = step.partition(" = ")
        value_text, _, note = rest.partition(", ")
        value = int(value_text)
        assert evaluate_expression(lhs) == value, step
        if note:
            m = re.fullmatch(r"write (\d)(?: (carry|borrow) (\d))?", note)
            assert m, step
            digit = int(m.group(1))
            if m.group(2) == "borrow":
                assert digit == value and int(m.group(3)) == 1
                assert int(lhs.split(" ")[0]) >= 10  # the borrowed-into column
            else:
                assert digit == value % 10 and int(m.group(3) or 0) == value // 10
            written.append(digit)
        last = value
    if op == "*" and min(len(str(a)), len(str(b))) > 1:  # partial products, then their sum
        assert len(steps) == min(len(str(a)), len(str(b))) + 1
        assert last == answer
    else:  # column steps: the last value, then the written digits, spell the result
        spelled = int(str(last) + "".join(str(d) for d in reversed(written)))
        assert sign * spelled == answer, response


@pytest.mark.parametrize(
    "knobs",
    [
        dict(operations=("+",), digits=2),
        dict(operations=("+",), digits=(1, 4), digits_b=(1, 3)),
        dict(operations=("-",), digits=3),
        dict(operations=("-",), digits=(1, 3), allow_negative=True),
        dict(operations=("*",), digits=3, digits_b=1),
        dict(operations=("*",), digits=2),
        dict(operations=("+", "-", "*"), digits=(1, 3)),
    ],
)
def test_generated_examples_are_correct(knobs):
    task = ArithmeticTask(**knobs)
    exs = task.generate(150, seed=0)
    ops_seen = set()
    for ex in exs:
        a, op, b = _operands(ex.question)
        ops_seen.add(op)
        assert op in task.operations
        assert ex.ground_truth == str({"+": a + b, "-": a - b, "*": a * b}[op])
        assert ex.response.startswith(" ") and ex.response.endswith(f" </think> <answer> {ex.ground_truth} </answer>")
        assert ex.source == "arithmetic" and ex.meta["task"] == "arithmetic"
        _check_trace(a, op, b, ex.response)
    assert ops_seen == set(task.operations)


def test_digit_knobs():
    for ex in ArithmeticTask(operations=("+", "*"), digits=3, digits_b=1).generate(100, 1):
        a, _, b = _operands(ex.question)
        assert 100 <= a <= 999 and 0 <= b <= 9
    lengths = set()
    for ex in ArithmeticTask(digits=(1, 4)).generate(300, 2):
        a, _, b = _operands(ex.question)
        lengths |= {len(str(a)), len(str(b))}
    assert lengths == {1, 2, 3, 4}


def test_subtraction_sign_knob():
    pos = ArithmeticTask(operations=("-",), digits=(1, 3)).generate(200, 3)
    assert all(int(e.ground_truth) >= 0 for e in pos)
    neg = ArithmeticTask(operations=("-",), digits=(1, 3), allow_negative=True).generate(200, 3)
    assert any(int(e.ground_truth) < 0 for e in neg)


def test_no_carry_knob():
    for op in ("+", "-"):
        task = ArithmeticTask(operations=(op,), digits=(2, 4), digits_b=(1, 4), allow_carry=False)
        for ex in task.generate(200, 4):
            a, _, b = _operands(ex.question)
            assert "carry" not in ex.response and "borrow" not in ex.response
            assert len(str(a)) >= 2 or len(str(b)) >= 2
            _check_trace(a, op, b, ex.response)
    carries = ArithmeticTask(digits=3).generate(100, 4)
    assert any("carry" in e.response for e in carries)


def test_deterministic_and_prefix_stable():
    a = generate_arithmetic(40, seed=11, operations=("+", "*"), digits=2)
    assert a == generate_arithmetic(40, seed=11, operations=("+", "*"), digits=2)
    assert generate_arithmetic(10, seed=11, operations=("+", "*"), digits=2) == a[:10]
    assert a != generate_arithmetic(40, seed=12, operations=("+", "*"), digits=2)


def test_invalid_knobs():
    with pytest.raises(ValueError):
        ArithmeticTask(operations=("/",))
    with pytest.raises(ValueError):
        ArithmeticTask(digits=0)
    with pytest.raises(ValueError):
        ArithmeticTask(digits=(3, 2))
    with pytest.raises(ValueError):
        ArithmeticTask(operations=())


def test_traces_are_short_for_a_tiny_model(tiny_tokenizer):
    template = load_template("r1_zero")
    for ex in make_task("arithmetic", digits=2, operations=["+", "-"]).generate(100, 0):
        assert len(encode_prompt(tiny_tokenizer, ex.response)) <= 60
        assert len(encode_prompt(tiny_tokenizer, format_prompt(template, ex))) <= 160


def _grader():
    try:
        from cs336_alignment.rewards import r1_zero_reward_fn
    except ImportError:  # the grader ships separately; skip only while it is absent
        pytest.skip("cs336_alignment.rewards.r1_zero_reward_fn not available")
    return r1_zero_reward_fn


def test_reward_via_grader():
    _grader()
    task = ArithmeticTask(operations=("+", "-", "*"), digits=2)
    for ex in task.generate(30, 5):
        assert task.reward_fn(ex.response, ex.ground_truth)["reward"] == 1.0
        wrong = ex.response.replace(f"<answer> {ex.ground_truth} </answer>", f"<answer> {int(ex.ground_truth) + 1} </answer>")
        out = task.reward_fn(wrong, ex.ground_truth)
        assert out["format_reward"] == 1.0 and out["reward"] == 0.0
        assert task.reward_fn(ex.ground_truth, ex.ground_truth)["reward"] == 0.0  # no r1_zero format
