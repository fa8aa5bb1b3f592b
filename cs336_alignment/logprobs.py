"""Per-token log-probabilities and entropies of a causal LM's next-token distribution.

Glossary: B sequences, T positions (after the one-token shift), V vocabulary.
All reductions over V run in fp32 (or fp64 when the input is fp64), even when the model
runs in bf16: bf16 has 8 bits of mantissa, which is too coarse for log-softmax over a
151,936-token vocabulary.
"""

from __future__ import annotations

import torch


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the input dtype when it is already fp32 or fp64."""
    return torch.promote_types(dtype, torch.float32)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution over the last dimension.

    H(p) = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v

    Written with logsumexp so it stays finite for logits of magnitude 1e4 or more.

    Args:
        logits: (..., V) unnormalised scores.
    Returns:
        (...) entropy in nats, fp32 (fp64 for fp64 input).
    """
    z = logits.to(_reduction_dtype(logits.dtype))  # (..., V)
    lse = torch.logsumexp(z, dim=-1)  # (...)
    p = torch.softmax(z, dim=-1)  # (..., V)
    return lse - (p * z).sum(dim=-1)  # (...)


def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, return_token_entropy: bool = False
) -> dict[str, torch.Tensor]:
    """log p(labels) under softmax(logits), and optionally the entropy, in fp32.

    Args:
        logits: (B, T, V) next-token scores.
        labels: (B, T) int64 target ids.
    Returns:
        {"log_probs": (B, T)} plus {"token_entropy": (B, T)} when asked.
    """
    z = logits.to(_reduction_dtype(logits.dtype))  # (B, T, V)
    lse = torch.logsumexp(z, dim=-1)  # (B, T)
    target = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    out = {"log_probs": target - lse}  # (B, T)
    if return_token_entropy:
        out["token_entropy"] = compute_entropy(z)  # (B, T)
    return out


def get_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Score ``labels`` under ``model`` given ``input_ids`` (teacher forcing).

    log_probs[b, t] = log p_model(labels[b, t] | input_ids[b, : t + 1])

    Nothing is masked here: prompt and padding positions are scored too, and the training
    step applies the response mask. Right padding needs no attention mask, because causal
    attention never lets a real token see the padding after it.

    Args:
        model: a causal LM returning ``.logits`` of shape (B, T, V).
        input_ids: (B, T) int64.
        labels: (B, T) int64, ``input_ids`` shifted left by one.
        return_token_entropy: also return the entropy of each next-token distribution.
    Returns:
        {"log_probs": (B, T) fp32} and, when asked, {"token_entropy": (B, T) fp32}.
    """
    input_ids = input_ids.to(model.device) if hasattr(model, "device") else input_ids
    logits = model(input_ids).logits  # (B, T, V), model dtype
    return log_probs_from_logits(logits, labels.to(logits.device), return_token_entropy)
