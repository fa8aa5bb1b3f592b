"""JSONL loaders for MATH-style files, GSM8K and ``sft.jsonl``.

All loaders return :class:`~cs336_alignment.data.examples.Example` records and never drop a
line silently: a malformed line raises :class:`DataError` naming the file, the 1-based line
number and the field, e.g.::

    data/validation.jsonl:17: field 'answer': missing (have: problem, level)

A missing file, a directory, or bytes that are not UTF-8 also raise :class:`DataError`
(``data/x.jsonl:3: not UTF-8 (byte 0xff at offset 1234)``: 1-based line, byte offset in the
file). ``DataError`` is a :class:`~cs336_alignment.errors.UserError` with exit code 2: bad
input, found before the run starts.

With ``skip_invalid=True`` malformed lines (and lines that are not UTF-8) are skipped instead,
and counted in the returned :class:`LoadReport` (with the first few reasons);
:func:`load_examples` also logs a warning.
Blank lines are ignored (they are not errors).

Formats (field-name variants in parentheses are accepted, first match wins):

* ``math``: question ``problem`` (``question``, ``query``, ``input``); answer ``answer``
  (``ground_truth``, ``gt``, ``final_answer``, ``expected_answer``, ``gt_answer``); optional
  solution ``solution`` (``reasoning``, ``rationale``). Without an answer field the answer is
  the content of the solution's last ``\\boxed{...}``. An answer may be a string, a number or
  a non-empty list of those (several accepted answers). Other fields go to ``meta``.
* ``gsm8k``: ``question`` and ``answer`` whose last line is ``#### N``; the ground truth is
  ``N`` with thousands separators removed, the solution is the text before ``####``.
* ``sft``: ``prompt`` and ``response`` (``output``, ``completion``) and ``ground_truth``
  (``answer``, ``gt``); the question is taken from a ``question`` field if present, else
  recovered from an r1_zero-formatted prompt (``User: ... Assistant: <think>``), else the
  whole prompt.

``kind="auto"`` picks the format from the first line that is a JSON object: ``sft`` if it has
a ``prompt`` field, ``gsm8k`` if it has ``question`` and an ``answer`` string
containing ``####``, otherwise ``math``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Literal

from ..errors import UserError
from .examples import Example, GroundTruth

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "LoadReport",
    "LoadResult",
    "detect_kind",
    "gsm8k_final_answer",
    "last_boxed",
    "load_dataset",
    "load_examples",
    "load_gsm8k",
    "load_math",
    "load_sft",
    "not_utf8_reason",
    "question_from_prompt",
]

logger = logging.getLogger(__name__)

Kind = Literal["auto", "math", "gsm8k", "sft"]
KINDS: tuple[str, ...] = ("auto", "math", "gsm8k", "sft")

MATH_QUESTION_FIELDS = ("problem", "question", "query", "input")
MATH_ANSWER_FIELDS = ("answer", "ground_truth", "gt", "final_answer", "expected_answer", "gt_answer")
MATH_SOLUTION_FIELDS = ("solution", "reasoning", "rationale")
SFT_PROMPT_FIELDS = ("prompt",)
SFT_RESPONSE_FIELDS = ("response", "output", "completion")
SFT_GROUND_TRUTH_FIELDS = ("ground_truth", "answer", "gt")

#: How many skip reasons a :class:`LoadReport` keeps.
MAX_REASONS = 10


class DataError(UserError, ValueError):
    """A malformed data line. ``str(err)`` is ``"<path>:<line>: <problem>"``.

    Attributes:
        path: The file.
        line: 1-based line number (``None`` for whole-file problems).
        field: The offending field name, if the problem is about one field.
        reason: The problem without the location prefix.
    """

    exit_code = 2  # bad input, found before the run starts

    def __init__(self, path: str, line: int | None, reason: str, field: str | None = None) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.reason = f"field {field!r}: {reason}" if field is not None else reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {self.reason}")


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist (a :class:`DataError` that is also a ``FileNotFoundError``)."""


