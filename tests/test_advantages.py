"""compute_group_normalized_rewards against hand-worked groups."""

from __future__ import annotations

import math

import pytest
import torch

from cs336_alignment import compute_group_normalized_rewards


def reward_from_text(response: str, ground_truth: str) -> dict[str, float]:
    r = 1.0 if response == ground_truth else 0.0
    return {"reward": r, "format_reward": 1.0, "answer_reward": r}


def test_hand_worked_groups():
    # group 1 rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735
    # group 2 rewards [1, 1, 1, 1]: all equal -> advantage 0
    responses = ["a", "x", "y", "a", "b", "b", "b", "b"]
    truths = ["a"] * 4 + ["b"] * 4
    adv, raw, meta = compute_group_normalized_rewards(
        reward_fn=reward_from_text,
        rollout_responses=responses,
        repeated_ground_truths=truths,
        group_size=4,
        advantage_eps=1e-6,
        normalize_by_std=True,
    )
    s = math.sqrt(1 / 3)
    assert raw.tolist() == [1, 0, 0, 1, 1, 1, 1, 1]
    assert adv.tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0], rel=1e-5)
    assert meta["frac_groups_all_equal"] == 0.5
    assert meta["reward_mean"] == pytest.approx(0.75)
    assert meta["reward_max"] == 1.0 and meta["reward_min"] == 0.0
    assert meta["format_reward_mean"] == 1.0 and meta["answer_reward_mean"] == pytest.approx(0.75)
    assert adv.shape == raw.shape == (8,)


def test_without_std_normalisation_only_centres():
    adv, raw, _ = compute_group_normalized_rewards(
        reward_from_text, ["a", "x", "y", "a"], ["a"] * 4, 2, 1e-6, normalize_by_std=False
    )
    # groups [1, 0] and [0, 1]: means 0.5 -> [0.5, -0.5, -0.5, 0.5]
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_eps_keeps_equal_groups_finite():
    adv, _, _ = compute_group_normalized_rewards(reward_from_text, ["a", "a"], ["a", "a"], 2, 1e-6, True)
    assert torch.isfinite(adv).all() and adv.abs().sum() == 0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="3 rollout responses but 2 ground truths"):
        compute_group_normalized_rewards(reward_from_text, ["a", "b", "c"], ["a", "b"], 1, 1e-6, False)
    with pytest.raises(ValueError, match="whole number of groups"):
        compute_group_normalized_rewards(reward_from_text, ["a", "b", "c"], ["a"] * 3, 2, 1e-6, False)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_group_normalized_rewards(reward_from_text, ["a"], ["a"], 1, 1e-6, True)
    with pytest.raises(ValueError, match="'reward' key"):
        compute_group_normalized_rewards(lambda r, g: {"score": 1.0}, ["a", "b"], ["a", "b"], 2, 1e-6, False)


def test_soft_overlong_penalty_hand_values():
    from cs336_alignment.advantages import soft_overlong_penalty

    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    # L = 10, C = 4: free up to L - C = 6 tokens, then (6 - |y|) / 4: 7 -> -0.25, 8 -> -0.5, 10 -> -1; beyond L: -1
    assert soft_overlong_penalty(lengths, max_tokens=10, buffer=4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # penalty 0.5 scales the ramp: 8 -> 0.5 * (6 - 8) / 4 = -0.25, 10 -> -0.5
    assert soft_overlong_penalty(lengths, max_tokens=10, buffer=4, penalty=0.5).tolist() == [0, 0, -0.125, -0.25, -0.5, -0.5]
    assert soft_overlong_penalty(lengths, max_tokens=10, buffer=0).tolist() == [0.0] * 6  # buffer 0: off


def test_all_equal_groups_hand_values():
    from cs336_alignment.advantages import all_equal_groups, frac_groups_all_equal

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])  # groups of 2: equal, mixed, equal, equal
    assert all_equal_groups(rewards, 2).tolist() == [True, False, True, True]
    assert frac_groups_all_equal(rewards, 2) == 0.75
