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

__all__ = [
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


def template_path(name: str) -> Path:
    """Filesystem path of a built-in template (``name`` in :data:`TEMPLATE_NAMES`)."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown prompt template {name!r}; built-in: {', '.join(TEMPLATE_NAMES)}")
    return Path(str(resources.files("cs336_alignment").joinpath("prompts", f"{name}.prompt")))


def load_template(name_or_path: str | Path) -> str:
    """Return the text of a template chosen by built-in name or by file path.

    A string equal to a built-in name (``"r1_zero"``, ``"question_only"``) selects the
    packaged file; anything else is read as a path to a UTF-8 text file. The text is
    returned exactly as stored (no stripping: the r1_zero template has no trailing newline
    and must not gain one).

    Raises:
        ValueError: unknown name / missing file, or the template lacks ``{question}``.
    """
    if isinstance(name_or_path, str) and name_or_path in TEMPLATE_NAMES:
        where = f"<built-in {name_or_path}>"
        resource = resources.files("cs336_alignment").joinpath("prompts", f"{name_or_path}.prompt")
        text = resource.read_bytes().decode("utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"prompt template {str(name_or_path)!r} is neither a built-in name "
                f"({', '.join(TEMPLATE_NAMES)}) nor an existing file"
            )
        where = str(path)
        text = path.read_bytes().decode("utf-8")
    if PLACEHOLDER not in text:
        raise ValueError(f"prompt template {where} does not contain {PLACEHOLDER}")
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
