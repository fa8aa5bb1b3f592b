"""Difficulty filtering and the easy-first curriculum: the pure functions on hand-worked values,
the pass-rate file (round trip, one-line errors with their line numbers), load-or-score, and
scoring with a scripted generator (exact counts) and with the tiny model (the real path)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from cs336_alignment.data import Example, load_template, make_task
from cs336_alignment.difficulty import (
    PassRateFileError,
    check_writable,
    curriculum_batch,
    curriculum_order,
    filter_by_pass_rate,
    is_correct,
    load_or_score_pass_rates,
    pass_rate_stats,
    question_sha,
    read_pass_rates,
    score_pass_rates,
    write_pass_rates,
)
from cs336_alignment.errors import UserError
from cs336_alignment.generation import Completion, GenerationResult, SamplingParams

TEMPLATE = load_template("r1_zero")
TASK = make_task("arithmetic")
QUESTIONS = TASK.generate(5, seed=0)  # "What is 43 + 75?" -> "118", ... (sums of two 2-digit numbers: never -1)

# ---------------------------------------------------------------------------------------
# filter_by_pass_rate
# ---------------------------------------------------------------------------------------


def test_filter_keeps_rates_within_inclusive_bounds_in_order():
    items, rates = list("abcde"), [0.0, 0.25, 0.5, 1.0, 0.75]
    kept, kept_rates = filter_by_pass_rate(items, rates, min_pass=0.25, max_pass=0.75)
    # a: 0 < 0.25 out; b: 0.25 <= 0.25 in (inclusive); c: 0.5 in; d: 1 > 0.75 out; e: 0.75 <= 0.75 in
    assert kept == ["b", "c", "e"] and kept_rates == [0.25, 0.5, 0.75]
    # (0, 1) keeps everything
    assert filter_by_pass_rate(items, rates, min_pass=0.0, max_pass=1.0) == (items, rates)
    # min_pass = 1/n (n=8: 0.125) drops the never-solved; max_pass = 1 - 1/8 = 0.875 the always-solved
    kept, _ = filter_by_pass_rate(list("wxyz"), [0 / 8, 1 / 8, 7 / 8, 8 / 8], min_pass=0.125, max_pass=0.875)
    assert kept == ["x", "y"]
    # 3/10 is the float 0.3 (both the nearest double to 0.3): a decimal bound equal to c/n keeps it
    assert filter_by_pass_rate(["p", "q"], [3 / 10, 2 / 10], min_pass=0.3, max_pass=0.3)[0] == ["p"]


@pytest.mark.parametrize(
    "min_pass, max_pass, message",
    [
        (0.6, 0.4, "min_pass (0.6) must be <= max_pass (0.4)"),
        (-0.1, 1.0, "min_pass must be in [0, 1], got -0.1"),
        (0.0, 1.5, "max_pass must be in [0, 1], got 1.5"),
        (float("nan"), 1.0, "min_pass must be in [0, 1], got nan"),
    ],
)
def test_filter_refuses_bad_bounds(min_pass, max_pass, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        filter_by_pass_rate(["a"], [0.5], min_pass=min_pass, max_pass=max_pass)


def test_filter_says_so_when_nothing_remains():
    # 4 questions: 2 never solved (rate 0), 2 always solved (rate 1): mean 0.5, 50% / 50%
    with pytest.raises(ValueError) as err:
        filter_by_pass_rate(list("abcd"), [0.0, 1.0, 0.0, 1.0], min_pass=0.25, max_pass=0.75)
    message = str(err.value)
    assert "\n" not in message
    assert "no training question has a pass rate in [0.25, 0.75] (of 4: mean pass rate 0.500, 50% never solved" in message
    with pytest.raises(ValueError, match="got 1 pass rates for 2 questions"):
        filter_by_pass_rate(["a", "b"], [0.5], min_pass=0.0, max_pass=1.0)


def test_pass_rate_stats():
    # [0, .5, 1, 1]: mean 2.5/4 = 0.625; one of four never solved (0.25); two of four always solved (0.5)
    assert pass_rate_stats([0.0, 0.5, 1.0, 1.0]) == {
        "pass_rate_mean": 0.625, "pass_rate_all_wrong": 0.25, "pass_rate_all_correct": 0.5,
    }


# ---------------------------------------------------------------------------------------
# curriculum_order and curriculum_batch
# ---------------------------------------------------------------------------------------


def _shuffled(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def test_curriculum_order_is_easiest_first_with_seeded_ties():
    items, rates = list("abcde"), [0.5, 1.0, 0.0, 0.5, 0.75]
    # distinct rates fix b (1.0), e (0.75), {a, d} (0.5), c (0.0); a and d tie, broken by the seeded shuffle of 0..4:
    assert _shuffled(5, seed=0) == [2, 1, 0, 4, 3]  # seed 0: index 0 (a) comes before index 3 (d)
    assert _shuffled(5, seed=1) == [2, 3, 4, 0, 1]  # seed 1: index 3 (d) comes before index 0 (a)
    assert curriculum_order(items, rates, seed=0) == ["b", "e", "a", "d", "c"]
    assert curriculum_order(items, rates, seed=1) == ["b", "e", "d", "a", "c"]
    assert curriculum_order(items, rates, seed=1) == curriculum_order(items, rates, seed=1)  # deterministic
    # all tied: exactly the seeded shuffle (seed 0: indices [2, 1, 0, 4, 3] -> c b a e d)
    assert curriculum_order(items, [0.5] * 5, seed=0) == ["c", "b", "a", "e", "d"]
    with pytest.raises(ValueError, match="got 2 pass rates for 5 questions"):
        curriculum_order(items, [0.5, 0.5], seed=0)


def test_curriculum_batch_takes_consecutive_slices_and_wraps():
    ordered = list("abcde")  # N = 5, batch 2: indices (2k + j) mod 5
    assert curriculum_batch(ordered, 0, 2) == ["a", "b"]  # 0, 1
    assert curriculum_batch(ordered, 1, 2) == ["c", "d"]  # 2, 3
    assert curriculum_batch(ordered, 2, 2) == ["e", "a"]  # 4, 5 mod 5 = 0: the hardest, then the easiest again
    assert curriculum_batch(ordered, 3, 2) == ["b", "c"]  # 6 mod 5 = 1, 7 mod 5 = 2
    assert curriculum_batch(ordered, 5, 2) == ["a", "b"]  # 10 mod 5 = 0: 5 steps x 2 = two whole passes
    assert curriculum_batch(ordered, 7, 5) == ordered  # batch = N: every step is the whole list, from 35 mod 5 = 0
    assert curriculum_batch(ordered, 1, 3) == ["d", "e", "a"]  # 3, 4, 5 mod 5 = 0
    for step, batch_size, message in [(0, 0, "batch_size must be in"), (0, 6, r"batch_size must be in \[1, 5\]"),
                                      (-1, 2, "step must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            curriculum_batch(ordered, step, batch_size)


# ---------------------------------------------------------------------------------------
# The pass-rate file
# ---------------------------------------------------------------------------------------

RATES = [0.25, 0.0, 1.0, 0.75, 0.5]  # n = 4: correct 1, 0, 4, 3, 2


def _written(tmp_path: Path) -> Path:
    path = tmp_path / "pass_rates.jsonl"
    write_pass_rates(path, QUESTIONS, RATES, template=TEMPLATE, n=4, scored_with={"model": "tiny", "sampling_seed": 7})
    return path


def test_pass_rate_file_round_trip_and_format(tmp_path):
    path = _written(tmp_path)
    assert read_pass_rates(path, QUESTIONS, template=TEMPLATE) == RATES
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + len(QUESTIONS)
    assert json.loads(lines[0]) == {"format": "pass_rates", "version": 1, "questions": 5, "n": 4,
                                    "scored_with": {"model": "tiny", "sampling_seed": 7}}
    assert json.loads(lines[4]) == {"index": 3, "question_sha": question_sha(QUESTIONS[3], TEMPLATE), "n": 4, "correct": 3,
                                    "pass_rate": 0.75}
    sha = question_sha(QUESTIONS[0], TEMPLATE)
    assert len(sha) == 12 and sha != question_sha(QUESTIONS[1], TEMPLATE) != question_sha(QUESTIONS[1], "Q: {question}")
    with pytest.raises(ValueError, match=r"pass rate 0\.3 of question 0 is not a multiple of 1/4"):
        write_pass_rates(path, QUESTIONS, [0.3] + RATES[1:], template=TEMPLATE, n=4)


def _one_line_error(path: Path, examples: list[Example] = QUESTIONS, template: str = TEMPLATE) -> str:
    with pytest.raises(PassRateFileError) as err:
        read_pass_rates(path, examples, template=template)
    assert isinstance(err.value, UserError) and err.value.exit_code == 2
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    return message.removeprefix(str(path))


def test_a_file_scored_on_other_questions_is_refused_at_the_first_differing_line(tmp_path):
    path = _written(tmp_path)
    other = list(QUESTIONS)
    other[3] = Example(question="What is 1 + 1?", ground_truth="2")
    assert _one_line_error(path, other) == (
        ":5: question differs from training question 3 ('What is 1 + 1?'); "  # line 5 = header + questions 0..3
        "the file was scored on another training set (or prompt template)"
    )
    regraded = list(QUESTIONS)
    regraded[1] = Example(question=QUESTIONS[1].question, ground_truth="0")  # same question, another answer
    assert _one_line_error(path, regraded).startswith(":3: question differs from training question 1")
    assert _one_line_error(path, template="Q: {question}").startswith(":2: question differs from training question 0")
    assert _one_line_error(path, QUESTIONS[:4]) == (
        ":1: scored on 5 questions, but the training set has 4; the file was scored on another training set"
    )


def _edit(path: Path, line: int, text: str | None) -> Path:
    """Replace 1-based line ``line`` by ``text`` (None: delete it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "line, text, expected",
    [
        (3, '{"index": 1, "n": 4', ":3: invalid JSON (Expecting ',' delimiter)"),
        (4, '{"index": 2, "question_sha": "x", "n": 4, "pass_rate": 1.0}', ":4: missing field 'correct'"),
        (2, '{"index": 0, "question_sha": "x", "n": 4, "correct": 1}', ":2: missing field 'pass_rate'"),
        (2, '{"index": 0, "n": 4, "correct": 1, "pass_rate": 0.25}', ":2: missing field 'question_sha'"),
        (5, '{"index": 3, "question_sha": "x", "n": 4, "correct": "3", "pass_rate": 0.75}',
         ":5: field 'correct': expected an integer, got \"3\""),
        (6, '{"index": 4, "question_sha": "x", "n": 4, "correct": 2, "pass_rate": 0.25}',
         ":6: pass_rate 0.25 is not correct/n = 2/4"),
        (6, '{"index": 4, "question_sha": "x", "n": 4, "correct": 5, "pass_rate": 1.25}',
         ":6: needs n >= 1 and 0 <= correct <= n, got n=4, correct=5"),
        (3, '{"index": 2, "question_sha": "x", "n": 4, "correct": 0, "pass_rate": 0.0}',
         ":3: index 2, expected 1: one line per training question, in training-set order"),
        (3, "[1, 2]", ":3: expected a JSON object, got list"),
        (1, '{"index": 0}', ':1: not a pass-rate file header (expected {"format": "pass_rates", "version": 1, '
                            '"questions": N, "n": n, ...})'),
        (6, None, ":6: the file ends after 4 of its 5 questions"),
        (7, "", ":7: one line more than the 5 questions its header announces"),
    ],
)
def test_a_malformed_line_is_one_line_naming_its_number(tmp_path, line, text, expected):
    path = _written(tmp_path)
    if line == 7:  # append a line
        path.write_text(path.read_text(encoding="utf-8") + "{}\n", encoding="utf-8")
    else:
        _edit(path, line, text)
    assert _one_line_error(path) == expected


