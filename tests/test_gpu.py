"""GPU checks (skipped without CUDA). CPU counterparts: test_logprobs.py, test_losses.py."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU counterparts run instead")


def test_bf16_log_probs_close_to_fp32_at_the_1p5b_shape():
    from transformers import AutoModelForCausalLM

    from cs336_alignment import get_response_log_probs, qwen25_math_1p5b_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen25_math_1p5b_config(), dtype=torch.float32).cuda().eval()
    ids = torch.randint(0, 151_000, (2, 257), device="cuda")
    with torch.no_grad():
        ref = get_response_log_probs(model, ids[:, :-1], ids[:, 1:], True)
        model.to(torch.bfloat16)
        bf16 = get_response_log_probs(model, ids[:, :-1], ids[:, 1:], True)
    assert bf16["log_probs"].dtype == torch.float32
    gap = (bf16["log_probs"] - ref["log_probs"]).abs().mean().item()
    assert gap < 0.02, f"bf16 vs fp32 mean |log-prob gap| = {gap:.4f} nats"


def test_primitives_on_cuda_match_cpu():
    from cs336_alignment import compute_entropy, grpo_microbatch_train_step, masked_mean

    torch.manual_seed(42)
    logits = torch.randn(2, 10, 100)
    torch.testing.assert_close(compute_entropy(logits.cuda()).cpu(), compute_entropy(logits), rtol=1e-5, atol=1e-5)
    mask = torch.rand(2, 10) > 0.5
    torch.testing.assert_close(masked_mean(logits[..., 0].cuda(), mask.cuda(), 1).cpu(), masked_mean(logits[..., 0], mask, 1))
    lp_cpu = torch.randn(2, 10, requires_grad=True)
    lp_gpu = lp_cpu.detach().cuda().requires_grad_(True)
    adv = torch.tensor([[1.0], [-0.5]])
    a, _ = grpo_microbatch_train_step(lp_cpu, mask, 2, "reinforce_with_baseline", advantages=adv)
    b, _ = grpo_microbatch_train_step(lp_gpu, mask.cuda(), 2, "reinforce_with_baseline", advantages=adv.cuda())
    torch.testing.assert_close(b.cpu(), a)
    torch.testing.assert_close(lp_gpu.grad.cpu(), lp_cpu.grad)
