"""Group-normalised advantages for GRPO.

Glossary: B prompts, G samples per prompt (the group), B * G rollouts in a rollout batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .rewards import score_pairs

__all__ = [
    "all_equal_groups",
    "compute_group_normalized_rewards",
    "frac_groups_all_equal",
    "group_normalize",
    "score_responses",
    "soft_overlong_penalty",
]


def score_responses(
    reward_fn: Callable[[str, Any], dict[str, float]], responses: Sequence[str], ground_truths: Sequence[Any]
) -> list[dict[str, float]]:
    """``reward_fn(response, ground_truth)`` for each pair; each dict must hold a "reward"."""
    if len(ground_truths) != len(responses):
        raise ValueError(
            f"got {len(responses)} rollout responses but {len(ground_truths)} ground truths; "
            "repeat each ground truth group_size times"
        )
    scores = score_pairs(reward_fn, responses, ground_truths)
    for i, s in enumerate(scores):
        if "reward" not in s:
            raise ValueError(f"reward_fn returned {sorted(s)} for rollout {i}; it must return a dict with a 'reward' key")
    return scores


def group_normalize(
    raw_rewards: torch.Tensor, group_size: int, advantage_eps: float, normalize_by_std: bool
) -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's std + eps when ``normalize_by_std``.

    A_i = r_i - mean(r_group)                                   (normalize_by_std=False)
    A_i = (r_i - mean(r_group)) / (std(r_group) + advantage_eps)  (normalize_by_std=True)

    ``std`` is the unbiased sample standard deviation (divides by G - 1), as ``torch.std``.

    Args: raw_rewards (B*G,), laid out group by group. Returns: advantages (B*G,).
    """
    n = raw_rewards.numel()
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"rollout batch of {n} responses is not a whole number of groups of size {group_size}")
    if normalize_by_std and group_size < 2:
        raise ValueError("normalize_by_std needs group_size >= 2: the std of a single sample is undefined")
    grouped = raw_rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if normalize_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + advantage_eps)  # (B, G)
    return centred.reshape(-1)  # (B*G,)


def all_equal_groups(raw_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have rewards all equal: every member gets advantage 0, so no signal
    (DAPO's dynamic sampling drops them; Yu et al., 2025, arXiv:2503.14476).

    Args: raw_rewards (B*G,), laid out group by group. Returns: (B,) bool.
    """
    grouped = raw_rewards.view(-1, group_size)  # (B, G)
    return grouped.max(dim=1).values == grouped.min(dim=1).values  # (B,)


def frac_groups_all_equal(raw_rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (:func:`all_equal_groups`).

    Args: raw_rewards (B*G,), laid out group by group.
    """
    return all_equal_groups(raw_rewards, group_size).float().mean().item()


def soft_overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476), added to the reward:
    nothing up to ``max_tokens - buffer`` tokens, then a penalty growing linearly to ``-penalty``
    at ``max_tokens``:

    R(|y|) = 0                                          |y| <= L - C
           = penalty * ((L - C) - |y|) / C              L - C < |y| <= L
           = -penalty                                   |y| > L

    L = ``max_tokens``, C = ``buffer`` (C = 0: no penalty).

    Args: lengths (N,) response lengths in tokens. Returns: (N,) fp32, each in [-penalty, 0].
    """
    lengths = lengths.float()  # (N,)
    if buffer <= 0:
        return torch.zeros_like(lengths)  # (N,)
    start = max_tokens - buffer
    ramp = penalty * (start - lengths) / buffer  # (N,)
    return torch.where(lengths <= start, torch.zeros_like(lengths), ramp.clamp(min=-penalty))  # (N,)


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, Any], dict[str, float]],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[Any],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Score every rollout and normalise its reward within its group (the handout's function).

    r_i = reward_fn(response_i, ground_truth_i)["reward"], then :func:`group_normalize`.
    Rollouts are laid out group by group: responses ``[k * G, (k + 1) * G)`` answer prompt k.

    Returns:
        (advantages (B*G,), raw_rewards (B*G,), metadata) where metadata holds floats:
        reward_mean / reward_std / reward_max / reward_min, format_reward_mean and
        answer_reward_mean (when the reward dicts carry them), and
        frac_groups_all_equal (:func:`frac_groups_all_equal`).
    """
    n = len(rollout_responses)
    scores = score_responses(reward_fn, rollout_responses, repeated_ground_truths)
    raw_rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)  # (B*G,)
    advantages = group_normalize(
        raw_rewards, group_size=group_size, advantage_eps=advantage_eps, normalize_by_std=normalize_by_std
    )  # (B*G,)
    metadata = {
        "reward_mean": raw_rewards.mean().item(),
        "reward_std": raw_rewards.std().item() if n > 1 else 0.0,
        "reward_max": raw_rewards.max().item(),
        "reward_min": raw_rewards.min().item(),
        "frac_groups_all_equal": frac_groups_all_equal(raw_rewards, group_size),
    }
    for key in ("format_reward", "answer_reward"):
        if all(key in s for s in scores):
            metadata[f"{key}_mean"] = sum(float(s[key]) for s in scores) / n
    return advantages, raw_rewards, metadata
