"""Masked reductions, the SFT loss, and the policy-gradient losses of the CS336 handout.

Pure tensor math: no I/O, no model. Glossary: B sequences in a micro-batch, T token
positions (response tokens are marked by ``response_mask``).

Length normalisation of the policy-gradient loss is a config value (``length_normalization``)
that keeps the handout's names; each value selects, with a plain ``if`` in
:func:`grpo_microbatch_train_step`, the function named after it:

- ``"masked_mean"`` -> :func:`masked_mean_loss` (the handout's GRPO default): the handout's
  ``masked_mean`` of the per-token loss over each sequence's own response tokens, then the mean
  over sequences. Each sequence weighs the same, so a token of a long response counts less.
- ``"masked_normalize"`` -> :func:`masked_normalize_loss` (as in Dr. GRPO): the handout's
  ``masked_normalize`` of each sequence with one constant (the maximum generation length), then
  the mean over sequences. Every token counts the same: no length bias.
- ``"token_mean"`` -> :func:`token_mean_loss`: the sum over all response tokens divided by a
  token count: the whole optimizer batch's when given (an exact global token mean across
  micro-batches), else the micro-batch's own.

Beyond the handout, each off by default: asymmetric clipping (``cliprange_high``, DAPO), the
sequence-level ratio of GSPO (``loss_type="gspo"``, :func:`compute_gspo_loss`), and a KL
penalty to a frozen reference policy (``kl_coef``, :func:`kl_penalty`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

__all__ = [
    "KL_ESTIMATORS",
    "KlEstimator",
    "LENGTH_NORMALIZATIONS",
    "LOSS_TYPES",
    "LengthNormalization",
    "LossType",
    "compute_grpo_clip_loss",
    "compute_grpo_no_clip_loss",
    "compute_gspo_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "grpo_microbatch_train_step",
    "k3_kl",
    "kl_penalty",
    "masked_mean",
    "masked_mean_loss",
    "masked_normalize",
    "masked_normalize_loss",
    "sft_microbatch_train_step",
    "token_mean_loss",
    "truncated_importance_weights",
]


LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip", "gspo"]
LengthNormalization = Literal["masked_mean", "masked_normalize", "token_mean"]
KlEstimator = Literal["k1", "k3"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
LENGTH_NORMALIZATIONS: tuple[str, ...] = get_args(LengthNormalization)
KL_ESTIMATORS: tuple[str, ...] = get_args(KlEstimator)


# ---------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------


def _masked(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tensor`` where ``mask`` is true, 0 elsewhere (also where tensor is inf or NaN)."""
    return torch.where(mask.bool(), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def masked_normalize(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    normalize_constant: float = 1.0,
    dim: int | None = None,
) -> torch.Tensor:
    """Sum of ``tensor`` where ``mask`` is true, along ``dim`` (all elements when None),
    divided by ``normalize_constant``.

    sum_{i in dim, mask_i} tensor_i / normalize_constant

    Masked-out elements contribute exactly 0, even when they hold inf or NaN.
    """
    total = _masked(tensor, mask).sum() if dim is None else _masked(tensor, mask).sum(dim=dim)
    return total / normalize_constant


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over the elements where ``mask`` is true, along ``dim`` (all when None).

    sum_{mask} tensor / count(mask)

    A slice with no true element gives NaN (0 / 0), as ``Tensor.mean`` of an empty tensor
    does; the training steps guard against empty responses, this function does not.
    """
    if dim is None:
        return _masked(tensor, mask).sum() / mask.sum()
    return _masked(tensor, mask).sum(dim=dim) / mask.sum(dim=dim)


# ---------------------------------------------------------------------------------------
# Sequence-length normalisation of a per-token loss: each returns the micro-batch loss
# (a scalar) before division by the number of gradient-accumulation steps.
# ---------------------------------------------------------------------------------------


def masked_mean_loss(per_token_loss: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``length_normalization="masked_mean"``: mean_b [ sum_t m_bt l_bt / sum_t m_bt ].

    Each sequence's loss is the handout's ``masked_mean`` over its response tokens, computed as
    ``masked_normalize`` by the sequence's token count clamped to 1, so that a sequence with no
    response token adds 0 where ``masked_mean`` would give NaN (0 / 0); then the mean over B.

    Args: per_token_loss (B, T); response_mask (B, T) bool.
    """
    counts = response_mask.sum(dim=-1).clamp(min=1)  # (B,) empty responses count as 1 -> 0/1 = 0
    return masked_normalize(per_token_loss, response_mask, counts, dim=-1).mean()  # (B,) -> ()


def masked_normalize_loss(
    per_token_loss: torch.Tensor, response_mask: torch.Tensor, normalize_constant: float
) -> torch.Tensor:
    """``length_normalization="masked_normalize"``: mean_b [ sum_t m_bt l_bt / C ] (Dr. GRPO).

    Each sequence's loss is the handout's ``masked_normalize`` with one constant C for every
    sequence (the maximum generation length), then the mean over B.

    Args: per_token_loss (B, T); response_mask (B, T) bool; normalize_constant C > 0.
    """
    return masked_normalize(per_token_loss, response_mask, normalize_constant, dim=-1).mean()  # (B,) -> ()


def token_mean_loss(
    per_token_loss: torch.Tensor, response_mask: torch.Tensor, num_tokens: float | None = None
) -> torch.Tensor:
    """``length_normalization="token_mean"``: sum_bt m_bt l_bt / N.

    N = ``num_tokens`` or, when None, this micro-batch's response-token count; the sum is the
    handout's ``masked_normalize`` over all elements.

    Args: per_token_loss (B, T); response_mask (B, T) bool; num_tokens N: the number of
    response tokens in the whole optimizer batch, for an exact global token mean.
    """
    count = response_mask.sum().clamp(min=1) if num_tokens is None else num_tokens  # ()
    return masked_normalize(per_token_loss, response_mask, count)  # ()


# ---------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the response tokens for one micro-batch; calls backward().

    loss = -mean_b [ sum_t m_bt log pi(y_bt) / normalize_constant ] / gradient_accumulation_steps

    Gradients accumulate in ``.grad`` across calls (the caller zeroes them after the
    optimizer step), so N micro-batches give the gradient of one batch N times larger.

    Args:
        policy_log_probs: (B, T) log-probs of the labels, requires grad.
        response_mask: (B, T) bool, True on response tokens.
        gradient_accumulation_steps: micro-batches per optimizer step.
        normalize_constant: divides each sequence's summed log-likelihood.
    Returns:
        (loss, metadata): the scaled scalar loss that was back-propagated (detached), and
        {"nll": unscaled loss, "num_response_tokens": response token count} (detached).
    """
    _check_accumulation(gradient_accumulation_steps)
    per_sequence = masked_normalize(policy_log_probs, response_mask, normalize_constant, dim=-1)  # (B,)
    nll = -per_sequence.mean()  # ()
    loss = nll / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {"nll": nll.detach(), "num_response_tokens": response_mask.sum().detach()}


# ---------------------------------------------------------------------------------------
# Policy-gradient per-token losses
# ---------------------------------------------------------------------------------------


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: torch.Tensor, policy_log_probs: torch.Tensor
) -> torch.Tensor:
    """Per-token REINFORCE loss -A_b * log pi(y_bt).

    Args:
        raw_rewards_or_advantages: (B, 1) reward or advantage of each sequence.
        policy_log_probs: (B, T).
    Returns:
        (B, T) per-token loss (A broadcast over T).
    """
    return -raw_rewards_or_advantages * policy_log_probs  # (B, 1) * (B, T) -> (B, T)


def compute_grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float,
    *,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO-Clip (PPO-style clipped surrogate) loss.

    ratio = pi / pi_old = exp(log pi - log pi_old)
    loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

    eps_low = ``cliprange``; eps_high = ``cliprange_high``, or ``cliprange`` when None (the
    handout's symmetric clip). A larger eps_high is DAPO's "clip-higher" (Yu et al., 2025,
    arXiv:2503.14476): tokens whose probability the update raises (A > 0) may rise further
    before their gradient stops, which keeps exploration from collapsing.

    Args:
        advantages: (B, 1).
        policy_log_probs, old_log_probs: (B, T).
        cliprange: eps_low (and eps_high unless ``cliprange_high``).
    Returns:
        (loss (B, T), metadata) with metadata["clipped"] (B, T) bool, True where the
        clipped term is strictly smaller (the token gets no gradient): "clipped_high" where
        that is at 1 + eps_high (A > 0), "clipped_low" at 1 - eps_low (A < 0); and
        metadata["ratio"] (B, T), all detached.
    """
    high = cliprange if cliprange_high is None else cliprange_high
    ratio = torch.exp(policy_log_probs - old_log_probs)  # (B, T)
    return _clipped_surrogate(ratio, advantages, low=cliprange, high=high)  # (B, T)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, *, low: float, high: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-min(ratio * A, clip(ratio, 1 - low, 1 + high) * A), and where the clipped term was taken
    (at the upper bound when A > 0, the lower when A < 0), all detached but the loss.

    Args: ratio (B, T) per token or (B, 1) per sequence; advantages (B, 1). Returns tensors shaped as ``ratio``.
    """
    unclipped = ratio * advantages  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - low, 1.0 + high) * advantages  # (B, T)
    taken = (clipped < unclipped).detach()  # (B, T) the token (sequence) gets no gradient
    return -torch.minimum(unclipped, clipped), {"clipped": taken, "clipped_high": taken & (advantages > 0),
                                                "clipped_low": taken & (advantages < 0), "ratio": ratio.detach()}


def compute_grpo_no_clip_loss(
    advantages: torch.Tensor, policy_log_probs: torch.Tensor, old_log_probs: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token unclipped importance-weighted loss -(pi / pi_old) * A (the GRPO-No-Clip ablation).

    Args: advantages (B, 1); policy_log_probs, old_log_probs (B, T).
    Returns: (loss (B, T), {"ratio": (B, T) detached}).
    """
    ratio = torch.exp(policy_log_probs - old_log_probs)  # (B, T)
    return -ratio * advantages, {"ratio": ratio.detach()}


def compute_gspo_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
    *,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's sequence-level clipped surrogate (Zheng et al., 2025, "Group Sequence Policy
    Optimization", arXiv:2507.18071), as a per-token loss.

    s_b    = (pi(y_b) / pi_old(y_b)) ** (1 / |y_b|) = exp( sum_t m_bt (log pi_bt - log pi_old_bt) / |y_b| )
    loss_b = -min(s_b * A_b, clip(s_b, 1 - eps_low, 1 + eps_high) * A_b)

    The importance ratio is the response's length-normalised likelihood ratio, clipped per
    sequence: a whole response is kept or dropped, never some of its tokens. The per-token loss
    is loss_b on every response token of row b, so ``masked_mean`` length normalisation gives
    the paper's mean over sequences. Its ratios stay much closer to 1 than token ratios: the
    paper clips at eps_low = 3e-4, eps_high = 4e-4.

    Args:
        advantages: (B, 1). policy_log_probs, old_log_probs: (B, T). response_mask: (B, T) bool.
        cliprange: eps_low (and eps_high unless ``cliprange_high``).
    Returns:
        (loss (B, T), metadata) with the sequence's "ratio" s_b, "clipped" (the clipped term
        taken: the sequence gets no gradient), "clipped_high" (A > 0) and "clipped_low" (A < 0)
        spread over its tokens as (B, T), all detached.
    """
    high = cliprange if cliprange_high is None else cliprange_high
    mask = response_mask.bool()  # (B, T)
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1) an empty response counts as 1: s = 1
    log_ratio = _masked(policy_log_probs - old_log_probs, mask).sum(dim=-1, keepdim=True) / lengths  # (B, 1)
    loss, meta = _clipped_surrogate(torch.exp(log_ratio), advantages, low=cliprange, high=high)  # (B, 1) per sequence
    return loss.expand_as(policy_log_probs), {k: v.expand_as(policy_log_probs) for k, v in meta.items()}  # (B, T) each


def kl_penalty(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL penalty to a frozen reference from tokens sampled from pi (Schulman,
    "Approximating KL divergence", 2020); its value estimates KL(pi || pi_ref):

    k1 = log pi - log pi_ref                               (unbiased; any sign, high variance)
    k3 = (pi_ref / pi - 1) - log(pi_ref / pi)              (unbiased, >= 0, low variance)

    What the gradient descends differs, because the tokens come from pi itself:

    - "k1": the value k1 with the gradient sg[k1] * grad log pi (score-function form; the plain
      grad k1 = grad log pi has expectation 0 under pi and would do nothing): in expectation
      the gradient of KL(pi || pi_ref).
    - "k3": grad k3 = (1 - pi_ref / pi) grad log pi, in expectation the gradient of
      KL(pi_ref || pi), the reverse direction; as in the GRPO paper (Shao et al., 2024,
      arXiv:2402.03300) and TRL / verl's low-variance KL loss.

    Args: policy_log_probs, ref_log_probs (B, T); estimator "k1" or "k3". Returns (B, T).
    """
    if estimator == "k1":
        k1 = (policy_log_probs - ref_log_probs).detach()  # (B, T)
        return k1 * (1.0 + policy_log_probs - policy_log_probs.detach())  # (B, T) value k1, gradient k1 * grad log pi
    if estimator == "k3":
        return k3_kl(ref_log_probs.detach(), policy_log_probs)  # (B, T) KL(pi || pi_ref): samples from pi
    raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def truncated_importance_weights(
    old_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token truncated importance weight of samples drawn from the behaviour policy mu (the
    generator) for the policy pi_old that the loss is about:

    w = min(pi_old / mu, C) = min(exp(log pi_old - log mu), C)

    Args: old_log_probs, behaviour_log_probs (B, T); cap C > 0.
    Returns: (w (B, T), truncated (B, T) bool: where pi_old / mu > C), both detached.
    """
    ratio = torch.exp(old_log_probs - behaviour_log_probs).detach()  # (B, T)
    return torch.clamp(ratio, max=cap), ratio > cap


def k3_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(q || p) from tokens sampled from q (Schulman's estimator):

    k3 = (r - 1) - log r,  r = p / q = exp(log p - log q);  k3 >= 0, and 0 where p = q.

    Args: log_p, log_q (B, T). Returns (B, T).
    """
    log_r = log_p - log_q  # (B, T)
    return torch.expm1(log_r) - log_r  # (B, T)


def compute_policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    *,
    cliprange_high: float | None = None,
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch to the per-token loss named by ``loss_type``.

    - "no_baseline": -r * log pi, needs ``raw_rewards`` (B, 1).
    - "reinforce_with_baseline": -A * log pi, needs ``advantages`` (B, 1).
    - "grpo_clip": clipped surrogate, needs ``advantages``, ``old_log_probs``, ``cliprange``.
    - "grpo_no_clip": -(pi / pi_old) * A, needs ``advantages`` and ``old_log_probs``.
    - "gspo": GSPO's sequence-level clipped surrogate, needs ``advantages``, ``old_log_probs``,
      ``cliprange`` and ``response_mask`` (B, T) (:func:`compute_gspo_loss`).

    Returns (per-token loss (B, T), metadata). A missing required argument raises
    ValueError naming it.
    """

    def need(name: str, value: object) -> None:
        if value is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name}, but {name} is None")

    if loss_type == "no_baseline":
        need("raw_rewards", raw_rewards)
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        need("advantages", advantages)
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type == "grpo_clip":
        need("advantages", advantages)
        need("old_log_probs", old_log_probs)
        need("cliprange", cliprange)
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs=old_log_probs, cliprange=cliprange,
                                      cliprange_high=cliprange_high)
    if loss_type == "grpo_no_clip":
        need("advantages", advantages)
        need("old_log_probs", old_log_probs)
        return compute_grpo_no_clip_loss(advantages, policy_log_probs, old_log_probs)
    if loss_type == "gspo":
        need("advantages", advantages)
        need("old_log_probs", old_log_probs)
        need("cliprange", cliprange)
        need("response_mask", response_mask)
        return compute_gspo_loss(advantages, policy_log_probs, old_log_probs=old_log_probs, response_mask=response_mask,
                                 cliprange=cliprange, cliprange_high=cliprange_high)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def grpo_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    *,
    length_normalization: str = "masked_mean",
    normalize_constant: float | None = None,
    num_tokens: float | None = None,
    importance_weights: torch.Tensor | None = None,
    cliprange_high: float | None = None,
    ref_log_probs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss for one micro-batch; calls backward().

    loss = normalise(w * per_token_loss + beta * kl, response_mask) / gradient_accumulation_steps

    (w = 1 unless ``importance_weights`` is given; beta = ``kl_coef``, kl = :func:`kl_penalty`
    of the policy to ``ref_log_probs``, 0 unless both are given.)

    With the defaults, normalise = :func:`masked_mean_loss` (masked mean over each
    sequence, then mean over the batch), exactly the handout's step, except that a sequence
    with no response token contributes 0 instead of NaN.

    Args:
        policy_log_probs: (B, T) requires grad.
        response_mask: (B, T) bool.
        gradient_accumulation_steps: micro-batches per optimizer step.
        loss_type, raw_rewards (B, 1), advantages (B, 1), old_log_probs (B, T), cliprange:
            see :func:`compute_policy_gradient_loss`.
        length_normalization: "masked_mean" (default), "masked_normalize" (sum / the
            constant ``normalize_constant``, as Dr. GRPO; e.g. the maximum generation
            length) or "token_mean" (sum / ``num_tokens``, the optimizer batch's response
            token count; when ``num_tokens`` is given the result is not divided by
            ``gradient_accumulation_steps``, because it is already a share of the batch).
        importance_weights: (B, T) (or (B, 1), per sequence) detached weights w of the loss, e.g. the truncated
            importance weights min(pi_old / mu, C) of tokens sampled from a behaviour policy mu
            (:func:`truncated_importance_weights`); None: 1.
        cliprange_high: grpo_clip's and gspo's upper epsilon (None: ``cliprange``); see :func:`compute_grpo_clip_loss`.
        ref_log_probs: (B, T) log-probs of a frozen reference policy; with them "kl_sum", the
            masked sum of the k3 estimate of KL(pi || pi_ref), is in the metadata (whatever ``kl_coef``).
        kl_coef: beta, the weight of the KL penalty in the loss (0: logged only).
        kl_estimator: the penalty's estimator, "k1" or "k3" (:func:`kl_penalty`).
    Returns:
        (loss, metadata): the back-propagated scalar (detached); metadata holds detached
        tensors: "loss_unscaled", "num_response_tokens", and for ratio-based losses
        "ratio_mean" (over response tokens) and, for grpo_clip and gspo, "clip_fraction".
    """
    _check_accumulation(gradient_accumulation_steps)
    per_token_loss, loss_meta = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards=raw_rewards, advantages=advantages, old_log_probs=old_log_probs,
        cliprange=cliprange, cliprange_high=cliprange_high, response_mask=response_mask,
    )  # (B, T)
    if importance_weights is not None:
        per_token_loss = importance_weights.detach() * per_token_loss  # (B, T)
    if kl_coef and ref_log_probs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_log_probs, the reference policy's log-probs")
    if kl_coef:
        per_token_loss = per_token_loss + kl_coef * kl_penalty(policy_log_probs, ref_log_probs, kl_estimator)  # (B, T)
    scale = gradient_accumulation_steps
    if length_normalization == "masked_mean":
        unscaled = masked_mean_loss(per_token_loss, response_mask)
    elif length_normalization == "masked_normalize":
        if normalize_constant is None or normalize_constant <= 0:
            raise ValueError(
                "length_normalization='masked_normalize' needs a positive normalize_constant "
                f"(e.g. the maximum generation length), got {normalize_constant!r}"
            )
        unscaled = masked_normalize_loss(per_token_loss, response_mask, normalize_constant)
    elif length_normalization == "token_mean":
        unscaled = token_mean_loss(per_token_loss, response_mask, num_tokens)
        if num_tokens is not None:
            scale = 1
    else:
        raise ValueError(
            f"unknown length_normalization {length_normalization!r}; expected one of {', '.join(LENGTH_NORMALIZATIONS)}"
        )
    loss = unscaled / scale
    loss.backward()

    metadata: dict[str, torch.Tensor] = {
        "loss_unscaled": unscaled.detach(),
        "num_response_tokens": response_mask.sum().detach(),
    }
    count = response_mask.sum().clamp(min=1)  # () 0 / 1 = 0 for an empty mask
    if ref_log_probs is not None:
        metadata["kl_sum"] = masked_normalize(k3_kl(ref_log_probs, policy_log_probs.detach()), response_mask)  # ()
    if "ratio" in loss_meta:
        metadata["ratio_sum"] = masked_normalize(loss_meta["ratio"], response_mask)  # ()
        metadata["ratio_mean"] = metadata["ratio_sum"] / count
    if "clipped" in loss_meta:
        metadata["clipped_tokens"] = masked_normalize(loss_meta["clipped"].float(), response_mask)  # ()
        metadata["clip_fraction"] = metadata["clipped_tokens"] / count
        for side in ("high", "low"):  # at 1 + eps_high (A > 0) and at 1 - eps_low (A < 0)
            metadata[f"clipped_{side}_tokens"] = masked_normalize(loss_meta[f"clipped_{side}"].float(), response_mask)  # ()
    return loss.detach(), metadata


def _check_accumulation(gradient_accumulation_steps: int) -> None:
    if int(gradient_accumulation_steps) < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
