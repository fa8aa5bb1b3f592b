"""Tokenize (prompt, output) pairs into next-token-prediction tensors with a response mask.

Shape glossary used across the package: B prompts (or sequences in a batch), G samples per
prompt, P prompt length, L response length, T = P + L - 1 after the one-token shift,
V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "pack_prompt_and_output_ids",
    "pad_token_id",
    "tokenize_prompt_and_output",
]


def pad_token_id(tokenizer: Any) -> int:
    """The id used for right-padding: the tokenizer's pad id, else its EOS id.

    Raises ValueError when the tokenizer has neither.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has neither a pad token nor an EOS token; "
            "set tokenizer.pad_token before tokenizing batches"
        )
    return int(pad)


def tokenize_prompt_and_output(prompt_strs: list[str], output_strs: list[str], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Tokenize prompts and outputs separately, concatenate, right-pad, and shift by one.

    Each prompt and each output is encoded on its own without special tokens (no BOS, no
    chat template), so the boundary between them is exactly where the output starts.
    Sequences are right-padded to the longest with the pad id (EOS when the tokenizer has
    no pad token). The mask is built from lengths, never from ``ids != pad``: Qwen's pad id
    equals its EOS id, and an EOS that ends a response is part of that response.

    Returns a dict of three (B, max_len - 1) tensors:
      - ``input_ids``: every token but the last, int64;
      - ``labels``: every token but the first (``labels[:, t]`` is predicted at ``t``), int64;
      - ``response_mask``: bool, True exactly on output tokens within ``labels``.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"got {len(prompt_strs)} prompts but {len(output_strs)} outputs; they must pair up one to one")
    if not prompt_strs:
        raise ValueError("tokenize_prompt_and_output needs at least one (prompt, output) pair")
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompt_strs]
    output_ids = [tokenizer.encode(o, add_special_tokens=False) for o in output_strs]
    return pack_prompt_and_output_ids(prompt_ids, output_ids, pad_token_id(tokenizer))


def pack_prompt_and_output_ids(
    prompt_ids: list[list[int]], output_ids: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate already-tokenized prompts and outputs into shifted, right-padded tensors.

    Recipes use this directly with the exact token ids the generator sampled (never
    re-tokenized text). Same return contract as :func:`tokenize_prompt_and_output`.
    """
    lengths = [len(p) + len(o) for p, o in zip(prompt_ids, output_ids, strict=True)]
    max_len = max(lengths)
    if max_len < 2:
        raise ValueError("every (prompt, output) pair is shorter than two tokens; nothing to predict")
    B = len(lengths)
    full = torch.full((B, max_len), pad_id, dtype=torch.long)  # (B, P+L) right-padded
    is_output = torch.zeros((B, max_len), dtype=torch.bool)  # (B, P+L) True on output tokens
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        full[i, : len(p) + len(o)] = torch.tensor(list(p) + list(o), dtype=torch.long)
        is_output[i, len(p) : len(p) + len(o)] = True
    return {
        "input_ids": full[:, :-1].contiguous(),  # (B, T)
        "labels": full[:, 1:].contiguous(),  # (B, T)
        "response_mask": is_output[:, 1:].contiguous(),  # (B, T)
    }
