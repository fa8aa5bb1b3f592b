"""Answer grading: the reference rules (hand-written cases), lenient mode, API contracts."""

from __future__ import annotations

import json
import os
import random
import textwrap
from pathlib import Path

import pytest

import cs336_alignment
from cs336_alignment import rewards
from cs336_alignment.rewards import (
    grade_answer,
    grade_batch,
    grade_response,
    grading_stats,
    question_only_reward_fn,
    r1_zero_reward_fn,
    reset_grading_stats,
    resolve_reward_fn,
)
from cs336_alignment.rewards.equivalence import NeedsSympy, cheap_sympy_equal, sympy_difference_is_zero
from cs336_alignment.rewards.extract import last_boxed_content, r1_zero_answer
from cs336_alignment.rewards.latex_text import LatexRenderError, latex_to_text
from cs336_alignment.rewards.lenient import math_verify_available
from cs336_alignment.rewards.normalize import canonical_form, hendrycks_normalize, split_tuple

FIXTURES = Path(__file__).parent / "fixtures" / "grading"
pytestmark = pytest.mark.timeout(60)


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


DEFAULT_CASES = _load("default_cases.jsonl")
LENIENT_CASES = _load("lenient_cases.jsonl")
REWARD_FNS = {"r1_zero": r1_zero_reward_fn, "question_only": question_only_reward_fn}


def _as_pair(reward: dict[str, float]) -> list[int]:
    assert set(reward) == {"format_reward", "answer_reward", "reward"}
    assert all(isinstance(v, float) for v in reward.values())
    assert reward["reward"] == reward["answer_reward"]
    return [int(reward["format_reward"]), int(reward["answer_reward"])]


def test_fixture_set_is_large_and_two_sided() -> None:
    assert len(DEFAULT_CASES) >= 150
    verdicts = [tuple(c["expected"]) for c in DEFAULT_CASES]
    assert verdicts.count((1, 1)) >= 60 and verdicts.count((1, 0)) >= 60 and verdicts.count((0, 0)) >= 8
    assert {c["fn"] for c in DEFAULT_CASES} == {"r1_zero", "question_only"}


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=[c["rule"] for c in DEFAULT_CASES])
def test_default_mode_case(case: dict) -> None:
    reward = REWARD_FNS[case["fn"]](case["response"], case["ground_truth"])
    assert _as_pair(reward) == case["expected"], case["rule"]


def test_default_cases_in_one_batch_match_single_calls() -> None:
    cases = [c for c in DEFAULT_CASES if c["fn"] == "r1_zero"]
    batch = grade_batch([c["response"] for c in cases], [c["ground_truth"] for c in cases])
    assert [_as_pair(r) for r in batch.rewards] == [c["expected"] for c in cases]
    assert batch.counts["timeouts"] == 0 and batch.counts["errors"] == 0
    assert batch.counts["graded"] == len(cases)


@pytest.mark.skipif(not math_verify_available(), reason="math-verify (lenient extra) not installed")
@pytest.mark.parametrize("case", LENIENT_CASES, ids=[c["rule"] for c in LENIENT_CASES])
def test_lenient_mode_case(case: dict) -> None:
    reward = r1_zero_reward_fn(case["response"], case["ground_truth"], mode="lenient")
    assert _as_pair(reward) == case["expected"], case["rule"]


@pytest.mark.skipif(not math_verify_available(), reason="math-verify (lenient extra) not installed")
def test_lenient_accepts_more_than_default_and_fast_false_means_lenient() -> None:
    response = "ok </think> <answer>\\{3,1,2\\}</answer>"
    assert r1_zero_reward_fn(response, "\\{1,2,3\\}")["reward"] == 0.0
    assert r1_zero_reward_fn(response, "\\{1,2,3\\}", mode="lenient")["reward"] == 1.0
    assert r1_zero_reward_fn(response, "\\{1,2,3\\}", False)["reward"] == 1.0
    assert rewards.r1_zero_lenient_reward_fn(response, "\\{1,2,3\\}")["reward"] == 1.0
    boxed = "so \\boxed{\\{3,1,2\\}}"
    assert rewards.question_only_lenient_reward_fn(boxed, "\\{1,2,3\\}")["reward"] == 1.0


def test_top_level_exports_are_the_reward_functions() -> None:
    assert cs336_alignment.r1_zero_reward_fn is r1_zero_reward_fn
    assert cs336_alignment.question_only_reward_fn is question_only_reward_fn