def not_utf8_reason(data: bytes, err: UnicodeDecodeError, offset: int = 0) -> str:
    """``"not UTF-8 (byte 0xff at offset 1234)"`` for a failed ``data.decode("utf-8")``.

    ``offset`` is where ``data`` starts in its file, so the offset named is the file's.
    """
    return f"not UTF-8 (byte 0x{data[err.start]:02x} at offset {offset + err.start})"


@dataclass
class LoadReport:
    """What a load did: how many examples were read and what was skipped.

    Attributes:
        path: The file.
        kind: The format used (after auto-detection).
        n_loaded: Examples returned.
        n_skipped: Malformed lines skipped (only with ``skip_invalid=True``; else always 0).
        n_blank: Blank lines ignored.
        reasons: The first :data:`MAX_REASONS` skip messages (``"path:line: problem"``).
    """

    path: str
    kind: str
    n_loaded: int = 0
    n_skipped: int = 0
    n_blank: int = 0
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs, e.g. ``"data.jsonl (math): 98 loaded, 2 skipped (first: ...)"``."""
        text = f"{self.path} ({self.kind}): {self.n_loaded} loaded, {self.n_skipped} skipped"
        if self.reasons:
            text += f" (first: {self.reasons[0]})"
        return text


@dataclass
class LoadResult:
    """Examples plus the :class:`LoadReport` of the load that produced them."""

    examples: list[Example]
    report: LoadReport


# --------------------------------------------------------------------------------------------
# helpers


_BRACE_OR_BACKSLASH = re.compile(r"[{}\\]")


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces matched.

    Returns ``None`` when there is none or its braces are unbalanced. ``\boxed 5`` (no braces)
    yields ``"5"``.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5"
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    pos = i
    # Jump from brace to brace (a Python step per brace, not per character: a long solution
    # costs one regex scan). A backslash escapes the next character (\{ is not a delimiter).
    while (m := _BRACE_OR_BACKSLASH.search(text, pos)) is not None:
        c, j = m.group(), m.start()
        pos = j + (2 if c == "\\" else 1)
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_GSM8K_NUMBER = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


def gsm8k_final_answer(answer: str) -> str | None:
    """The ``N`` of a GSM8K answer ending in ``#### N`` (thousands commas removed), or None."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip()
    if not final:
        return None
    if _GSM8K_NUMBER.fullmatch(final):
        final = final.replace(",", "")
    return final


_R1_USER = "\nUser: "
_R1_ASSISTANT = "\nAssistant: <think>"


def question_from_prompt(prompt: str) -> str:
    r"""Recover the question from an r1_zero-formatted prompt; otherwise the prompt itself.

    The question is the text between the first ``"\nUser: "`` and a final
    ``"\nAssistant: <think>"`` (trailing whitespace allowed). Same result as the regex
    ``\nUser: (.*)\nAssistant: <think>\s*$`` (DOTALL), in linear time: that regex is
    quadratic on a prompt with many ``"\nUser: "``.
    """
    head = prompt.rstrip()
    if not head.endswith(_R1_ASSISTANT):
        return prompt
    head = head[: -len(_R1_ASSISTANT)]
    start = head.find(_R1_USER)
    return head[start + len(_R1_USER) :] if start >= 0 else prompt


class _LineError(Exception):
    """Raised by a per-line parser; converted to DataError with the location."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def _have(obj: dict[str, Any]) -> str:
    return ", ".join(sorted(obj)) or "no fields"


def _pick(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    for name in names:
        if name in obj and obj[name] is not None:
            return name, obj[name]
    return None


def _require_text(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, str]:
    found = _pick(obj, names)
    if found is None:
        alts = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
        raise _LineError(f"missing{alts} (have: {_have(obj)})", names[0])
    name, value = found
    if not isinstance(value, str):
        raise _LineError(f"expected a string, got {type(value).__name__}", name)
    if not value.strip():
        raise _LineError("empty", name)
    return name, value


def _optional_text(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, str] | None:
    found = _pick(obj, names)
    if found is None:
        return None
    name, value = found
    if not isinstance(value, str):
        raise _LineError(f"expected a string, got {type(value).__name__}", name)
    return name, value


def _answer_value(name: str, value: Any) -> GroundTruth:
    """Normalise an answer field: str, int/float -> str, non-empty list of those -> list[str]."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise _LineError(f"expected a string or number, got {type(v).__name__}", name)
        text = v.strip() if isinstance(v, str) else str(v)
        if not text:
            raise _LineError("empty", name)
        return text

    if isinstance(value, list):
        if not value:
            raise _LineError("empty list", name)
        return [scalar(v) for v in value]
    return scalar(value)


