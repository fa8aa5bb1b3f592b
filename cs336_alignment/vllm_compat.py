"""The handout's vLLM helpers, with the handout's names: ``init_vllm``,
``load_policy_into_vllm_instance`` and ``evaluate_vllm``.

They are thin wrappers over :mod:`cs336_alignment.generation.vllm_backend` (which handles
vLLM 0.7.2's V0 engine and the current V1 engine) and :func:`cs336_alignment.evaluate.evaluate`.
Importing this module does not import vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .evaluate import GenerationRecord, RewardFn, evaluate
from .generation.vllm_backend import VLLMGenerator, build_llm, from_vllm_sampling, load_policy_weights

__all__ = [
    "evaluate_vllm",
    "init_vllm",
    "load_policy_into_vllm_instance",
]


def init_vllm(model_id: str, device: str | torch.device, seed: int, gpu_memory_utilization: float = 0.85) -> Any:
    """Start a ``vllm.LLM`` for ``model_id`` on its own ``device`` (e.g. "cuda:1"), seeded with ``seed``.

    bf16 weights, prefix caching on, ``gpu_memory_utilization`` of that GPU for vLLM. On
    vLLM 0.7.2 the course's patches let it start next to a training process; on the V1
    engine the weight-sync worker extension is registered so
    :func:`load_policy_into_vllm_instance` works.
    """
    return build_llm(model_id, device, seed, gpu_memory_utilization)


def load_policy_into_vllm_instance(policy: Any, llm: Any) -> None:
    """Copy the training ``policy``'s current weights into ``llm`` (from :func:`init_vllm`)."""
    load_policy_weights(llm.llm if isinstance(llm, VLLMGenerator) else llm, policy)


def evaluate_vllm(
    vllm_model: Any,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    eval_sampling_params: Any,
    *,
    ground_truths: Sequence[Any] | None = None,
    out_dir: str | Path | None = None,
    policy: Any | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[GenerationRecord]]:
    """Generate for ``prompts`` with ``vllm_model``, score each response with ``reward_fn``, and serialize.

    ``vllm_model`` is a ``vllm.LLM`` or a :class:`VLLMGenerator`; ``eval_sampling_params``
    a ``vllm.SamplingParams`` or ours. ``reward_fn(response, ground_truth)`` needs the
    ``ground_truths`` (one per prompt). With ``out_dir``, generations.jsonl and
    metrics.json are written there. Returns (metrics, records), as
    :func:`cs336_alignment.evaluate.evaluate` does.
    """
    if ground_truths is None:
        raise ValueError("evaluate_vllm needs ground_truths=[...] (one per prompt) for reward_fn(response, ground_truth)")
    generator = vllm_model if isinstance(vllm_model, VLLMGenerator) else VLLMGenerator(vllm_model)
    sampling = from_vllm_sampling(eval_sampling_params)
    return evaluate(
        generator, reward_fn, prompts, sampling=sampling, ground_truths=ground_truths, out_dir=out_dir, policy=policy,
        progress=progress,
    )
