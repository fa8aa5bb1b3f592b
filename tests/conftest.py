"""Shared fixtures: the tiny tokenizer and model (built offline), course-shaped tensors."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from cs336_alignment.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny model directory, as a user's own model directory would be."""
    from cs336_alignment.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tiny_tokenizer, seed=0).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A fresh tiny model per test (tests may train it)."""
    from cs336_alignment.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=0)


# Inputs shaped like the CS336 harness's: seed 42, batch 2 x seq 10 x vocab 100.
@pytest.fixture()
def course_logits():
    torch.manual_seed(42)
    return torch.randn(2, 10, 100)


@pytest.fixture()
def course_policy_log_probs():
    torch.manual_seed(42)
    return torch.randn(2, 10)


@pytest.fixture()
def course_response_mask(course_policy_log_probs):
    torch.manual_seed(42)
    return torch.rand_like(course_policy_log_probs) > 0.5


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU counterpart runs instead")
