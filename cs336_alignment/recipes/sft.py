"""Supervised fine-tuning on (prompt, response) pairs, as in the CS336 handout, in one loop.

  sft_examples       prompts and reference responses (sft.jsonl, or a built-in task's traces),
                     optionally only those whose response earns reward 1, optionally the first N,
                     tokenised and cut to max_seq_len
  sft_optimizer_step one optimizer step per batch of a shuffled epoch: gradient accumulation over
                     micro-batches, clipping, AdamW (warmup + cosine optional)
  end_of_step        validation every eval_every steps, checkpoints, time budget (``loop.py``)
  finish             the final model and tokenizer (save_pretrained) in <out>/model

Glossary: b sequences per micro-batch, T positions after the one-token shift.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import NonFiniteError, RunControl
from ..config import ConfigError
from ..data import Example, format_prompt, load_examples, validation_subset
from ..distributed import ONE, DistContext, all_reduce, padded_share, world_size
from ..generation import SamplingParams
from ..logprobs import get_response_log_probs
from ..losses import sft_microbatch_train_step
from ..models import autocast, resolve_device
from ..tokenization import pack_prompt_and_output_ids, pad_token_id
from ..trackers import check_trackers
from .common import (
    DataConfig,
    LoadedData,
    check_common_fields,
    check_fits,
    check_sft_batching,
    check_sft_world_size,
    clip_and_step,
    load_data,
    load_policy_and_generator,
    lr_at,
    set_lr,
    timed,
)
from .loop import RunLoop

__all__ = [
    "SFTConfig",
    "SFTExamples",
    "sft_examples",
    "sft_optimizer_step",
    "sft_pairs",
    "train_sft",
    "with_answers",
]


TokenPair = tuple[list[int], list[int]]  # (prompt ids, response ids)
LOSS_NORMALIZATION = {  # how each SFT loss reduction reads in the run's log
    "constant": "per sequence: summed NLL / normalize_constant, mean over the batch (the handout's)",
    "batch_tokens": "per response token of the batch",
}


@dataclass
class SFTConfig:
    """Supervised fine-tuning on reasoning traces."""

    model: str = ""  # model directory to start from, or "tiny"
    out: str = "runs/sft"  # run directory; the trained model goes to <out>/model
    seed: int = 0  # seeds shuffling, example selection, sampling
    data: DataConfig = field(default_factory=DataConfig)  # examples with reference responses
    n_examples: int | None = None  # use this many unique examples (128, 256, 512, 1024; None = all)
    filter_correct: bool = False  # keep only examples whose reference response earns reward 1
    answers: str = ""  # JSONL whose questions give the answers of traces without ground_truth (filter_correct);
    # "" = train.jsonl beside data.train
    epochs: int = 1  # passes over the examples
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    learning_rate: float = 2e-5  # peak AdamW learning rate
    warmup_steps: int = 0  # linear warmup steps
    warmup_ratio: float = 0.0  # or: linear warmup over this fraction of the run's optimizer steps (set one of the two)
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 2  # sequences per forward/backward; accumulation = batch / micro
    max_seq_len: int = 2048  # prompt + response tokens; longer examples are cut (and counted)
    normalize: Literal["constant", "batch_tokens"] = "constant"  # the handout's: each sequence's summed NLL /
    # normalize_constant, mean over the batch; or batch_tokens: per response token of the batch
    normalize_constant: float = 1.0  # the constant when normalize = "constant"
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 0  # validate every this many optimizer steps (0: only at the end)
    eval_at_start: bool = False  # also validate the starting policy (step 0): curves start there
    n_eval_examples: int = 1024  # size of the fixed, seeded validation subset
    final_eval_full: bool = True  # validate on the whole validation set after the last step
    eval_seed: int = 1234  # seed of that subset and of validation sampling
    eval_n_samples: int = 1  # responses per validation question (> 1: pass@k for every k <= it, and maj@k)
    eval_max_tokens: int = 1024  # validation sampling: maximum new tokens
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    generator_device: str = "same"  # validation generator: "same" device as the policy, or its own ("cuda:1")
    backend: Literal["native", "vllm", "auto"] = "native"  # validation generation: native, vllm, or auto (vLLM where it runs)
    max_num_seqs: int = 256  # native generator: sequences decoded together
    kv_cache_memory_fraction: float = 0.3  # native generator: share of free GPU memory for the KV cache
    gpu_memory_utilization: float = 0.85  # vLLM generator: share of its GPU's memory
    gradient_checkpointing: bool = False  # trade compute for activation memory
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel (flash: flash-attn installed)
    use_liger_kernel: bool = False  # Liger's fused RoPE, RMSNorm and SwiGLU in the policy (GPU; liger-kernel installed)
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the final model/ ("auto": bf16 on GPU, else fp32)
    logprob_chunk_size: int | None = 1024  # log-probs/entropy over this many positions at a time (None: full fp32 logits)
    length_grouping: bool = True  # sort each batch by length before micro-batching (less padding, same gradient)
    control: RunControl = field(default_factory=RunControl)  # checkpoints, resume, time budget, failures
    wandb_project: str = ""  # wandb's project ("" disables wandb unless trackers lists it); also trackio's
    run_name: str = ""  # the run's name in wandb and trackio ("": theirs)
    trackers: list[str] = field(
        default_factory=lambda: ["jsonl"])  # metrics go to: jsonl (always on, listed or not), wandb, trackio, tensorboard

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_common_fields(self)
        check_trackers(self.trackers, installed=False)  # unknown or repeated names; packages: when the run starts
        check_sft_batching(self.batch_size, self.micro_batch_size)
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1 or null (all), got {self.n_examples}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} both set; set one of them")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps`` optimizer steps: ``warmup_steps``, or
        ``round(warmup_ratio * total_steps)``."""
        return self.warmup_steps or round(self.warmup_ratio * total_steps)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run SFT as configured; returns the final validation metrics."""
    # ------------------------------------------------------------------ setup
    data = load_data(cfg.data, cfg.seed)  # bad data is refused before the run directory exists
    if not any(ex.response for ex in data.train):
        raise ConfigError(f"field 'data.train': no example in {cfg.data.train} has a reference response; SFT needs "
                          "(prompt, response) pairs, e.g. sft.jsonl")
    unmatched = 0
    if cfg.filter_correct and any(ex.ground_truth is None for ex in data.train):
        data, unmatched = with_answers(data, cfg.answers or str(Path(cfg.data.train).with_name("train.jsonl")))
    check_fits(cfg.model, data.template, data.train, with_response=True)  # an over-long example: refused now
    check_fits(cfg.model, data.template, data.val, new_tokens=cfg.eval_max_tokens, new_tokens_field="eval_max_tokens")
    check_sft_world_size(cfg.batch_size, cfg.micro_batch_size, world_size())  # several processes: refused now
    with RunLoop(cfg, "SFT") as loop:  # the run directory is locked until the end
        gen_device = loop.device if cfg.generator_device == "same" else resolve_device(cfg.generator_device)
        policy, tokenizer, optimizer, generator = load_policy_and_generator(cfg, device=loop.device,
                                                                            generator_device=gen_device, ctx=loop.ctx)
        pad_id = pad_token_id(tokenizer)  # pad, else EOS
        if unmatched:
            loop.logger.warning("filter_correct: %d traces have no ground_truth and their question is not in %s; dropped "
                                "(add ground_truth to those lines, or name the file with their answers in answers=...)",
                                unmatched, cfg.answers or Path(cfg.data.train).with_name("train.jsonl"))
        examples = sft_examples(data, tokenizer, cfg, logger=loop.logger)
        steps_per_epoch = math.ceil(len(examples.pairs) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(steps_per_epoch * cfg.epochs, cfg.max_steps)
        val_subset = validation_subset(data.val, cfg.n_eval_examples, cfg.eval_seed)
        loop.logger.info(
            "SFT: %d examples (%d available%s, %d cut to max_seq_len), %d epochs x %d steps, batch %d = %d x %d micro, "
            "loss %s", len(examples.pairs), examples.n_available, ", filtered" if cfg.filter_correct else "", examples.n_cut,
            cfg.epochs, steps_per_epoch, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.micro_batch_size,
            LOSS_NORMALIZATION[cfg.normalize],
        )
        loop.attach(policy, optimizer, tokenizer=tokenizer)
        if not loop.resuming:
            loop.sink.log("data", 0, {"n_examples": len(examples.pairs), "n_available": examples.n_available,
                                      "n_cut": examples.n_cut, "loss_normalization": cfg.normalize})
        eval_sampling = SamplingParams.r1_zero(max_tokens=cfg.eval_max_tokens, seed=cfg.eval_seed, n=cfg.eval_n_samples)

        def validate(step: int, examples: list[Example] = val_subset, tag: str = "subset") -> dict[str, Any]:
            if not examples:
                return {}
            generator.load_weights(policy)  # the generator holds its own copy: give it this step's weights
            return loop.validate(generator, policy, data=data, examples=examples, sampling=eval_sampling, step=step, tag=tag)

        if cfg.eval_at_start and loop.state.step == 0:
            validate(0)

        @functools.lru_cache(maxsize=1)
        def epoch_order(epoch: int) -> list[int]:
            order = list(range(len(examples.pairs)))
            random.Random(cfg.seed * 1000 + epoch).shuffle(order)
            return order

        # ------------------------------------------------------------------ train
        n_final = len(data.val) if cfg.final_eval_full else len(val_subset)  # the final validation's size
        for step in loop.steps(total_steps, eval_every=cfg.eval_every, evaluate=validate, final_examples=n_final):
            epoch, position = divmod(step, steps_per_epoch)
            batch = [examples.pairs[i] for i in epoch_order(epoch)[position * cfg.batch_size : (position + 1) * cfg.batch_size]]
            lr = lr_at(step, total=total_steps, base=cfg.learning_rate, warmup=cfg.warmup_for(total_steps), schedule=cfg.schedule)
            metrics, seconds = timed(
                sft_optimizer_step, policy=policy, optimizer=optimizer, batch=batch, cfg=cfg, lr=lr, pad_id=pad_id,
                step=step + 1, on_nonfinite=loop.nonfinite, ctx=loop.ctx,  # several processes: a share of the micro-batches each
            )
            loop.state.optimizer_step += 1
            if metrics is not None:
                tokens = sum(len(p) + len(r) for p, r in batch)
                loop.sink.log("train", step + 1, {
                    "epoch": epoch, **metrics, "tokens_per_second": tokens / seconds,
                    "wall_clock_train": loop.stop_clock(), "skipped_steps": loop.state.skipped_steps,
                })
            loss = (metrics or {}).get("loss", float("nan"))
            log = (step + 1) % max(1, total_steps // 20) == 0 or step + 1 == total_steps  # about 20 log lines a run
            loop.end_of_step(f"loss {loss:.4f}, lr {lr:.2e}", log=log, loss=loss)
        # ------------------------------------------------------------------ validate and save
        final = validate(loop.state.step, data.val, "full") if cfg.final_eval_full else validate(loop.state.step, tag="final")
        return loop.finish(policy, tokenizer, final)


def with_answers(data: LoadedData, answers: str) -> tuple[LoadedData, int]:
    """``data`` whose training traces without ground_truth take it from the example of ``answers``
    (e.g. MATH train.jsonl) with the same question; returns it and how many traces found none
    (they are dropped). A missing ``answers`` file: ConfigError."""
    if not Path(answers).is_file():
        raise ConfigError(f"field 'answers': no such file {answers}; filter_correct needs each trace's answer: add "
                          "ground_truth to the sft.jsonl lines, or name a JSONL with their questions and answers")
    known = {ex.question.strip(): ex.ground_truth for ex in load_examples(answers)}
    train, unmatched = [], 0
    for ex in data.train:
        truth = ex.ground_truth if ex.ground_truth is not None else known.get(ex.question.strip())
        if truth is None:
            unmatched += 1
        else:
            train.append(dataclasses.replace(ex, ground_truth=truth))
    return dataclasses.replace(data, train=train), unmatched


@dataclass
class SFTExamples:
    """The tokenised training pairs of an SFT run, and how they were chosen."""

    pairs: list[TokenPair]  # (prompt ids, response ids), in the seeded order of selection
    n_available: int  # examples with a reference response before filtering
    n_cut: int  # examples cut to max_seq_len


def sft_pairs(examples: Sequence[Example], template: str) -> list[tuple[str, str, Any]]:
    """(prompt, response, ground_truth) for every example that has a reference response."""
    pairs = [(format_prompt(template, ex), ex.response, ex.ground_truth) for ex in examples if ex.response]
    if not pairs:
        raise ValueError("none of the training examples has a reference response; SFT needs (prompt, response) pairs")
    return pairs


def sft_examples(data: LoadedData, tokenizer: Any, cfg: SFTConfig, *, logger: Any) -> SFTExamples:
    """The examples phase: reference pairs, filtered to reward 1 (``filter_correct``), shuffled
    with the run seed, the first ``n_examples``, tokenised; responses cut to ``max_seq_len``."""
    pairs = sft_pairs(data.train, data.template)
    n_available = len(pairs)
    if cfg.filter_correct:
        pairs = [p for p in pairs if data.reward_fn(p[1], p[2]).get("reward", 0.0) >= 1.0]
        logger.info("filter_correct: kept %d of %d examples whose response earns reward 1", len(pairs), n_available)
    random.Random(cfg.seed).shuffle(pairs)
    if cfg.n_examples is not None:
        if cfg.n_examples > len(pairs):
            logger.warning("n_examples=%d but only %d examples are available; using all", cfg.n_examples, len(pairs))
        pairs = pairs[: cfg.n_examples]
    encoded, n_cut = [], 0
    for prompt, response, _ in pairs:
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        r_ids = tokenizer.encode(response, add_special_tokens=False)
        if len(p_ids) + len(r_ids) > cfg.max_seq_len:
            r_ids = r_ids[: max(1, cfg.max_seq_len - len(p_ids))]
            n_cut += 1
        encoded.append((p_ids, r_ids))
    return SFTExamples(pairs=encoded, n_available=n_available, n_cut=n_cut)


def sft_optimizer_step(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Sequence[TokenPair],
    *,
    cfg: Any,
    lr: float,
    pad_id: int,
    step: int,
    on_nonfinite: Callable[[NonFiniteError], None],
    ctx: DistContext = ONE,
) -> dict[str, float] | None:
    """One optimizer step of SFT on ``batch`` (prompt ids, response ids), micro-batched.

    ``cfg`` (an SFTConfig or EIConfig) supplies micro_batch_size, normalize, normalize_constant,
    max_grad_norm, logprob_chunk_size and length_grouping. With normalize="batch_tokens", each
    micro-batch divides its per-sequence sums by the batch's mean response length, so the
    summed loss is

        loss = -(sum of response-token log-probs in the batch) / (response tokens in the batch)

    Several processes (``ctx``): each rank runs its share of the micro-batches, normalised as in
    one process (FSDP sums the gradients); a rank with fewer real ones (the short last batch of
    an epoch) runs repeats weighted 0, so that all run as many forward/backward passes.

    Returns the step's metrics, or None when a non-finite step was skipped (``on_nonfinite``).
    """
    device = next(policy.parameters()).device
    set_lr(optimizer, lr)
    if cfg.length_grouping:
        batch = sorted(batch, key=lambda pr: len(pr[0]) + len(pr[1]))
    n_tokens = sum(len(r) for _, r in batch)  # the whole batch's
    constant = n_tokens / len(batch) if cfg.normalize == "batch_tokens" else cfg.normalize_constant
    chunks = [batch[k : k + cfg.micro_batch_size] for k in range(0, len(batch), cfg.micro_batch_size)]
    mine, n_real = padded_share(chunks, ctx)  # all of them in one process
    loss_sum, entropy_sum = 0.0, 0.0
    for i, chunk in enumerate(mine):
        packed = pack_prompt_and_output_ids([p for p, _ in chunk], [r for _, r in chunk], pad_id)
        mask = packed["response_mask"].to(device)  # (b, T)
        with autocast(device):
            out = get_response_log_probs(
                policy, packed["input_ids"].to(device), packed["labels"].to(device), return_token_entropy=True,
                chunk_size=cfg.logprob_chunk_size, positions_mask=mask,
            )
        # each micro-batch weighs by its share of the batch's sequences
        mask = mask if i < n_real else torch.zeros_like(mask)  # a repeat only keeps the ranks in step: no loss, no gradient
        loss, _ = sft_microbatch_train_step(
            out["log_probs"], mask, gradient_accumulation_steps=len(batch) / len(chunk), normalize_constant=constant
        )
        loss_sum += loss.item()
        entropy_sum += (out["token_entropy"].detach() * mask).sum().item()
    loss_sum, entropy_sum = all_reduce({"loss": loss_sum, "entropy": entropy_sum}, ctx, op="sum").values()
    grad_norm = clip_and_step(policy, optimizer, max_grad_norm=cfg.max_grad_norm, loss=loss_sum, step=step,
                              on_nonfinite=on_nonfinite)
    if grad_norm is None:
        return None
    return {"loss": loss_sum, "grad_norm": grad_norm, "lr": lr, "token_entropy": entropy_sum / max(n_tokens, 1),
            "tokens": n_tokens}
