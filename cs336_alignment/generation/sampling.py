"""Next-token sampling with one counter-based random stream per sample.

Each sample owns a stream keyed on (seed, prompt index, sample index); the random number for
its t-th token is a hash of that key and t. So what a sample draws does not depend on which
other sequences share its batch, on batch size, or on the order prompts are scheduled.

Sampling uses the inverse CDF with one uniform number per token: cdf = cumsum(p), and the
token is the first index with cdf >= u * cdf[-1]. Tokens with zero probability (suppressed
EOS, tokens outside top-k / top-p) are never chosen.

Glossary: A active sequences, V vocabulary.
"""

from __future__ import annotations

import torch

__all__ = [
    "sample_tokens",
    "stream_keys",
    "stream_uniforms",
]

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32.

    Multipliers stay below 2**31, so no intermediate product overflows int64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x4C957F2D) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def stream_keys(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Per-sample stream keys (int64, < 2**32) from the call's seed and each sample's indices."""
    base = _mix32(torch.tensor([seed & _M32], dtype=torch.int64)) ^ _mix32(torch.tensor([(seed >> 32) & _M32]) + 0x9E37)
    k = _mix32(base.to(prompt_index.device) ^ (prompt_index.to(torch.int64) & _M32))  # (A,)
    return _mix32(k ^ _mix32((sample_index.to(torch.int64) & _M32) + 0x51ED))  # (A,)


def stream_uniforms(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per sample, for token number ``step`` of each stream.

    Args: keys (A,) int64; step (A,) int64. Returns (A,) float64 with 32 random bits.
    """
    bits = _mix32(keys ^ _mix32((step.to(torch.int64) & _M32) ^ 0x3C6EF372))  # (A,)
    return (bits.to(torch.float64) + 0.5) / 2.0**32


def sample_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress: torch.Tensor | None = None,
    suppress_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return it with its log-probability under the raw model.

    Args:
        logits: (A, V) next-token scores (any float dtype; reductions run in fp32).
        uniforms: (A,) in (0, 1), from :func:`stream_uniforms`.
        temperature: 0 means greedy.
        top_p, top_k: nucleus / top-k filtering (1.0 / 0 disable them).
        suppress: (A,) bool, rows whose ``suppress_ids`` (e.g. EOS ids) get probability 0
            (min_tokens not reached yet).
    Returns:
        tokens (A,) int64 and logprobs (A,) fp32: log softmax(logits) of the chosen token at
        temperature 1 with no filtering, i.e. the model's own probability, the quantity a
        trainer computes for the same token.
    """
    z = logits.float()  # (A, V)
    raw_logprobs = torch.log_softmax(z, dim=-1)  # (A, V)
    if suppress is not None and suppress_ids is not None and suppress_ids.numel() and bool(suppress.any()):
        banned = torch.zeros_like(z, dtype=torch.bool)  # (A, V)
        banned[:, suppress_ids] = True
        z = z.masked_fill(banned & suppress.unsqueeze(-1), float("-inf"))  # out of place: logits stay intact
    if temperature == 0:
        tokens = z.argmax(dim=-1)  # (A,)
    else:
        z = z / temperature
        if top_k and top_k < z.shape[-1]:
            kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (A, 1)
            z = z.masked_fill(z < kth, float("-inf"))
        if top_p < 1.0:
            sorted_z, order = torch.sort(z, dim=-1, descending=True)  # (A, V)
            probs = torch.softmax(sorted_z, dim=-1)  # (A, V)
            mass_before = torch.cumsum(probs, dim=-1) - probs  # (A, V) mass of strictly more likely tokens
            probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
            index = _inverse_cdf(probs, uniforms)  # (A,) position in sorted order
            tokens = order.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (A,)
        else:
            tokens = _inverse_cdf(torch.softmax(z, dim=-1), uniforms)  # (A,)
    logprobs = raw_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (A,)
    return tokens, logprobs


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative probability reaches u * total. probs (A, V) -> (A,)."""
    cdf = torch.cumsum(probs, dim=-1)  # (A, V)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1].double()).to(cdf.dtype)  # (A,)
    index = torch.searchsorted(cdf, target.unsqueeze(-1)).squeeze(-1)  # (A,)
    index = index.clamp(max=probs.shape[-1] - 1)
    # Guard against fp rounding landing on a zero-probability entry: step back to the last
    # token with mass at or before it.
    bad = probs.gather(-1, index.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(bad.any()):
        positive = probs > 0
        last_pos = torch.where(positive, torch.arange(probs.shape[-1], device=probs.device), -1).cummax(dim=-1).values
        index = torch.where(bad, last_pos.gather(-1, index.unsqueeze(-1)).squeeze(-1), index)
    return index
