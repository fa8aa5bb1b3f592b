"""Expert iteration, as in the CS336 handout, in one loop.

Each EI step:
  rollout   sample batch_questions questions (D_b), rollouts_per_question (G) responses each,
            with the rollout sampling of the handout (T=1, 4..1024 tokens, stop at </answer>)
  filter    keep the responses that earn reward 1 (optionally one copy of each distinct one)
  sft       sft_epochs (E) epochs of SFT on the kept pairs, starting from the current policy
            (the optimizer persists across EI steps unless fresh_optimizer=true)
  sync      load the new weights into the generator
  log       rollout entropy, number kept, validation accuracy at every step

Glossary: D_b questions, G responses per question, b sequences per micro-batch.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ..checkpoint import (
    Progress,
    RunControl,
    budget_spent,
    fault_point,
    format_seconds,
    truncate_metrics,
)
from ..evaluate import response_entropies
from ..generation import SamplingParams
from ..tokenization import pad_token_id
from .common import (
    DataConfig,
    autocast,
    check_sft_batching,
    finish_run,
    free_cuda_cache,
    grader_counts,
    grader_delta,
    load_data,
    load_policy,
    make_generator,
    make_optimizer,
    open_run,
    step_seed,
    validate,
)
from .sft import sft_optimizer_step


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
    dedupe_correct: bool = True  # keep one copy of each distinct correct response per question
    sft_epochs: int = 1  # E: SFT epochs over each step's kept responses
    fresh_optimizer: bool = False  # a new AdamW at every EI step (True) or one optimizer for the run
    learning_rate: float = 2e-5  # AdamW learning rate of the SFT phase (constant)
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 2  # sequences per forward/backward
    normalize: Literal["batch_tokens", "constant"] = "batch_tokens"  # SFT loss normalisation (see sft.py)
    normalize_constant: float = 1.0  # the constant when normalize = "constant"
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    max_grad_norm: float = 1.0  # gradient clipping
    log_entropy: bool = True  # compute the mean token entropy of each step's rollouts (one forward pass)
    n_eval_examples: int = 1024  # validation subset, evaluated after every EI step
    eval_seed: int = 1234  # seed of that subset and of validation sampling
    final_eval_full: bool = True  # validate on the whole validation set at the end
    device: str = "auto"  # policy device
    gradient_checkpointing: bool = False  # trade compute for activation memory
    logprob_chunk_size: int | None = 1024  # log-probs/entropy over this many positions at a time (None: full fp32 logits)
    length_grouping: bool = True  # sort each SFT batch by length before micro-batching
    backend: Literal["native", "vllm"] = "native"  # generation backend: our engine, or vLLM (CUDA, optional extra)
    max_num_seqs: int = 256  # native generator: sequences decoded together
    kv_cache_memory_fraction: float = 0.3  # native generator: share of free GPU memory for the KV cache
    gpu_memory_utilization: float = 0.85  # vLLM generator: share of its GPU's memory
    control: RunControl = field(default_factory=RunControl)  # checkpoints (one per EI step when set), resume, budget
    wandb_project: str = ""  # "" disables wandb
    run_name: str = ""  # wandb run name

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_sft_batching(self.batch_size, self.micro_batch_size)
        for name in ("n_ei_steps", "batch_questions", "rollouts_per_question", "sft_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sampling_min_tokens <= self.sampling_max_tokens:
            raise ValueError("sampling_min_tokens must be between 0 and sampling_max_tokens")


def select_expert_responses(
    results: list[Any], rewards: list[list[float]], dedupe: bool
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of every response with reward 1; with ``dedupe``, each distinct
    response of a question once. ``rewards[q][s]`` is the reward of sample s of question q."""
    kept = []
    for result, question_rewards in zip(results, rewards):
        seen: set[tuple[int, ...]] = set()
        for completion, reward in zip(result.completions, question_rewards):
            key = tuple(completion.token_ids)
            if reward >= 1.0 and not (dedupe and key in seen):
                seen.add(key)
                kept.append((list(result.prompt_token_ids), list(completion.token_ids)))
    return kept


