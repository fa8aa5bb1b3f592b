"""Prompt templates and the project-wide prompt tokenization rule.

Templates are plain text files containing the placeholder ``{question}``. The built-in ones
ship as package data in ``cs336_alignment/prompts/``:

* ``r1_zero``: the R1-Zero template used throughout CS336 assignment 5 (verbatim); it ends
  with ``Assistant: <think>`` so the model's response starts with its reasoning;
* ``question_only``: just ``{question}``.

Tokenization rule (every generator, trainer and evaluator must follow it, so that a prompt is
the same token sequence everywhere): ``tokenizer(text, add_special_tokens=False)`` — no BOS
token and no chat template. Use :func:`encode_prompt`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .examples import Example
from .loaders import DataError, not_utf8_reason

__all__ = [
    "TemplateError",
    "encode_prompt",
    "format_prompt",
    "format_prompts",
    "load_template",
    "template_path",
]

#: Placeholder substituted by :func:`format_prompt`.
PLACEHOLDER = "{question}"

#: Names of the templates shipped with the package.
TEMPLATE_NAMES: tuple[str, ...] = ("r1_zero", "question_only")


class TemplateError(DataError):
    """A bad prompt template: unknown name, missing or unreadable file, not UTF-8, no
    ``{question}``. ``str(err)`` is ``"<file or name>[:<line>]: <problem>"``; a
    :class:`DataError` (so a ``ValueError``, exit code 2)."""


def template_path(name: str) -> Path:
    """Filesystem path of a built-in template (``name`` in :data:`TEMPLATE_NAMES`).

    Raises:
        TemplateError: ``name`` is not a built-in template.
    """
    if name not in TEMPLATE_NAMES:
        raise TemplateError(name, None, f"unknown prompt template; built-in: {', '.join(TEMPLATE_NAMES)}")
    return Path(str(resources.files("cs336_alignment").joinpath("prompts", f"{name}.prompt")))


def load_template(name_or_path: str | Path) -> str:
    """Return the text of a template chosen by built-in name or by file path.

    A string equal to a built-in name (``"r1_zero"``, ``"question_only"``) selects the
    packaged file; anything else is read as a path to a UTF-8 text file. The text is
    returned exactly as stored (no stripping: the r1_zero template has no trailing newline
    and must not gain one).

    Raises:
        TemplateError: neither a built-in name nor an existing file, a directory, an
            unreadable file, bytes that are not UTF-8 (the 1-based line and the byte offset are
            named), or no ``{question}`` in the text. A ``ValueError`` too.
    """
    if isinstance(name_or_path, str) and name_or_path in TEMPLATE_NAMES:
        where = f"<built-in {name_or_path}>"
        data = resources.files("cs336_alignment").joinpath("prompts", f"{name_or_path}.prompt").read_bytes()
    else:
        path = Path(name_or_path)
        where = str(path)
        if path.is_dir():
            raise TemplateError(where, None, "is a directory, not a prompt template file")
        if not path.is_file():
            raise TemplateError(
                where, None, f"prompt template is neither a built-in name ({', '.join(TEMPLATE_NAMES)}) nor an existing file"
            )
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TemplateError(where, None, f"cannot read prompt template ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TemplateError(where, line, not_utf8_reason(data, e)) from None
    if PLACEHOLDER not in text:
        raise TemplateError(where, None, f"prompt template does not contain {PLACEHOLDER}")
    return text


def format_prompt(template: str, example: Example | str) -> str:
    """Format the prompt for ``example`` (an :class:`Example` or a bare question string).

    If the example already carries a pre-formatted ``prompt`` (e.g. from ``sft.jsonl``), that
    prompt is returned unchanged. Otherwise every ``{question}`` in ``template`` (the template
    *text*, see :func:`load_template`) is replaced by the question; the rest of the template is
    kept verbatim (literal braces need no escaping). For the built-in templates this equals
    ``template.format(question=question)``.
    """
    if PLACEHOLDER not in template:
        raise ValueError(
            "template text does not contain {question}; pass the text from load_template(name), "
            "not the template's name"
        )
    if isinstance(example, Example):
        if example.prompt is not None:
            return example.prompt
        question = example.question
    elif isinstance(example, str):
        question = example
    else:
        raise TypeError(f"expected an Example or a str, got {type(example).__name__}")
    return template.replace(PLACEHOLDER, question)


def format_prompts(template: str, examples: list[Example]) -> list[str]:
    """:func:`format_prompt` for each example, in order."""
    return [format_prompt(template, ex) for ex in examples]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` under the project rule: no special tokens, no chat template.

    ``tokenizer`` is any Hugging Face tokenizer (or a callable with the same interface
    returning a mapping with ``"input_ids"``). Used for prompts and for response text alike.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]