def _meta(obj: dict[str, Any], used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in used}


# --------------------------------------------------------------------------------------------
# per-format line parsers: dict -> Example (source/line filled in by the caller)


def _parse_math(obj: dict[str, Any]) -> Example:
    q_name, question = _require_text(obj, MATH_QUESTION_FIELDS)
    used = {q_name}
    sol = _optional_text(obj, MATH_SOLUTION_FIELDS)
    solution = sol[1] if sol else None
    if sol:
        used.add(sol[0])
    found = _pick(obj, MATH_ANSWER_FIELDS)
    if found is not None:
        a_name, raw = found
        used.add(a_name)
        ground_truth = _answer_value(a_name, raw)
    else:
        if solution is None:
            alts = ", ".join(MATH_ANSWER_FIELDS[1:])
            raise _LineError(
                f"missing (or {alts}; or a solution with \\boxed{{}}) (have: {_have(obj)})", "answer"
            )
        boxed = last_boxed(solution)
        if boxed is None or not boxed.strip():
            raise _LineError("no answer field and no \\boxed{...} to derive it from", sol[0] if sol else None)
        ground_truth = boxed.strip()
    return Example(question=question, ground_truth=ground_truth, solution=solution, meta=_meta(obj, used))


def _parse_gsm8k(obj: dict[str, Any]) -> Example:
    _, question = _require_text(obj, ("question",))
    _, answer = _require_text(obj, ("answer",))
    final = gsm8k_final_answer(answer)
    if final is None:
        raise _LineError("does not end with '#### <final answer>'", "answer")
    solution = answer.rsplit("####", 1)[0].strip()
    return Example(
        question=question,
        ground_truth=final,
        solution=solution or None,
        meta=_meta(obj, {"question", "answer"}),
    )


def _parse_sft(obj: dict[str, Any]) -> Example:
    p_name, prompt = _require_text(obj, SFT_PROMPT_FIELDS)
    r_name, response = _require_text(obj, SFT_RESPONSE_FIELDS)
    found = _pick(obj, SFT_GROUND_TRUTH_FIELDS)  # optional: the handout's sft.jsonl has prompt and response only
    ground_truth = _answer_value(*found) if found is not None else None
    used = {p_name, r_name} | ({found[0]} if found is not None else set())
    q = _optional_text(obj, ("question",))
    if q is not None and q[1].strip():
        question = q[1]
        used.add("question")
    else:
        question = question_from_prompt(prompt)
    return Example(
        question=question,
        ground_truth=ground_truth,
        response=response,
        prompt=prompt,
        meta=_meta(obj, used),
    )


_PARSERS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "math": _parse_math,
    "gsm8k": _parse_gsm8k,
    "sft": _parse_sft,
}


def detect_kind(obj: dict[str, Any]) -> str:
    """The format (``"sft"``, ``"gsm8k"`` or ``"math"``) a JSON object looks like."""
    if any(name in obj for name in SFT_PROMPT_FIELDS):
        return "sft"
    answer = obj.get("answer")
    if "question" in obj and isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    return "math"


# --------------------------------------------------------------------------------------------
# public entry points


def _open_data_file(path: str | Path) -> BinaryIO:
    """``open(path, "rb")`` (bytes, so that a decoding error can name its line and offset), or a
    :class:`DataError` for a directory, a missing or an unreadable file."""
    if Path(path).is_dir():
        raise DataError(str(path), None, "is a directory, not a JSONL file")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataFileNotFoundError(str(path), None, "no such file") from None
    except OSError as e:
        raise DataError(str(path), None, f"cannot read ({e.strerror or e})") from None


