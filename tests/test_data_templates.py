"""Prompt templates (package data) and the prompt tokenization rule."""

from __future__ import annotations

import hashlib

import pytest

from cs336_alignment.data import (
    TEMPLATE_NAMES,
    Example,
    encode_prompt,
    format_prompt,
    format_prompts,
    load_template,
    template_path,
)

# The R1-Zero template must match the course's file byte for byte (no trailing newline).
R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>.\nUser: {question}\nAssistant: <think>"
)


def test_r1_zero_template_is_verbatim():
    text = load_template("r1_zero")
    assert text == R1_ZERO
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "56213732da87e12ace60a2b88a16df0af18280fb0563a957cbecc938a6a2ac0e"
    )
    assert template_path("r1_zero").read_bytes() == R1_ZERO.encode()


def test_question_only_template():
    assert load_template("question_only") == "{question}"
    assert format_prompt(load_template("question_only"), "What is 2+2?") == "What is 2+2?"


def test_builtin_names():
    assert set(TEMPLATE_NAMES) == {"r1_zero", "question_only"}
    with pytest.raises(ValueError, match="unknown prompt template"):
        template_path("chatml")


def test_format_prompt_equals_str_format_for_builtins():
    q = "Let $f(x) = {x}^2$. Find $f(3)$."  # braces in the question are kept verbatim
    ex = Example(question=q, ground_truth="9")
    for name in TEMPLATE_NAMES:
        t = load_template(name)
        assert format_prompt(t, ex) == t.format(question=q)
    prompt = format_prompt(load_template("r1_zero"), ex)
    assert prompt.endswith(f"User: {q}\nAssistant: <think>")


def test_format_prompt_uses_stored_prompt():
    ex = Example(question="q", ground_truth="1", prompt="PRE-FORMATTED")
    assert format_prompt(load_template("r1_zero"), ex) == "PRE-FORMATTED"
    assert format_prompts(load_template("question_only"), [ex, Example(question="z", ground_truth="2")]) == [
        "PRE-FORMATTED",
        "z",
    ]


def test_format_prompt_rejects_template_name_and_bad_types():
    with pytest.raises(ValueError, match="load_template"):
        format_prompt("r1_zero", "q")
    with pytest.raises(TypeError):
        format_prompt("{question}", 42)  # type: ignore[arg-type]


def test_template_from_file(tmp_path):
    path = tmp_path / "mine.prompt"
    path.write_text("Q: {question} {not_a_field}\nA:")
    t = load_template(path)
    assert format_prompt(t, "2+2?") == "Q: 2+2? {not_a_field}\nA:"
    assert load_template(str(path)) == t
    bad = tmp_path / "bad.prompt"
    bad.write_text("no placeholder")
    with pytest.raises(ValueError, match=r"does not contain \{question\}"):
        load_template(bad)
    with pytest.raises(ValueError, match="neither a built-in name"):
        load_template(tmp_path / "missing.prompt")


class _RecordingTokenizer:
    """Stand-in HF tokenizer: prepends BOS unless add_special_tokens=False."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_encode_prompt_never_adds_special_tokens():
    tok = _RecordingTokenizer()
    assert encode_prompt(tok, "ab") == [97, 98]
    assert tok.calls == [False]


def test_encode_prompt_with_tiny_tokenizer_round_trips(tiny_tokenizer):
    prompt = format_prompt(load_template("r1_zero"), "What is 47 + 85?")
    ids = encode_prompt(tiny_tokenizer, prompt)
    assert ids == list(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(isinstance(i, int) for i in ids)
    assert tiny_tokenizer.decode(ids) == prompt
