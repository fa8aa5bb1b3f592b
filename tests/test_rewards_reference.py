"""Differential test against the CS336 reference grader (opt-in).

Set ``CS336_REFERENCE_GRADER=/path/to/drgrpo_grader.py`` (the file from
github.com/stanford-cs336/assignment5-alignment, which needs ``pylatexenc`` and
``math-verify`` installed) to compare our verdicts with the reference's on the
hand-written corpus plus cross-paired answers and ground truths. Skipped otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest

from cs336_alignment.rewards import grade_batch, resolve_reward_fn

FIXTURES = Path(__file__).parent / "fixtures" / "grading"
REFERENCE = os.environ.get("CS336_REFERENCE_GRADER", "")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not REFERENCE, reason="set CS336_REFERENCE_GRADER to the reference drgrpo_grader.py"),
]


def _reference(name: str):  # noqa: ANN202 - whatever the reference file defines
    try:
        return resolve_reward_fn(f"{REFERENCE}:{name}")
    except ValueError as exc:
        pytest.skip(f"reference grader not importable: {exc}")


def _cases(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def _differential_corpus(n_cross: int = 1500, seed: int = 0) -> list[tuple[str, object]]:
    """Fixture cases plus answers from one case paired with ground truths of another."""
    cases = [c for c in _cases("default_cases.jsonl") if c["fn"] == "r1_zero"]
    pairs = [(c["response"], c["ground_truth"]) for c in cases]
    rng = random.Random(seed)
    responses = [c["response"] for c in cases]
    truths = [c["ground_truth"] for c in cases if isinstance(c["ground_truth"], str)]
    pairs += [(rng.choice(responses), rng.choice(truths)) for _ in range(n_cross)]
    return pairs


def _agreement(reference, pairs, **kwargs) -> tuple[int, list]:  # noqa: ANN001
    logging.disable(logging.CRITICAL)
    try:
        ours = grade_batch([p[0] for p in pairs], [p[1] for p in pairs], **kwargs).rewards
        disagreements = []
        for (response, truth), mine in zip(pairs, ours):
            theirs = reference(response, truth, kwargs.get("mode", "default") == "default")
            if [theirs["format_reward"], theirs["reward"]] != [mine["format_reward"], mine["reward"]]:
                disagreements.append((response, truth, theirs, mine))
        return len(pairs), disagreements
    finally:
        logging.disable(logging.NOTSET)


def test_default_mode_agrees_with_reference_everywhere() -> None:
    reference = _reference("r1_zero_reward_fn")
    total, disagreements = _agreement(reference, _differential_corpus())
    rate = 1 - len(disagreements) / total
    print(f"default mode: {total} pairs, agreement {rate:.4%}")
    assert not disagreements, disagreements[:10]


def test_question_only_agrees_with_reference() -> None:
    reference = _reference("question_only_reward_fn")
    cases = [c for c in _cases("default_cases.jsonl") if c["fn"] == "question_only"]
    for case in cases:
        from cs336_alignment.rewards import question_only_reward_fn

        assert question_only_reward_fn(case["response"], case["ground_truth"]) == reference(
            case["response"], case["ground_truth"]
        ), case["rule"]


def test_lenient_mode_agrees_with_reference_fast_false() -> None:
    pytest.importorskip("math_verify")
    reference = _reference("r1_zero_reward_fn")
    cases = _cases("lenient_cases.jsonl")
    total, disagreements = _agreement(reference, [(c["response"], c["ground_truth"]) for c in cases], mode="lenient")
    print(f"lenient mode: {total} pairs, {len(disagreements)} disagreements")
    assert not disagreements, disagreements
