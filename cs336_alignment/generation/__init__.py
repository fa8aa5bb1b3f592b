"""Generation: one interface (``Generator``), our native engine, and the vLLM backend.

    from cs336_alignment.generation import NativeEngine, SamplingParams
    engine = NativeEngine(policy, tokenizer)
    results = engine.generate(prompts, SamplingParams.r1_zero(n=8, seed=0))
    results[0].completions[0].text, .token_ids, .finish_reason, .logprobs
    engine.load_weights(policy)   # after each optimizer step

``load_generator(backend, ...)`` builds the backend a config names ("native", "vllm", or "auto":
vLLM where it can run, else native with a one-line warning).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from .native import NativeEngine
from .types import Completion, FinishReason, GenerationResult, Generator, SamplingParams
from .vllm_backend import load_vllm_generator

__all__ = [
    "Completion",
    "FinishReason",
    "GenerationResult",
    "Generator",
    "NativeEngine",
    "SamplingParams",
    "load_generator",
]


def load_generator(
    backend: str,
    policy: Any,
    tokenizer: Any,
    *,
    model_path: str,
    device: torch.device,
    seed: int,
    max_num_seqs: int = 256,
    kv_cache_memory_fraction: float = 0.3,
    gpu_memory_utilization: float = 0.85,
) -> Generator:
    """The generation backend ``backend`` names, holding ``policy``'s current weights.

    "native": our engine on ``device`` (any device; ``max_num_seqs`` and
    ``kv_cache_memory_fraction`` size it). "vllm": an in-process vLLM engine for
    ``model_path`` on ``device`` (CUDA only; ``gpu_memory_utilization``; a one-line
    BackendUnavailable error where vLLM is missing). "auto": "vllm" where vLLM is installed and
    ``device`` is CUDA, else "native" with a one-line warning (the handout evaluates with vLLM, so
    such a run's numbers are not leaderboard-conformant).
    """
    if backend == "auto":
        backend = "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") is not None else "native"
        if backend == "native":
            why = "not on CUDA" if device.type != "cuda" else "vllm is not installed"
            logging.getLogger(__name__).warning(
                "backend auto: vLLM cannot run here (%s), generating with the native engine; the handout evaluates with "
                "vLLM, so these numbers are not leaderboard-conformant", why)
    if backend == "native":
        return NativeEngine(
            policy, tokenizer, device=device, max_num_seqs=max_num_seqs, kv_cache_memory_fraction=kv_cache_memory_fraction
        )
    if backend == "vllm":
        generator = load_vllm_generator(
            model_path, device=device, seed=seed, gpu_memory_utilization=gpu_memory_utilization, tokenizer=tokenizer
        )
        generator.load_weights(policy)  # e.g. after a resume, the policy is no longer the checkpoint on disk
        return generator
    raise ValueError(f"unknown generation backend {backend!r}; expected 'native' or 'vllm'")