def test_an_empty_or_not_utf8_file_or_a_directory_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert _one_line_error(empty) == ": is empty; expected a header line and one line per training question"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"format": "pass_rates"}\n{"caf\xe9"}\n')
    assert _one_line_error(latin) == ":2: not UTF-8"
    assert _one_line_error(tmp_path) == ": is a directory, not a pass-rate file"


# ---------------------------------------------------------------------------------------
# load_or_score_pass_rates
# ---------------------------------------------------------------------------------------


class _Score:
    """A stand-in for the expensive scoring: counts its calls."""

    def __init__(self, rates: list[float]):
        self.rates, self.calls = rates, 0

    def __call__(self) -> list[float]:
        self.calls += 1
        return self.rates


def test_load_or_score_reads_a_matching_file_without_scoring(tmp_path, caplog):
    path = _written(tmp_path)
    before = path.read_bytes()
    score = _Score([0.0] * 5)
    with caplog.at_level(logging.WARNING, logger="cs336_alignment.difficulty"):
        rates = load_or_score_pass_rates(path, QUESTIONS, score, template=TEMPLATE, n=8)
    assert rates == RATES and score.calls == 0 and path.read_bytes() == before
    assert "scored with n=4 samples per question, not pass_rate_samples=8" in caplog.text  # used, with a warning


