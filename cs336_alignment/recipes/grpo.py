"""GRPO: group-relative policy optimisation, as in the CS336 handout, in one loop.

Each GRPO step:
  rollout   sample rollout_batch_size / group_size questions, group_size responses each
  score     reward every response; advantages = reward minus its group's mean (/ std)
  old lp    off-policy only: log-probs of the sampling policy, once per rollout batch
  train     epochs_per_rollout_batch passes over the rollouts, one optimizer step per
            train_batch_size rollouts, gradient accumulation over micro-batches
  sync      load the new weights into the generator
  log       one record per optimizer step; validation every eval_every steps

Glossary: B prompts per rollout batch, G = group_size, b rollouts per micro-batch, T positions.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..advantages import compute_group_normalized_rewards
from ..checkpoint import (
    NonFiniteError,
    Progress,
    RunControl,
    budget_spent,
    check_finite,
    fault_point,
    format_seconds,
    truncate_metrics,
)
from ..generation import SamplingParams
from ..logprobs import get_response_log_probs
from ..losses import LENGTH_NORMALIZATIONS, LOSS_TYPES, grpo_microbatch_train_step
from ..rollouts import Rollout, pack_rollouts, rollout_stats
from ..tokenization import pad_token_id
from .common import (
    DataConfig,
    autocast,
    finish_run,
    free_cuda_cache,
    grader_counts,
    grader_delta,
    load_data,
    load_policy,
    make_generator,
    make_optimizer,
    open_run,
    resolve_device,
    step_seed,
    validate,
)

_DEFAULT_ACCUMULATION = 128


@dataclass
class GRPOConfig:
    """Every knob of the handout's GRPO experiments, with the handout's defaults."""

    model: str = ""  # policy to start from: a model directory (e.g. an SFT output) or "tiny"
    out: str = "runs/grpo"  # run directory
    seed: int = 0  # seeds prompt sampling, rollouts and initialisation
    data: DataConfig = field(default_factory=DataConfig)  # questions, prompt template, reward
    # -- the handout's hyperparameters
    n_grpo_steps: int = 200  # rollout batches (GRPO steps)
    learning_rate: float = 1e-5  # AdamW learning rate (constant)
    advantage_eps: float = 1e-6  # added to the group std
    rollout_batch_size: int = 256  # responses per GRPO step (= questions x group_size)
    group_size: int = 8  # responses per question
    sampling_temperature: float = 1.0  # rollout sampling temperature
    sampling_min_tokens: int = 4  # rollouts have at least this many tokens
    sampling_max_tokens: int = 1024  # and at most this many
    epochs_per_rollout_batch: int = 1  # passes over each rollout batch (> 1 is off-policy)
    train_batch_size: int = 256  # rollouts per optimizer step (< rollout_batch_size is off-policy)
    gradient_accumulation_steps: int = _DEFAULT_ACCUMULATION  # micro-batches per optimizer step
    micro_batch_size: int | None = None  # memory knob: when set, gradient_accumulation_steps = train_batch_size / this
    loss_type: Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"] = (
        "reinforce_with_baseline"
    )  # per-token loss: -r log pi, -A log pi, clipped ratio x A, or unclipped ratio x A
    use_std_normalization: bool = True  # divide advantages by the group std
    length_normalization: Literal["masked_mean", "masked_normalize", "token_mean"] = "masked_mean"  # see losses.py
    cliprange: float = 0.2  # epsilon of grpo_clip
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    max_grad_norm: float = 1.0  # gradient clipping
    # -- validation
    eval_every: int = 10  # validate every this many GRPO steps (0: only at the end)
    eval_at_start: bool = False  # also validate the starting policy (step 0)
    n_eval_examples: int = 1024  # size of the fixed, seeded validation subset
    eval_seed: int = 1234  # seed of that subset and of validation sampling
    final_eval_full: bool = True  # validate on the whole validation set after the last step
    log_rollout_examples: int = 4  # example rollouts written to the log per validation
    # -- placement and memory
    device: str = "auto"  # policy device: "auto", "cpu", "cuda", "cuda:0", ...
    generator_device: str = "same"  # "same": colocated with the policy; else the generator's own device ("cuda:1")
    gradient_checkpointing: bool = False  # trade compute for activation memory
    logprob_chunk_size: int | None = 1024  # log-probs/entropy over this many positions at a time (None: full fp32 logits)
    length_grouping: bool = True  # sort each train batch by length before micro-batching (less padding, same gradient)
    backend: Literal["native", "vllm"] = "native"  # generation backend: our engine, or vLLM (CUDA, optional extra)
    max_num_seqs: int = 256  # native generator: sequences decoded together
    kv_cache_memory_fraction: float = 0.3  # native generator: share of free GPU memory for the KV cache
    gpu_memory_utilization: float = 0.85  # vLLM generator: share of its GPU's memory
    # -- checkpoints, resume, time budget, failures
    control: RunControl = field(default_factory=RunControl)  # see checkpoint.RunControl
    # -- logging
    wandb_project: str = ""  # "" disables wandb
    run_name: str = ""  # wandb run name

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        problems = []
        for name in ("rollout_batch_size", "group_size", "train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None:
            if self.micro_batch_size < 1 or self.train_batch_size % self.micro_batch_size:
                raise ValueError(
                    f"micro_batch_size ({self.micro_batch_size}) must divide train_batch_size ({self.train_batch_size})"
                )
            derived = self.train_batch_size // self.micro_batch_size
            if self.gradient_accumulation_steps not in (derived, _DEFAULT_ACCUMULATION):
                raise ValueError(
                    f"micro_batch_size={self.micro_batch_size} implies gradient_accumulation_steps={derived}, but "
                    f"gradient_accumulation_steps={self.gradient_accumulation_steps} was given; set only one of them"
                )
            self.gradient_accumulation_steps = derived
        if self.train_batch_size % self.gradient_accumulation_steps:
            problems.append(
                f"train_batch_size ({self.train_batch_size}) must be divisible by gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}): each micro-batch holds train_batch_size / "
                "gradient_accumulation_steps rollouts"
            )
        if self.rollout_batch_size % self.group_size:
            problems.append(
                f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by group_size ({self.group_size}): "
                "each question gets group_size responses"
            )
        if self.train_batch_size < self.group_size:
            problems.append(f"train_batch_size ({self.train_batch_size}) must be >= group_size ({self.group_size})")
        if self.rollout_batch_size % self.train_batch_size:
            problems.append(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of train_batch_size "
                f"({self.train_batch_size}): each rollout batch is split into whole optimizer steps"
            )
        if self.use_std_normalization and self.group_size < 2:
            problems.append("use_std_normalization needs group_size >= 2")
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.length_normalization not in LENGTH_NORMALIZATIONS:
            problems.append(f"length_normalization {self.length_normalization!r} is not one of {LENGTH_NORMALIZATIONS}")
        if self.loss_type == "grpo_clip" and not self.cliprange > 0:
            problems.append(f"grpo_clip needs cliprange > 0, got {self.cliprange}")
        if not 0 <= self.sampling_min_tokens <= self.sampling_max_tokens:
            problems.append("sampling_min_tokens must be between 0 and sampling_max_tokens")
        if self.n_grpo_steps < 1 or self.epochs_per_rollout_batch < 1:
            problems.append("n_grpo_steps and epochs_per_rollout_batch must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def n_prompts_per_rollout_batch(self) -> int:
        return self.rollout_batch_size // self.group_size

    @property
    def micro_train_batch_size(self) -> int:
        return self.train_batch_size // self.gradient_accumulation_steps

    @property
    def optimizer_steps_per_rollout_batch(self) -> int:
        return self.epochs_per_rollout_batch * (self.rollout_batch_size // self.train_batch_size)

    @property
    def off_policy(self) -> bool:
        return self.optimizer_steps_per_rollout_batch > 1


def train_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    """Run GRPO as configured; returns the final validation metrics."""
    # ------------------------------------------------------------------ setup
    session = open_run(cfg, "GRPO")
    run, sink, ckpt, latest, device = session.run, session.sink, session.ckpt, session.latest, session.device
    colocated = cfg.generator_device == "same"
    gen_device = device if colocated else resolve_device(cfg.generator_device)
    data = load_data(cfg.data, cfg.seed)
    if len(data.train) < cfg.n_prompts_per_rollout_batch:
        raise ValueError(
            f"{len(data.train)} training questions cannot fill a rollout batch of {cfg.n_prompts_per_rollout_batch}"
        )
    val = data.val or data.train
    val_subset = random.Random(cfg.eval_seed).sample(val, min(cfg.n_eval_examples, len(val)))
    policy, tokenizer = load_policy(cfg.model, device, cfg.seed, cfg.gradient_checkpointing)
    pad_id = pad_token_id(tokenizer)  # pad, else EOS
    optimizer = make_optimizer(policy, cfg.learning_rate, cfg.weight_decay, cfg.betas)
    generator = make_generator(
        cfg.backend, policy, tokenizer, cfg.model, gen_device, cfg.seed, cfg.max_num_seqs, cfg.kv_cache_memory_fraction,
        cfg.gpu_memory_utilization,
    )
    rollout_sampling = SamplingParams(
        temperature=cfg.sampling_temperature,
        max_tokens=cfg.sampling_max_tokens,
        min_tokens=cfg.sampling_min_tokens,
        stop=("</answer>",),
        include_stop_str_in_output=True,
        n=cfg.group_size,
    )
    eval_sampling = SamplingParams.r1_zero(max_tokens=cfg.sampling_max_tokens, seed=cfg.eval_seed)
    gas = cfg.gradient_accumulation_steps
    micro = cfg.micro_train_batch_size
    run.logger.info(
        "GRPO: %d steps, %d questions x %d responses, %d optimizer step(s) per rollout batch (%s), micro-batch %d, "
        "policy on %s, generator on %s (%s)",
        cfg.n_grpo_steps, cfg.n_prompts_per_rollout_batch, cfg.group_size, cfg.optimizer_steps_per_rollout_batch,
        "off-policy" if cfg.off_policy else "on-policy", micro, device, gen_device, "colocated" if colocated else "separate",
    )

    def validate_now(step: int, examples: list[Any], tag: str) -> dict[str, Any]:
        return validate(session, generator, policy, data, examples, eval_sampling, step, tag, cfg.log_rollout_examples)

    # ------------------------------------------------------------------ resume
    start_step, optimizer_step, train_clock, skipped = 0, 0, 0.0, 0  # train_clock: seconds outside validation
    if latest is not None:
        state = ckpt.load(latest, policy, optimizer)
        start_step, optimizer_step, train_clock, skipped = (
            state["next_step"], state["optimizer_step"], state["train_clock"], state["skipped_steps"])
        truncate_metrics(run.metrics_path, state["metrics_bytes"])
        generator.load_weights(policy)
        run.logger.info("resumed from %s: continuing at GRPO step %d", latest, start_step + 1)

    def save_checkpoint(next_step: int) -> None:
        ckpt.save(next_step, policy, optimizer, {
            "next_step": next_step, "optimizer_step": optimizer_step, "train_clock": train_clock,
            "skipped_steps": skipped, "metrics_bytes": run.metrics_path.stat().st_size if run.metrics_path.exists() else 0,
        })

    budget = cfg.control.budget_seconds
    progress = Progress(cfg.n_grpo_steps, start_step, cfg.control.progress, "grpo")
    clock_at_start = train_clock
    final: dict[str, Any] = {}
    last_step = start_step
    if cfg.eval_at_start and start_step == 0:
        validate_now(0, val_subset, "subset")
    if budget_spent(budget, train_clock, run):  # a resumed run whose budget ran out only validates
        start_step = cfg.n_grpo_steps
    for grpo_step in range(start_step, cfg.n_grpo_steps):
        step_start = time.perf_counter()
        # ------------------------------------------------------------------ rollout
        rng = random.Random(step_seed(cfg.seed, grpo_step))
        questions = rng.sample(data.train, cfg.n_prompts_per_rollout_batch)
        prompts = [_prompt(data.template, ex) for ex in questions]
        t0 = time.perf_counter()
        if colocated:
            free_cuda_cache(device)  # hand the training phase's cached blocks to the KV cache
        policy.eval()
        results = generator.generate(prompts, dataclasses.replace(rollout_sampling, seed=step_seed(cfg.seed, grpo_step, 1)))
        policy.train()
        if colocated:
            free_cuda_cache(device)
        rollout_seconds = time.perf_counter() - t0
        rollouts = [
            Rollout(
                group=g, prompt=prompts[g], prompt_token_ids=res.prompt_token_ids, response=c.text,
                response_token_ids=c.token_ids, ground_truth=questions[g].ground_truth, finish_reason=c.finish_reason,
                generator_logprobs=c.logprobs,
            )
            for g, res in enumerate(results)
            for c in res.completions
        ]  # B * G rollouts, group by group

        # ------------------------------------------------------------------ score and advantages
        scores: list[dict[str, float]] = []
        graded_before = grader_counts()

        def scored_reward(response: str, truth: Any) -> dict[str, float]:
            scores.append(data.reward_fn(response, truth))
            return scores[-1]

        advantages, raw_rewards, reward_meta = compute_group_normalized_rewards(
            scored_reward, [r.response for r in rollouts], [r.ground_truth for r in rollouts],
            cfg.group_size, cfg.advantage_eps, cfg.use_std_normalization,
        )
        for r, s, a in zip(rollouts, scores, advantages.tolist()):
            r.reward, r.format_reward, r.answer_reward = float(s["reward"]), float(s.get("format_reward", 0)), float(s.get("answer_reward", 0))
            r.advantage = a
        stats = rollout_stats(rollouts, cfg.group_size, cfg.sampling_max_tokens)
        grader = grader_delta(graded_before)  # timeouts count as wrong answers; logged, never fatal
        if grader["grader_timeouts"] or grader["grader_errors"]:
            run.logger.warning("GRPO step %d: %d grader timeouts, %d grader errors (scored as wrong)",
                               grpo_step + 1, grader["grader_timeouts"], grader["grader_errors"])
        micro_batches = []  # train batch by train batch, each cut into micro-batches of similar length
        for first in range(0, len(rollouts), cfg.train_batch_size):
            batch = rollouts[first : first + cfg.train_batch_size]
            if cfg.length_grouping:
                batch = sorted(batch, key=lambda r: len(r.prompt_token_ids) + r.num_tokens)
            micro_batches += [pack_rollouts(batch[i : i + micro], pad_id, device) for i in range(0, len(batch), micro)]

        # ------------------------------------------------------------------ old log-probs (once per rollout batch)
        t0 = time.perf_counter()
        gap = _LogprobGap()  # generator-vs-policy log-prob gap over response tokens
        if cfg.off_policy:  # on-policy, the old policy is the current one: its log-probs come from the train forward
            with torch.inference_mode(), autocast(device):
                for mb in micro_batches:
                    mb.old_log_probs = get_response_log_probs(
                        policy, mb.input_ids, mb.labels, chunk_size=cfg.logprob_chunk_size, positions_mask=mb.response_mask
                    )["log_probs"].float()  # (b, T)
                    gap.add(mb.old_log_probs, mb)
        old_lp_seconds = time.perf_counter() - t0

        # ------------------------------------------------------------------ train
        t0 = time.perf_counter()
        mbs_per_step = cfg.train_batch_size // micro
        train_tokens = 0
        step_records: list[tuple[int, dict[str, Any]]] = []  # (optimizer step, metrics) of this rollout batch
        for epoch in range(cfg.epochs_per_rollout_batch):
            for first in range(0, len(micro_batches), mbs_per_step):
                step_mbs = micro_batches[first : first + mbs_per_step]
                tokens = sum(mb.num_response_tokens for mb in step_mbs)
                # loss, entropy sum, clip-fraction sum, ratio sum: summed on the device, read once per step
                sums = torch.zeros(4, device=device)
                for mb in step_mbs:
                    with autocast(device):
                        out = get_response_log_probs(
                            policy, mb.input_ids, mb.labels, return_token_entropy=True,
                            chunk_size=cfg.logprob_chunk_size, positions_mask=mb.response_mask,
                        )
                    log_probs = out["log_probs"]  # (b, T) fp32
                    old = mb.old_log_probs if mb.old_log_probs is not None else log_probs.detach()  # (b, T)
                    loss, meta = grpo_microbatch_train_step(
                        log_probs, mb.response_mask, gas, cfg.loss_type,
                        raw_rewards=mb.raw_rewards, advantages=mb.advantages, old_log_probs=old,
                        cliprange=cfg.cliprange, length_normalization=cfg.length_normalization,
                        normalize_constant=float(cfg.sampling_max_tokens),
                        num_tokens=tokens if cfg.length_normalization == "token_mean" else None,
                    )
                    n_tok = mb.num_response_tokens
                    sums[0] += loss
                    sums[1] += (out["token_entropy"].detach() * mb.response_mask).sum()
                    sums[2] += meta.get("clip_fraction", 0.0) * n_tok
                    sums[3] += meta.get("ratio_mean", 0.0) * n_tok
                    if not cfg.off_policy and epoch == 0:  # the sampling policy itself: the gap is measurable here
                        gap.add(log_probs.detach(), mb)
                train_tokens += tokens
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm).item()
                loss_sum, entropy_sum, clip_sum, ratio_sum = sums.tolist()
                try:
                    check_finite("loss", loss_sum, optimizer_step + 1)
                    check_finite("gradient norm", grad_norm, optimizer_step + 1)
                except NonFiniteError as e:
                    optimizer.zero_grad(set_to_none=True)
                    if not cfg.control.skip_nonfinite:
                        run.logger.error("%s Last checkpoint: %s", e, ckpt.latest())
                        raise
                    skipped += 1
                    run.logger.warning("skipped an optimizer step of GRPO step %d (%d skipped so far): %s", grpo_step + 1, skipped, e)
                    continue
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                optimizer_step += 1
                record = {
                    "grpo_step": grpo_step,
                    "epoch": epoch,
                    "loss": loss_sum,
                    "grad_norm": grad_norm,
                    "token_entropy": entropy_sum / max(tokens, 1),
                    "lr": optimizer.param_groups[0]["lr"],
                }
                if cfg.loss_type in ("grpo_clip", "grpo_no_clip"):
                    record["ratio_mean"] = ratio_sum / max(tokens, 1)
                if cfg.loss_type == "grpo_clip":
                    record["clip_fraction"] = clip_sum / max(tokens, 1)
                step_records.append((optimizer_step, record))
        train_seconds = time.perf_counter() - t0

        # ------------------------------------------------------------------ sync
        generator.load_weights(policy)
        train_clock += time.perf_counter() - step_start
        rollout_tokens = sum(r.num_tokens for r in rollouts)
        shared = {
            **{f"train_{k}": v for k, v in stats.items()},
            "frac_groups_all_equal": reward_meta["frac_groups_all_equal"],
            "generator_policy_logprob_gap_mean": gap.mean,
            "generator_policy_logprob_gap_max": gap.max,
            "rollout_seconds": rollout_seconds,
            "rollout_tokens_per_second": rollout_tokens / rollout_seconds,
            "old_logprob_seconds": old_lp_seconds,
            "train_seconds": train_seconds,
            "train_tokens_per_second": train_tokens / train_seconds if train_seconds > 0 else None,
            "wall_clock_train": train_clock,
            "skipped_steps": skipped,
            **grader,
        }
        # ------------------------------------------------------------------ log
        for step_index, record in step_records:
            sink.log("train", step_index, {**record, **shared})
        last = step_records[-1][1] if step_records else {"loss": float("nan"), "grad_norm": float("nan"), "token_entropy": float("nan")}
        eta = progress.update(grpo_step + 1, train_clock - clock_at_start, reward=stats["reward_mean"])
        run.logger.info(
            "step %d/%d: reward %.3f (format %.3f), loss %.4f, grad norm %.3f, entropy %.3f, length %.1f, %.1fs, %s",
            grpo_step + 1, cfg.n_grpo_steps, stats["reward_mean"], stats["format_reward_mean"], last["loss"],
            last["grad_norm"], last["token_entropy"], stats["response_length_mean"], time.perf_counter() - step_start, eta,
        )
        fault_point("step", grpo_step + 1)
        last_step = grpo_step + 1
        out_of_time = budget is not None and train_clock >= budget
        if cfg.eval_every and last_step % cfg.eval_every == 0 and last_step < cfg.n_grpo_steps and not out_of_time:
            final = validate_now(last_step, val_subset, "subset")
        if out_of_time or last_step == cfg.n_grpo_steps or (
            cfg.control.checkpoint_every and last_step % cfg.control.checkpoint_every == 0
        ):
            save_checkpoint(last_step)
        if out_of_time:
            run.logger.info("time budget %s reached after %d steps (%s of training)", cfg.control.time_budget,
                            last_step, format_seconds(train_clock))
            break
    progress.close()

    final = validate_now(last_step, val if cfg.final_eval_full else val_subset, "full" if cfg.final_eval_full else "subset")
    return finish_run(session, policy, tokenizer, final)


class _LogprobGap:
    """|log pi_policy - log pi_generator| over response tokens: mean and max (read once per rollout batch)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.peak: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, policy_log_probs: torch.Tensor, mb: Any) -> None:
        diff = (policy_log_probs - mb.generator_logprobs).abs() * mb.response_mask  # (b, T), 0 off the response
        self.total = self.total + diff.sum()
        self.peak = torch.maximum(torch.as_tensor(self.peak, device=diff.device), diff.max())
        self.count += mb.num_response_tokens

    @property
    def mean(self) -> float | None:
        return float(self.total) / self.count if self.count else None

    @property
    def max(self) -> float | None:
        return float(self.peak) if self.count else None


def _prompt(template: str, example: Any) -> str:
    from ..data import format_prompt

    return format_prompt(template, example)
