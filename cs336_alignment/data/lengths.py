"""A size guard run before training or generation: every text the model will see must fit
its context.

:func:`check_lengths` refuses, with a one-line :class:`~cs336_alignment.data.loaders.DataError`
(exit code 2) naming ``file:line``, an example whose prompt (plus its reference response, for
SFT) is longer than the context. It first bounds the length in characters, without the
tokenizer, so a 50 MB line is refused in a fraction of a second instead of minutes of
tokenization; the texts that pass are then tokenized in one batch and counted exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .examples import Example
from .loaders import DataError
from .templates import format_prompt

__all__ = [
    "MAX_CHARS_PER_TOKEN",
    "check_lengths",
]

#: Characters one token can stand for, at most, in the character pre-check. Real text averages
#: about 4 characters per token (English; 1-3 for code, digits and CJK; Qwen splits digits one
#: per token), and the tiny test tokenizer's longest token is 13 characters. Only long runs of
#: one character merged by BPE into single tokens (runs of spaces, "=====") push the average
#: higher, up to the length of the longest vocabulary entry, so :func:`check_lengths` raises
#: this bound to that length when the tokenizer exposes ``get_vocab()``: a text refused for
#: its characters can never have fitted.
MAX_CHARS_PER_TOKEN = 32


def _chars_per_token(tokenizer: Any) -> int:
    """:data:`MAX_CHARS_PER_TOKEN`, or the tokenizer's longest vocabulary entry if longer.

    Byte-level BPE entries spell each byte as one character, so an entry's length bounds the
    characters of text its token covers.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    longest = max(map(len, get_vocab()), default=0) if callable(get_vocab) else 0
    return max(MAX_CHARS_PER_TOKEN, longest)


def _where(example: Example, index: int) -> tuple[str, int | None]:
    """(path, line) for an error: ``file`` and line, or ``source[index]`` for a generated example."""
    if example.line is not None:
        return example.source, example.line
    return f"{example.source or 'examples'}[{index}]", None


def check_lengths(
    examples: Sequence[Example],
    *,
    template: str,
    tokenizer: Any,
    max_tokens: int,
    with_response: bool,
) -> None:
    """Refuse the first example whose text does not fit in ``max_tokens`` tokens.

    The text is ``format_prompt(template, example)``, plus ``example.response`` (when set) if
    ``with_response`` (SFT), counted as the prompt's tokens plus the response's, each encoded
    with ``add_special_tokens=False`` as the recipes do. Examples longer than
    ``max_tokens * chars_per_token`` characters (see :data:`MAX_CHARS_PER_TOKEN`) are refused
    without calling the tokenizer; the others are tokenized in one batched call (none when
    ``examples`` is empty).

    Args:
        examples: Loaded or generated examples (``source``/``line`` name them in the error).
        template: Prompt template text (see :func:`~cs336_alignment.data.templates.load_template`).
        tokenizer: A Hugging Face tokenizer, or a callable with its interface for a list of
            texts (returning a mapping with ``"input_ids"``: one id list per text).
        max_tokens: The most tokens the model may see (its context, less any generation budget).
        with_response: Count the reference response too.

    Raises:
        DataError: ``"<file>:<line>: prompt is 5,120 tokens, more than the model's 4096-token
            context"`` (or ``"... characters, more than a 4096-token context can hold"``), with
            ``"; N examples are too long"`` appended when more than one is. Exit code 2.
        ValueError: ``max_tokens`` < 1.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    prompts = [format_prompt(template, ex) for ex in examples]
    responses = [(ex.response or "") if with_response else "" for ex in examples]

    def refuse(bad: list[int], size: int, unit: str, bound: str) -> None:
        ex = examples[bad[0]]
        what = "prompt and response are" if responses[bad[0]] else "prompt is"
        more = f"; {len(bad)} examples are too long" if len(bad) > 1 else ""
        path, line = _where(ex, bad[0])
        raise DataError(path, line, f"{what} {size:,} {unit}, more than {bound}{more}")

    max_chars = max_tokens * _chars_per_token(tokenizer)
    n_chars = [len(p) + len(r) for p, r in zip(prompts, responses)]
    too_long = [i for i, n in enumerate(n_chars) if n > max_chars]
    if too_long:
        refuse(too_long, n_chars[too_long[0]], "characters", f"a {max_tokens}-token context can hold")

    if not examples:
        return
    has_response = [i for i, r in enumerate(responses) if r]
    texts = prompts + [responses[i] for i in has_response]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # verbose: no too-long warning, we report it
    n_tokens = [len(x) for x in ids[: len(prompts)]]
    for i, r_ids in zip(has_response, ids[len(prompts) :]):
        n_tokens[i] += len(r_ids)
    too_long = [i for i, n in enumerate(n_tokens) if n > max_tokens]
    if too_long:
        refuse(too_long, n_tokens[too_long[0]], "tokens", f"the model's {max_tokens}-token context")