def test_load_or_score_scores_and_writes_when_there_is_no_file(tmp_path):
    path = tmp_path / "run" / "pass_rates.jsonl"  # the directory is created
    score = _Score(list(RATES))
    assert load_or_score_pass_rates(path, QUESTIONS, score, template=TEMPLATE, n=4, scored_with={"model": "m"}) == RATES
    assert score.calls == 1
    assert read_pass_rates(path, QUESTIONS, template=TEMPLATE) == RATES
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["scored_with"] == {"model": "m"}
    # a second call (a resumed run) reads it back
    assert load_or_score_pass_rates(path, QUESTIONS, score, template=TEMPLATE, n=4) == RATES and score.calls == 1


def test_load_or_score_refuses_a_mismatching_file_and_leaves_it(tmp_path):
    path = _written(tmp_path)
    before, score = path.read_bytes(), _Score(list(RATES))
    with pytest.raises(PassRateFileError, match="scored on 5 questions, but the training set has 4"):
        load_or_score_pass_rates(path, QUESTIONS[:4], score, template=TEMPLATE, n=4)
    assert score.calls == 0 and path.read_bytes() == before


def test_an_unwritable_path_fails_before_scoring(tmp_path):
    blocker = tmp_path / "course-data.jsonl"  # a file where a directory would have to be (fails for root too)
    blocker.write_text("x", encoding="utf-8")
    path, score = blocker / "pass_rates.jsonl", _Score(list(RATES))
    with pytest.raises(PassRateFileError) as err:
        load_or_score_pass_rates(path, QUESTIONS, score, template=TEMPLATE, n=4)
    message = str(err.value)
    assert score.calls == 0 and "\n" not in message
    assert message.startswith(f"{path}: cannot write in {blocker} (")
    assert "give pass_rates a path in a writable directory" in message
    with pytest.raises(PassRateFileError, match="is a directory; give the pass-rate file's path"):
        check_writable(tmp_path)
    check_writable(tmp_path / "new" / "pass_rates.jsonl")  # creatable: fine
    assert not list((tmp_path / "new").iterdir())  # the probe file is gone


