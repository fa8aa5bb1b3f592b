"""Per-token log-probabilities and entropies of a causal LM's next-token distribution.

Glossary: B sequences, T positions (after the one-token shift), N = B * T rows, M scored
rows, V vocabulary, D hidden size, C rows per chunk.
All reductions over V run in fp32 (or fp64 when the input is fp64), even when the model
runs in bf16: bf16 has 8 bits of mantissa, which is too coarse for log-softmax over a
151,936-token vocabulary.

Two paths compute the same numbers:

- the simple path (``chunk_size=None``, the handout's): ``model(input_ids).logits`` gives
  (B, T, V) logits, reduced in fp32. Autograd keeps the fp32 logits (and their softmax) for
  the backward: at micro-batch 16 x 1024 with Qwen's V = 151,936 that is 10 GB per copy.
- the chunked path (``chunk_size=C``): the transformer body gives (B, T, D) hidden states,
  and :class:`_ChunkedLogProbs` multiplies C rows at a time by the output embedding,
  reduces them and drops their logits. Its backward recomputes each chunk's logits, so no
  more than O(C x V) of logits ever exists at once, forward or backward.
"""

from __future__ import annotations

import torch

__all__ = [
    "CHUNKED_FORWARD",
    "chunked_log_probs_from_hidden",
    "chunked_response_log_probs",
    "compute_entropy",
    "get_response_log_probs",
    "log_probs_from_logits",
]

DEFAULT_CHUNK_SIZE = 1024  # rows per chunk: 1024 x 151,936 fp32 logits = 622 MB at a time


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


# ---------------------------------------------------------------------------------------
# Chunked log-probs and entropy from hidden states
# ---------------------------------------------------------------------------------------


