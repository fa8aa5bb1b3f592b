"""The ``Example`` record: the one contract between data, trainers, evaluation and the demo.

Every loader and every built-in task returns a list of :class:`Example`. A recipe (SFT,
expert iteration, GRPO, evaluation) only needs:

* ``format_prompt(template, example)`` (see :mod:`cs336_alignment.data.templates`) for the
  prompt text; it uses ``example.prompt`` when the example already carries a formatted prompt;
* ``example.ground_truth``: passed unchanged as the second argument of the reward function;
* ``example.response``: the reference response for SFT (the text that *follows* the prompt,
  in r1_zero format: reasoning, then ``</think> <answer>...</answer>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

__all__ = [
    "Example",
]

#: What a reward function receives as its ``ground_truth`` argument.
#: ``str`` for MATH / GSM8K / arithmetic, ``list[str]`` when several answers are accepted,
#: ``dict`` for structured tasks (Countdown: ``{"numbers": [...], "target": N}``).
GroundTruth = Union[str, list[str], dict[str, Any]]


@dataclass(frozen=True)
class Example:
    """One task instance.

    Attributes:
        question: The problem statement substituted for ``{question}`` in a template.
        ground_truth: What the reward function receives (see :data:`GroundTruth`).
        solution: A worked solution in the dataset's own style (MATH ``solution``, GSM8K
            rationale), if any. Not in r1_zero format.
        response: The reference response for SFT, in r1_zero format: the text that follows
            the prompt (which ends with ``Assistant: <think>``), i.e. reasoning, then
            ``</think> <answer>...</answer>``. ``None`` when the source has none.
        prompt: A pre-formatted prompt (e.g. from ``sft.jsonl``). When set,
            :func:`~cs336_alignment.data.templates.format_prompt` returns it unchanged.
        source: File path the example was read from, or the generator's name.
        line: 1-based line number in ``source`` (``None`` for generated examples).
        meta: Any other fields (MATH ``level``/``type``, generator parameters, ...).

    Instances are immutable. ``ground_truth`` and ``meta`` are excluded from the hash (they
    may be lists or dicts), but included in equality.
    """

    question: str
    ground_truth: GroundTruth = field(hash=False)
    solution: str | None = None
    response: str | None = None
    prompt: str | None = None
    source: str = ""
    line: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields (inverse of :meth:`from_dict`)."""
        return {
            "question": self.question,
            "ground_truth": self.ground_truth,
            "solution": self.solution,
            "response": self.response,
            "prompt": self.prompt,
            "source": self.source,
            "line": self.line,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Example":
        """Build an Example from :meth:`to_dict` output (unknown keys raise ``TypeError``)."""
        return cls(**dict(data))

    def ground_truth_text(self) -> str:
        """``ground_truth`` as one string, for logs and tables (dicts/lists as compact JSON)."""
        if isinstance(self.ground_truth, str):
            return self.ground_truth
        return json.dumps(self.ground_truth, separators=(",", ":"), sort_keys=True)

    @property
    def location(self) -> str:
        """``source:line`` (or just ``source``), for error messages and logs."""
        return f"{self.source}:{self.line}" if self.line is not None else self.source
