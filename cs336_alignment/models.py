"""Models: which device, how a model and its tokenizer load, and the precision policy.

Precision policy: training keeps fp32 master weights and optimizer state and runs forward and
backward under bf16 autocast on GPU (pure-bf16 AdamW drops updates at lr 1e-5); evaluation-only
models load in bf16 on GPU; everything is fp32 on CPU. Generators sample from their own copy
(see ``generation``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from .tiny import build_tiny_model, build_tiny_tokenizer

__all__ = [
    "autocast",
    "enable_gradient_checkpointing",
    "free_cuda_cache",
    "load_model_and_tokenizer",
    "load_policy",
    "resolve_device",
]


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch reads it ("cuda:1")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_and_tokenizer(
    path: str, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0
) -> tuple[Any, Any]:
    """A model directory (or "tiny") -> (model on ``device`` in eval mode, tokenizer).

    ``dtype`` defaults to bf16 on CUDA and fp32 on CPU. "tiny" builds the offline tiny model
    with initialisation seed ``seed``.
    """
    if path == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed)
    else:
        # transformers takes seconds to import: only when a model directory is loaded, so that
        # `config`, `run --help` and `sweep --dry-run` (which import the recipes) stay quick
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).exists():
            raise FileNotFoundError(f"model directory {path} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.to(device, dtype).eval(), tokenizer


def load_policy(
    path: str, device: torch.device, seed: int = 0, gradient_checkpointing: bool = False
) -> tuple[Any, Any]:
    """The trainable policy in fp32 (master weights), in train mode, and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(path, device, dtype=torch.float32, seed=seed)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train(), tokenizer


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them."""
    # renamed in transformers 5.2x; older versions have only the second name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward and backward on GPU (fp32 master weights); nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_cuda_cache(device: torch.device) -> None:
    """Return cached blocks between phases when generator and policy share a GPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