class _ChunkedLogProbs(torch.autograd.Function):
    """log p(y) and H(p) of ``softmax(h W^T + b)`` for rows of ``h``, C rows at a time.

    Forward, per chunk of rows r (z = logits in fp32, lse = logsumexp_v z):
        log_probs[r] = z[r, y_r] - lse[r]
        entropy[r]   = lse[r] - sum_v p[r, v] z[r, v],        p = softmax(z)
    Backward, per chunk, with g = dL/dlog_probs and e = dL/dentropy (each may be absent):
        dL/dz[r, v] = g_r (1[v = y_r] - p_rv) - e_r p_rv (log p_rv + H_r)
        dL/dh[r]    = dL/dz[r] W          dL/dW += dL/dz[r]^T h[r]          dL/db += sum_r dL/dz[r]
    where log p_rv + H_r = z_rv - lse_r + H_r, from the saved lse and entropy.

    Only the inputs (h, W, b, labels), the row index and two (N,) fp32 vectors are saved;
    each chunk's logits are recomputed in the backward and freed after it. Matmuls run in
    ``compute_dtype`` (the autocast dtype, or the model's), as ``nn.Linear`` would, and the
    reductions in fp32. dL/dW accumulates over chunks in fp32 and is cast to W's dtype once.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, D)
        weight: torch.Tensor,  # (V, D)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,) int64
        rows: torch.Tensor | None,  # (M,) int64 rows to score; None = all N
        chunk_size: int,
        compute_dtype: torch.dtype,
        want_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        n_rows = hidden.shape[0]
        red = _reduction_dtype(compute_dtype)
        log_probs = torch.zeros(n_rows, dtype=red, device=hidden.device)  # (N,)
        entropy = torch.zeros(n_rows if want_entropy else 0, dtype=red, device=hidden.device)  # (N,) or (0,)
        lse_all = torch.zeros(n_rows, dtype=red, device=hidden.device)  # (N,) kept for the backward
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            w = weight.to(compute_dtype)  # (V, D)
            b = bias.to(compute_dtype) if bias is not None else None  # (V,)
            for idx in _chunks(n_rows, rows, chunk_size):
                z = _chunk_logits(hidden, w, b, idx, compute_dtype, red)  # (C, V) fp32
                y = labels[idx]  # (C,)
                lse = torch.logsumexp(z, dim=-1)  # (C,)
                log_probs[idx] = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse  # (C,)
                lse_all[idx] = lse
                if want_entropy:
                    p = (z - lse.unsqueeze(-1)).exp_()  # (C, V) softmax
                    entropy[idx] = lse - p.mul_(z).sum(dim=-1)  # (C,)
                del z
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse_all, entropy)
        ctx.chunk_size, ctx.compute_dtype, ctx.want_entropy = chunk_size, compute_dtype, want_entropy
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        hidden, weight, bias, labels, rows, lse_all, entropy = ctx.saved_tensors
        cd = ctx.compute_dtype
        red = _reduction_dtype(cd)
        if not ctx.want_entropy:
            grad_entropy = None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        if grad_log_probs is None and grad_entropy is None:
            return (None,) * 8
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, D)
        grad_w = torch.zeros(weight.shape, dtype=red, device=weight.device) if need_w else None  # (V, D) fp32
        grad_b = torch.zeros(weight.shape[0], dtype=red, device=weight.device) if need_b else None  # (V,) fp32
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            w = weight.to(cd)  # (V, D)
            b = bias.to(cd) if bias is not None else None  # (V,)
            for idx in _chunks(hidden.shape[0], rows, ctx.chunk_size):
                z = _chunk_logits(hidden, w, b, idx, cd, red)  # (C, V) fp32
                z.sub_(lse_all[idx].unsqueeze(-1))  # (C, V) log p
                p = torch.exp(z)  # (C, V)
                if grad_entropy is not None:
                    # dz = -e p (log p + H), built in z's storage
                    dz = z.add_(entropy[idx].unsqueeze(-1)).mul_(p).mul_(-grad_entropy[idx].unsqueeze(-1))  # (C, V)
                    if grad_log_probs is not None:
                        dz.sub_(p.mul_(grad_log_probs[idx].unsqueeze(-1)))  # (C, V)
                else:
                    del z
                    dz = p.mul_(-grad_log_probs[idx].unsqueeze(-1))  # (C, V)
                del p
                if grad_log_probs is not None:
                    g = grad_log_probs[idx]  # (C,)
                    dz.scatter_add_(-1, labels[idx].unsqueeze(-1), g.unsqueeze(-1))  # (C, V) += g one_hot(y)
                dz_c = dz.to(cd)  # (C, V)
                del dz
                if need_h:
                    grad_h[idx] = (dz_c @ w).to(hidden.dtype)  # (C, D)
                if need_w:
                    h = hidden[idx].to(cd)  # (C, D)
                    if cd == red:
                        grad_w.addmm_(dz_c.t(), h)  # (V, D)
                    else:  # bf16 product per chunk, summed over chunks in fp32
                        grad_w.add_(dz_c.t() @ h)  # (V, D)
                if need_b:
                    grad_b.add_(dz_c.sum(dim=0).to(red))  # (V,)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None, None, None, None, None,
        )


def _chunks(n_rows: int, rows: torch.Tensor | None, chunk_size: int):
    """Yield the rows of each chunk: a ``slice`` of [0, N), or a slice of the index ``rows``."""
    if rows is None:
        for start in range(0, n_rows, chunk_size):
            yield slice(start, min(start + chunk_size, n_rows))
    else:
        for start in range(0, rows.numel(), chunk_size):
            yield rows[start : start + chunk_size]


def _chunk_logits(
    hidden: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, idx: slice | torch.Tensor,
    compute_dtype: torch.dtype, reduction_dtype: torch.dtype,
) -> torch.Tensor:
    """z = h[idx] W^T (+ b) in ``compute_dtype``, returned in the reduction dtype: (C, V)."""
    h = hidden[idx].to(compute_dtype)  # (C, D): a view for a slice, a gather for an index
    z = h @ w.t() if b is None else torch.addmm(b, h, w.t())  # (C, V) compute dtype
    return z.to(reduction_dtype)  # (C, V)


def chunked_log_probs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    positions_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """log p(labels) and entropy under softmax(hidden W^T + b), never holding all (B, T, V) logits.

    log_probs[b, t] = z[b, t, labels[b, t]] - logsumexp_v z[b, t, v]
    entropy[b, t]   = logsumexp_v z[b, t, v] - sum_v softmax(z[b, t])_v z[b, t, v]
    with z = hidden W^T + b computed for ``chunk_size`` of the N = B * T rows at a time
    (forward and backward), so extra memory is O(chunk_size x V) instead of O(B x T x V).
    Gradients flow to ``hidden``, ``weight`` (tied to the input embedding in Qwen: autograd
    adds both uses) and ``bias``.

    Args:
        hidden: (B, T, D) final hidden states (after the last norm).
        weight: (V, D) output embedding (``lm_head.weight``).
        labels: (B, T) int64 target ids.
        return_token_entropy: also return the entropy.
        bias: (V,) output bias, if the head has one.
        chunk_size: rows per chunk (>= 1; need not divide B * T).
        positions_mask: (B, T) bool; when given only these positions are scored (the rest
            cost nothing, hold 0 and get no gradient). None scores every position.
        compute_dtype: dtype of the logit matmul; default: the autocast dtype when autocast
            is on for ``hidden``'s device, else the promoted dtype of hidden and weight.
    Returns:
        {"log_probs": (B, T) fp32} and, when asked, {"token_entropy": (B, T) fp32}
        (fp64 when the matmul runs in fp64).
    """
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, D = hidden.shape
    if labels.shape != (B, T):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {(B, T, D)}")
    device_type = hidden.device.type
    if compute_dtype is None:
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows = None
    if positions_mask is not None:
        if positions_mask.shape != (B, T):
            raise ValueError(f"positions_mask {tuple(positions_mask.shape)} does not match labels {(B, T)}")
        rows = positions_mask.to(hidden.device).reshape(-1).nonzero().squeeze(-1)  # (M,) int64
    log_probs, entropy = _ChunkedLogProbs.apply(
        hidden.reshape(B * T, D),  # (N, D)
        weight,
        bias,
        labels.to(hidden.device).reshape(B * T),  # (N,)
        rows,
        int(chunk_size),
        compute_dtype,
        return_token_entropy,
    )
    out = {"log_probs": log_probs.view(B, T)}  # (B, T)
    if return_token_entropy:
        out["token_entropy"] = entropy.view(B, T)  # (B, T)
    return out


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returns ``last_hidden_state``) and the output head of a causal LM.

    Works for Hugging Face ``*ForCausalLM`` models whose logits are exactly
    ``lm_head(last_hidden_state)`` (Qwen2, Qwen3, Llama, Mistral, ...). Models that scale
    or soft-cap their logits are refused rather than scored wrongly.
    """
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} post-processes its logits ({name}={value}); use chunk_size=None"
            )
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise NotImplementedError(
            f"chunked log-probs need a causal LM with a separate body and lm_head; {type(model).__name__} "
            "has none (use chunk_size=None)"
        )
    return body, head


