"""Bad input is refused before the run: a one-line DataError (exit code 2) naming file, line, offset.

Covers data files (missing, a directory, not UTF-8, empty), prompt templates (unknown, missing,
a directory, not UTF-8, no ``{question}``), the size guard :func:`check_lengths` (the character
bound refuses a 32 MiB line without tokenizing it; the token bound; a batched call), the loader's
time on huge lines, and the CLI's ``error: <message>`` with exit 2.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cs336_alignment.cli import app
from cs336_alignment.data import (
    MAX_CHARS_PER_TOKEN,
    DataError,
    DataFileNotFoundError,
    Example,
    TemplateError,
    check_lengths,
    encode_prompt,
    last_boxed,
    load_dataset,
    load_examples,
    load_template,
    question_from_prompt,
    template_path,
)
from cs336_alignment.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "data"
GOOD = b'{"problem": "What is 1+1?", "answer": "2"}\n'


def assert_user_error(err: BaseException, cls: type = DataError) -> str:
    """``err`` is a ``cls`` UserError with exit code 2 and a one-line message; returns the message."""
    assert isinstance(err, cls) and isinstance(err, UserError)
    assert err.exit_code == 2
    message = str(err)
    assert message and "\n" not in message
    return message


class SpyTokenizer:
    """The tiny tokenizer, recording each call (as a list of texts) and refusing huge texts."""

    def __init__(self, tokenizer, refuse_over: int = 1_000_000) -> None:
        self.tokenizer = tokenizer
        self.refuse_over = refuse_over
        self.calls: list[list[str]] = []

    def __call__(self, texts, **kwargs):
        batch = [texts] if isinstance(texts, str) else list(texts)
        longest = max(map(len, batch), default=0)
        if longest > self.refuse_over:  # fail at once rather than tokenize for minutes
            raise AssertionError(f"the tokenizer was given a {longest:,}-character text")
        self.calls.append(batch)
        return self.tokenizer(texts, **kwargs)

    def get_vocab(self):
        return self.tokenizer.get_vocab()


# --------------------------------------------------------------------------------------------
# data files


def test_missing_data_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert assert_user_error(info.value, DataFileNotFoundError) == f"{path}: no such file"
    assert isinstance(info.value, FileNotFoundError)  # what callers caught before


def test_directory_as_data_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_examples(tmp_path)
    assert assert_user_error(info.value) == f"{tmp_path}: is a directory, not a JSONL file"


@pytest.mark.parametrize(
    "content, bad, line",
    [
        (GOOD + b"\n" + b'{"problem": "caf\xff", "answer": "1"}\n', b"\xff", 3),  # latin-1 byte after blank line
        (b"\xef\xbb\xbf" + GOOD + b'{"problem": "\xc3\xa9\xe9", "answer": "1"}\n', b"\xe9\x22", 2),  # BOM, then e-acute
        (GOOD * 2 + b'{"problem": "x", "answer": "\xe2\x82"}\r\n', b"\xe2\x82\x22", 3),  # truncated euro sign
        (b"\x80" + GOOD, b"\x80", 1),  # a stray continuation byte first
    ],
    ids=["latin-1", "after-bom", "truncated", "first-byte"],
)
def test_non_utf8_names_line_and_file_offset(tmp_path, content, bad, line):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    offset = content.index(bad)
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = assert_user_error(info.value)
    assert message == f"{path}:{line}: not UTF-8 (byte 0x{bad[0]:02x} at offset {offset})"
    assert info.value.line == line


def test_non_utf8_line_is_skipped_and_counted_with_skip_invalid(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(GOOD + b'{"problem": "\xff", "answer": "1"}\n' + GOOD)
    result = load_dataset(path, skip_invalid=True)
    assert (result.report.n_loaded, result.report.n_skipped) == (2, 1)
    assert result.report.reasons == [f"{path}:2: not UTF-8 (byte 0xff at offset {len(GOOD) + 13})"]


def test_empty_file_and_malformed_line_exit_2(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(DataError) as info:
        load_examples(empty)
    assert assert_user_error(info.value) == f"{empty}: no examples (file is empty or blank)"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD + b"{not json\n")
    with pytest.raises(DataError) as info:
        load_examples(bad)
    assert assert_user_error(info.value).startswith(f"{bad}:2: invalid JSON")


# --------------------------------------------------------------------------------------------
# prompt templates


def _template_case(tmp_path: Path, case: str) -> tuple[Path | str, str]:
    """(what to load, the message expected) for one bad template."""
    path = tmp_path / "mine.prompt"
    if case == "unknown name":
        return "chatml", "chatml: prompt template is neither a built-in name (r1_zero, question_only) nor an existing file"
    if case == "missing":
        return path, f"{path}: prompt template is neither a built-in name (r1_zero, question_only) nor an existing file"
    if case == "directory":
        return tmp_path, f"{tmp_path}: is a directory, not a prompt template file"
    if case == "not utf-8":
        path.write_bytes(b"Solve:\n{question} \xa7 now\n")
        return path, f"{path}:2: not UTF-8 (byte 0xa7 at offset 18)"
    path.write_text("Solve: {q}\n", encoding="utf-8")  # no placeholder
    return path, f"{path}: prompt template does not contain {{question}}"


@pytest.mark.parametrize("case", ["unknown name", "missing", "directory", "not utf-8", "no placeholder"])
def test_bad_template_is_a_one_line_template_error(tmp_path, case):
    source, expected = _template_case(tmp_path, case)
    with pytest.raises(ValueError) as info:  # still a ValueError for older callers
        load_template(source)
    assert assert_user_error(info.value, TemplateError) == expected


def test_unknown_builtin_template_path():
    with pytest.raises(TemplateError) as info:
        template_path("chatml")
    assert assert_user_error(info.value, TemplateError) == "chatml: unknown prompt template; built-in: r1_zero, question_only"


# --------------------------------------------------------------------------------------------
# the size guard


def _ex(question: str, line: int | None = 7, response: str | None = None, source: str = "data/t.jsonl") -> Example:
    return Example(question=question, ground_truth="1", response=response, source=source, line=line)


def test_normal_examples_pass_in_one_batched_call(tiny_tokenizer):
    spy = SpyTokenizer(tiny_tokenizer)
    examples = load_examples(FIX / "math_basic.jsonl") + load_examples(FIX / "sft.jsonl")
    template = load_template("r1_zero")
    check_lengths(examples, template=template, tokenizer=spy, max_tokens=4096, with_response=True)
    assert len(spy.calls) == 1  # prompts and responses in one call
    n_responses = sum(1 for ex in examples if ex.response)
    assert len(spy.calls[0]) == len(examples) + n_responses
    check_lengths([], template=template, tokenizer=spy, max_tokens=4096, with_response=True)
    assert len(spy.calls) == 1  # nothing to tokenize


def test_token_bound_refuses_text_under_the_character_bound(tiny_tokenizer):
    question = "1" * 200  # one token per digit: 200 tokens in 200 characters
    n = len(encode_prompt(tiny_tokenizer, question))
    assert n > 100 and len(question) < 100 * MAX_CHARS_PER_TOKEN
    check_lengths([_ex(question)], template="{question}", tokenizer=tiny_tokenizer, max_tokens=n, with_response=False)
    with pytest.raises(DataError) as info:
        check_lengths(
            [_ex("2+2?", line=3), _ex(question)], template="{question}", tokenizer=tiny_tokenizer, max_tokens=n - 1,
            with_response=False,
        )
    assert assert_user_error(info.value) == f"data/t.jsonl:7: prompt is {n:,} tokens, more than the model's {n - 1}-token context"


def test_token_bound_counts_the_response_for_sft(tiny_tokenizer):
    half = "3" * 60
    examples = [_ex(half, line=None, response=half, source="arithmetic") for _ in range(2)]
    check_lengths(examples, template="{question}", tokenizer=tiny_tokenizer, max_tokens=100, with_response=False)
    with pytest.raises(DataError) as info:
        check_lengths(examples, template="{question}", tokenizer=tiny_tokenizer, max_tokens=100, with_response=True)
    assert assert_user_error(info.value) == (
        "arithmetic[0]: prompt and response are 120 tokens, more than the model's 100-token context; "
        "2 examples are too long"
    )


def test_character_bound_follows_the_longest_vocabulary_entry():
    """A vocabulary with a 64-character token: 640 such characters fit in 10 tokens, not refused."""

    class RunTokenizer:
        def get_vocab(self):
            return {"=" * 64: 0, "=": 1}

        def __call__(self, texts, add_special_tokens=True, verbose=True):
            return {"input_ids": [[0] * (len(t) // 64) + [1] * (len(t) % 64) for t in texts]}

    text = "=" * 640
    assert len(text) > 10 * MAX_CHARS_PER_TOKEN
    check_lengths([_ex(text)], template="{question}", tokenizer=RunTokenizer(), max_tokens=10, with_response=False)
    with pytest.raises(DataError, match="641 characters, more than a 10-token context can hold"):
        check_lengths([_ex(text + "=")], template="{question}", tokenizer=RunTokenizer(), max_tokens=10, with_response=False)


def test_huge_line_is_loaded_and_refused_in_seconds_without_tokenizing(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    size = 32 * 2**20
    with open(path, "w", encoding="utf-8") as f:
        f.write(GOOD.decode())
        f.write(json.dumps({"problem": "x" * size, "answer": "1"}) + "\n")
    spy = SpyTokenizer(tiny_tokenizer)
    template = load_template("r1_zero")
    t0 = time.perf_counter()
    examples = load_examples(path)
    with pytest.raises(DataError) as info:
        check_lengths(examples, template=template, tokenizer=spy, max_tokens=4096, with_response=False)
    elapsed = time.perf_counter() - t0
    n_chars = len(template) - len("{question}") + size
    assert assert_user_error(info.value) == (
        f"{path}:2: prompt is {n_chars:,} characters, more than a 4096-token context can hold"
    )
    assert not any(len(text) > 1_000_000 for call in spy.calls for text in call)
    assert elapsed < 5.0


def test_loader_helpers_are_fast_on_huge_fields():
    t0 = time.perf_counter()
    assert last_boxed("\\boxed{" + "x" * 20_000_000) is None  # unbalanced: scans to the end
    assert question_from_prompt("\nUser: " * 10_000) == "\nUser: " * 10_000  # quadratic as a regex
    assert time.perf_counter() - t0 < 1.5


@pytest.mark.parametrize(
    "prompt",
    [
        "Sys\nUser: What is 2+2?\nAssistant: <think>",
        "Sys\nUser: a\nUser: b\nAssistant: <think>\nAssistant: <think> \n",
        "\nUser: \nAssistant: <think>",
        "\nUser: q\nAssistant: <think> x",
        "User: q\nAssistant: <think>",
        "\nUser: q\u3000\nAssistant: <think>\u3000",
    ],
)
def test_question_from_prompt_matches_the_documented_regex(prompt):
    m = re.search(r"\nUser: (.*)\nAssistant: <think>\s*$", prompt, re.DOTALL)
    assert question_from_prompt(prompt) == (m.group(1) if m else prompt)


# --------------------------------------------------------------------------------------------
# the CLI


@pytest.mark.parametrize("case", ["missing data", "not utf-8", "template"])
def test_cli_prints_one_line_and_exits_2_before_writing(tmp_path, case):
    data, prompt = tmp_path / "data.jsonl", "r1_zero"
    expected = f"{data}: no such file"
    if case == "not utf-8":
        data.write_bytes(GOOD + b'{"problem": "\xff", "answer": "1"}\n')
        expected = f"{data}:2: not UTF-8 (byte 0xff at offset {len(GOOD) + 13})"
    elif case == "template":
        data.write_bytes(GOOD)
        prompt = str(tmp_path / "missing.prompt")
        expected = f"{prompt}: prompt template is neither a built-in name"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", str(data), "--prompt", prompt, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {expected}") and result.output.count("\n") == 1
    assert "Traceback" not in result.output and not out.exists()
