"""Supervised fine-tuning on (prompt, response) pairs, as in the CS336 handout, in one loop.

  data      prompts and reference responses (sft.jsonl, or a built-in task's traces),
            optionally only those whose response earns reward 1, optionally the first N
  train     epochs over shuffled batches; each optimizer step accumulates gradients over
            micro-batches, clips the gradient norm, and steps AdamW (warmup + cosine optional)
  validate  every eval_every optimizer steps, sampling with the generation engine
  save      the final model and tokenizer (save_pretrained) in <out>/model

Glossary: b sequences per micro-batch, T positions after the one-token shift.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..checkpoint import (
    NonFiniteError,
    Progress,
    RunControl,
    budget_spent,
    check_finite,
    fault_point,
    truncate_metrics,
)
from ..generation import NativeEngine, SamplingParams
from ..logprobs import get_response_log_probs
from ..losses import sft_microbatch_train_step
from ..tokenization import pack_prompt_and_output_ids, pad_token_id
from .common import (
    DataConfig,
    autocast,
    check_sft_batching,
    finish_run,
    load_data,
    load_policy,
    lr_at,
    make_optimizer,
    open_run,
    set_lr,
    validate,
)


@dataclass
class SFTConfig:
    """Supervised fine-tuning on reasoning traces."""

    model: str = ""  # model directory to start from, or "tiny"
    out: str = "runs/sft"  # run directory; the trained model goes to <out>/model
    seed: int = 0  # seeds shuffling, example selection, sampling
    data: DataConfig = field(default_factory=DataConfig)  # examples with reference responses
    n_examples: int | None = None  # use this many unique examples (128, 256, 512, 1024; None = all)
    filter_correct: bool = False  # keep only examples whose reference response earns reward 1
    epochs: int = 1  # passes over the examples
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    learning_rate: float = 2e-5  # peak AdamW learning rate
    warmup_steps: int = 0  # linear warmup steps
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 2  # sequences per forward/backward; accumulation = batch / micro
    max_seq_len: int = 2048  # prompt + response tokens; longer examples are cut (and counted)
    normalize: Literal["batch_tokens", "constant"] = "batch_tokens"  # loss per token of the batch, or sum / constant
    normalize_constant: float = 1.0  # the constant when normalize = "constant"
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 0  # validate every this many optimizer steps (0: only at the end)
    n_eval_examples: int = 1024  # size of the fixed, seeded validation subset
    eval_seed: int = 1234  # seed of that subset and of validation sampling
    eval_max_tokens: int = 1024  # validation sampling: maximum new tokens
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    gradient_checkpointing: bool = False  # trade compute for activation memory
    logprob_chunk_size: int | None = 1024  # log-probs/entropy over this many positions at a time (None: full fp32 logits)
    length_grouping: bool = True  # sort each batch by length before micro-batching (less padding, same gradient)
    control: RunControl = field(default_factory=RunControl)  # checkpoints, resume, time budget, failures
    wandb_project: str = ""  # "" disables wandb
    run_name: str = ""  # wandb run name

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_sft_batching(self.batch_size, self.micro_batch_size)
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1 or null (all), got {self.n_examples}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


def sft_pairs(examples: list[Any], template: str) -> list[tuple[str, str, Any]]:
    """(prompt, response, ground_truth) for every example that has a reference response."""
    from ..data import format_prompt

    pairs = [(format_prompt(template, ex), ex.response, ex.ground_truth) for ex in examples if ex.response]
    if not pairs:
        raise ValueError("none of the training examples has a reference response; SFT needs (prompt, response) pairs")
    return pairs


def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run SFT as configured; returns the final validation metrics."""
    # ------------------------------------------------------------------ setup
    session = open_run(cfg, "SFT")
    run, sink, ckpt, latest, device = session.run, session.sink, session.ckpt, session.latest, session.device
    policy, tokenizer = load_policy(cfg.model, device, cfg.seed, cfg.gradient_checkpointing)
    pad_id = pad_token_id(tokenizer)  # pad, else EOS

    # ------------------------------------------------------------------ data
    data = load_data(cfg.data, cfg.seed)
    pairs = sft_pairs(data.train, data.template)
    n_available = len(pairs)
    if cfg.filter_correct:
        pairs = [p for p in pairs if data.reward_fn(p[1], p[2]).get("reward", 0.0) >= 1.0]
        run.logger.info("filter_correct: kept %d of %d examples whose response earns reward 1", len(pairs), n_available)
    random.Random(cfg.seed).shuffle(pairs)
    if cfg.n_examples is not None:
        if cfg.n_examples > len(pairs):
            run.logger.warning("n_examples=%d but only %d examples are available; using all", cfg.n_examples, len(pairs))
        pairs = pairs[: cfg.n_examples]
    encoded, n_cut = [], 0
    for prompt, response, _ in pairs:
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        r_ids = tokenizer.encode(response, add_special_tokens=False)
        if len(p_ids) + len(r_ids) > cfg.max_seq_len:
            r_ids = r_ids[: max(1, cfg.max_seq_len - len(p_ids))]
            n_cut += 1
        encoded.append((p_ids, r_ids))
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    val = data.val
    val_subset = random.Random(cfg.eval_seed).sample(val, min(cfg.n_eval_examples, len(val))) if val else []
    run.logger.info(
        "SFT: %d examples (%d available%s, %d cut to max_seq_len), %d epochs x %d steps, batch %d = %d x %d micro",
        len(encoded), n_available, ", filtered" if cfg.filter_correct else "", n_cut, cfg.epochs, steps_per_epoch,
        cfg.batch_size, cfg.gradient_accumulation_steps, cfg.micro_batch_size,
    )
    sink.log("data", 0, {"n_examples": len(encoded), "n_available": n_available, "n_cut": n_cut})

    optimizer = make_optimizer(policy, cfg.learning_rate, cfg.weight_decay, cfg.betas)
    generator = None
    eval_sampling = SamplingParams.r1_zero(max_tokens=cfg.eval_max_tokens, seed=cfg.eval_seed)

    def validate_now(step: int, examples: list[Any], tag: str) -> dict[str, Any]:
        nonlocal generator
        if not examples:
            return {}
        if generator is None:
            generator = NativeEngine(policy, tokenizer)
        else:
            generator.load_weights(policy)
        return validate(session, generator, policy, data, examples, eval_sampling, step, tag)

    # ------------------------------------------------------------------ resume
    step, train_clock, skipped = 0, 0.0, 0
    if latest is not None:
        state = ckpt.load(latest, policy, optimizer)
        step, train_clock, skipped = state["step"], state["train_clock"], state["skipped_steps"]
        truncate_metrics(run.metrics_path, state["metrics_bytes"])
        run.logger.info("resumed from %s: continuing after optimizer step %d", latest, step)

    def save_checkpoint() -> None:
        ckpt.save(step, policy, optimizer, {
            "step": step, "train_clock": train_clock, "skipped_steps": skipped,
            "metrics_bytes": run.metrics_path.stat().st_size if run.metrics_path.exists() else 0,
        })

    # ------------------------------------------------------------------ train
    budget = cfg.control.budget_seconds
    progress = Progress(total_steps, step, cfg.control.progress, "sft")
    clock_at_start = train_clock
    out_of_time = False
    # a resumed run that already finished its steps or its budget only validates
    first_epoch = cfg.epochs if step >= total_steps or budget_spent(budget, train_clock, run) else step // steps_per_epoch
    for epoch in range(first_epoch, cfg.epochs):
        order = list(range(len(encoded)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        for first in range((step % steps_per_epoch) * cfg.batch_size if epoch == step // steps_per_epoch else 0,
                           len(order), cfg.batch_size):
            t0 = time.perf_counter()
            batch = [encoded[i] for i in order[first : first + cfg.batch_size]]
            lr = lr_at(step, total_steps, cfg.learning_rate, cfg.warmup_steps, cfg.schedule)
            metrics = sft_optimizer_step(policy, optimizer, batch, cfg, lr, pad_id, device, step + 1)
            if metrics is None:
                skipped += 1
            step += 1
            seconds = time.perf_counter() - t0
            train_clock += seconds
            if metrics is not None:
                tokens = sum(len(p) + len(r) for p, r in batch)
                sink.log("train", step, {"epoch": epoch, **metrics, "tokens_per_second": tokens / seconds,
                                         "wall_clock_train": train_clock, "skipped_steps": skipped})
            eta = progress.update(step, train_clock - clock_at_start, loss=(metrics or {}).get("loss", float("nan")))
            if step % max(1, total_steps // 20) == 0 or step == total_steps:
                run.logger.info("step %d/%d: loss %.4f, lr %.2e, %s", step, total_steps,
                                (metrics or {}).get("loss", float("nan")), lr, eta)
            fault_point("step", step)
            out_of_time = budget is not None and train_clock >= budget
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and not out_of_time:
                validate_now(step, val_subset, "subset")
            if out_of_time or step == total_steps or (cfg.control.checkpoint_every and step % cfg.control.checkpoint_every == 0):
                save_checkpoint()
            if out_of_time:
                run.logger.info("time budget %s reached after %d steps", cfg.control.time_budget, step)
                break
            if step >= total_steps:
                break
        if out_of_time or step >= total_steps:
            break
    progress.close()

    # ------------------------------------------------------------------ validate and save
    final = validate_now(step, val_subset, "final")
    return finish_run(session, policy, tokenizer, final)


def sft_optimizer_step(
    policy: Any, optimizer: Any, batch: list[tuple[list[int], list[int]]], cfg: Any, lr: float, pad_id: int,
    device: torch.device, step: int,
) -> dict[str, float] | None:
    """One optimizer step of SFT on ``batch`` (prompt ids, response ids), micro-batched.

    ``cfg`` supplies micro_batch_size, normalize, normalize_constant, max_grad_norm and
    control.skip_nonfinite. With normalize="batch_tokens", each micro-batch divides its
    per-sequence sums by the batch's mean response length, so the summed loss is
    -(sum of response log-probs) / (response tokens in the batch).
    Returns the step's metrics, or None when a non-finite step was skipped.
    """
    set_lr(optimizer, lr)
    micro = cfg.micro_batch_size
    if cfg.length_grouping:
        batch = sorted(batch, key=lambda pr: len(pr[0]) + len(pr[1]))
    n_tokens = sum(len(r) for _, r in batch)
    constant = n_tokens / len(batch) if cfg.normalize == "batch_tokens" else cfg.normalize_constant
    loss_sum, entropy_sum = 0.0, 0.0
    for k in range(0, len(batch), micro):
        chunk = batch[k : k + micro]
        packed = pack_prompt_and_output_ids([p for p, _ in chunk], [r for _, r in chunk], pad_id)
        mask = packed["response_mask"].to(device)  # (b, T)
        with autocast(device):
            out = get_response_log_probs(
                policy, packed["input_ids"].to(device), packed["labels"].to(device), return_token_entropy=True,
                chunk_size=cfg.logprob_chunk_size, positions_mask=mask,
            )
        # each micro-batch weighs by its share of the batch's sequences
        loss, _ = sft_microbatch_train_step(out["log_probs"], mask, len(batch) / len(chunk), constant)
        loss_sum += loss.item()
        entropy_sum += (out["token_entropy"].detach() * mask).sum().item()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm).item()
    try:
        check_finite("loss", loss_sum, step)
        check_finite("gradient norm", grad_norm, step)
    except NonFiniteError:
        optimizer.zero_grad(set_to_none=True)
        if not cfg.control.skip_nonfinite:
            raise
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "grad_norm": grad_norm, "lr": lr, "token_entropy": entropy_sum / max(n_tokens, 1),
            "tokens": n_tokens}
