"""Deterministic in-process rewards for recipe tests (loaded by path: 'tests/reward_helpers.py:name')."""

from __future__ import annotations

CALLS = {"n": 0, "nan_after": None}


def contains_one(response: str, ground_truth) -> dict[str, float]:
    """Reward 1 when the response contains the digit 1 (a property a tiny model can be taught)."""
    r = 1.0 if "1" in response else 0.0
    return {"format_reward": 1.0, "answer_reward": r, "reward": r}


def nan_after_calls(response: str, ground_truth) -> dict[str, float]:
    """Like contains_one, but NaN once CALLS["nan_after"] calls have been made (a broken reward)."""
    CALLS["n"] += 1
    if CALLS["nan_after"] is not None and CALLS["n"] > CALLS["nan_after"]:
        return {"format_reward": 1.0, "answer_reward": float("nan"), "reward": float("nan")}
    return contains_one(response, ground_truth)


def contains_e(response: str, ground_truth) -> dict[str, float]:
    """Reward 1 when the response contains the letter e: frequent enough in a tiny untrained
    model's samples that expert iteration keeps some of every step's rollouts."""
    r = 1.0 if "e" in response else 0.0
    return {"format_reward": 1.0, "answer_reward": r, "reward": r}
