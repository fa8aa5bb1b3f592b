"""Masked reductions, the SFT step and the policy-gradient losses, against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cs336_alignment import (
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    grpo_microbatch_train_step,
    masked_mean,
    masked_normalize,
    sft_microbatch_train_step,
)
from cs336_alignment.losses import masked_mean_loss, masked_normalize_loss, token_mean_loss

# A 2 x 3 example used throughout:
#   tensor = [[1, 2, 3],      mask = [[1, 0, 1],
#             [4, 5, 6]]              [0, 1, 1]]
T = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[True, False, True], [False, True, True]])


# --------------------------------------------------------------------------- masked_normalize


def test_masked_normalize_hand_values():
    # all: (1 + 3 + 5 + 6) / 2 = 7.5
    assert masked_normalize(T, M, normalize_constant=2.0).item() == pytest.approx(7.5)
    # rows: [(1 + 3) / 2, (5 + 6) / 2] = [2, 5.5]
    assert masked_normalize(T, M, normalize_constant=2.0, dim=-1).tolist() == pytest.approx([2.0, 5.5])
    assert masked_normalize(T, M, normalize_constant=2.0, dim=1).tolist() == pytest.approx([2.0, 5.5])
    # columns: [1 / 2, 5 / 2, (3 + 6) / 2] = [0.5, 2.5, 4.5]
    assert masked_normalize(T, M, normalize_constant=2.0, dim=0).tolist() == pytest.approx([0.5, 2.5, 4.5])


def test_masked_normalize_ignores_inf_and_nan_under_the_mask():
    t = torch.tensor([[1.0, float("-inf"), 3.0], [float("nan"), 5.0, 6.0]])
    assert masked_normalize(t, M, 1.0).item() == pytest.approx(15.0)


def test_masked_normalize_course_shaped_matches_float64_reference(course_logits):
    torch.manual_seed(42)
    mask = torch.rand_like(course_logits) > 0.5
    ref = course_logits.double().numpy() * mask.numpy()
    for dim in (None, 0, 1, -1):
        got = masked_normalize(tensor=course_logits, mask=mask, normalize_constant=42.0, dim=dim)
        want = (ref.sum() if dim is None else ref.sum(axis=dim)) / 42.0
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- masked_mean


def test_masked_mean_hand_values():
    # all: 15 / 4 = 3.75; rows: [4 / 2, 11 / 2]; columns: [1 / 1, 5 / 1, 9 / 2]
    assert masked_mean(T, M).item() == pytest.approx(3.75)
    assert masked_mean(T, M, dim=-1).tolist() == pytest.approx([2.0, 5.5])
    assert masked_mean(T, M, dim=0).tolist() == pytest.approx([1.0, 5.0, 4.5])


def test_masked_mean_empty_slice_is_nan():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    rows = masked_mean(T, mask, dim=-1)
    assert rows[0].item() == pytest.approx(2.0)
    assert math.isnan(rows[1].item())  # 0 / 0
    assert math.isnan(masked_mean(T, torch.zeros_like(mask)).item())
    cols = masked_mean(T, mask, dim=0)
    assert math.isnan(cols[1].item()) and cols[2].item() == pytest.approx(3.0)


def test_masked_mean_course_shaped_matches_float64_reference(course_logits):
    torch.manual_seed(42)
    mask = torch.rand_like(course_logits) > 0.5
    x, m = course_logits.double().numpy(), mask.numpy()
    for dim in (None, 0, 1, -1):
        got = masked_mean(tensor=course_logits, mask=mask, dim=dim)
        with np.errstate(invalid="ignore"):  # empty slices are NaN on both sides
            want = (x * m).sum() / m.sum() if dim is None else (x * m).sum(axis=dim) / m.sum(axis=dim)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- SFT step


def test_sft_step_hand_values():
    # log-probs [[-1, -2, -3], [-4, -5, -6]] with mask [[1, 1, 0], [0, 1, 1]]:
    # per-sequence sums -3 and -11, mean -7, loss = 7 / (gas 2) = 3.5.
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    loss, meta = sft_microbatch_train_step(lp, mask, gradient_accumulation_steps=2)
    assert loss.item() == pytest.approx(3.5)
    assert meta["nll"].item() == pytest.approx(7.0)
    assert meta["num_response_tokens"].item() == 4
    # d loss / d lp = -mask / (B * gas * c) = -1 / 4 on response tokens, 0 elsewhere.
    assert lp.grad.tolist() == [[-0.25, -0.25, 0.0], [0.0, -0.25, -0.25]]


def test_sft_step_normalize_constant_divides():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    loss, _ = sft_microbatch_train_step(lp, mask, gradient_accumulation_steps=2, normalize_constant=42.0)
    assert loss.item() == pytest.approx(3.5 / 42.0)
    assert lp.grad[0, 0].item() == pytest.approx(-0.25 / 42.0)


def test_sft_step_course_shaped_keywords(course_policy_log_probs, course_response_mask):
    lp = course_policy_log_probs.clone().requires_grad_(True)
    loss, _ = sft_microbatch_train_step(
        policy_log_probs=lp,
        response_mask=course_response_mask,
        gradient_accumulation_steps=2,
        normalize_constant=1.0,
    )
    x, m = course_policy_log_probs.double().numpy(), course_response_mask.numpy().astype(float)
    assert loss.item() == pytest.approx(-(x * m).sum(axis=1).mean() / 2, rel=1e-6)
    np.testing.assert_allclose(lp.grad.numpy(), -m / (2 * 2), rtol=1e-6)


def test_sft_microbatches_accumulate_to_the_full_batch_gradient(tiny_model, tiny_tokenizer):
    """Two micro-batches with gas=2 give the gradient of one batch twice as large with gas=1."""
    from cs336_alignment import get_response_log_probs, tokenize_prompt_and_output

    prompts = ["What is 2 + 3?", "What is 10 * 4?", "Compute 7 - 2.", "Say hi."]
    outputs = [" 5 </think> <answer> 5 </answer>", " 40", " it is 5", " hi there<|endoftext|>"]
    batch = tokenize_prompt_and_output(prompts, outputs, tiny_tokenizer)

    def grads_after(splits: list[slice], gas: int) -> dict[str, torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        for sl in splits:
            lp = get_response_log_probs(tiny_model, batch["input_ids"][sl], batch["labels"][sl])["log_probs"]
            sft_microbatch_train_step(lp, batch["response_mask"][sl], gas)
        return {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    full = grads_after([slice(0, 4)], gas=1)
    micro = grads_after([slice(0, 2), slice(2, 4)], gas=2)
    for name in full:
        torch.testing.assert_close(micro[name], full[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in full.values())


def test_sft_ten_successive_calls_accumulate(course_policy_log_probs, course_response_mask):
    lp = course_policy_log_probs.clone().requires_grad_(True)
    losses = [sft_microbatch_train_step(lp, course_response_mask, 2)[0] for _ in range(10)]
    m = course_response_mask.numpy().astype(float)
    np.testing.assert_allclose(lp.grad.numpy(), 10 * (-m / 4), rtol=1e-6)
    assert all(torch.equal(losses[0], l) for l in losses)


def test_sft_step_rejects_bad_accumulation():
    lp = torch.zeros(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        sft_microbatch_train_step(lp, torch.ones(1, 2, dtype=torch.bool), 0)


# --------------------------------------------------------------------------- per-token PG losses


def test_naive_policy_gradient_loss_hand_values():
    # -A * log pi with A broadcast over the sequence: A = [[2], [-1]].
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    a = torch.tensor([[2.0], [-1.0]])
    assert compute_naive_policy_gradient_loss(a, lp).tolist() == [[2.0, 4.0], [-3.0, -4.0]]


def _ratio_case():
    # Log-ratio per token so that ratio = [[1.5, 1.1], [0.5, 1.0]]; A = [[1], [-1]]; eps = 0.2.
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 1.1], [0.5, 1.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0]])
    return new, old, adv


def test_grpo_clip_loss_hand_values():
    new, old, adv = _ratio_case()
    loss, meta = compute_grpo_clip_loss(adv, new, old, cliprange=0.2)
    # token (0,0): ratio 1.5, A=+1: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped
    # token (0,1): ratio 1.1, A=+1: min(1.1, 1.1) = 1.1 -> loss -1.1, not clipped
    # token (1,0): ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped
    # token (1,1): ratio 1.0, A=-1: min(-1, -1) = -1 -> loss 1.0, not clipped
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.1], [0.8, 1.0]]))
    assert meta["clipped"].tolist() == [[True, False], [True, False]]
    torch.testing.assert_close(meta["ratio"], torch.tensor([[1.5, 1.1], [0.5, 1.0]]))


def test_grpo_clip_gradient_is_zero_on_clipped_tokens():
    new, old, adv = _ratio_case()
    loss, meta = compute_grpo_clip_loss(adv, new, old, cliprange=0.2)
    loss.sum().backward()
    # d(-ratio * A)/d log pi = -ratio * A on unclipped tokens: (0,1) -> -1.1, (1,1) -> +1.0.
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -1.1], [0.0, 1.0]]))
    assert (new.grad[meta["clipped"]] == 0).all()


def test_grpo_no_clip_differs_from_clip_outside_the_range():
    new, old, adv = _ratio_case()
    loss, meta = compute_policy_gradient_loss(new, "grpo_no_clip", advantages=adv, old_log_probs=old)
    # -ratio * A: [[-1.5, -1.1], [0.5, 1.0]]
    torch.testing.assert_close(loss, torch.tensor([[-1.5, -1.1], [0.5, 1.0]]))
    clip_loss, _ = compute_policy_gradient_loss(new, "grpo_clip", advantages=adv, old_log_probs=old, cliprange=0.2)
    assert not torch.allclose(loss, clip_loss)
    assert "clipped" not in meta


def test_compute_policy_gradient_loss_dispatch_course_shaped(course_policy_log_probs):
    torch.manual_seed(42)
    raw = torch.rand(2, 1)
    adv = raw - raw.mean(dim=0)
    torch.manual_seed(42)
    old = course_policy_log_probs + torch.randn_like(course_policy_log_probs)
    lp = course_policy_log_probs
    kw = dict(raw_rewards=raw, advantages=adv, old_log_probs=old, cliprange=0.5)
    nb, _ = compute_policy_gradient_loss(policy_log_probs=lp, loss_type="no_baseline", **kw)
    torch.testing.assert_close(nb, -raw * lp)
    rb, _ = compute_policy_gradient_loss(policy_log_probs=lp, loss_type="reinforce_with_baseline", **kw)
    torch.testing.assert_close(rb, -adv * lp)
    gc, meta = compute_policy_gradient_loss(policy_log_probs=lp, loss_type="grpo_clip", **kw)
    ratio = np.exp(lp.double().numpy() - old.double().numpy())
    a = adv.double().numpy()
    want = -np.minimum(ratio * a, np.clip(ratio, 0.5, 1.5) * a)
    np.testing.assert_allclose(gc.numpy(), want, rtol=1e-5, atol=1e-6)
    assert meta["clipped"].any()


@pytest.mark.parametrize(
    "loss_type, missing, kwargs",
    [
        ("no_baseline", "raw_rewards", {}),
        ("reinforce_with_baseline", "advantages", {"raw_rewards": torch.ones(1, 1)}),
        ("grpo_clip", "old_log_probs", {"advantages": torch.ones(1, 1), "cliprange": 0.2}),
        ("grpo_clip", "cliprange", {"advantages": torch.ones(1, 1), "old_log_probs": torch.zeros(1, 3)}),
        ("grpo_no_clip", "old_log_probs", {"advantages": torch.ones(1, 1)}),
    ],
)
def test_missing_argument_is_named(loss_type, missing, kwargs):
    with pytest.raises(ValueError, match=missing):
        compute_policy_gradient_loss(torch.zeros(1, 3), loss_type, **kwargs)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        compute_policy_gradient_loss(torch.zeros(1, 3), "ppo", advantages=torch.ones(1, 1))


# --------------------------------------------------------------------------- GRPO micro-batch step


def test_grpo_step_default_is_the_handout_formula(course_policy_log_probs, course_response_mask):
    lp = course_policy_log_probs.clone().requires_grad_(True)
    torch.manual_seed(42)
    raw = torch.rand(2, 1)
    adv = raw - raw.mean(dim=0)
    loss, meta = grpo_microbatch_train_step(
        policy_log_probs=lp,
        response_mask=course_response_mask,
        gradient_accumulation_steps=2,
        loss_type="reinforce_with_baseline",
        raw_rewards=raw,
        advantages=adv,
    )
    x, m, a = course_policy_log_probs.double().numpy(), course_response_mask.numpy().astype(float), adv.double().numpy()
    per_seq = ((-a * x) * m).sum(axis=1) / m.sum(axis=1)
    assert loss.item() == pytest.approx(per_seq.mean() / 2, rel=1e-5)
    # d loss / d lp_bt = -A_b * m_bt / (count_b * B * gas)
    np.testing.assert_allclose(lp.grad.numpy(), -a * m / (m.sum(axis=1, keepdims=True) * 2 * 2), rtol=1e-5, atol=1e-8)
    assert meta["loss_unscaled"].item() == pytest.approx(per_seq.mean(), rel=1e-5)


def test_grpo_step_clip_metadata_and_ten_calls(course_policy_log_probs, course_response_mask):
    torch.manual_seed(42)
    raw = torch.rand(2, 1)
    adv = raw - raw.mean(dim=0)
    torch.manual_seed(42)
    old = course_policy_log_probs + torch.randn_like(course_policy_log_probs)
    lp = course_policy_log_probs.clone().requires_grad_(True)
    kw = dict(
        response_mask=course_response_mask, gradient_accumulation_steps=2, loss_type="grpo_clip",
        raw_rewards=raw, advantages=adv, old_log_probs=old, cliprange=0.1,
    )
    loss, meta = grpo_microbatch_train_step(policy_log_probs=lp, **kw)
    first_grad = lp.grad.clone()
    for _ in range(9):
        again, _ = grpo_microbatch_train_step(policy_log_probs=lp, **kw)
        assert torch.equal(again, loss)
    torch.testing.assert_close(lp.grad, 10 * first_grad)
    # Clip fraction is the share of response tokens whose clipped term won.
    _, per_tok = compute_grpo_clip_loss(adv, course_policy_log_probs, old, 0.1)
    m = course_response_mask
    assert meta["clip_fraction"].item() == pytest.approx(per_tok["clipped"][m].float().mean().item())
    assert 0.0 < meta["clip_fraction"].item() < 1.0
    assert meta["ratio_mean"].item() == pytest.approx(per_tok["ratio"][m].mean().item(), rel=1e-5)


def test_grpo_step_empty_response_contributes_zero_not_nan():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])  # second response is empty
    adv = torch.tensor([[1.0], [5.0]])
    loss, _ = grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=adv)
    # sequence 0: mean(1, 2) = 1.5; sequence 1 contributes 0; batch mean = 0.75
    assert loss.item() == pytest.approx(0.75)
    assert torch.isfinite(lp.grad).all() and lp.grad[1].abs().sum() == 0


def test_grpo_step_masked_normalize_ablation():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([[1.0], [-1.0]])
    loss, _ = grpo_microbatch_train_step(
        lp, mask, 2, "reinforce_with_baseline", advantages=adv,
        length_normalization="masked_normalize", normalize_constant=4.0,
    )
    # per-token -A*lp: [[1, 2, .], [., -5, -6]]; sums 3 and -11; / 4 -> 0.75, -2.75; mean -1; / gas 2
    assert loss.item() == pytest.approx(-0.5)
    # gradient: -A_b m_bt / (C * B * gas) = -A_b / 16
    assert lp.grad.tolist() == [[-1 / 16, -1 / 16, 0.0], [0.0, 1 / 16, 1 / 16]]
    with pytest.raises(ValueError, match="normalize_constant"):
        grpo_microbatch_train_step(lp, mask, 2, "reinforce_with_baseline", advantages=adv, length_normalization="masked_normalize")


def test_grpo_step_token_mean_over_microbatches_is_the_global_token_mean():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([[1.0], [-1.0]])
    total = 0.0
    for b in range(2):
        loss, _ = grpo_microbatch_train_step(
            lp[b : b + 1], mask[b : b + 1], 2, "reinforce_with_baseline", advantages=adv[b : b + 1],
            length_normalization="token_mean", num_tokens=int(mask.sum()),
        )
        total += loss.item()
    # (1 + 2 - 5 - 6) / 4 tokens = -2
    assert total == pytest.approx(-2.0)


def test_length_normalisations_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # masked mean per sequence: (1+3)/2 = 2, (5+6)/2 = 5.5 -> mean 3.75
    assert masked_mean_loss(loss, M).item() == pytest.approx(3.75)
    # constant 3: 4/3, 11/3 -> mean 2.5
    assert masked_normalize_loss(loss, M, 3.0).item() == pytest.approx(2.5)
    # token mean: 15 / 4
    assert token_mean_loss(loss, M).item() == pytest.approx(3.75)
    assert token_mean_loss(loss, M, num_tokens=10).item() == pytest.approx(1.5)


def test_no_baseline_gradient_is_minus_reward_times_grad_log_pi(tiny_model, tiny_tokenizer):
    """On a real model: the no_baseline step's parameter gradient equals -r * grad(mean log pi) / B."""
    from cs336_alignment import get_response_log_probs, tokenize_prompt_and_output

    batch = tokenize_prompt_and_output(["Q: 1 + 1?", "Q: 2 + 2?"], [" 2 </answer>", " 5"], tiny_tokenizer)
    rewards = torch.tensor([[1.0], [0.5]])
    lp = get_response_log_probs(tiny_model, batch["input_ids"], batch["labels"])["log_probs"]
    grpo_microbatch_train_step(lp, batch["response_mask"], 1, "no_baseline", raw_rewards=rewards)
    got = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    tiny_model.zero_grad(set_to_none=True)
    lp = get_response_log_probs(tiny_model, batch["input_ids"], batch["labels"])["log_probs"]
    m = batch["response_mask"]
    mean_lp = (lp * m).sum(dim=1) / m.sum(dim=1)  # (B,)
    objective = sum(-rewards[b, 0] * mean_lp[b] for b in range(2)) / 2
    objective.backward()
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- off-policy correction


def test_truncated_importance_weights_hand_values():
    from cs336_alignment.losses import truncated_importance_weights

    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))  # pi_old of three sampled tokens
    mu = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))  # the generator's probabilities of the same tokens
    w, truncated = truncated_importance_weights(old, mu, cap=2.0)
    # pi_old / mu = 0.5/0.25 = 2.0 (at the cap, kept), 0.2/0.4 = 0.5, 0.9/0.1 = 9.0 -> min(9, 2) = 2
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 2.0]]), atol=1e-6)
    assert truncated.tolist() == [[False, False, True]]
    assert not w.requires_grad


def test_k3_kl_hand_values():
    from cs336_alignment.losses import k3_kl

    log_p = torch.log(torch.tensor([[0.5, 0.2, 0.4]]))
    log_q = torch.log(torch.tensor([[0.25, 0.2, 0.8]]))
    # r = p / q = 2, 1, 0.5;  k3 = (r - 1) - log r = 1 - 0.6931 = 0.3069, 0, -0.5 + 0.6931 = 0.1931
    assert torch.allclose(k3_kl(log_p, log_q), torch.tensor([[1 - math.log(2), 0.0, -0.5 + math.log(2)]]), atol=1e-6)


def test_importance_weights_scale_each_tokens_loss_and_gradient():
    from cs336_alignment import grpo_microbatch_train_step

    lp = torch.log(torch.tensor([[0.5, 0.25, 0.1]])).requires_grad_()  # (1, 3)
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([[2.0]])
    w = torch.tensor([[1.0, 0.5, 7.0]])  # the masked third token's weight must not matter
    loss, _ = grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=adv, importance_weights=w)
    # per token -A * w * log p: -2 * 1 * log 0.5 = 1.3863, -2 * 0.5 * log 0.25 = 1.3863; masked mean = 1.3863
    assert math.isclose(loss.item(), 2 * math.log(2), rel_tol=1e-6)
    # d loss / d log p = -A * w / 2 tokens = -1, -0.5, and 0 for the masked token
    assert torch.allclose(lp.grad, torch.tensor([[-1.0, -0.5, 0.0]]))
    lp.grad = None
    loss_ones, _ = grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=adv,
                                              importance_weights=torch.ones(1, 3))
    assert math.isclose(loss_ones.item(), (-2 * math.log(0.5) - 2 * math.log(0.25)) / 2, rel_tol=1e-6)  # w = 1: unchanged


def test_clip_higher_moves_the_upper_bound_only():
    from cs336_alignment.losses import compute_grpo_clip_loss

    # ratios 1.5, 1.25, 0.5, 0.75 (log pi - log pi_old); advantages +1 for row 0, -1 for row 1
    old = torch.zeros(2, 2)
    lp = torch.log(torch.tensor([[1.5, 1.25], [0.5, 0.75]]))
    adv = torch.tensor([[1.0], [-1.0]])
    symmetric, meta = compute_grpo_clip_loss(adv, lp, old, cliprange=0.2)
    # eps 0.2 both sides: A > 0 caps the ratio at 1.2 -> -1.2, -1.2; A < 0 floors it at 0.8 -> +0.8, +0.8 (min(-r, -0.8))
    assert torch.allclose(symmetric, torch.tensor([[-1.2, -1.2], [0.8, 0.8]]))
    assert meta["clipped_high"].tolist() == [[True, True], [False, False]]
    assert meta["clipped_low"].tolist() == [[False, False], [True, True]]
    higher, meta = compute_grpo_clip_loss(adv, lp, old, cliprange=0.2, cliprange_high=0.28)
    # eps_high 0.28: 1.25 is now inside (-1.25, unclipped), 1.5 is cut at 1.28; the lower side is unchanged
    assert torch.allclose(higher, torch.tensor([[-1.28, -1.25], [0.8, 0.8]]))
    assert meta["clipped_high"].tolist() == [[True, False], [False, False]]
    assert meta["clipped_low"].tolist() == [[False, False], [True, True]]
    assert torch.equal(meta["clipped"], meta["clipped_high"] | meta["clipped_low"])


def test_gspo_loss_hand_values_clips_whole_sequences():
    from cs336_alignment.losses import compute_gspo_loss

    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.zeros(2, 3)
    # row 0: log ratios ln 2, 0 (the third position is padding, its 999 must not count)
    #   s_0 = exp((ln 2 + 0) / 2) = sqrt(2) = 1.41421
    # row 1: log ratios 0.1, -0.1, 0.3 -> s_1 = exp(0.3 / 3) = exp(0.1) = 1.10517
    lp = torch.tensor([[math.log(2.0), 0.0, 999.0], [0.1, -0.1, 0.3]], requires_grad=True)
    adv = torch.tensor([[1.0], [-2.0]])
    loss, meta = compute_gspo_loss(adv, lp, old, mask, cliprange=0.2)
    s0, s1 = math.sqrt(2.0), math.exp(0.1)
    # row 0: -min(1.41421 * 1, clip(1.41421, 0.8, 1.2) * 1) = -1.2, on every token: the whole response is clipped
    # row 1: -min(1.10517 * -2, 1.10517 * -2) = 2.21034 (inside the range)
    assert torch.allclose(loss, torch.tensor([[-1.2] * 3, [2 * s1] * 3]), atol=1e-5)
    assert meta["clipped"].tolist() == [[True] * 3, [False] * 3]
    assert meta["clipped_high"][0].all() and not meta["clipped_low"].any()
    assert torch.allclose(meta["ratio"], torch.tensor([[s0] * 3, [s1] * 3]), atol=1e-5)
    # gradient of the masked mean per row, then the mean over the 2 rows: row 0 gets none (clipped);
    # row 1: d/d lp_1t [-A s_1] / 2 = 2 * s_1 * (1/3) / 2 = 0.36839 on each of its 3 tokens
    masked_mean_loss(loss, mask).backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.0] * 3, [s1 / 3] * 3]), atol=1e-5)
    # clip-higher applies per sequence too: eps_high = 0.5 keeps s_0 = 1.41421 < 1.5 unclipped
    higher, meta = compute_gspo_loss(adv, lp.detach(), old, mask, cliprange=0.2, cliprange_high=0.5)
    assert torch.allclose(higher[0], torch.full((3,), -s0), atol=1e-5) and not meta["clipped"].any()


def test_gspo_through_the_dispatch_needs_the_response_mask():
    lp, old, adv = torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 1)
    with pytest.raises(ValueError, match="needs response_mask"):
        compute_policy_gradient_loss(lp, "gspo", advantages=adv, old_log_probs=old, cliprange=0.2)
    loss, meta = compute_policy_gradient_loss(lp, "gspo", advantages=adv, old_log_probs=old, cliprange=0.2,
                                              response_mask=torch.ones(1, 2, dtype=torch.bool))
    assert loss.tolist() == [[-1.0, -1.0]] and meta["ratio"].tolist() == [[1.0, 1.0]]  # s = 1: -A


def test_kl_penalty_hand_values():
    from cs336_alignment.losses import kl_penalty

    lp = torch.log(torch.tensor([[0.5, 0.3]]))  # pi of two sampled tokens
    ref = torch.log(torch.tensor([[0.25, 0.3]]))  # pi_ref of the same tokens
    # k1 = log pi - log pi_ref = ln(0.5 / 0.25) = ln 2 = 0.693147; 0 where they agree
    assert torch.allclose(kl_penalty(lp, ref, "k1"), torch.tensor([[math.log(2.0), 0.0]]), atol=1e-6)
    # k3 = (pi_ref / pi - 1) - ln(pi_ref / pi) = (0.5 - 1) - ln 0.5 = -0.5 + 0.693147 = 0.193147; 0 where they agree
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.tensor([[0.193147, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        kl_penalty(lp, ref, "k2")


def test_grpo_step_adds_the_kl_penalty_and_logs_the_kl_without_it():
    mask = torch.tensor([[True, True]])
    ref = torch.log(torch.tensor([[0.25, 0.3]]))
    zero = torch.zeros(1, 1)  # advantage 0: the policy-gradient term is 0, only the penalty remains

    def step(kl_coef, estimator="k3"):
        lp = torch.log(torch.tensor([[0.5, 0.3]])).requires_grad_()
        loss, meta = grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=zero,
                                                ref_log_probs=ref, kl_coef=kl_coef, kl_estimator=estimator)
        return loss, meta, lp.grad

    loss, meta, grad = step(0.1)
    # masked mean over the 2 tokens of 0.1 * k3 = 0.1 * (0.193147 + 0) / 2 = 0.00965735
    assert loss.item() == pytest.approx(0.00965735, abs=1e-7)
    # d k3 / d log pi = 1 - pi_ref / pi: 1 - 0.5 = 0.5 on token 0, 0 on token 1; times 0.1 / 2 tokens = 0.025
    assert torch.allclose(grad, torch.tensor([[0.025, 0.0]]), atol=1e-6)
    assert meta["kl_sum"].item() == pytest.approx(0.193147, abs=1e-6)  # the k3 sum, for the log
    loss, meta, grad = step(0.0)  # not in the loss: logged all the same
    assert loss.item() == 0.0 and meta["kl_sum"].item() == pytest.approx(0.193147, abs=1e-6) and not grad.any()
    # k1: value 0.1 * ln 2 / 2 = 0.0346574; gradient sg[k1] * grad log pi: 0.1 * ln 2 / 2 = 0.0346574 on token 0, 0 on token 1
    loss, _, grad = step(0.1, "k1")
    assert loss.item() == pytest.approx(0.0346574, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[0.0346574, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        grpo_microbatch_train_step(torch.zeros(1, 2, requires_grad=True), mask, 1, "reinforce_with_baseline",
                                   advantages=zero, kl_coef=0.1)


def test_the_kl_penalties_descend_the_kl_in_expectation():
    """Exact expectations over a 4-token vocabulary, each token sampled with probability pi(a):
    E_pi[grad penalty(a)] = sum_a pi(a) grad penalty(a), against autograd's gradient of the KL itself."""
    from cs336_alignment.losses import kl_penalty

    logits = torch.tensor([0.3, -0.2, 1.0, 0.1], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, 0.2, -0.4]), dim=-1)  # (4,)

    def expected_gradient(estimator):
        lp = torch.log_softmax(logits, dim=-1)  # (4,) log pi of each token
        per_token = kl_penalty(lp.view(1, 4), ref.view(1, 4), estimator).view(4)  # (4,) the penalty if token a was drawn
        (grad,) = torch.autograd.grad((lp.exp().detach() * per_token).sum(), logits)
        return grad

    def kl_gradient(forward):
        lp = torch.log_softmax(logits, dim=-1)  # (4,)
        kl = (lp.exp() * (lp - ref)).sum() if forward else (ref.exp() * (ref - lp)).sum()
        (grad,) = torch.autograd.grad(kl, logits)
        return grad

    assert torch.allclose(expected_gradient("k1"), kl_gradient(forward=True), atol=1e-6)  # KL(pi || pi_ref)
    assert torch.allclose(expected_gradient("k3"), kl_gradient(forward=False), atol=1e-6)  # KL(pi_ref || pi), as GRPO
    assert kl_gradient(forward=True).abs().max() > 1e-2  # a real gradient: a penalty doing nothing would fail above
