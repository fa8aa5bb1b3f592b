"""The GRPO variants beyond the handout (issue 24), each off by default: a tiny CPU run per knob
showing its documented effect (the formulas are tested against hand-worked values in test_losses.py)."""

from __future__ import annotations

import json
from pathlib import Path

from cs336_alignment.config import load_config
from cs336_alignment.recipes.grpo import GRPOConfig, train_grpo
from cs336_alignment.run_dir import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DATA = {"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 64, "n_task_val": 8,
        "reward": str(REPO / "tests" / "reward_helpers.py") + ":contains_e", "reward_in_process": True}


def config(out: Path, **kw) -> GRPOConfig:
    """One GRPO step of 4 questions x 4 responses trained for 2 epochs in train batches of 8:
    4 optimizer steps, the later ones off-policy (ratios away from 1)."""
    base = dict(model="tiny", out=str(out), device="cpu", seed=3, n_grpo_steps=1, learning_rate=3e-3, data=DATA,
                rollout_batch_size=16, group_size=4, train_batch_size=8, micro_batch_size=4, epochs_per_rollout_batch=2,
                loss_type="grpo_clip", sampling_max_tokens=12, eval_every=0, n_eval_examples=2, final_eval_full=False,
                log_rollout_examples=0, control={"progress": False})
    return load_config(GRPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def test_clip_higher_moves_the_upper_clipped_share_apart_from_the_lower(tmp_path):
    train_grpo(config(tmp_path / "sym", cliprange_low=0.01, cliprange_high=0.01))
    train_grpo(config(tmp_path / "higher", cliprange_low=0.01, cliprange_high=1e9))  # no upper bound
    sym = [r for r in read_jsonl(tmp_path / "sym" / "metrics.jsonl") if r["kind"] == "train"]
    higher = [r for r in read_jsonl(tmp_path / "higher" / "metrics.jsonl") if r["kind"] == "train"]
    # until the first clipped token the two runs are the same run; at that step only the upper share differs
    first = next(i for i, r in enumerate(sym) if r["clip_fraction"] > 0)
    assert [r["loss"] for r in sym[:first]] == [r["loss"] for r in higher[:first]]
    assert sym[first]["clip_fraction_high"] > 0 and higher[first]["clip_fraction_high"] == 0
    assert higher[first]["clip_fraction_low"] == sym[first]["clip_fraction_low"]
    assert sym[first]["clip_fraction"] == sym[first]["clip_fraction_high"] + sym[first]["clip_fraction_low"]
    default = config(tmp_path / "d")  # off by default: both bounds are cliprange, and nothing new is logged
    assert (default.clip_low, default.clip_high, default.asymmetric_clip) == (0.2, 0.2, False)


def test_overlong_filter_gives_a_response_cut_at_the_length_limit_no_gradient(tiny_model, tmp_path):
    import dataclasses

    import torch

    from cs336_alignment.recipes.grpo import accumulate_gradients
    from cs336_alignment.rollouts import Rollout, pack_rollouts

    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(group=0, prompt="p", prompt_token_ids=torch.randint(3, 60, (5,), generator=g).tolist(), response="r",
                        response_token_ids=torch.randint(3, 60, (6,), generator=g).tolist(), ground_truth=None,
                        finish_reason=reason, generator_logprobs=[-1.0] * 6, advantage=a)
                for reason, a in (("eos", 1.0), ("length", -1.0))]

    def gradient(batch_rollouts, **fields):
        tiny_model.zero_grad()
        cfg = config(tmp_path / "x", loss_type="reinforce_with_baseline", gradient_accumulation_steps=None, **fields)
        accumulate_gradients(tiny_model, [pack_rollouts(batch_rollouts, pad_id=0)], cfg, tokens=12, gap=None)
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    filtered = gradient(rollouts, overlong_filter=True)
    # the same as if the truncated response had advantage 0: its tokens weigh nothing (the batch mean still counts it)
    silenced = gradient([rollouts[0], dataclasses.replace(rollouts[1], advantage=0.0)])
    assert torch.allclose(filtered, silenced, atol=1e-8)
    assert not torch.allclose(filtered, gradient(rollouts), atol=1e-6)  # off by default: it does weigh
