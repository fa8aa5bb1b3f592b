"""Every study config holds the handout's values (issue 19): a table per study, so a wrong
learning rate, batch size, group size, loss, normalisation, sampling, step count or evaluation
cadence fails here, whatever else still parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from cs336_alignment.experiments import load_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The handout's GRPO defaults (section "GRPO experiments"), shared by the GRPO studies.
GRPO = dict(
    n_grpo_steps=200, learning_rate=1e-5, advantage_eps=1e-6, rollout_batch_size=256, group_size=8,
    sampling_temperature=1.0, sampling_min_tokens=4, sampling_max_tokens=1024, epochs_per_rollout_batch=1,
    train_batch_size=256, gradient_accumulation_steps=128, loss_type="reinforce_with_baseline",
    use_std_normalization=True, length_normalization="masked_mean", eval_at_start=True, final_eval_full=True,
)
OFF_POLICY = dict(epochs_per_rollout_batch=2, train_batch_size=128, gradient_accumulation_steps=64)

EXPECTED: dict[str, dict] = {
    "grpo": {**GRPO, "eval_every": 10, "data.prompt": "r1_zero", "data.reward": ""},
    "grpo_no_clip": {**GRPO, **OFF_POLICY, "loss_type": "grpo_no_clip"},
    "grpo_off_policy": {**GRPO, **OFF_POLICY, "n_grpo_steps": 40, "loss_type": "grpo_clip", "cliprange": 0.2},
    "grpo_question_only": {**GRPO, "data.prompt": "question_only", "data.reward": "question_only"},
    "ei": dict(n_ei_steps=5, batch_questions=512, rollouts_per_question=4, sampling_temperature=1.0, sampling_min_tokens=4,
               sampling_max_tokens=1024, dedupe_correct=False, normalize="constant", eval_at_start=True,
               final_eval_full=True),
    "sft": dict(learning_rate=2e-5, n_examples=None, filter_correct=False, normalize="constant", eval_at_start=True,
                final_eval_full=True, eval_max_tokens=1024, **{"data.prompt": "r1_zero"}),
    "sft_filtered": dict(learning_rate=2e-5, filter_correct=True, normalize="constant", eval_at_start=True,
                         final_eval_full=True),
    "math_baseline": dict(prompt="r1_zero", temperature=1.0, top_p=1.0, max_tokens=1024, min_tokens=0, n=1,
                          stop=["</answer>"]),
}


def _value(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("study", sorted(EXPECTED))
def test_a_study_config_holds_the_handouts_values(study, monkeypatch):
    monkeypatch.delenv("CS336_DATA", raising=False)
    cfg = load_study(CONFIGS / f"{study}.yaml", []).config
    wrong = {k: (_value(cfg, k), v) for k, v in EXPECTED[study].items() if _value(cfg, k) != v}
    assert not wrong, f"{study}: field (config, handout): {wrong}"