# --- bad input never raises ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "truth"),
    [(None, "5"), (5, "5"), (b"</think> <answer>5</answer>", "5"), ("x </think> <answer>5</answer>", None),
     ("x </think> <answer>5</answer>", {"a": 1}), ("x </think> <answer>5</answer>", ["5", None])],
)
def test_bad_input_gives_zeros_and_is_counted(response: object, truth: object) -> None:
    reset_grading_stats()
    assert r1_zero_reward_fn(response, truth) == {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}  # type: ignore[arg-type]
    assert grading_stats()["bad_inputs"] == 1
    result = grade_response(response, truth)
    assert result.status == "bad_input" and result.detail


def test_unknown_mode_or_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="mode"):
        grade_response("x", "5", mode="strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        grade_response("x", "5", kind="countdown")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        grade_response("x", "5", timeout=0)


def test_grade_answer_grades_bare_answers() -> None:
    assert grade_answer("\\frac{1}{2}", "0.5").correct
    assert not grade_answer("\\frac{2}{4}", "\\frac{1}{2}").correct
    assert grade_answer("\\frac{2}{4}", "0.5").correct  # a decimal truth is compared by value
    assert grade_answer("x^2+2x+1", "(x+1)^2").where == "worker"
    assert grade_answer(None, "1").status == "bad_input"  # type: ignore[arg-type]


# --- batch API ------------------------------------------------------------------------------


def test_batch_preserves_order_and_counts() -> None:
    rng = random.Random(0)
    truths = [str(rng.randint(0, 500)) for _ in range(300)] + ["(x+1)^2"] * 20
    responses = []
    expected = []
    for i, truth in enumerate(truths):
        if truth == "(x+1)^2":
            answer, ok = ("x^2+2x+1", True) if i % 2 else ("x^2+1", False)
        else:
            ok = i % 3 != 0
            answer = truth if ok else str(int(truth) + 1)
        responses.append(f"think </think> <answer>{answer}</answer>")
        expected.append(ok)
    responses.append("no tags at all")
    truths.append("1")
    expected.append(False)
    result = grade_batch(responses, truths, chunk_size=7)
    assert [r.correct for r in result.results] == expected
    assert result.counts["worker_items"] == 20
    assert result.counts["correct"] == sum(expected)
    assert result.results[-1].formatted is False
    assert 0 < result.accuracy < 1


def test_batch_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="ground truths"):
        grade_batch(["a", "b"], ["1"])


# --- resolve_reward_fn ------------------------------------------------------------------------


def test_resolve_builtin_names_and_callables() -> None:
    assert resolve_reward_fn("r1_zero") is r1_zero_reward_fn
    assert resolve_reward_fn("question_only") is question_only_reward_fn
    assert resolve_reward_fn("r1_zero_lenient") is rewards.r1_zero_lenient_reward_fn
    assert resolve_reward_fn("cs336_alignment.rewards:r1_zero_reward_fn") is r1_zero_reward_fn
    assert resolve_reward_fn(len) is len


def test_resolve_file_path(tmp_path: Path) -> None:
    path = tmp_path / "my_grader.py"
    path.write_text(textwrap.dedent("""
        def reward(response, ground_truth):
            ok = float(response.strip() == str(ground_truth))
            return {"format_reward": 1.0, "answer_reward": ok, "reward": ok}
    """))
    fn = resolve_reward_fn(f"{path}:reward")
    assert fn("7", 7)["reward"] == 1.0 and fn("8", 7)["reward"] == 0.0


@pytest.mark.parametrize(
    "spec", ["no_such_reward", "cs336_alignment.rewards:missing", "no.such.module:fn", "/no/such/file.py:fn", ""]
)
def test_resolve_errors_name_the_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="cannot resolve reward function"):
        resolve_reward_fn(spec)


# --- building blocks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\frac{1}{2}"), ("\\boxed{{x}}", "{x}"), ("\\boxed{1", None),
     ("\\boxed 1", None), ("nothing", None), ("\\fbox{3}", None), ("\\boxed{}", "")],
)
def test_last_boxed_content(text: str, expected: str | None) -> None:
    assert last_boxed_content(text) == expected


def test_r1_zero_answer_extraction() -> None:
    assert r1_zero_answer("a </think> <answer> 5 </answer>") == (True, " 5 ")
    assert r1_zero_answer("a </think> <answer>\\boxed{5}</answer>") == (True, "5")
    assert r1_zero_answer("a </think> <answer>\\boxed{5</answer>") == (True, None)
    assert r1_zero_answer("a </think><answer>5</answer>") == (False, None)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [("\\text{ 5 }", "5"), ("5\\text{ cm}", "5"), ("\\dfrac12", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"), ("3/4", "\\frac{3}{4}"),
     ("x = 7", "7"), ("\\left(1,2\\right)", "(1,2)"), ("90^\\circ", "90"), ("\\$1", "1"), ("50\\%", "50"), (".5", "\\frac{1}{2}"),
     ("\\sqrt3", "\\sqrt{3}"), ("\\frac", "\\frac"), ("5\\text{ b}\\text{ c}d", "5\\text{ b}\\text{ c}d")],
)
def test_hendrycks_normalize(raw: str, normalized: str) -> None:
    assert hendrycks_normalize(raw) == normalized


