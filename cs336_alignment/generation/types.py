"""The contract between generation and everything that consumes it.

``SamplingParams`` says how to sample; ``Completion`` is one sampled response with the exact
token ids the engine drew (recipes train on these ids, never on re-tokenised text);
``GenerationResult`` groups the ``n`` completions of one prompt. Every backend (the native
engine, vLLM) takes and returns these types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "Completion",
    "GenerationResult",
    "Generator",
    "SamplingParams",
]

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Defaults follow vLLM's; :meth:`r1_zero` gives the handout's settings."""

    temperature: float = 1.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
    top_k: int = 0  # keep only the k most likely tokens; 0 disables
    max_tokens: int = 16  # at most this many new tokens per completion
    min_tokens: int = 0  # stop strings and EOS are suppressed until this many tokens exist
    stop: tuple[str, ...] = ()  # stop strings, matched across token boundaries
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    n: int = 1  # completions per prompt
    seed: int | None = None  # None: a fresh seed drawn from torch's global RNG per call
    ignore_eos: bool = False  # keep going past EOS (benchmarks with fixed lengths)
    prompt_offset: int = 0  # index of this call's first prompt in the whole batch: sampling streams are keyed on
    # (seed, offset + prompt index, sample index), so a batch split across ranks samples what one process would

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.prompt_offset < 0:
            raise ValueError(f"prompt_offset must be >= 0, got {self.prompt_offset}")

    @classmethod
    def r1_zero(cls, **overrides: Any) -> SamplingParams:
        """The handout's evaluation sampling: T=1, top-p 1, at most 1024 new tokens, stop at </answer> and
        keep it. Its EI and GRPO rollouts add ``min_tokens=4``."""
        base = dict(
            temperature=1.0,
            top_p=1.0,
            max_tokens=1024,
            min_tokens=0,
            stop=("</answer>",),
            include_stop_str_in_output=True,
        )
        return cls(**{**base, **overrides})


@dataclass
class Completion:
    """One sampled response.

    ``token_ids`` are exactly the sampled ids, including the EOS that ended the response
    (it is part of the response and of its training mask) and the whole token that
    completed a stop string. ``text`` is their decoding, cut at the stop string (kept or
    dropped per ``include_stop_str_in_output``), without special tokens.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the engine's model at T=1, per token
    stop_str: str | None = None  # the stop string that ended it, if any

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationResult:
    """The ``n`` completions of one prompt, in sample order."""

    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[Completion]


class Generator(Protocol):
    """What every generation backend provides."""

    tokenizer: Any

    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], sampling: SamplingParams, progress: bool = False
    ) -> list[GenerationResult]:
        """Sample ``sampling.n`` completions for each prompt (text, or token ids)."""
        ...

    def load_weights(self, policy: Any) -> None:
        """Make later calls sample from ``policy``'s current weights."""
        ...
