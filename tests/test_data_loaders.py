"""Loaders for MATH-style, GSM8K and sft.jsonl files (tests/fixtures/data/)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cs336_alignment.data import (
    DataError,
    Example,
    detect_kind,
    gsm8k_final_answer,
    last_boxed,
    load_dataset,
    load_examples,
    load_gsm8k,
    load_math,
    load_sft,
    question_from_prompt,
)

FIX = Path(__file__).parent / "fixtures" / "data"


# ------------------------------------------------------------------ MATH


def test_math_basic_fields_lines_and_meta():
    exs = load_math(FIX / "math_basic.jsonl")
    assert [e.line for e in exs] == [1, 3, 5, 6]  # blank lines 2 and 4 ignored, numbering kept
    first = exs[0]
    assert first.question == "What is $1+1$?"
    assert first.ground_truth == "2"
    assert first.solution == "We have $1+1=\\boxed{2}$."
    assert first.response is None and first.prompt is None
    assert first.source == str(FIX / "math_basic.jsonl")
    assert dict(first.meta) == {"level": "Level 1", "type": "Prealgebra"}
    assert exs[1].ground_truth == "\\frac{1}{2}"
    assert exs[2].ground_truth == ["2", "-2"]  # several accepted answers
    assert exs[2].solution is None
    assert exs[3].ground_truth == "6"  # numbers become strings


def test_math_field_variants_and_boxed_derivation():
    exs = load_math(FIX / "math_variants.jsonl")
    assert [(e.question, e.ground_truth) for e in exs] == [
        ("What is $2 \\cdot 3$?", "6"),
        ("Compute $10-4$.", "6"),
        ("Find $\\sqrt{16}$.", "4"),
        ("Write one over root two.", "\\dfrac{1}{\\sqrt{2}}"),  # last \boxed{}, nested braces
        ("Braces.", "\\{1, 2\\}"),  # escaped braces are not delimiters
        ("Compute $3^2$.", "9"),
    ]
    assert exs[5].meta == {"unique_id": "test/algebra/1.json"}


def test_math_malformed_raises_with_file_line_and_field():
    path = FIX / "math_malformed.jsonl"
    with pytest.raises(DataError) as info:
        load_math(path)
    err = info.value
    assert err.line == 3 and err.field == "answer" and err.path == str(path)
    msg = str(err)
    assert msg.startswith(f"{path}:3: field 'answer': missing")
    assert "(have: level, problem)" in msg
    assert isinstance(err, ValueError)


def test_math_malformed_skip_reports_every_skipped_line(caplog):
    path = FIX / "math_malformed.jsonl"
    result = load_dataset(path, "math", skip_invalid=True)
    assert [e.line for e in result.examples] == [1, 2, 8]
    rep = result.report
    assert (rep.n_loaded, rep.n_skipped, rep.kind) == (3, 5, "math")
    assert [r.split(": ", 1)[0] for r in rep.reasons] == [f"{path}:{n}" for n in (3, 4, 5, 6, 7)]
    assert "invalid JSON" in rep.reasons[1]
    assert "expected a JSON object, got list" in rep.reasons[2]
    assert "field 'problem': empty" in rep.reasons[3]
    assert "\\boxed" in rep.reasons[4]
    assert "3 loaded, 5 skipped" in rep.summary()
    with caplog.at_level(logging.WARNING):
        exs = load_examples(path, "math", skip_invalid=True)
    assert len(exs) == 3
    assert "5 skipped" in caplog.text


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"problem": "p", "answer": "1"', "invalid JSON"),
        ('{"problem": 5, "answer": "1"}', "field 'problem': expected a string, got int"),
        ('{"problem": "p", "answer": true}', "field 'answer': expected a string or number, got bool"),
        ('{"problem": "p", "answer": []}', "field 'answer': empty list"),
        ('{"problem": "p", "answer": "  "}', "field 'answer': empty"),
        ('{"answer": "1"}', "field 'problem': missing (or question, query, input) (have: answer)"),
        ('{"problem": "p", "solution": "no box"}', "field 'solution'"),
    ],
)
def test_math_line_errors(tmp_path, line, expected):
    path = tmp_path / "one.jsonl"
    path.write_text('{"problem": "ok", "answer": "1"}\n\n' + line + "\n")
    with pytest.raises(DataError) as info:
        load_math(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert expected in str(info.value)


def test_empty_file_is_an_error_not_an_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(path)


def test_unknown_kind_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown data kind"):
        load_examples(FIX / "math_basic.jsonl", kind="csv")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "nope.jsonl")


def test_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"problem": "p", "answer": "1"}).encode() + b"\n")
    assert load_math(path)[0].ground_truth == "1"


# ------------------------------------------------------------------ GSM8K


def test_gsm8k_answers_solutions_and_commas():
    exs = load_gsm8k(FIX / "gsm8k.jsonl")
    assert [e.ground_truth for e in exs] == ["7", "12000", "-3"]
    assert [e.line for e in exs] == [1, 2, 4]
    assert exs[0].question.startswith("Ann has 3 apples")
    assert exs[0].solution == "She has 3 + 4 = <<3+4=7>>7 apples."
    assert "####" not in exs[1].solution


def test_gsm8k_malformed():
    path = FIX / "gsm8k_malformed.jsonl"
    with pytest.raises(DataError) as info:
        load_gsm8k(path)
    assert str(info.value) == f"{path}:2: field 'answer': does not end with '#### <final answer>'"
    result = load_dataset(path, "gsm8k", skip_invalid=True)
    assert result.report.n_skipped == 2 and len(result.examples) == 1
    assert result.report.reasons[1] == f"{path}:3: field 'answer': missing (have: question)"


def test_gsm8k_final_answer_helper():
    assert gsm8k_final_answer("x\n#### 1,234,567") == "1234567"
    assert gsm8k_final_answer("x\n#### 3.5") == "3.5"
    assert gsm8k_final_answer("a #### 1 #### 2") == "2"
    assert gsm8k_final_answer("no marker") is None
    assert gsm8k_final_answer("x ####  ") is None


# ------------------------------------------------------------------ sft.jsonl


def test_sft_prompt_response_ground_truth():
    from cs336_alignment.data import format_prompt, load_template

    exs = load_sft(FIX / "sft.jsonl")
    assert len(exs) == 4
    first = exs[0]
    assert first.question == "What is $1+2$?"  # recovered from the r1_zero prompt
    assert first.prompt == load_template("r1_zero").replace("{question}", "What is $1+2$?")
    assert first.response == " 1 + 2 = 3. </think> <answer> 3 </answer>"
    assert first.ground_truth == "3"
    # format_prompt returns the stored prompt unchanged (whatever template is passed)
    assert format_prompt(load_template("question_only"), first) == first.prompt
    # variants: output/answer with explicit question; completion/gt with a non-template prompt
    assert (exs[2].question, exs[2].response, exs[2].ground_truth) == (
        "plain prompt",
        " 7 </think> <answer> 7 </answer>",
        "7",
    )
    assert exs[3].question == "Free-form prompt without a template" and exs[3].ground_truth == "x"


def test_sft_malformed():
    path = FIX / "sft_malformed.jsonl"
    with pytest.raises(DataError) as info:
        load_sft(path)
    assert str(info.value) == f"{path}:3: field 'response': expected a string, got int"
    result = load_dataset(path, "sft", skip_invalid=True)
    assert len(result.examples) == 2  # line 2 has no ground_truth: the handout's sft.jsonl has none either
    assert result.examples[1].ground_truth is None and result.examples[1].response
    assert result.report.reasons == [f"{path}:3: field 'response': expected a string, got int"]


def test_question_from_prompt():
    assert question_from_prompt("Sys.\nUser: Q?\nmore\nAssistant: <think>") == "Q?\nmore"
    assert question_from_prompt("just text") == "just text"


# ------------------------------------------------------------------ autodetect


@pytest.mark.parametrize(
    "name, kind",
    [("math_basic.jsonl", "math"), ("math_variants.jsonl", "math"), ("gsm8k.jsonl", "gsm8k"), ("sft.jsonl", "sft")],
)
def test_autodetect_matches_explicit_kind(name, kind):
    result = load_dataset(FIX / name)
    assert result.report.kind == kind
    assert result.examples == load_examples(FIX / name, kind)


def test_autodetect_skips_leading_bad_line_only_with_flag(tmp_path):
    path = tmp_path / "bad_first.jsonl"
    path.write_text('not json\n{"question": "q", "answer": "w\\n#### 4"}\n')
    with pytest.raises(DataError, match=":1: invalid JSON"):
        load_examples(path)
    result = load_dataset(path, skip_invalid=True)
    assert result.report.kind == "gsm8k" and result.examples[0].ground_truth == "4"


def test_detect_kind():
    assert detect_kind({"prompt": "p", "response": "r", "ground_truth": "g"}) == "sft"
    assert detect_kind({"prompt": "p", "ground_truth": "g"}) == "sft"  # malformed sft line, still sft
    assert detect_kind({"question": "q", "answer": "x\n#### 4"}) == "gsm8k"
    assert detect_kind({"question": "q", "answer": "4"}) == "math"
    assert detect_kind({"problem": "q", "solution": "s"}) == "math"


# ------------------------------------------------------------------ helpers / record


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{42}$.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\boxed{\\{x\\}}", "\\{x\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5$", "5"),
        ("\\boxed{unclosed", None),
        ("nothing", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_example_is_frozen_hashable_and_round_trips():
    ex = load_math(FIX / "math_basic.jsonl")[2]
    with pytest.raises(AttributeError):
        ex.question = "x"  # type: ignore[misc]
    assert hash(ex) == hash(Example.from_dict(ex.to_dict()))  # list ground truth still hashable
    assert Example.from_dict(json.loads(json.dumps(ex.to_dict()))) == ex
    assert ex.ground_truth_text() == '["2","-2"]'
    assert ex.location.endswith("math_basic.jsonl:5")