# ---------------------------------------------------------------------------------------
# score_pass_rates
# ---------------------------------------------------------------------------------------

PLANNED = [2, 0, 4, 1, 3]  # correct samples of each of the 5 questions, out of n = 4


class _ScriptedGenerator:
    """Sample j of question q (q = prompt_offset + position) answers right iff j < PLANNED[q]."""

    tokenizer = None

    def __init__(self, examples: list[Example]):
        self.truths = [ex.ground_truth for ex in examples]
        self.calls: list[tuple[int, int, SamplingParams]] = []  # (prompt_offset, prompts, sampling)

    def generate(self, prompts, sampling, progress=False):
        self.calls.append((sampling.prompt_offset, len(prompts), sampling))
        results = []
        for position, prompt in enumerate(prompts):
            q = sampling.prompt_offset + position
            texts = [f" ok </think> <answer> {self.truths[q] if j < PLANNED[q] else -1} </answer>" for j in range(sampling.n)]
            results.append(GenerationResult(prompt, [], [Completion(t, [0], "stop") for t in texts]))
        return results

    def load_weights(self, policy):
        pass


def test_score_pass_rates_counts_correct_samples_chunk_by_chunk():
    generator = _ScriptedGenerator(QUESTIONS)
    rates = score_pass_rates(generator, TASK.reward_fn, QUESTIONS, template=TEMPLATE, n=4, sampling_seed=7, max_tokens=32,
                             chunk_size=2)
    assert rates == [0.5, 0.0, 1.0, 0.25, 0.75]  # PLANNED / 4 = 2/4, 0/4, 4/4, 1/4, 3/4
    # recomputed independently from the same outputs with the task's reward
    again = [r for offset in (0, 2, 4) for r in generator.generate([""] * min(2, 5 - offset),
                                                                   SamplingParams(n=4, prompt_offset=offset))]
    assert rates == [sum(TASK.reward_fn(c.text, ex.ground_truth)["answer_reward"] > 0 for c in r.completions) / 4
                     for r, ex in zip(again, QUESTIONS)]
    # 5 questions in chunks of 2: offsets 0, 2, 4 with 2, 2, 1 prompts; R1-Zero sampling with the given knobs
    assert [(offset, count) for offset, count, _ in generator.calls[:3]] == [(0, 2), (2, 2), (4, 1)]
    sampling = generator.calls[0][2]
    assert (sampling.n, sampling.seed, sampling.max_tokens, sampling.stop) == (4, 7, 32, ("</answer>",))
    assert sampling.include_stop_str_in_output and sampling.temperature == 1.0
    whole = _ScriptedGenerator(QUESTIONS)
    assert score_pass_rates(whole, TASK.reward_fn, QUESTIONS, template=TEMPLATE, n=4, sampling_seed=7, max_tokens=32) == rates
    assert [(offset, count) for offset, count, _ in whole.calls] == [(0, 5)]