def load_dataset(path: str | Path, kind: Kind = "auto", *, skip_invalid: bool = False) -> LoadResult:
    """Read a JSONL file into examples, with a report of what was loaded and skipped.

    Args:
        path: A ``.jsonl`` file (UTF-8; a leading BOM is tolerated).
        kind: ``"math"``, ``"gsm8k"``, ``"sft"`` or ``"auto"`` (detected from the first line
            that is a JSON object).
        skip_invalid: Skip malformed lines (counted in the report) instead of raising.

    Raises:
        DataError: a malformed line or one that is not UTF-8 (when ``skip_invalid`` is
            False), a file with no examples at all, a directory, an unreadable file.
        DataFileNotFoundError: ``path`` does not exist (a ``DataError`` and a
            ``FileNotFoundError``).
        ValueError: unknown ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    src = str(path)
    report = LoadReport(path=src, kind=kind)
    examples: list[Example] = []
    resolved: str | None = None if kind == "auto" else kind

    def fail(line_no: int, reason: str, fld: str | None = None) -> None:
        err = DataError(src, line_no, reason, fld)
        if not skip_invalid:
            raise err
        report.n_skipped += 1
        if len(report.reasons) < MAX_REASONS:
            report.reasons.append(str(err))

    with _open_data_file(path) as f:
        offset = 0  # of the next line in the file
        for line_no, data in enumerate(f, start=1):
            line_start, offset = offset, offset + len(data)
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(line_no, not_utf8_reason(data, e, line_start))
                continue
            if line_no == 1:
                raw = raw.removeprefix("\ufeff")  # a byte-order mark
            if not raw.strip():
                report.n_blank += 1
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                fail(line_no, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                fail(line_no, f"expected a JSON object, got {type(obj).__name__}")
                continue
            if resolved is None:
                resolved = detect_kind(obj)
            try:
                ex = _PARSERS[resolved](obj)
            except _LineError as e:
                fail(line_no, e.reason, e.field)
                continue
            examples.append(
                Example(
                    question=ex.question,
                    ground_truth=ex.ground_truth,
                    solution=ex.solution,
                    response=ex.response,
                    prompt=ex.prompt,
                    source=src,
                    line=line_no,
                    meta=ex.meta,
                )
            )
    report.kind = resolved or kind
    report.n_loaded = len(examples)
    if not examples and report.n_skipped == 0:
        raise DataError(src, None, "no examples (file is empty or blank)")
    return LoadResult(examples=examples, report=report)


def load_examples(path: str | Path, kind: Kind = "auto", *, skip_invalid: bool = False) -> list[Example]:
    """Read a JSONL file into examples (see :func:`load_dataset`).

    With ``skip_invalid=True`` a warning with the skip count and first reason is logged when
    anything was skipped; use :func:`load_dataset` to get the full :class:`LoadReport`.
    """
    result = load_dataset(path, kind, skip_invalid=skip_invalid)
    if result.report.n_skipped:
        logger.warning("skipped malformed lines: %s", result.report.summary())
    return result.examples


def load_math(path: str | Path, *, skip_invalid: bool = False) -> list[Example]:
    """MATH-style JSONL (``problem``/``answer``/``solution`` and variants)."""
    return load_examples(path, "math", skip_invalid=skip_invalid)


def load_gsm8k(path: str | Path, *, skip_invalid: bool = False) -> list[Example]:
    """GSM8K JSONL (``question``/``answer`` ending in ``#### N``)."""
    return load_examples(path, "gsm8k", skip_invalid=skip_invalid)


def load_sft(path: str | Path, *, skip_invalid: bool = False) -> list[Example]:
    """``sft.jsonl`` (``prompt``/``response``/``ground_truth``)."""
    return load_examples(path, "sft", skip_invalid=skip_invalid)