def train_ei(cfg: EIConfig) -> dict[str, Any]:
    """Run expert iteration as configured; returns the final validation metrics."""
    # ------------------------------------------------------------------ setup
    session = open_run(cfg, "expert iteration")
    run, sink, ckpt, latest, device = session.run, session.sink, session.ckpt, session.latest, session.device
    data = load_data(cfg.data, cfg.seed)
    val = data.val or data.train
    val_subset = random.Random(cfg.eval_seed).sample(val, min(cfg.n_eval_examples, len(val)))
    policy, tokenizer = load_policy(cfg.model, device, cfg.seed, cfg.gradient_checkpointing)
    pad_id = pad_token_id(tokenizer)  # pad, else EOS
    optimizer = make_optimizer(policy, cfg.learning_rate, cfg.weight_decay, cfg.betas)
    generator = make_generator(
        cfg.backend, policy, tokenizer, cfg.model, device, cfg.seed, cfg.max_num_seqs, cfg.kv_cache_memory_fraction,
        cfg.gpu_memory_utilization,
    )
    rollout_sampling = SamplingParams(
        temperature=cfg.sampling_temperature, max_tokens=cfg.sampling_max_tokens, min_tokens=cfg.sampling_min_tokens,
        stop=("</answer>",), include_stop_str_in_output=True, n=cfg.rollouts_per_question,
    )
    eval_sampling = SamplingParams.r1_zero(max_tokens=cfg.sampling_max_tokens, seed=cfg.eval_seed)
    n_questions = min(cfg.batch_questions, len(data.train))
    run.logger.info(
        "EI: %d steps, %d questions x %d rollouts, %d SFT epoch(s) per step, %s optimizer, duplicates %s",
        cfg.n_ei_steps, n_questions, cfg.rollouts_per_question, cfg.sft_epochs,
        "fresh" if cfg.fresh_optimizer else "persistent", "dropped" if cfg.dedupe_correct else "kept",
    )

    def validate_now(step: int, examples: list[Any], tag: str) -> dict[str, Any]:
        return validate(session, generator, policy, data, examples, eval_sampling, step, tag)

    # ------------------------------------------------------------------ resume
    start, optimizer_step, train_clock = 0, 0, 0.0
    if latest is not None:
        state = ckpt.load(latest, policy, None if cfg.fresh_optimizer else optimizer)
        start, optimizer_step, train_clock = state["next_step"], state["optimizer_step"], state["train_clock"]
        truncate_metrics(run.metrics_path, state["metrics_bytes"])
        generator.load_weights(policy)
        run.logger.info("resumed from %s: continuing at EI step %d", latest, start + 1)

    budget = cfg.control.budget_seconds
    progress = Progress(cfg.n_ei_steps, start, cfg.control.progress, "ei")
    clock_at_start = train_clock
    final: dict[str, Any] = {}
    last_step = start
    if budget_spent(budget, train_clock, run):  # a resumed run whose budget ran out only validates
        start = cfg.n_ei_steps
    for ei_step in range(start, cfg.n_ei_steps):
        step_start = time.perf_counter()
        # ------------------------------------------------------------------ rollout
        from ..data import format_prompt

        questions = random.Random(step_seed(cfg.seed, ei_step)).sample(data.train, n_questions)
        prompts = [format_prompt(data.template, ex) for ex in questions]
        t0 = time.perf_counter()
        policy.eval()
        results = generator.generate(prompts, dataclasses.replace(rollout_sampling, seed=step_seed(cfg.seed, ei_step, 1)))
        policy.train()
        free_cuda_cache(device)
        rollout_seconds = time.perf_counter() - t0

        # ------------------------------------------------------------------ filter
        graded_before = grader_counts()
        rewards = [[float(data.reward_fn(c.text, q.ground_truth)["reward"]) for c in r.completions] for q, r in zip(questions, results)]
        grader = grader_delta(graded_before)  # timeouts count as wrong answers; logged, never fatal
        kept = select_expert_responses(results, rewards, cfg.dedupe_correct)
        n_rollouts = sum(len(r) for r in rewards)
        entropy = None
        if cfg.log_entropy:
            pairs = [(r.prompt_token_ids, c.token_ids) for r in results for c in r.completions]
            with autocast(device):
                ents = response_entropies(policy, [p for p, _ in pairs], [c for _, c in pairs], pad_id)
            entropy = sum(ents) / len(ents)

        # ------------------------------------------------------------------ sft on the kept responses
        t0 = time.perf_counter()
        if cfg.fresh_optimizer and ei_step > start:
            optimizer = make_optimizer(policy, cfg.learning_rate, cfg.weight_decay, cfg.betas)
        losses = []
        for epoch in range(cfg.sft_epochs):
            order = list(range(len(kept)))
            random.Random(step_seed(cfg.seed, ei_step, 2, epoch)).shuffle(order)
            for first in range(0, len(order), cfg.batch_size):
                batch = [kept[i] for i in order[first : first + cfg.batch_size]]
                metrics = sft_optimizer_step(policy, optimizer, batch, cfg, cfg.learning_rate, pad_id, device, optimizer_step + 1)
                optimizer_step += 1
                if metrics is not None:
                    losses.append(metrics["loss"])
                    sink.log("train", optimizer_step, {"ei_step": ei_step, "epoch": epoch, **metrics})
        sft_seconds = time.perf_counter() - t0

        # ------------------------------------------------------------------ sync and log
        generator.load_weights(policy)
        train_clock += time.perf_counter() - step_start
        last_step = ei_step + 1
        sink.log("ei", last_step, {
            "rollouts": n_rollouts,
            "n_correct": int(sum(sum(r >= 1.0 for r in q) for q in rewards)),
            "n_kept": len(kept),
            "rollout_reward_mean": sum(map(sum, rewards)) / n_rollouts,
            "rollout_entropy": entropy,
            "sft_loss_mean": sum(losses) / len(losses) if losses else None,
            "optimizer_steps": optimizer_step,
            "rollout_seconds": rollout_seconds,
            "sft_seconds": sft_seconds,
            "wall_clock_train": train_clock,
            **grader,
        })
        eta = progress.update(last_step, train_clock - clock_at_start, kept=len(kept))
        run.logger.info("EI step %d/%d: kept %d of %d rollouts, %s", last_step, cfg.n_ei_steps, len(kept), n_rollouts, eta)
        fault_point("step", last_step)
        out_of_time = budget is not None and train_clock >= budget
        if last_step < cfg.n_ei_steps and not out_of_time:
            final = validate_now(last_step, val_subset, "subset")
        if out_of_time or last_step == cfg.n_ei_steps or cfg.control.checkpoint_every and last_step % cfg.control.checkpoint_every == 0:
            ckpt.save(last_step, policy, None if cfg.fresh_optimizer else optimizer, {
                "next_step": last_step, "optimizer_step": optimizer_step, "train_clock": train_clock,
                "metrics_bytes": run.metrics_path.stat().st_size,
            })
        if out_of_time:
            run.logger.info("time budget %s reached after %d EI steps (%s)", cfg.control.time_budget, last_step,
                            format_seconds(train_clock))
            break
    progress.close()

    final = validate_now(last_step, val if cfg.final_eval_full else val_subset, "full" if cfg.final_eval_full else "subset")
    return finish_run(session, policy, tokenizer, final)