def test_correct_means_answer_reward_else_reward():
    assert is_correct({"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0})
    assert not is_correct({"format_reward": 1.0, "answer_reward": 0.0, "reward": 1.0})  # answer_reward decides
    assert is_correct({"reward": 0.5}) and not is_correct({"reward": 0.0}) and not is_correct({})

    def reward_only(response, truth):  # a user's reward without answer_reward
        return {"reward": 1.0 if f"> {truth} <" in response else 0.0}

    rates = score_pass_rates(_ScriptedGenerator(QUESTIONS), reward_only, QUESTIONS, template=TEMPLATE, n=4, sampling_seed=0,
                             max_tokens=8)
    assert rates == [0.5, 0.0, 1.0, 0.25, 0.75]


def test_score_pass_rates_with_the_tiny_model(tiny_model, tiny_tokenizer):
    from cs336_alignment.data import format_prompts
    from cs336_alignment.generation import NativeEngine

    engine = NativeEngine(tiny_model, tiny_tokenizer)
    questions = QUESTIONS[:3]

    def even_length(response, truth):  # the tiny model never answers right: a reward that its samples sometimes get
        return {"reward": float(len(response) % 2 == 0)}

    kwargs = dict(template=TEMPLATE, n=4, sampling_seed=1, max_tokens=8)
    rates = score_pass_rates(engine, even_length, questions, chunk_size=256, **kwargs)
    assert len(rates) == 3 and set(rates) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    results = engine.generate(format_prompts(TEMPLATE, questions), SamplingParams.r1_zero(n=4, seed=1, max_tokens=8))
    assert rates == [sum(len(c.text) % 2 == 0 for c in r.completions) / 4 for r in results]  # recounted
    assert score_pass_rates(engine, even_length, questions, chunk_size=1, **kwargs) == rates  # chunks change nothing
    # the task's own reward (what recipes.common.reward_for picks for a task): a valid rate per question
    assert set(score_pass_rates(engine, TASK.reward_fn, questions, **kwargs)) <= {0.0, 0.25, 0.5, 0.75, 1.0}