def get_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
    *,
    chunk_size: int | None = None,
    positions_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Score ``labels`` under ``model`` given ``input_ids`` (teacher forcing).

    log_probs[b, t] = log p_model(labels[b, t] | input_ids[b, : t + 1])

    By default nothing is masked: prompt and padding positions are scored too, and the
    training step applies the response mask. Right padding needs no attention mask, because
    causal attention never lets a real token see the padding after it.

    Args:
        model: a causal LM returning ``.logits`` of shape (B, T, V).
        input_ids: (B, T) int64.
        labels: (B, T) int64, ``input_ids`` shifted left by one.
        return_token_entropy: also return the entropy of each next-token distribution.
        chunk_size: None (default, the handout's path): the model's full (B, T, V) logits,
            reduced in fp32. An int C: run the transformer body, then compute logits C rows
            of the flattened B * T at a time with recomputation in the backward
            (:func:`chunked_log_probs_from_hidden`): the same numbers without ever holding
            all fp32 logits. 1024 is a good value for Qwen's 151,936-token vocabulary.
        positions_mask: (B, T) bool, e.g. the response mask: positions where it is False
            hold 0 in both outputs and get no gradient; with ``chunk_size`` they also cost
            no logits at all (prompts are usually most of a sequence).
    Returns:
        {"log_probs": (B, T) fp32} and, when asked, {"token_entropy": (B, T) fp32}.
    """
    input_ids = input_ids.to(model.device) if hasattr(model, "device") else input_ids
    if chunk_size is None:
        logits = model(input_ids).logits  # (B, T, V), model dtype
        out = log_probs_from_logits(logits, labels.to(logits.device), return_token_entropy)
        if positions_mask is not None:
            keep = positions_mask.to(logits.device).bool()  # (B, T)
            out = {k: torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)) for k, v in out.items()}
        return out
    # A model sharded over processes (FSDP2) runs this as a registered forward method, so that
    # its own parameters (embeddings, tied head, final norm) are gathered around it (distributed.shard_policy).
    run = getattr(model, CHUNKED_FORWARD, None)
    if run is not None:
        return run(input_ids, labels, return_token_entropy, chunk_size, positions_mask)
    return chunked_response_log_probs(model, input_ids, labels, return_token_entropy, chunk_size, positions_mask)


CHUNKED_FORWARD = "chunked_response_log_probs"  # the name of the forward method a sharded model registers


def chunked_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool,
    chunk_size: int,
    positions_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """:func:`get_response_log_probs` with ``chunk_size``: the transformer body over ``input_ids``
    (B, T), then the head's log-probs (and entropies) C rows at a time (:func:`chunked_log_probs_from_hidden`)."""
    body, head = _body_and_head(model)
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, D)
    return chunked_log_probs_from_hidden(
        hidden, head.weight, labels, return_token_entropy,
        bias=getattr(head, "bias", None), chunk_size=chunk_size, positions_mask=positions_mask,
    )
