"""Group-normalised advantages for GRPO.

Glossary: B prompts, G samples per prompt (the group), B * G rollouts in a rollout batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, Any], dict[str, float]],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[Any],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Score every rollout and normalise its reward within its group.

    r_i      = reward_fn(response_i, ground_truth_i)["reward"]
    A_i      = r_i - mean(r_group)                                   (normalize_by_std=False)
    A_i      = (r_i - mean(r_group)) / (std(r_group) + advantage_eps)  (normalize_by_std=True)

    ``std`` is the unbiased sample standard deviation (divides by G - 1), as ``torch.std``.
    Rollouts are laid out group by group: responses ``[k * G, (k + 1) * G)`` answer prompt k.

    Returns:
        (advantages (B*G,), raw_rewards (B*G,), metadata) where metadata holds floats:
        reward_mean / reward_std / reward_max / reward_min, format_reward_mean and
        answer_reward_mean (when the reward dicts carry them), and
        frac_groups_all_equal: the share of groups whose rewards are all equal (they give
        every member a zero advantage, so no learning signal).
    """
    n = len(rollout_responses)
    if len(repeated_ground_truths) != n:
        raise ValueError(
            f"got {n} rollout responses but {len(repeated_ground_truths)} ground truths; "
            "repeat each ground truth group_size times"
        )
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"rollout batch of {n} responses is not a whole number of groups of size {group_size}")
    if normalize_by_std and group_size < 2:
        raise ValueError("normalize_by_std needs group_size >= 2: the std of a single sample is undefined")

    scores = [reward_fn(r, gt) for r, gt in zip(rollout_responses, repeated_ground_truths)]
    for i, s in enumerate(scores):
        if "reward" not in s:
            raise ValueError(f"reward_fn returned {sorted(s)} for rollout {i}; it must return a dict with a 'reward' key")
    raw_rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)  # (B*G,)

    grouped = raw_rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if normalize_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + advantage_eps)  # (B, G)
    advantages = centred.reshape(-1)  # (B*G,)

    metadata = {
        "reward_mean": raw_rewards.mean().item(),
        "reward_std": raw_rewards.std().item() if n > 1 else 0.0,
        "reward_max": raw_rewards.max().item(),
        "reward_min": raw_rewards.min().item(),
        "frac_groups_all_equal": (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item(),
    }
    for key in ("format_reward", "answer_reward"):
        if all(key in s for s in scores):
            metadata[f"{key}_mean"] = sum(float(s[key]) for s in scores) / n
    return advantages, raw_rewards, metadata