@pytest.mark.parametrize(
    ("raw", "form"),
    [("\\frac{a+b}{c}", "a+b/c"), ("1\\frac{1}{2}", "1+1/2"), ("\\sqrt{2}", "sqrt(2)"), ("2\\pi", "2pi"), ("1,000", "1000"),
     ("\\text{Yes}", "yes"), ("5 cm", "5"), ("1 or 2", "1,2"), ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "[1+2]"), ("18.0", "18"),
     ("\\infty", "inf"), ("A \\cup B", "aub"), ("2 \\times 3", "2*3"), ("\\sqrt", "\\sqrt")],
)
def test_canonical_form(raw: str, form: str) -> None:
    assert canonical_form(raw) == form


def test_split_tuple() -> None:
    assert split_tuple("(1,2)") == ["1", "2"]
    assert split_tuple("[1,000,2)") == ["1000", "2"]
    assert split_tuple("((1,2))") == ["((1,2))"]
    assert split_tuple("") == []


@pytest.mark.parametrize(
    ("latex", "text"),
    [("\\frac{1}{2}", "1/2"), ("\\sqrt[3]{x}", "√(x)"), ("\\alpha\\le\\beta", "α≤β"), ("x \\ne y", "x y"), ("\\binom{5}{2}", "52"),
     ("\\mbox{cm}5", "5"), ("\\mathbb{R}", "ℝ"), ("\\hat{a}", "â"), ("a \\\\ b", "a \n b"), ("\\begin{cases}1&2\\end{cases}", "1   2"),
     ("\\not=", "≠"), ("\\frac\\pi2", "π/2"), ("\\frac{1}", "%s/%s1"), ("x}", "x"), ("\\left(1\\right]", "(1]")],
)
def test_latex_to_text(latex: str, text: str) -> None:
    assert latex_to_text(latex) == text


@pytest.mark.parametrize("latex", ["\\sqrt", "\\frac\\sqrt{2}{3}", "\\begin{pmatrix}"])
def test_latex_to_text_failures(latex: str) -> None:
    with pytest.raises(LatexRenderError):
        latex_to_text(latex)


def test_cheap_comparison_agrees_with_sympy() -> None:
    """The in-process shortcut for plain numbers gives exactly sympy's verdict."""
    rng = random.Random(1)
    samples = ["0", "-0", "12", "-12", "3.5", "3.50", "-3.5", ".5", "0.1", "0.10000000000000001", "123456789012345.6"]
    for _ in range(150):
        samples.append(str(rng.randint(-999, 999)))
        samples.append(f"{rng.uniform(-100, 100):.{rng.randint(1, 6)}f}")
    checked = 0
    for a in samples:
        for b in rng.sample(samples, 4) + [a]:
            try:
                cheap = cheap_sympy_equal(a, b)
            except NeedsSympy:
                continue
            assert cheap == sympy_difference_is_zero(a, b), (a, b)
            checked += 1
    assert checked > 500
    with pytest.raises(NeedsSympy):
        cheap_sympy_equal("x+1", "1+x")


@pytest.mark.timeout(60)
def test_default_mode_needs_no_optional_packages(tmp_path: Path) -> None:
    """With math-verify, pylatexenc and latex2sympy unimportable (in this process and in
    the workers), default grading still works and lenient mode fails with a clear hint."""
    import subprocess
    import sys

    for name in ("math_verify", "pylatexenc", "latex2sympy2_extended", "latex2sympy2"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    script = textwrap.dedent("""
        import sys
        from cs336_alignment.rewards import grade_batch, r1_zero_reward_fn
        responses = ["t </think> <answer>x^2+2x+1</answer>", "t </think> <answer>\\\\frac{2}{4}</answer>",
                     "t </think> <answer>\\\\dfrac{\\\\sqrt{2}}{2}</answer>"]
        result = grade_batch(responses, ["(x+1)^2", "\\\\frac{1}{2}", "\\\\frac{1}{\\\\sqrt{2}}"])
        assert [r.correct for r in result.results] == [True, False, True], result
        assert result.counts["worker_items"] >= 2 and result.counts["errors"] == 0
        assert not any(m in sys.modules for m in ("math_verify", "pylatexenc", "latex2sympy2_extended"))
        try:
            r1_zero_reward_fn(responses[0], "(x+1)^2", mode="lenient")
        except ImportError as exc:
            assert "lenient" in str(exc)
        else:
            raise AssertionError("lenient mode should need math-verify")
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr
