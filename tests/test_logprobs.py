"""compute_entropy and get_response_log_probs against float64 references and step-by-step scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cs336_alignment import compute_entropy, get_response_log_probs, tokenize_prompt_and_output
from cs336_alignment.logprobs import log_probs_from_logits


def _entropy_ref(logits: torch.Tensor) -> np.ndarray:
    z = logits.double().numpy()
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def test_entropy_hand_values():
    # uniform over 4 -> log 4; two equal logits among -inf-like -> log 2; one-hot -> 0
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, -1e4, -1e4], [1e4, 0.0, 0.0, 0.0]])
    h = compute_entropy(logits)
    assert h.tolist() == pytest.approx([math.log(4), math.log(2), 0.0], abs=1e-6)


def test_entropy_is_finite_for_extreme_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 1e4
    h = compute_entropy(logits)
    assert torch.isfinite(h).all() and (h >= -1e-4).all()
    np.testing.assert_allclose(h.numpy(), _entropy_ref(logits), atol=1e-3)


def test_entropy_course_shaped_matches_float64(course_logits):
    np.testing.assert_allclose(compute_entropy(course_logits).numpy(), _entropy_ref(course_logits), rtol=1e-6, atol=1e-6)


def test_entropy_of_bf16_logits_is_computed_in_fp32(course_logits):
    h = compute_entropy(course_logits.bfloat16())
    assert h.dtype == torch.float32
    np.testing.assert_allclose(h.numpy(), _entropy_ref(course_logits.bfloat16().float()), rtol=1e-5, atol=1e-5)


def test_log_probs_from_extreme_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]]])
    out = log_probs_from_logits(logits, torch.tensor([[1, 2]]), return_token_entropy=True)
    assert torch.isfinite(out["log_probs"]).all()
    assert out["log_probs"][0, 0].item() == pytest.approx(-2e4)
    assert out["log_probs"][0, 1].item() == pytest.approx(-math.log(3))


def test_get_response_log_probs_equals_token_by_token_scoring(tiny_model, tiny_tokenizer):
    batch = tokenize_prompt_and_output(
        ["What is 4 + 4?\nAssistant: <think>", "Hi"], [" 8 </think> <answer> 8 </answer>", " there"], tiny_tokenizer
    )
    out = get_response_log_probs(
        model=tiny_model, input_ids=batch["input_ids"], labels=batch["labels"], return_token_entropy=True
    )
    assert out["log_probs"].shape == batch["labels"].shape == out["token_entropy"].shape
    assert out["log_probs"].dtype == torch.float32
    with torch.no_grad():
        for b in range(2):
            n = int((batch["response_mask"][b].nonzero().max()) + 1)  # real length of row b
            for t in range(n):
                logits = tiny_model(batch["input_ids"][b : b + 1, : t + 1]).logits[0, -1].double()
                want = torch.log_softmax(logits, -1)[batch["labels"][b, t]].item()
                assert out["log_probs"][b, t].item() == pytest.approx(want, abs=1e-4)
                h = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum().item()
                assert out["token_entropy"][b, t].item() == pytest.approx(h, abs=1e-4)
    assert "token_entropy" not in get_response_log_probs(tiny_model, batch["input_ids"], batch["labels"])


def test_right_padding_does_not_change_real_positions(tiny_model, tiny_tokenizer):
    prompts, outputs = ["Q: short", "Q: a much, much longer prompt than the other"], [" a", " b c d"]
    batch = tokenize_prompt_and_output(prompts, outputs, tiny_tokenizer)
    alone = tokenize_prompt_and_output(prompts[:1], outputs[:1], tiny_tokenizer)
    with torch.no_grad():
        both = get_response_log_probs(tiny_model, batch["input_ids"], batch["labels"])["log_probs"]
        one = get_response_log_probs(tiny_model, alone["input_ids"], alone["labels"])["log_probs"]
    n = one.shape[1]
    torch.testing.assert_close(both[0, :n], one[0], rtol=1e-5, atol=1e-5)


def test_bf16_model_returns_fp32_close_to_fp32_model(tiny_model, tiny_tokenizer):
    """CPU counterpart of the GPU bf16 check: fp32 reductions on bf16 logits."""
    batch = tokenize_prompt_and_output(["What is 12 + 30?"], [" 42 </answer>"], tiny_tokenizer)
    with torch.no_grad():
        ref = get_response_log_probs(tiny_model, batch["input_ids"], batch["labels"], True)
        bf16 = get_response_log_probs(tiny_model.to(torch.bfloat16), batch["input_ids"], batch["labels"], True)
    assert bf16["log_probs"].dtype == torch.float32 and bf16["token_entropy"].dtype == torch.float32
    m = batch["response_mask"]
    assert (bf16["log_probs"] - ref["log_probs"])[m].abs().mean().item() < 0.1
