"""Generation: one interface (``Generator``), our native engine, and the vLLM backend.

    from cs336_alignment.generation import NativeEngine, SamplingParams
    engine = NativeEngine(policy, tokenizer)
    results = engine.generate(prompts, SamplingParams.r1_zero(n=8, seed=0))
    results[0].completions[0].text, .token_ids, .finish_reason, .logprobs
    engine.load_weights(policy)   # after each optimizer step
"""

from .native import NativeEngine
from .types import Completion, FinishReason, GenerationResult, Generator, SamplingParams

__all__ = ["Completion", "FinishReason", "GenerationResult", "Generator", "NativeEngine", "SamplingParams"]
