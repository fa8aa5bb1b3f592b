"""Expert iteration, as in the CS336 handout, in one loop.

Each EI step names its phases as calls:

  sample_rollouts
                 batch_questions questions (D_b), rollouts_per_question (G) responses each,
                 with the handout's rollout sampling (T=1, 4..1024 tokens, stop at </answer>)
  with_rewards   reward every response
  select_expert_responses
                 keep the responses that earn reward 1 (optionally one copy of each distinct one)
  expert_sft     sft_epochs (E) epochs of SFT on the kept pairs, from the current policy
                 (the optimizer persists across EI steps unless fresh_optimizer=true)
  load_weights   the generator gets the new weights
  end_of_step    log, validation after every step, checkpoints, time budget (``loop.py``)

Glossary: D_b questions, G responses per question, b sequences per micro-batch.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..checkpoint import RunControl
from ..data import Example, validation_subset
from ..distributed import ONE, DistContext, DistributedError, all_reduce, gather, padded_share, share, world_size
from ..evaluate import response_entropies
from ..generation import SamplingParams
from ..models import autocast
from ..rollouts import Rollout, sample_rollouts, with_rewards
from ..tokenization import pad_token_id
from ..trackers import check_trackers
from .common import (
    DataConfig,
    check_common_fields,
    check_fits,
    check_sft_batching,
    check_sft_world_size,
    load_data,
    load_policy_and_generator,
    make_optimizer,
    step_seed,
    timed,
)
from .loop import RunLoop
from .sft import TokenPair, sft_optimizer_step

__all__ = [
    "EIConfig",
    "expert_sft",
    "rollout_entropy",
    "select_expert_responses",
    "train_ei",
]


@dataclass
class EIConfig:
    """Expert iteration: sample, keep what the reward accepts, fine-tune on it, repeat."""

    model: str = ""  # policy to start from: a model directory or "tiny"
    out: str = "runs/ei"  # run directory
    seed: int = 0  # seeds question sampling, rollouts and shuffling
    data: DataConfig = field(default_factory=DataConfig)  # questions, prompt template, reward
    n_ei_steps: int = 5  # expert-iteration steps
    batch_questions: int = 512  # D_b: questions sampled per EI step (handout: 512, 1024, 2048)
    rollouts_per_question: int = 4  # G: responses sampled per question
    sampling_temperature: float = 1.0  # rollout sampling temperature
    sampling_min_tokens: int = 4  # rollouts have at least this many tokens
    sampling_max_tokens: int = 1024  # and at most this many
    dedupe_correct: bool = False  # keep one copy of each distinct correct response (the handout keeps every one)
    sft_epochs: int = 1  # E: SFT epochs over each step's kept responses
    fresh_optimizer: bool = False  # a new AdamW at every EI step (True) or one optimizer for the run
    learning_rate: float = 2e-5  # AdamW learning rate of the SFT phase (constant)
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 2  # sequences per forward/backward
    normalize: Literal["constant", "batch_tokens"] = "constant"  # SFT loss reduction (see SFTConfig): the handout's
    normalize_constant: float = 1.0  # the constant when normalize = "constant"
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    max_grad_norm: float = 1.0  # gradient clipping
    log_entropy: bool = True  # compute the mean token entropy of each step's rollouts (one forward pass)
    eval_at_start: bool = False  # also validate the starting policy (step 0): curves start there
    n_eval_examples: int = 1024  # validation subset, evaluated after every EI step
    eval_seed: int = 1234  # seed of that subset and of validation sampling
    eval_n_samples: int = 1  # responses per validation question (> 1: pass@k for every k <= it, and maj@k)
    final_eval_full: bool = True  # validate on the whole validation set at the end
    device: str = "auto"  # policy device
    gradient_checkpointing: bool = False  # trade compute for activation memory
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel (flash: flash-attn installed)
    use_liger_kernel: bool = False  # Liger's fused RoPE, RMSNorm and SwiGLU in the policy (GPU; liger-kernel installed)
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the final model/ ("auto": bf16 on GPU, else fp32)
    logprob_chunk_size: int | None = 1024  # log-probs/entropy over this many positions at a time (None: full fp32 logits)
    length_grouping: bool = True  # sort each SFT batch by length before micro-batching
    backend: Literal["native", "vllm", "auto"] = "native"  # native, vllm (CUDA, optional extra) or auto (vLLM where it runs)
    max_num_seqs: int = 256  # native generator: sequences decoded together
    kv_cache_memory_fraction: float = 0.3  # native generator: share of free GPU memory for the KV cache
    gpu_memory_utilization: float = 0.85  # vLLM generator: share of its GPU's memory
    control: RunControl = field(default_factory=RunControl)  # checkpoints (one per EI step when set), resume, budget
    wandb_project: str = ""  # wandb's project ("" disables wandb unless trackers lists it); also trackio's
    run_name: str = ""  # the run's name in wandb and trackio ("": theirs)
    trackers: list[str] = field(
        default_factory=lambda: ["jsonl"])  # metrics go to: jsonl (always on, listed or not), wandb, trackio, tensorboard

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_common_fields(self)
        check_trackers(self.trackers, installed=False)  # unknown or repeated names; packages: when the run starts
        check_sft_batching(self.batch_size, self.micro_batch_size)
        for name in ("n_ei_steps", "batch_questions", "rollouts_per_question", "sft_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sampling_min_tokens <= self.sampling_max_tokens:
            raise ValueError("sampling_min_tokens must be between 0 and sampling_max_tokens")


def train_ei(cfg: EIConfig) -> dict[str, Any]:
    """Run expert iteration as configured; returns the final validation metrics."""
    # ------------------------------------------------------------------ setup
    data = load_data(cfg.data, cfg.seed)  # bad data is refused before the run directory exists
    check_fits(cfg.model, data.template, data.train + data.val, new_tokens=cfg.sampling_max_tokens,
               new_tokens_field="sampling_max_tokens")  # an over-long prompt is refused now, not mid-run
    n_questions = min(cfg.batch_questions, len(data.train))
    check_sft_world_size(cfg.batch_size, cfg.micro_batch_size, world_size())  # several processes: refused now
    if n_questions % world_size():
        raise DistributedError(f"batch_questions: {n_questions} questions per step do not split over {world_size()} "
                               f"processes; make it a multiple of {world_size()} or start fewer processes")
    with RunLoop(cfg, "EI") as loop:  # the run directory is locked until the end
        device, ctx = loop.device, loop.ctx
        val_subset = validation_subset(data.val, cfg.n_eval_examples, cfg.eval_seed)
        policy, tokenizer, optimizer, generator = load_policy_and_generator(cfg, device=device, generator_device=device,
                                                                            ctx=ctx)  # several processes: sharded
        pad_id = pad_token_id(tokenizer)  # pad, else EOS
        # a fresh optimizer per step is not checkpointed
        loop.attach(policy, None if cfg.fresh_optimizer else optimizer, tokenizer=tokenizer, generator=generator)
        rollout_sampling = SamplingParams.r1_zero(  # stop at </answer> and keep it
            temperature=cfg.sampling_temperature, max_tokens=cfg.sampling_max_tokens, min_tokens=cfg.sampling_min_tokens,
            n=cfg.rollouts_per_question,
        )
        eval_sampling = SamplingParams.r1_zero(max_tokens=cfg.sampling_max_tokens, seed=cfg.eval_seed, n=cfg.eval_n_samples)
        loop.logger.info(
            "EI: %d steps, %d questions x %d rollouts, %d SFT epoch(s) per step, %s optimizer, duplicates %s",
            cfg.n_ei_steps, n_questions, cfg.rollouts_per_question, cfg.sft_epochs,
            "fresh" if cfg.fresh_optimizer else "persistent", "dropped" if cfg.dedupe_correct else "kept",
        )

        def validate(step: int, examples: list[Example] = val_subset, tag: str = "subset") -> dict[str, Any]:
            return loop.validate(generator, policy, data=data, examples=examples, sampling=eval_sampling, step=step, tag=tag)

        if cfg.eval_at_start and loop.state.step == 0:
            validate(0)

        n_final = len(data.val) if cfg.final_eval_full else len(val_subset)  # the final validation's size
        for ei_step in loop.steps(cfg.n_ei_steps, eval_every=1, evaluate=validate, final_examples=n_final):
            questions = random.Random(step_seed(cfg.seed, ei_step)).sample(data.train, n_questions)
            mine = share(questions, ctx)  # every rank samples its share of the questions (all of them in one process)
            sampling = dataclasses.replace(rollout_sampling, seed=step_seed(cfg.seed, ei_step, 1),
                                           prompt_offset=ctx.rank * len(mine))  # streams keyed on the global question index
            rollouts, rollout_seconds = timed(
                sample_rollouts, generator=generator, policy=policy, questions=mine, template=data.template,
                sampling=sampling, colocated_device=device,
            )
            with loop.grading() as grader:  # timeouts count as wrong answers: logged, never fatal
                rollouts = gather(with_rewards(rollouts, data.reward_fn), ctx)  # graded where sampled; every rank gets all
            kept = select_expert_responses(rollouts, cfg.dedupe_correct)  # the same on every rank: each trains on a share
            entropy = rollout_entropy(policy, rollouts, pad_id=pad_id, ctx=ctx) if cfg.log_entropy else None
            if cfg.fresh_optimizer:
                optimizer = make_optimizer(policy, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=cfg.betas)
            losses, sft_seconds = timed(
                expert_sft, policy=policy, optimizer=optimizer, kept=kept, cfg=cfg, loop=loop, ei_step=ei_step, pad_id=pad_id
            )
            generator.load_weights(policy)
            # ------------------------------------------------------------------ log, end of step
            seconds = all_reduce({"rollout": rollout_seconds, "sft": sft_seconds}, ctx, op="max")  # the slowest rank's
            loop.sink.log("ei", ei_step + 1, {
                "rollouts": len(rollouts),
                "n_correct": sum(r.reward >= 1.0 for r in rollouts),
                "n_kept": len(kept),
                "rollout_reward_mean": sum(r.reward for r in rollouts) / len(rollouts),
                "rollout_entropy": entropy,
                "sft_loss_mean": sum(losses) / len(losses) if losses else None,
                "optimizer_steps": loop.state.optimizer_step,
                "rollout_seconds": seconds["rollout"],
                "sft_seconds": seconds["sft"],
                "wall_clock_train": loop.stop_clock(),
                "grader_timeouts": grader.timeouts,
                "grader_errors": grader.errors,
            })
            loop.end_of_step(f"kept {len(kept)} of {len(rollouts)} rollouts", kept=len(kept))
        final = validate(loop.state.step, data.val, "full") if cfg.final_eval_full else validate(loop.state.step)
        return loop.finish(policy, tokenizer, final)


# ---------------------------------------------------------------------------------------
# The phases
# ---------------------------------------------------------------------------------------


def select_expert_responses(rollouts: Sequence[Rollout], dedupe: bool) -> list[TokenPair]:
    """(prompt ids, response ids) of every rollout with reward 1, in order; with ``dedupe``,
    each distinct response of a question (a group) once."""
    kept, seen = [], set()
    for r in rollouts:
        key = (r.group, tuple(r.response_token_ids))
        if r.reward >= 1.0 and not (dedupe and key in seen):
            seen.add(key)
            kept.append((list(r.prompt_token_ids), list(r.response_token_ids)))
    return kept


def rollout_entropy(policy: torch.nn.Module, rollouts: Sequence[Rollout], *, pad_id: int, ctx: DistContext = ONE) -> float:
    """Mean over rollouts of each response's mean next-token entropy under ``policy`` (nats).
    Several processes: each rank scores its share (as many forward passes on every rank)."""
    mine, n_real = padded_share(rollouts, ctx)
    with autocast(next(policy.parameters()).device):
        entropies = response_entropies(
            policy, [r.prompt_token_ids for r in mine], [r.response_token_ids for r in mine], pad_id=pad_id
        )
    entropies = gather(entropies[:n_real], ctx)
    return sum(entropies) / len(entropies)


def expert_sft(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    kept: Sequence[TokenPair],
    cfg: EIConfig,
    *,
    loop: RunLoop,
    ei_step: int,
    pad_id: int,
) -> list[float]:
    """SFT phase: ``sft_epochs`` epochs over the kept pairs, shuffled per epoch with a seed of
    the step; a train record per optimizer step. Returns the losses of the steps taken."""
    losses = []
    for epoch in range(cfg.sft_epochs):
        order = list(range(len(kept)))
        random.Random(step_seed(cfg.seed, ei_step, 2, epoch)).shuffle(order)  # the step seed of (step, phase 2, epoch)
        for first in range(0, len(order), cfg.batch_size):
            batch = [kept[i] for i in order[first : first + cfg.batch_size]]
            metrics = sft_optimizer_step(
                policy, optimizer, batch, cfg=cfg, lr=cfg.learning_rate, pad_id=pad_id,
                step=loop.state.optimizer_step + 1, on_nonfinite=loop.nonfinite, ctx=loop.ctx,  # a share of it on each rank
            )
            loop.state.optimizer_step += 1
            if metrics is not None:
                losses.append(metrics["loss"])
                loop.sink.log("train", loop.state.optimizer_step, {"ei_step": ei_step, "epoch": epoch, **metrics})
    return losses
