"""Difficulty filtering and an easy-first curriculum of training questions, from pass rates.

A question's *pass rate* is the share of ``n`` responses sampled from the starting policy that
get its answer right (:func:`score_pass_rates`). Questions the policy always solves (rate 1) or
never solves (rate 0) give a GRPO group no learning signal: every response gets the same reward,
so every group-normalised advantage is 0. Two uses of the rates:

* **filtering** (:func:`filter_by_pass_rate`): train only on questions with
  ``min_pass <= rate <= max_pass``, decided once before training. DAPO (Yu et al. 2025,
  arXiv:2503.14476, "dynamic sampling") drops the all-correct / all-wrong groups online, batch by
  batch; online difficulty filtering (Bae et al. 2025, arXiv:2504.03380) keeps the questions of
  intermediate pass rate during training. Here the filter is static: cheaper, at the price of
  the rates going stale as the policy learns.
* **curriculum** (:func:`curriculum_order`, :func:`curriculum_batch`): ``easy_first`` visits the
  questions from the highest pass rate down, in consecutive slices, one per step; curriculum
  learning in the sense of Bengio et al. 2009 ("Curriculum learning", ICML).

Scoring is expensive (``n`` samples of every training question), so the rates are kept in a
pass-rate file and read back on a resumed run or from a user-given path
(:func:`load_or_score_pass_rates`); the file is checked against the training set line by line.

Pass-rate file (JSONL, UTF-8, written atomically). Line 1 is a header, then one line per
training question, in training-set order::

    {"format": "pass_rates", "version": 1, "questions": 3, "n": 8, "scored_with": {"model": "...", ...}}
    {"index": 0, "question_sha": "3f1c0a9e5b27", "n": 8, "correct": 2, "pass_rate": 0.25}
    {"index": 1, "question_sha": "a04b6d1e0c93", "n": 8, "correct": 0, "pass_rate": 0.0}
    {"index": 2, "question_sha": "77e2c5d0f184", "n": 8, "correct": 8, "pass_rate": 1.0}

``questions`` is the number of question lines; ``n`` the samples per question it was scored with;
``scored_with`` whatever the caller records (model, sampling seed, max_tokens, temperature), for
people, never checked. Question line ``k + 2`` describes training question ``k`` (0-based
``index``); ``question_sha`` is :func:`question_sha`: the first 12 hex digits of the SHA-1 of the
formatted prompt and the ground truth, so a file scored on other questions, another order, another
prompt template or other answers is refused. ``correct`` of ``n`` samples were right and
``pass_rate`` is ``correct / n`` (both given; they must agree). A file that does not match, or a
malformed line, raises :class:`PassRateFileError`: one line, ``<file>:<line>: <problem>``.

The generator and the reward function are passed in; the filter and the curriculum are pure functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .data import DataError, Example, format_prompt, format_prompts
from .generation.types import Generator, SamplingParams
from .rewards import RewardFn, is_correct, score_pairs
from .run_dir import atomic_write_text

__all__ = [
    "CURRICULA",
    "DEFAULT_CHUNK_SIZE",
    "PassRateFileError",
    "check_writable",
    "curriculum_batch",
    "curriculum_order",
    "existing_pass_rates",
    "filter_by_pass_rate",
    "is_correct",
    "load_or_score_pass_rates",
    "pass_rate_stats",
    "question_sha",
    "read_pass_rates",
    "score_pass_rates",
    "write_pass_rates",
]

CURRICULA = ("none", "easy_first")  # the values of the config's ``curriculum``
DEFAULT_CHUNK_SIZE = 256  # questions generated (and graded) at a time
FORMAT = "pass_rates"
VERSION = 1
SHA_CHARS = 12  # hex digits of question_sha kept (48 bits)
T = TypeVar("T")

logger = logging.getLogger(__name__)


class PassRateFileError(DataError):
    """A pass-rate file that cannot be used: malformed, scored on another training set, or a path
    that cannot be written. ``str(err)`` is ``"<file>[:<line>]: <problem>"``; a ``DataError`` (a
    ``UserError`` and a ``ValueError``, exit code 2)."""


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def score_pass_rates(
    generator: Generator,
    reward_fn: RewardFn,
    examples: Sequence[Example],
    *,
    template: str,
    n: int,
    sampling_seed: int,
    max_tokens: int,
    temperature: float = 1.0,
    min_tokens: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    log: logging.Logger | None = None,
    first_index: int = 0,
) -> list[float]:
    """Each question's pass rate under ``generator``'s current weights: ``c_i / n``, where ``c_i`` of
    ``n`` sampled responses to question ``i`` are correct (:func:`is_correct` of ``reward_fn``).

    Sampling is the R1-Zero one (:meth:`SamplingParams.r1_zero`: top-p 1, stop at ``</answer>``)
    with ``temperature``, ``max_tokens``, ``min_tokens`` and seed ``sampling_seed``. Questions go
    to the generator ``chunk_size`` at a time (each chunk graded before the next is sampled, one
    log line per chunk on ``log``); a chunk's ``prompt_offset`` is its first question's index
    (``first_index`` + its position: a rank scoring its share of a training set passes the share's
    first index), so with the native engine (streams keyed on seed, question index and sample
    index) the rates depend neither on ``chunk_size`` nor on how the set is shared among ranks.
    ``progress`` shows the generator's progress bar.

    Returns one rate per example, in order; each is a multiple of ``1 / n``.
    """
    if n < 1:
        raise ValueError(f"n (pass_rate_samples) must be >= 1, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    log = log or logger
    sampling = SamplingParams.r1_zero(
        n=n, seed=sampling_seed, max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature
    )
    examples = list(examples)
    rates: list[float] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start : start + chunk_size]
        prompts = format_prompts(template, chunk)
        results = generator.generate(prompts, dataclasses.replace(sampling, prompt_offset=first_index + start),
                                     progress=progress)
        if len(results) != len(chunk) or any(len(r.completions) != n for r in results):
            got = sorted({len(r.completions) for r in results})
            raise ValueError(f"the generator returned {len(results)} results with {got} completions each "
                             f"for {len(chunk)} prompts x n={n}")
        responses = [c.text for r in results for c in r.completions]
        truths = [ex.ground_truth for ex in chunk for _ in range(n)]
        correct = [is_correct(s) for s in score_pairs(reward_fn, responses, truths)]
        rates.extend(sum(correct[i * n : (i + 1) * n]) / n for i in range(len(chunk)))
        log.info("pass rates: scored %d/%d questions x %d samples", len(rates), len(examples), n)
    return rates


# ---------------------------------------------------------------------------------------
# The pass-rate file
# ---------------------------------------------------------------------------------------


def question_sha(example: Example, template: str) -> str:
    """The identity of a training question in a pass-rate file: the first 12 hex digits of
    ``sha1(formatted prompt + "\\0" + ground truth as text)``."""
    key = format_prompt(template, example) + "\x00" + example.ground_truth_text()
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:SHA_CHARS]


def _correct_counts(pass_rates: Sequence[float], n: int) -> list[int]:
    """``round(rate * n)`` for each rate, refusing a rate that is not a multiple of ``1 / n`` in [0, 1]."""
    counts = []
    for i, rate in enumerate(pass_rates):
        c = round(float(rate) * n) if math.isfinite(rate) else -1
        if not 0 <= c <= n or abs(float(rate) * n - c) > 1e-6:
            raise ValueError(f"pass rate {rate!r} of question {i} is not a multiple of 1/{n} in [0, 1]")
        counts.append(c)
    return counts


def write_pass_rates(
    path: str | Path,
    examples: Sequence[Example],
    pass_rates: Sequence[float],
    *,
    template: str,
    n: int,
    scored_with: Mapping[str, Any] | None = None,
) -> None:
    """Write the pass-rate file (format in the module docstring) atomically: a reader sees the old
    file or the whole new one. ``pass_rates[i]`` (a multiple of ``1 / n``) is ``examples[i]``'s;
    ``scored_with`` (JSON-serialisable: model, sampling seed, ...) is recorded in the header."""
    if len(pass_rates) != len(examples):
        raise ValueError(f"got {len(pass_rates)} pass rates for {len(examples)} questions")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = _correct_counts(pass_rates, n)
    header = {"format": FORMAT, "version": VERSION, "questions": len(examples), "n": n, "scored_with": dict(scored_with or {})}
    lines = [json.dumps(header)]
    for i, (example, c) in enumerate(zip(examples, counts)):
        record = {"index": i, "question_sha": question_sha(example, template), "n": n, "correct": c, "pass_rate": c / n}
        lines.append(json.dumps(record))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _int_field(record: dict[str, Any], name: str, fail: Callable[[str], PassRateFileError]) -> int:
    if name not in record:
        raise fail(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise fail(f"field {name!r}: expected an integer, got {json.dumps(value)}")
    return value


def _parse_line(line: str, fail: Callable[[str], PassRateFileError]) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    return record


def _read(path: Path, examples: Sequence[Example], template: str) -> tuple[list[float], dict[str, Any]]:
    """The pass rates and the header of a pass-rate file checked against ``examples``."""
    where = str(path)

    def fail_at(line: int | None) -> Callable[[str], PassRateFileError]:
        return lambda reason: PassRateFileError(where, line, reason)

    if path.is_dir():
        raise PassRateFileError(where, None, "is a directory, not a pass-rate file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PassRateFileError(where, None, f"cannot read the pass-rate file ({e.strerror or e})") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PassRateFileError(where, data.count(b"\n", 0, e.start) + 1, "not UTF-8") from None
    if not lines:
        raise PassRateFileError(where, None, "is empty; expected a header line and one line per training question")
    header = _parse_line(lines[0], fail_at(1))
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise fail_at(1)(f'not a pass-rate file header (expected {{"format": "{FORMAT}", "version": {VERSION}, '
                         '"questions": N, "n": n, ...})')
    n_questions = _int_field(header, "questions", fail_at(1))
    if n_questions != len(examples):
        raise fail_at(1)(f"scored on {n_questions} questions, but the training set has {len(examples)}; "
                         "the file was scored on another training set")
    rates = []
    for k, line in enumerate(lines[1:]):
        fail = fail_at(k + 2)
        if k >= len(examples):
            raise fail(f"one line more than the {len(examples)} questions its header announces")
        record = _parse_line(line, fail)
        index = _int_field(record, "index", fail)
        if index != k:
            raise fail(f"index {index}, expected {k}: one line per training question, in training-set order")
        n, correct = _int_field(record, "n", fail), _int_field(record, "correct", fail)
        if n < 1 or not 0 <= correct <= n:
            raise fail(f"needs n >= 1 and 0 <= correct <= n, got n={n}, correct={correct}")
        if "pass_rate" not in record:
            raise fail("missing field 'pass_rate'")
        rate = record["pass_rate"]
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or abs(rate - correct / n) > 1e-9:
            raise fail(f"pass_rate {json.dumps(rate)} is not correct/n = {correct}/{n}")
        if "question_sha" not in record:
            raise fail("missing field 'question_sha'")
        if record["question_sha"] != question_sha(examples[k], template):
            question = examples[k].question if len(examples[k].question) <= 40 else examples[k].question[:37] + "..."
            raise fail(f"question differs from training question {k} ({question!r}); "
                       "the file was scored on another training set (or prompt template)")
        rates.append(correct / n)  # recomputed: exactly c/n, whatever the file's rounding
    if len(rates) < len(examples):
        raise PassRateFileError(where, len(lines) + 1, f"the file ends after {len(rates)} of its {len(examples)} questions")
    return rates, header


def read_pass_rates(
    path: str | Path, examples: Sequence[Example], *, template: str, n: int | None = None, log: logging.Logger | None = None
) -> list[float]:
    """The pass rates of ``examples`` from the pass-rate file at ``path``, each ``correct / n``.

    The file must describe exactly these questions, in this order, formatted with ``template``
    (same count, same :func:`question_sha` on every line). Otherwise, or for a malformed line (bad
    JSON, a missing or ill-typed field, ``pass_rate`` not ``correct / n``), raises
    :class:`PassRateFileError` naming the file and the first bad line. With ``n``, a file scored
    with another number of samples per question is used with a warning on ``log``.
    """
    rates, header = _read(Path(path), examples, template)
    if n is not None and header.get("n") != n:
        (log or logger).warning("%s: scored with n=%s samples per question, not pass_rate_samples=%d; using the file as "
                                "it is", path, header.get("n"), n)
    return rates


def check_writable(path: str | Path) -> None:
    """Raise :class:`PassRateFileError` unless a file can be written at ``path`` (its directory is
    created if missing and a temporary file is tried there). Call it before an expensive scoring."""
    path = Path(path)
    if path.is_dir():
        raise PassRateFileError(str(path), None, "is a directory; give the pass-rate file's path, e.g. <dir>/pass_rates.jsonl")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise PassRateFileError(
            str(path), None, f"cannot write in {path.parent} ({e.strerror or e}); give pass_rates a path in a writable "
            "directory (by default the file goes to the run directory)"
        ) from None


def existing_pass_rates(
    path: str | Path, examples: Sequence[Example], *, template: str, n: int, log: logging.Logger | None = None
) -> list[float] | None:
    """The first half of :func:`load_or_score_pass_rates`: the rates of the file at ``path`` when it
    exists (checked as :func:`read_pass_rates` does), else None once ``path`` is known writable
    (:func:`check_writable`). With several processes the scoring between the halves runs on every
    rank, so a recipe calls this on rank 0 and writes with :func:`write_pass_rates` there."""
    path, log = Path(path), log or logger
    if path.exists():
        rates = read_pass_rates(path, examples, template=template, n=n, log=log)
        log.info("pass rates of %d questions read from %s (not re-scored)", len(rates), path)
        return rates
    check_writable(path)
    return None


def load_or_score_pass_rates(
    path: str | Path,
    examples: Sequence[Example],
    score: Callable[[], Sequence[float]],
    *,
    template: str,
    n: int,
    scored_with: Mapping[str, Any] | None = None,
    log: logging.Logger | None = None,
) -> list[float]:
    """The pass rates of ``examples``: read from ``path`` when the file exists (a resumed run, or a
    file the user gave; never re-scored), else ``score()``, written to ``path``, and returned.

    An existing file must match the training set (:func:`read_pass_rates`); one that does not is
    an error, never overwritten (it may be the user's). A file scored with another ``n`` is used,
    with a warning. Before scoring, ``path`` is checked to be writable (:func:`check_writable`), so
    a bad path fails in a second, not after the scoring. With several processes, call it on one
    rank (``distributed.on_main``): the others get the rates from there.
    """
    path, log = Path(path), log or logger
    rates = existing_pass_rates(path, examples, template=template, n=n, log=log)
    if rates is not None:
        return rates
    rates = [float(r) for r in score()]
    write_pass_rates(path, examples, rates, template=template, n=n, scored_with=scored_with)
    log.info("pass rates of %d questions written to %s", len(rates), path)
    return rates


# ---------------------------------------------------------------------------------------
# Filtering and curriculum (pure functions)
# ---------------------------------------------------------------------------------------


def pass_rate_stats(pass_rates: Sequence[float]) -> dict[str, float]:
    """Summary metrics: ``pass_rate_mean``, and the shares of questions never solved
    (``pass_rate_all_wrong``: rate 0) and always solved (``pass_rate_all_correct``: rate 1)."""
    if not pass_rates:
        raise ValueError("no pass rates to summarise")
    count = len(pass_rates)
    return {
        "pass_rate_mean": sum(pass_rates) / count,
        "pass_rate_all_wrong": sum(r == 0 for r in pass_rates) / count,
        "pass_rate_all_correct": sum(r == 1 for r in pass_rates) / count,
    }


def filter_by_pass_rate(
    examples: Sequence[T], pass_rates: Sequence[float], *, min_pass: float, max_pass: float
) -> tuple[list[T], list[float]]:
    """The questions with ``min_pass <= rate <= max_pass`` (both bounds inclusive), and their rates,
    in their original order.

    Rates are ``c / n`` and compared exactly: a bound written as a decimal equal to ``c / n`` (0.25,
    0.375, 0.3 for 3/10) is that same float. With n samples, ``min_pass = 1/n`` drops the questions
    never solved and ``max_pass = 1 - 1/n`` those always solved (the groups whose GRPO advantages
    are all zero); ``(0, 1)`` keeps everything.

    Raises ValueError for bounds outside [0, 1] or ``min_pass > max_pass``, for lengths that
    differ, and when no question remains.
    """
    if len(examples) != len(pass_rates):
        raise ValueError(f"got {len(pass_rates)} pass rates for {len(examples)} questions")
    for name, bound in (("min_pass", min_pass), ("max_pass", max_pass)):
        if not (isinstance(bound, (int, float)) and 0.0 <= bound <= 1.0):  # NaN fails too
            raise ValueError(f"{name} must be in [0, 1], got {bound}")
    if min_pass > max_pass:
        raise ValueError(f"min_pass ({min_pass}) must be <= max_pass ({max_pass})")
    kept = [i for i, rate in enumerate(pass_rates) if min_pass <= rate <= max_pass]
    if not kept:
        if not pass_rates:
            raise ValueError("no training questions to filter")
        stats = pass_rate_stats(pass_rates)
        raise ValueError(
            f"no training question has a pass rate in [{min_pass}, {max_pass}] (of {len(pass_rates)}: mean pass rate "
            f"{stats['pass_rate_mean']:.3f}, {stats['pass_rate_all_wrong']:.0%} never solved, "
            f"{stats['pass_rate_all_correct']:.0%} always solved); widen the bounds"
        )
    return [examples[i] for i in kept], [pass_rates[i] for i in kept]


def curriculum_order(examples: Sequence[T], pass_rates: Sequence[float], *, seed: int) -> list[T]:
    """``easy_first``: the questions from the highest pass rate to the lowest.

    Formula: shuffle the indices ``0..N-1`` with ``random.Random(seed).shuffle``, then sort them by
    decreasing pass rate with a stable sort; so questions of equal rate keep the shuffled order,
    the same for a given seed (and different seeds mix each tier differently).
    """
    if len(examples) != len(pass_rates):
        raise ValueError(f"got {len(pass_rates)} pass rates for {len(examples)} questions")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -pass_rates[i])
    return [examples[i] for i in order]


def curriculum_batch(ordered: Sequence[T], step: int, batch_size: int) -> list[T]:
    """Step ``step``'s questions under ``easy_first``: the ``step``-th consecutive slice of
    ``batch_size`` questions of ``ordered`` (from :func:`curriculum_order`), wrapping around.

    Formula: indices ``(step * batch_size + j) mod N`` for ``j = 0..batch_size-1``, ``N = len(ordered)``.
    So a run longer than ``N / batch_size`` steps starts again from the easiest; a slice that
    crosses the end takes the hardest questions and then the easiest. A pure function of
    ``step``: a resumed run continues where it stopped. Needs ``1 <= batch_size <= N`` (a step
    never repeats a question) and ``step >= 0``.
    """
    count = len(ordered)
    if not 1 <= batch_size <= count:
        raise ValueError(f"batch_size must be in [1, {count}] (the number of ordered questions), got {batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return [ordered[(step * batch_size + j) % count] for j in range(batch_size)]
