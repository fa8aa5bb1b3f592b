"""The contract between generation and training: typed rollout records and their tensors.

A ``Rollout`` is one sampled response with everything training needs: the exact prompt and
response token ids (never re-tokenised text), the generator's log-probs of those tokens,
the reward dict, and the group-normalised advantage. ``pack_rollouts`` turns a list of them
into the padded tensors of one micro-batch.

Glossary: b rollouts in a micro-batch, T positions after the one-token shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .tokenization import pack_prompt_and_output_ids


@dataclass
class Rollout:
    """One sampled response to one prompt of a rollout batch."""

    group: int  # index of its prompt within the rollout batch (rollouts of a group share it)
    prompt: str
    prompt_token_ids: list[int]
    response: str
    response_token_ids: list[int]  # exactly the sampled ids, EOS included when it ended the response
    ground_truth: Any
    finish_reason: str  # "stop" | "eos" | "length"
    generator_logprobs: list[float]  # the generator's log p of each response token (T=1)
    reward: float = 0.0
    format_reward: float = 0.0
    answer_reward: float = 0.0
    advantage: float = 0.0  # group-normalised reward, filled after scoring

    @property
    def num_tokens(self) -> int:
        return len(self.response_token_ids)


@dataclass
class MicroBatch:
    """Padded tensors of b rollouts, ready for ``get_response_log_probs`` and the loss."""

    input_ids: torch.Tensor  # (b, T) int64
    labels: torch.Tensor  # (b, T) int64
    response_mask: torch.Tensor  # (b, T) bool
    advantages: torch.Tensor  # (b, 1) fp32
    raw_rewards: torch.Tensor  # (b, 1) fp32
    generator_logprobs: torch.Tensor  # (b, T) fp32, zero outside the response
    num_response_tokens: int = 0  # response tokens in the micro-batch (known on the host, no device sync)
    old_log_probs: torch.Tensor | None = None  # (b, T) fp32, set when the loss or logging needs them


def pack_rollouts(rollouts: Sequence[Rollout], pad_id: int, device: torch.device | str = "cpu") -> MicroBatch:
    """Right-pad a few rollouts into one micro-batch on ``device``."""
    packed = pack_prompt_and_output_ids(
        [r.prompt_token_ids for r in rollouts], [r.response_token_ids for r in rollouts], pad_id
    )
    mask = packed["response_mask"]  # (b, T)
    gen = torch.zeros(mask.shape, dtype=torch.float32)  # (b, T)
    # Response positions of a row are contiguous and in order, so row-major fill lines up.
    gen[mask] = torch.tensor([lp for r in rollouts for lp in r.generator_logprobs], dtype=torch.float32)
    return MicroBatch(
        input_ids=packed["input_ids"].to(device),
        labels=packed["labels"].to(device),
        response_mask=mask.to(device),
        advantages=torch.tensor([[r.advantage] for r in rollouts], dtype=torch.float32, device=device),  # (b, 1)
        raw_rewards=torch.tensor([[r.reward] for r in rollouts], dtype=torch.float32, device=device),  # (b, 1)
        generator_logprobs=gen.to(device),
        num_response_tokens=sum(r.num_tokens for r in rollouts),
    )


def rollout_stats(rollouts: Sequence[Rollout], group_size: int, max_tokens: int) -> dict[str, float]:
    """Reward, length and degeneracy statistics of a rollout batch (floats, for logging)."""
    n = len(rollouts)
    lengths = [r.num_tokens for r in rollouts]
    correct = [r.num_tokens for r in rollouts if r.answer_reward > 0]
    incorrect = [r.num_tokens for r in rollouts if r.answer_reward <= 0]
    groups = [rollouts[i : i + group_size] for i in range(0, n, group_size)]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "reward_mean": mean([r.reward for r in rollouts]),
        "format_reward_mean": mean([r.format_reward for r in rollouts]),
        "answer_reward_mean": mean([r.answer_reward for r in rollouts]),
        "response_length_mean": mean(lengths),
        "response_length_correct": mean(correct),
        "response_length_incorrect": mean(incorrect),
        "truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / n,
        "frac_groups_all_equal": mean([float(len({r.reward for r in g}) == 1) for g in groups]),
        "max_tokens": float(max_tokens),
    }
