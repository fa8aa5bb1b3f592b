"""GRPO: group-relative policy optimisation, as in the CS336 handout, in one loop.

Each GRPO step names its phases as calls:

  sample_rollouts  rollout_batch_size / group_size questions, group_size responses each (rollouts.py)
  score            reward every response; advantage = reward minus its group's mean (/ std)
  micro_batches    train batches of train_batch_size rollouts, cut into micro-batches
  old_log_probs    off-policy only: log-probs of the sampling policy, once per rollout batch
  policy_update    epochs_per_rollout_batch passes, one optimizer step per train batch
  load_weights     the generator gets the new weights
  end_of_step      log, validation and checkpoint cadence, time budget (``loop.py``)

Glossary: B questions per rollout batch, G = group_size, b rollouts per micro-batch,
T positions after the one-token shift.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..advantages import all_equal_groups, frac_groups_all_equal, group_normalize, soft_overlong_penalty
from ..async_rollouts import AsyncRollouts
from ..checkpoint import NonFiniteError, RunControl
from ..config import ConfigError
from ..data import Example, validation_subset
from ..difficulty import (
    check_writable,
    curriculum_batch,
    curriculum_order,
    existing_pass_rates,
    filter_by_pass_rate,
    pass_rate_stats,
    read_pass_rates,
    score_pass_rates,
    write_pass_rates,
)
from ..distributed import (
    ONE,
    DistContext,
    DistributedError,
    all_reduce,
    gather,
    on_main,
    padded_share,
    share,
    world_size,
)
from ..generation import Generator, SamplingParams
from ..generation.process import GeneratorProcess
from ..logprobs import get_response_log_probs
from ..losses import (
    KlEstimator,
    LengthNormalization,
    LossType,
    grpo_microbatch_train_step,
    k3_kl,
    truncated_importance_weights,
)
from ..models import autocast, load_model_and_tokenizer, resolve_device
from ..rewards import GraderFailures, RewardFn
from ..rollouts import LocalRollouts, MicroBatch, Rollout, RolloutBatch, micro_batches, rollout_stats, with_rewards
from ..tokenization import pad_token_id
from ..trackers import check_trackers
from .common import (
    DataConfig,
    LoadedData,
    check_common_fields,
    check_fits,
    clip_and_step,
    data_reward,
    load_data,
    load_policy_and_generator,
    step_seed,
    timed,
)
from .loop import RunLoop

__all__ = [
    "GRPOConfig",
    "LogprobGap",
    "PRESETS",
    "StepStats",
    "TrainFilter",
    "accumulate_gradients",
    "check_data_parallel",
    "check_pass_rates_file",
    "dynamic_sampling",
    "extra_rounds",
    "load_reference",
    "old_log_probs",
    "policy_update",
    "question_batches",
    "rank_batches",
    "reference_log_probs",
    "reshuffled",
    "rollout_batch_metrics",
    "score",
    "start_async_rollouts",
    "train_grpo",
    "training_questions",
]


HANDOUT_GRADIENT_ACCUMULATION_STEPS = 128  # the handout's default: micro-batches of 2 at train_batch_size 256

PRESETS: dict[str, dict[str, Any]] = {  # preset -> the fields it sets; fields set explicitly win
    "handout": {},  # the handout's GRPO: every field at its default
    "dr_grpo": {  # Dr. GRPO (Liu et al., 2025, arXiv:2503.20783): no std division, one constant length normaliser
        "use_std_normalization": False,
        "length_normalization": "masked_normalize",  # each response's summed loss / sampling_max_tokens
    },
    "dapo": {  # DAPO (Yu et al., 2025, arXiv:2503.14476)
        "loss_type": "grpo_clip",
        "cliprange_low": 0.2,  # clip-higher: eps_low 0.2, eps_high 0.28
        "cliprange_high": 0.28,
        "drop_all_equal_groups": True,  # dynamic sampling
        "length_normalization": "token_mean",  # token-level policy-gradient loss
        "overlong_buffer": None,  # soft overlong punishment over the last fifth of sampling_max_tokens (DAPO: 4096 of 20480)
        "overlong_penalty": 1.0,
    },
}


@dataclass
class TrainFilter:
    """Which training questions GRPO keeps, by their pass rate under the starting policy."""

    min_pass: float = 0.0  # keep questions whose pass rate is >= this (0: keep the never-solved ones too)
    max_pass: float = 1.0  # and <= this (1: keep the always-solved ones too); both at 0 and 1: no filtering

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_pass <= self.max_pass <= 1.0:
            raise ValueError(f"train_filter needs 0 <= min_pass <= max_pass <= 1; got min_pass={self.min_pass}, "
                             f"max_pass={self.max_pass}")

    @property
    def active(self) -> bool:
        return self.min_pass > 0.0 or self.max_pass < 1.0


@dataclass
class GRPOConfig:
    """Every knob of the handout's GRPO experiments, with the handout's defaults."""

    model: str = ""  # policy to start from: a model directory (e.g. an SFT output) or "tiny"
    out: str = "runs/grpo"  # run directory
    seed: int = 0  # seeds prompt sampling, rollouts and initialisation
    data: DataConfig = field(default_factory=DataConfig)  # questions, prompt template, reward
    preset: Literal["handout", "dr_grpo", "dapo"] = "handout"  # a named set of the knobs below (PRESETS); explicit fields win
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
    gradient_accumulation_steps: int | None = None  # micro-batches per optimizer step (unset: derived, 128 by default)
    micro_batch_size: int | None = None  # memory knob: rollouts per forward/backward; sets gradient_accumulation_steps
    loss_type: LossType = "reinforce_with_baseline"  # -r log pi, -A log pi, clipped ratio x A, or unclipped ratio x A
    use_std_normalization: bool = True  # divide advantages by the group std
    length_normalization: LengthNormalization = "masked_mean"  # or masked_normalize (/ max tokens), token_mean; losses.py
    cliprange: float = 0.2  # epsilon of grpo_clip
    cliprange_low: float | None = None  # grpo_clip's lower epsilon: ratio >= 1 - cliprange_low (None: cliprange)
    cliprange_high: float | None = None  # its upper epsilon, ratio <= 1 + cliprange_high (None: cliprange); DAPO's clip-higher
    overlong_filter: bool = False  # responses cut at sampling_max_tokens get zero loss weight (DAPO's overlong filtering)
    overlong_buffer: int | None = 0  # DAPO's soft overlong penalty over the last this many tokens (0: off; None: max tokens / 5)
    overlong_penalty: float = 1.0  # that penalty's size: the reward falls linearly by up to this much at sampling_max_tokens
    drop_all_equal_groups: bool = False  # DAPO's dynamic sampling: drop groups whose rewards are all equal, sample more
    max_resample_rounds: int = 4  # dynamic sampling: at most this many extra rounds of questions per GRPO step
    kl_coef: float = 0.0  # beta of the KL(pi || pi_ref) penalty in the loss, pi_ref the frozen starting policy (0: none)
    kl_estimator: KlEstimator = "k3"  # the penalty's per-token estimator: k1 (log ratio) or k3 (Schulman's, >= 0)
    log_kl: bool = False  # with kl_coef 0: load the reference anyway and log the KL to it (kl_coef > 0 always logs it)
    reference_device: str = "same"  # the reference policy's device ("same": the policy's)
    reference_dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # its dtype ("auto": bf16 on GPU, fp32 on CPU)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    max_grad_norm: float = 1.0  # gradient clipping
    # -- asynchronous rollouts and the off-policy correction
    async_rollouts: bool = False  # sample the next batches in a generator process (generator_device) while the policy trains
    max_staleness: int = 1  # async: batch k is sampled with the weights after step max(0, k - max_staleness)
    tis_cap: float | None = None  # weigh each token's loss by min(pi_old / mu, tis_cap), mu the generator's (None: off)
    # -- validation
    eval_every: int = 10  # validate every this many GRPO steps (0: only at the end)
    eval_at_start: bool = False  # also validate the starting policy (step 0)
    n_eval_examples: int = 1024  # size of the fixed, seeded validation subset
    eval_seed: int = 1234  # seed of that subset and of validation sampling
    eval_n_samples: int = 1  # responses per validation question (> 1: pass@k for every k <= it, and maj@k)
    # -- training questions by difficulty (scored once with the starting policy)
    train_filter: TrainFilter = field(default_factory=TrainFilter)  # keep questions by pass rate (default: all)
    curriculum: Literal["none", "easy_first"] = "none"  # easy_first: step k takes the next questions, easiest first
    pass_rate_samples: int = 8  # responses per training question when scoring pass rates
    pass_rates: str = ""  # the pass-rate file, read if it exists, else written ("": <run>/pass_rates.jsonl)
    final_eval_full: bool = True  # validate on the whole validation set after the last step
    log_rollout_examples: int = 4  # example rollouts written to the log per validation
    # -- placement and memory
    device: str = "auto"  # policy device: "auto", "cpu", "cuda", "cuda:0", ...
    generator_device: str = "same"  # "same": colocated with the policy; else the generator's own device ("cuda:1")
    gradient_checkpointing: bool = False  # trade compute for activation memory
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel (flash: flash-attn installed)
    use_liger_kernel: bool = False  # Liger's fused RoPE, RMSNorm and SwiGLU in the policy (GPU; liger-kernel installed)
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the final model/ ("auto": bf16 on GPU, else fp32)
    logprob_chunk_size: int | None = 1024  # log-probs/entropy over this many positions at a time (None: full fp32 logits)
    length_grouping: bool = True  # sort each train batch by length before micro-batching (less padding, same gradient)
    backend: Literal["native", "vllm", "auto"] = "native"  # native, vllm (CUDA, optional extra) or auto (vLLM where it runs)
    max_num_seqs: int = 256  # native generator: sequences decoded together
    kv_cache_memory_fraction: float = 0.3  # native generator: share of free GPU memory for the KV cache
    gpu_memory_utilization: float = 0.85  # vLLM generator: share of its GPU's memory
    # -- checkpoints, resume, time budget, failures
    control: RunControl = field(default_factory=RunControl)  # see checkpoint.RunControl
    # -- logging
    wandb_project: str = ""  # wandb's project ("" disables wandb unless trackers lists it); also trackio's
    run_name: str = ""  # the run's name in wandb and trackio ("": theirs)
    trackers: list[str] = field(
        default_factory=lambda: ["jsonl"])  # metrics go to: jsonl (always on, listed or not), wandb, trackio, tensorboard

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS  # config.from_dict expands ``preset`` with it

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_common_fields(self)
        check_trackers(self.trackers, installed=False)  # unknown or repeated names; packages: when the run starts
        for name in ("rollout_batch_size", "group_size", "train_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._derive_gradient_accumulation_steps()
        problems = []
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
        if self.loss_type in ("grpo_clip", "gspo") and not self.cliprange > 0:
            problems.append(f"{self.loss_type} needs cliprange > 0, got {self.cliprange}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            problems.append(f"kl_coef must be a finite number >= 0 (0: no KL penalty), got {self.kl_coef}")
        if self.overlong_buffer is None:
            self.overlong_buffer = max(1, self.sampling_max_tokens // 5)
        if not 0 <= self.overlong_buffer < self.sampling_max_tokens:
            problems.append(f"overlong_buffer must be in [0, sampling_max_tokens = {self.sampling_max_tokens}): the "
                            f"penalty covers the last overlong_buffer tokens before the limit; got {self.overlong_buffer}")
        if not (math.isfinite(self.overlong_penalty) and self.overlong_penalty >= 0):
            problems.append(f"overlong_penalty must be a finite number >= 0, got {self.overlong_penalty}")
        if self.max_resample_rounds < 0:
            problems.append(f"max_resample_rounds must be >= 0, got {self.max_resample_rounds}")
        if self.drop_all_equal_groups and self.group_size < 2:
            problems.append("drop_all_equal_groups needs group_size >= 2: a group of one response is always all equal")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        preset = PRESETS.get(self.preset)
        if preset is None:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        changes = {k: v for k, v in preset.items() if v is not None and v != defaults[k]}  # what it changes
        if changes and not any(getattr(self, k) == v for k, v in changes.items()):
            problems.append(f"preset {self.preset!r} changes none of its fields ({', '.join(PRESETS[self.preset])}): each "
                            "is given explicitly (explicit fields win), or the preset was not expanded (config files, "
                            "key=value and config.from_dict expand it; GRPOConfig(...) itself does not)")
        if self.pass_rate_samples < 1:
            problems.append(f"pass_rate_samples must be >= 1, got {self.pass_rate_samples}")
        for name in ("cliprange_low", "cliprange_high"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, or null for cliprange; got {value}")
        if self.cliprange_low is not None and self.cliprange_low >= 1:
            problems.append(f"cliprange_low must be < 1 (the ratio's lower bound 1 - cliprange_low > 0); "
                            f"got {self.cliprange_low}")
        if not 0 <= self.sampling_min_tokens <= self.sampling_max_tokens:
            problems.append("sampling_min_tokens must be between 0 and sampling_max_tokens")
        if self.n_grpo_steps < 1 or self.epochs_per_rollout_batch < 1:
            problems.append("n_grpo_steps and epochs_per_rollout_batch must be >= 1")
        if self.max_staleness < 1:
            problems.append(f"max_staleness must be >= 1, got {self.max_staleness}")
        if (self.async_rollouts or self.tis_cap is not None) and self.sampling_temperature != 1.0:
            problems.append(f"async_rollouts and tis_cap need sampling_temperature 1 (got {self.sampling_temperature}): the "
                            "generator's log-probs mu are those of temperature 1, the correction's importance ratios need "
                            "those of the distribution actually sampled")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap > 0):
            problems.append(f"tis_cap must be a finite number > 0 (e.g. 2.0), or null to turn it off; got {self.tis_cap}")
        if self.async_rollouts:
            if self.generator_device == "same":
                problems.append("async_rollouts needs a generator of its own: set generator_device to its device "
                                "(cpu, cuda:1), not same")
            if self.backend != "native":
                problems.append(f"async_rollouts runs the native engine in its process; backend={self.backend!r} is not "
                                "supported with it yet")
            if self.generator_device == self.device and self.generator_device.startswith("cuda"):
                problems.append(f"async_rollouts needs a generator of its own: generator_device={self.generator_device!r} is "
                                "the policy's GPU, where training would take the memory the generator sized its cache by")
            if self.loss_type in ("no_baseline", "reinforce_with_baseline") and self.tis_cap is None:
                problems.append(f"async_rollouts with loss_type={self.loss_type}: the samples come from older weights "
                                "and this loss has no ratio to correct for it; set tis_cap (e.g. 2.0) or use grpo_clip")
        if problems:
            raise ValueError("; ".join(problems))

    def _derive_gradient_accumulation_steps(self) -> None:
        """gradient_accumulation_steps from micro_batch_size when only that is set; the handout's
        128 when neither is; both set must agree."""
        if self.micro_batch_size is None:
            if self.gradient_accumulation_steps is None:
                self.gradient_accumulation_steps = HANDOUT_GRADIENT_ACCUMULATION_STEPS
        else:
            if self.micro_batch_size < 1 or self.train_batch_size % self.micro_batch_size:
                raise ValueError(
                    f"micro_batch_size ({self.micro_batch_size}) must divide train_batch_size ({self.train_batch_size})"
                )
            derived = self.train_batch_size // self.micro_batch_size
            if self.gradient_accumulation_steps not in (None, derived):
                raise ValueError(
                    f"micro_batch_size={self.micro_batch_size} implies gradient_accumulation_steps={derived}, but "
                    f"gradient_accumulation_steps={self.gradient_accumulation_steps} was given; set only one of them"
                )
            self.gradient_accumulation_steps = derived
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")

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

    @property
    def clip_low(self) -> float:
        """grpo_clip's lower epsilon: cliprange_low, else cliprange."""
        return self.cliprange if self.cliprange_low is None else self.cliprange_low

    @property
    def clip_high(self) -> float:
        """grpo_clip's upper epsilon: cliprange_high, else cliprange."""
        return self.cliprange if self.cliprange_high is None else self.cliprange_high

    @property
    def uses_reference(self) -> bool:
        """Whether the run loads the frozen reference policy (a KL penalty, or the KL logged)."""
        return self.kl_coef > 0 or self.log_kl

    @property
    def scores_pass_rates(self) -> bool:
        """Whether the training questions are scored with the starting policy before the run."""
        return self.train_filter.active or self.curriculum != "none"

    @property
    def asymmetric_clip(self) -> bool:
        """Whether either clip bound is set on its own (its clipped share is then logged apart)."""
        return self.cliprange_low is not None or self.cliprange_high is not None

    @property
    def corrected(self) -> bool:
        """Whether the steps log the behaviour-policy correction (truncated share, pi/mu KL)."""
        return self.async_rollouts or self.tis_cap is not None

    @property
    def behaviour_is_old_policy(self) -> bool:
        """Async without tis_cap (verl's bypass mode): the ratio losses take the generator's
        log-probs mu as pi_old, so pi_old is never recomputed."""
        return self.async_rollouts and self.tis_cap is None

    @property
    def recompute_old_log_probs(self) -> bool:
        """Whether the old log-probs phase runs: off-policy, unless mu stands in for pi_old."""
        return self.off_policy and not self.behaviour_is_old_policy


def start_async_rollouts(
    cfg: GRPOConfig, policy: torch.nn.Module, tokenizer: Any, batch_of: Callable[[int], tuple[list[Example], SamplingParams]],
    *, template: str,
) -> AsyncRollouts:
    """The generator process on ``cfg.generator_device`` and the pipeline that keeps
    ``max_staleness`` batches in flight (:mod:`~cs336_alignment.async_rollouts`). On the CPU the
    process gets half of this process's threads, and this process keeps the other half until the
    pipeline closes."""
    device = resolve_device(cfg.generator_device)
    threads = max(1, torch.get_num_threads() // 2) if device.type == "cpu" else None
    process = GeneratorProcess(policy.config, tokenizer, device=device, max_num_seqs=cfg.max_num_seqs,
                               kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
                               max_pending_weights=cfg.max_staleness + 1, threads=threads,
                               reward=functools.partial(data_reward, cfg.data) if cfg.drop_all_equal_groups else None)
    pipeline = AsyncRollouts(process, batch_of=batch_of, template=template, max_staleness=cfg.max_staleness,
                             total=cfg.n_grpo_steps, resample_rounds=cfg.max_resample_rounds if cfg.drop_all_equal_groups else 0)
    if threads is not None and next(policy.parameters()).device.type == "cpu":  # the cores are shared: half each
        pipeline.restore_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, torch.get_num_threads() - threads))
    return pipeline


def check_data_parallel(cfg: GRPOConfig, world_size: int) -> None:
    """Refuse (DistributedError, exit 2) a batch that several processes cannot split evenly: each
    rank generates whole groups for an equal share of the questions, and runs an equal share of
    each optimizer step's micro-batches (each a collective); and async_rollouts, which runs in one
    process. One process: nothing to check."""
    if world_size == 1:
        return
    if cfg.async_rollouts:
        raise DistributedError("async_rollouts runs in one process; with several processes each rank already generates "
                               "its own share: set async_rollouts: false")
    problems = []
    if cfg.n_prompts_per_rollout_batch % world_size:
        problems.append(f"rollout_batch_size / group_size = {cfg.n_prompts_per_rollout_batch} questions per step do not "
                        f"split over {world_size} processes")
    if cfg.gradient_accumulation_steps % world_size:
        problems.append(f"gradient_accumulation_steps = {cfg.gradient_accumulation_steps} micro-batches per optimizer step "
                        f"do not split over {world_size} processes (lower micro_batch_size)")
    if problems:
        raise DistributedError("; ".join(problems) + f"; make them multiples of {world_size} or start fewer processes")


def train_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    """Run GRPO as configured; returns the final validation metrics."""
    # ------------------------------------------------------------------ setup
    data = load_data(cfg.data, cfg.seed)  # bad data is refused before the run directory exists
    if len(data.train) < cfg.n_prompts_per_rollout_batch:
        raise ConfigError(
            f"field 'data.train': {len(data.train)} training questions cannot fill one rollout batch of "
            f"{cfg.n_prompts_per_rollout_batch} (rollout_batch_size / group_size); use more data or a smaller rollout_batch_size"
        )
    check_fits(cfg.model, data.template, data.train + data.val, new_tokens=cfg.sampling_max_tokens,
               new_tokens_field="sampling_max_tokens")  # an over-long prompt is refused now, not mid-run
    check_data_parallel(cfg, world_size())  # several processes: the batch must split evenly, refused now
    check_pass_rates_file(cfg, data)  # a pass-rate file given: it matches the questions, or can be written
    with RunLoop(cfg, "GRPO") as loop:  # the run directory is locked until the end
        device, colocated, ctx = loop.device, cfg.generator_device == "same", loop.ctx
        gen_device = device if colocated or cfg.async_rollouts else resolve_device(cfg.generator_device)  # async: validation's
        val_subset = validation_subset(data.val, cfg.n_eval_examples, cfg.eval_seed)
        policy, tokenizer, optimizer, generator = load_policy_and_generator(cfg, device=device, generator_device=gen_device,
                                                                            ctx=ctx)  # several processes: sharded
        reference = load_reference(cfg, device) if cfg.uses_reference else None  # frozen starting policy (KL)
        pad_id = pad_token_id(tokenizer)  # pad, else EOS
        pool, ordered = training_questions(cfg, data, generator=generator, policy=policy, loop=loop)  # by pass rate
        batch_of = question_batches(cfg, pool, ordered)  # (step, round) -> questions, sampling
        source = loop.own(  # a generator process sampling ahead of training, or this process's generator
            start_async_rollouts(cfg, policy, tokenizer, batch_of, template=data.template) if cfg.async_rollouts else
            LocalRollouts(generator, policy, batch_of=batch_of, template=data.template, ctx=ctx,
                          colocated_device=device if colocated else None))
        loop.attach(policy, optimizer, tokenizer=tokenizer, generator=generator,  # resume: the generator gets the weights
                    extra_state=source.state)  # async: checkpoints keep the batches in flight
        source.start(loop.state.step, policy, saved=loop.saved_state)
        eval_sampling = SamplingParams.r1_zero(max_tokens=cfg.sampling_max_tokens, seed=cfg.eval_seed, n=cfg.eval_n_samples)
        loop.logger.info(
            "GRPO: %d steps, %d questions x %d responses, %d optimizer step(s) per rollout batch (%s), micro-batch %d, "
            "policy on %s, generator on %s (%s)",
            cfg.n_grpo_steps, cfg.n_prompts_per_rollout_batch, cfg.group_size, cfg.optimizer_steps_per_rollout_batch,
            "off-policy" if cfg.off_policy else "on-policy", cfg.micro_train_batch_size, device, gen_device,
            "colocated" if colocated else "separate",
        )

        def validate(step: int, examples: list[Example] = val_subset, tag: str = "subset") -> dict[str, Any]:
            if cfg.async_rollouts:  # the in-process engine validates only: give it this step's weights
                generator.load_weights(policy)
            return loop.validate(generator, policy, data=data, examples=examples, sampling=eval_sampling, step=step, tag=tag,
                                 n_logged=cfg.log_rollout_examples)

        if cfg.eval_at_start and loop.state.step == 0:
            validate(0)
        n_final = len(data.val) if cfg.final_eval_full else len(val_subset)  # the final validation's size
        for grpo_step in loop.steps(cfg.n_grpo_steps, eval_every=cfg.eval_every, evaluate=validate, final_examples=n_final):
            # ------------------------------------------------------------------ rollout
            batch = source.sample_rollouts(grpo_step)  # whole groups for this rank's share of the step's questions
            # ------------------------------------------------------------------ score and advantages
            with loop.grading() as grader:  # timeouts count as wrong answers: logged, never fatal
                rollouts = gather(score(batch.rollouts, data.reward_fn, cfg), ctx)  # graded where sampled; all on every rank
                if cfg.drop_all_equal_groups:  # DAPO's dynamic sampling: more questions until every group has signal
                    more = extra_rounds(source, batch, grpo_step, data.reward_fn, cfg=cfg, ctx=ctx)
                    rollouts, counts = dynamic_sampling(rollouts, cfg, more=more)  # the same on every rank
                    batch.extra.update(counts)  # logged with the step
            # ------------------------------------------------------------------ micro-batches, old log-probs
            batches = micro_batches(  # the whole rollout batch's (the same on every rank); each rank runs its share
                rollouts, train_batch_size=cfg.train_batch_size, micro_batch_size=cfg.micro_train_batch_size, pad_id=pad_id,
                device=device, length_grouping=cfg.length_grouping,
            )
            gap = LogprobGap()  # generator-vs-policy log-prob gap over response tokens
            old_lp_seconds = timed(old_log_probs, policy=policy, batches=batches, cfg=cfg, gap=gap,
                                   ctx=ctx)[1] if cfg.recompute_old_log_probs else 0.0
            ref_lp_seconds = timed(reference_log_probs, reference=reference, batches=batches, cfg=cfg,
                                   ctx=ctx)[1] if reference is not None else 0.0
            # ------------------------------------------------------------------ update, sync
            steps, train_seconds = timed(
                policy_update, policy=policy, optimizer=optimizer, batches=batches, cfg=cfg,
                optimizer_step=loop.state.optimizer_step, gap=None if cfg.recompute_old_log_probs else gap,
                on_nonfinite=loop.nonfinite, shuffle_seed=step_seed(cfg.seed, grpo_step, 2), pad_id=pad_id, ctx=ctx,
            )
            source.load_weights(policy, version=grpo_step + 1)  # the new weights (gathered when sharded)
            # ------------------------------------------------------------------ log, end of step
            seconds = all_reduce({"rollout": batch.seconds, "old_logprob": old_lp_seconds, "ref_logprob": ref_lp_seconds,
                                  "train": train_seconds}, ctx, op="max")  # the slowest rank's
            shared = rollout_batch_metrics(
                rollouts, cfg, gap=gap.all_reduce(ctx), grader=grader, rollout_seconds=seconds["rollout"],
                generation_seconds=batch.extra.get("generation_seconds", seconds["rollout"]),
                old_logprob_seconds=seconds["old_logprob"], train_seconds=seconds["train"], wall_clock_train=loop.stop_clock(),
                skipped_steps=loop.state.skipped_steps,
                ref_logprob_seconds=seconds["ref_logprob"] if reference is not None else None,
            ) | batch.extra  # async: the batch's staleness and weights version
            for step_stats in steps:
                loop.state.optimizer_step += 1
                loop.sink.log("train", loop.state.optimizer_step,
                              {"grpo_step": grpo_step, **step_stats.record(cfg.loss_type, correction=cfg.corrected,
                                                                           split_clip=cfg.asymmetric_clip,
                                                                           reference=cfg.uses_reference), **shared})
            last = steps[-1] if steps else StepStats.nan()
            loop.end_of_step(
                f"reward {shared['train_reward_mean']:.3f} (format {shared['train_format_reward_mean']:.3f}), "
                f"loss {last.loss:.4f}, grad norm {last.grad_norm:.3f}, entropy {last.token_entropy:.3f}, "
                f"length {shared['train_response_length_mean']:.1f}",
                reward=shared["train_reward_mean"],
            )
        final = validate(loop.state.step, data.val, "full") if cfg.final_eval_full else validate(loop.state.step)
        return loop.finish(policy, tokenizer, final)


def question_batches(
    cfg: GRPOConfig, pool: Sequence[Example], ordered: Sequence[Example] | None = None
) -> Callable[..., tuple[list[Example], SamplingParams]]:
    """``batch_of(step, round=0)``: step ``step``'s questions (the same on every rank) and their
    sampling, seeded by the step: ``n_prompts_per_rollout_batch`` questions drawn from ``pool``,
    or with an easy-first curriculum (``ordered``) the step's slice of it
    (:func:`~cs336_alignment.difficulty.curriculum_batch`). ``round`` > 0: an extra round of
    dynamic sampling, drawn from ``pool`` with seeds of the step and the round."""
    sampling = SamplingParams.r1_zero(  # stop at </answer> and keep it
        temperature=cfg.sampling_temperature, max_tokens=cfg.sampling_max_tokens, min_tokens=cfg.sampling_min_tokens,
        n=cfg.group_size,
    )
    size = cfg.n_prompts_per_rollout_batch

    def batch_of(step: int, round: int = 0) -> tuple[list[Example], SamplingParams]:
        if round:
            questions = random.Random(step_seed(cfg.seed, step, 3, round)).sample(list(pool), size)
            return questions, dataclasses.replace(sampling, seed=step_seed(cfg.seed, step, 4, round))
        if ordered is not None:
            questions = curriculum_batch(ordered, step, size)
        else:
            questions = random.Random(step_seed(cfg.seed, step)).sample(list(pool), size)
        return questions, dataclasses.replace(sampling, seed=step_seed(cfg.seed, step, 1))

    return batch_of


def check_pass_rates_file(cfg: GRPOConfig, data: LoadedData) -> None:
    """Refuse (one line, exit 2), before the run directory exists, a ``pass_rates`` file given by
    the user that does not match the training questions, or a path where it cannot be written."""
    if not (cfg.scores_pass_rates and cfg.pass_rates):
        return
    path = Path(cfg.pass_rates)
    if path.exists():
        read_pass_rates(path, data.train, template=data.template)
    elif path.parent.exists():  # a folder still to be made is tried when the file is written
        check_writable(path)


def training_questions(
    cfg: GRPOConfig, data: LoadedData, *, generator: Generator, policy: torch.nn.Module, loop: RunLoop
) -> tuple[list[Example], list[Example] | None]:
    """The questions GRPO trains on, and their easy-first order (None without a curriculum).

    With ``train_filter`` or ``curriculum`` set, each training question is first scored with the
    starting policy (``pass_rate_samples`` responses through ``generator``) into a pass-rate file
    (``pass_rates``, or <run>/pass_rates.jsonl; :mod:`~cs336_alignment.difficulty`), which a
    resumed run or a user-given file is read from instead. Several processes: each rank scores
    its share, rank 0 reads and writes the file. Otherwise: every training question, no order.
    """
    if not cfg.scores_pass_rates:
        return list(data.train), None
    ctx = loop.ctx
    path = Path(cfg.pass_rates) if cfg.pass_rates else Path(cfg.out) / "pass_rates.jsonl"

    rates = on_main(lambda: existing_pass_rates(path, data.train, template=data.template, n=cfg.pass_rate_samples,
                                                log=loop.logger), ctx)  # rank 0: the file's, or None once it can be written
    if rates is None:
        mine, n_real = padded_share(data.train, ctx)  # each rank its share of the questions (the last padded)
        policy.eval()
        rates = gather(score_pass_rates(
            generator, data.reward_fn, mine, template=data.template, n=cfg.pass_rate_samples,
            sampling_seed=step_seed(cfg.seed, 5), max_tokens=cfg.sampling_max_tokens, temperature=cfg.sampling_temperature,
            min_tokens=cfg.sampling_min_tokens, progress=cfg.control.progress and ctx.is_main, log=loop.logger,
            first_index=ctx.rank * len(mine),  # streams keyed on the question's index in the whole set
        )[:n_real], ctx)
        policy.train()

        def write() -> None:  # rank 0; in the run directory the run owns the file (a fresh start removes it)
            if path.resolve().is_relative_to(loop.run.path.resolve()):
                loop.run.files.record(path.resolve().relative_to(loop.run.path.resolve()).as_posix())
            write_pass_rates(path, data.train, rates, template=data.template, n=cfg.pass_rate_samples,
                             scored_with={"model": cfg.model, "seed": cfg.seed, "max_tokens": cfg.sampling_max_tokens})

        on_main(write, ctx)
    loop.logger.info("pass rates of %d training questions: %s", len(rates),
                     ", ".join(f"{k} {v:.3f}" for k, v in pass_rate_stats(rates).items()))
    try:
        pool, kept = filter_by_pass_rate(data.train, rates, min_pass=cfg.train_filter.min_pass,
                                         max_pass=cfg.train_filter.max_pass)
    except ValueError as e:
        raise ConfigError(f"field 'train_filter': {e}") from None
    if len(pool) < cfg.n_prompts_per_rollout_batch:
        raise ConfigError(f"field 'train_filter': {len(pool)} questions kept of {len(rates)}, too few for one rollout "
                          f"batch of {cfg.n_prompts_per_rollout_batch} questions; widen the bounds")
    ordered = curriculum_order(pool, kept, seed=cfg.seed) if cfg.curriculum == "easy_first" else None
    return pool, ordered


# ---------------------------------------------------------------------------------------
# The phases
# ---------------------------------------------------------------------------------------


def extra_rounds(
    source: LocalRollouts | AsyncRollouts, batch: RolloutBatch, step: int, reward_fn: RewardFn, *, cfg: GRPOConfig,
    ctx: DistContext = ONE,
) -> Callable[[int], list[Rollout]]:
    """``more(round)`` for :func:`dynamic_sampling`: step ``step``'s extra round of questions from
    ``source`` (async: the round the generator process sampled with the batch), scored and
    gathered like the first (the same rollouts on every rank, so every rank takes the same
    decision); its seconds join ``batch``'s."""

    def more(round: int) -> list[Rollout]:
        extra = source.sample_rollouts(step, round)
        batch.seconds += extra.seconds
        if "generation_seconds" in batch.extra:
            batch.extra["generation_seconds"] += extra.extra["generation_seconds"]
        return gather(score(extra.rollouts, reward_fn, cfg), ctx)

    return more


def dynamic_sampling(
    rollouts: Sequence[Rollout], cfg: GRPOConfig, *, more: Callable[[int], Sequence[Rollout]]
) -> tuple[list[Rollout], dict[str, int]]:
    """DAPO's dynamic sampling (Yu et al., 2025, arXiv:2503.14476): drop the groups whose rewards
    (before the soft overlong penalty, which only tells responses apart by length) are all equal
    (every advantage 0: no gradient signal, yet they dilute the batch) and fill the
    batch from extra rounds of questions, ``more(round)`` for round = 1, 2, ... (each scored,
    B * G rollouts), until B informative groups are kept or ``max_resample_rounds`` rounds ran.

    Keeps the first B informative groups in sampling order. If the rounds run out first, the
    batch is topped up with dropped groups (the batch shape, and so every rank's number of
    micro-batches, never changes) and ``groups_short`` says how many. Returns (B * G rollouts,
    {"resample_rounds", "groups_dropped", "groups_short"}); groups are renumbered 0 .. B - 1.
    """
    size, wanted = cfg.group_size, cfg.n_prompts_per_rollout_batch
    kept: list[list[Rollout]] = []
    dropped: list[list[Rollout]] = []

    def split(batch: Sequence[Rollout]) -> None:  # on the reward before any length penalty: DAPO filters on accuracy
        equal = all_equal_groups(torch.tensor([r.reward - r.overlong_penalty for r in batch]), size).tolist()  # (B,)
        for g, same in enumerate(equal):
            (dropped if same else kept).append(list(batch[g * size:(g + 1) * size]))

    split(rollouts)
    rounds = 0
    while len(kept) < wanted and rounds < cfg.max_resample_rounds:
        rounds += 1
        split(more(rounds))
    short = max(0, wanted - len(kept))
    groups = kept[:wanted] + dropped[:short]
    trained = [dataclasses.replace(r, group=g) for g, group in enumerate(groups) for r in group]
    return trained, {"resample_rounds": rounds, "groups_dropped": len(dropped) - short, "groups_short": short}


def score(rollouts: Sequence[Rollout], reward_fn: RewardFn, cfg: GRPOConfig) -> list[Rollout]:
    """Score phase: each rollout's rewards and its group-normalised advantage (new records).

    A_i = (r_i - mean_group(r)) / (std_group(r) + advantage_eps), or without the division
    when ``use_std_normalization`` is off (:func:`~cs336_alignment.advantages.group_normalize`).
    With ``overlong_buffer`` the reward first gets DAPO's soft overlong penalty
    (:func:`~cs336_alignment.advantages.soft_overlong_penalty`), kept in ``overlong_penalty``.
    """
    scored = with_rewards(rollouts, reward_fn)
    if cfg.overlong_buffer:
        penalties = soft_overlong_penalty(torch.tensor([r.num_tokens for r in scored]), max_tokens=cfg.sampling_max_tokens,
                                          buffer=cfg.overlong_buffer, penalty=cfg.overlong_penalty)  # (B*G,)
        scored = [dataclasses.replace(r, reward=r.reward + p, overlong_penalty=p) for r, p in zip(scored, penalties.tolist())]
    raw = torch.tensor([r.reward for r in scored], dtype=torch.float32)  # (B*G,)
    advantages = group_normalize(
        raw, group_size=cfg.group_size, advantage_eps=cfg.advantage_eps, normalize_by_std=cfg.use_std_normalization
    )  # (B*G,)
    return [dataclasses.replace(r, advantage=a) for r, a in zip(scored, advantages.tolist())]


@torch.no_grad()  # not inference_mode: FSDP reuses its gather buffers in the update that follows
def old_log_probs(
    policy: torch.nn.Module, batches: Sequence[MicroBatch], cfg: GRPOConfig, *, gap: LogprobGap, ctx: DistContext = ONE
) -> None:
    """Old log-probs phase (off-policy only): log pi_old of each response token under the
    sampling policy, once per rollout batch, into each micro-batch's ``old_log_probs`` (b, T)
    and each rollout's ``old_logprobs`` (L,) (:func:`_log_probs_once`).

    On-policy the old policy is the current one: its log-probs come from the update's forward.
    """
    _log_probs_once(policy, batches, cfg, ctx=ctx, into="old", gap=gap)


@torch.no_grad()
def reference_log_probs(
    reference: torch.nn.Module, batches: Sequence[MicroBatch], cfg: GRPOConfig, *, ctx: DistContext = ONE
) -> None:
    """Reference log-probs phase (a reference loaded: kl_coef > 0 or log_kl): log pi_ref of each
    response token under the frozen starting policy, once per rollout batch beside the old
    log-probs, into ``ref_log_probs`` (b, T) and each rollout's ``ref_logprobs`` (L,)."""
    _log_probs_once(reference, batches, cfg, ctx=ctx, into="ref")


def _log_probs_once(
    model: torch.nn.Module, batches: Sequence[MicroBatch], cfg: GRPOConfig, *, ctx: DistContext, into: Literal["old", "ref"],
    gap: LogprobGap | None = None,
) -> None:
    """``model``'s log-probs of every response token of a rollout batch, computed once and kept
    with each micro-batch (``<into>_log_probs`` (b, T)) and each rollout (``<into>_logprobs``
    (L,): later epochs re-pack the rollouts). Several processes: each rank computes its share
    of ``batches`` (those it trains on first, :func:`rank_batches`) and every rollout then gets
    its log-probs from the rank that computed them. ``model`` may sit on another device than
    the batches (a reference on ``reference_device``)."""
    device = next(model.parameters()).device
    mine = rank_batches(batches, cfg.gradient_accumulation_steps, ctx)
    with autocast(device):
        for mb in mine:
            log_probs = get_response_log_probs(
                model, mb.input_ids.to(device), mb.labels.to(device), chunk_size=cfg.logprob_chunk_size,
                positions_mask=mb.response_mask.to(device),
            )["log_probs"].float().to(mb.input_ids.device)  # (b, T)
            setattr(mb, f"{into}_log_probs", log_probs)
            if gap is not None:
                gap.add(log_probs, mb)
            for row, rollout in enumerate(mb.rollouts):  # kept with each rollout: later epochs re-pack them
                setattr(rollout, f"{into}_logprobs", log_probs[row][mb.response_mask[row]])  # (L,)
    if ctx.world_size > 1:
        rollouts = [r for mb in batches for r in mb.rollouts]  # the same order on every rank
        position = {id(r): i for i, r in enumerate(rollouts)}
        computed = gather([(position[id(r)], getattr(r, f"{into}_logprobs").cpu()) for mb in mine for r in mb.rollouts], ctx)
        for i, lp in computed:
            setattr(rollouts[i], f"{into}_logprobs", lp.to(batches[0].input_ids.device))  # (L,)


def load_reference(cfg: GRPOConfig, policy_device: torch.device) -> torch.nn.Module:
    """The frozen reference policy pi_ref of a KL penalty: the starting policy (``cfg.model``,
    loaded again, so a resumed run gets the same one) on ``reference_device`` in
    ``reference_dtype``, in eval mode, without gradients. Each rank holds a whole copy."""
    device = policy_device if cfg.reference_device == "same" else resolve_device(cfg.reference_device)
    dtype = None if cfg.reference_dtype == "auto" else getattr(torch, cfg.reference_dtype)
    reference, _ = load_model_and_tokenizer(cfg.model, device, dtype=dtype, seed=cfg.seed,
                                            attn_implementation=cfg.attn_implementation)
    return reference.requires_grad_(False).eval()


def rank_batches(batches: Sequence[MicroBatch], per_step: int, ctx: DistContext) -> list[MicroBatch]:
    """This rank's micro-batches of an epoch: its share of each optimizer step's ``per_step``
    micro-batches (all of them in one process)."""
    return [mb for first in range(0, len(batches), per_step) for mb in share(batches[first:first + per_step], ctx)]


@dataclass
class StepStats:
    """One optimizer step of the update phase: token-weighted sums, read from the device once."""

    epoch: int  # pass over the rollout batch
    tokens: int  # response tokens in the step's train batch
    loss: float  # the step's loss: the sum of its micro-batches' back-propagated losses
    grad_norm: float  # gradient norm before clipping
    entropy_sum: float  # sum of next-token entropies over response tokens
    clipped_tokens: float  # response tokens whose clipped term was taken (grpo_clip)
    ratio_sum: float  # sum of pi / pi_old over response tokens (grpo_clip, grpo_no_clip)
    lr: float  # learning rate of the step
    clipped_high_tokens: float = 0.0  # of clipped_tokens: those at 1 + cliprange_high (A > 0)
    clipped_low_tokens: float = 0.0  # of clipped_tokens: those at 1 - cliprange_low (A < 0)
    truncated_tokens: float = 0.0  # response tokens whose importance weight pi_old / mu was cut to tis_cap
    weight_sum: float = 0.0  # sum over response tokens of the importance weight min(pi_old / mu, tis_cap) (tis_cap)
    behaviour_kl_sum: float = 0.0  # sum over response tokens of the k3 estimate of KL(mu || pi), mu the generator
    kl_sum: float = 0.0  # sum over response tokens of the k3 estimate of KL(pi || pi_ref) (a reference loaded)

    @property
    def token_entropy(self) -> float:
        return self.entropy_sum / max(self.tokens, 1)

    @classmethod
    def nan(cls) -> StepStats:
        """Stands in for a rollout batch whose optimizer steps were all skipped."""
        return cls(epoch=0, tokens=0, loss=float("nan"), grad_norm=float("nan"), entropy_sum=float("nan"),
                   clipped_tokens=0.0, ratio_sum=0.0, lr=float("nan"))

    def record(self, loss_type: str, correction: bool = False, split_clip: bool = False,
               reference: bool = False) -> dict[str, float]:
        """The step's metrics as logged: per-token means of the sums; with ``correction`` (async
        rollouts or tis_cap) also the truncated share and the pi/mu KL; with ``split_clip``
        (cliprange_low or cliprange_high set) the clipped shares at each bound; with
        ``reference`` the KL to the reference policy (``ref_kl``)."""
        record = {"epoch": self.epoch, "loss": self.loss, "grad_norm": self.grad_norm,
                  "token_entropy": self.token_entropy, "lr": self.lr}
        if loss_type in ("grpo_clip", "grpo_no_clip", "gspo"):
            record["ratio_mean"] = self.ratio_sum / max(self.tokens, 1)
        if reference:
            record["ref_kl"] = self.kl_sum / max(self.tokens, 1)
        if loss_type in ("grpo_clip", "gspo"):
            record["clip_fraction"] = self.clipped_tokens / max(self.tokens, 1)
            if split_clip:
                record["clip_fraction_high"] = self.clipped_high_tokens / max(self.tokens, 1)
                record["clip_fraction_low"] = self.clipped_low_tokens / max(self.tokens, 1)
        if correction:
            record["truncated_fraction"] = self.truncated_tokens / max(self.tokens, 1)
            record["importance_weight_mean"] = self.weight_sum / max(self.tokens, 1) if self.weight_sum else None
            record["behaviour_kl"] = self.behaviour_kl_sum / max(self.tokens, 1)
        return record


def policy_update(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[MicroBatch],
    cfg: GRPOConfig,
    *,
    optimizer_step: int,
    gap: LogprobGap | None,
    on_nonfinite: Callable[[NonFiniteError], None],
    shuffle_seed: int = 0,
    pad_id: int = 0,
    ctx: DistContext = ONE,
) -> list[StepStats]:
    """Update phase: ``epochs_per_rollout_batch`` passes over the rollout batch, one optimizer
    step per train batch (gradient accumulation over its micro-batches). The first pass uses
    ``batches``; each later one a fresh permutation of the same rollouts, seeded by
    ``shuffle_seed`` and the epoch, cut into train and micro-batches again (our choice: the
    handout reuses one order; length grouping still applies within each train batch).

    ``optimizer_step`` counts the steps taken before; ``gap`` (on-policy) collects the
    generator-vs-policy log-prob gap from the forward passes. Returns the stats of the steps
    taken (a non-finite step is left out when ``on_nonfinite`` skips it).

    Several processes (``ctx``): ``batches`` is the whole rollout batch's on every rank; each
    rank runs its share of each step's micro-batches, each normalised as in one process (FSDP
    sums the gradients: the update is the one-process update), and the step's sums are added
    over the ranks.
    """
    per_step = cfg.gradient_accumulation_steps  # micro-batches per optimizer step
    taken = []
    for epoch in range(cfg.epochs_per_rollout_batch):
        epoch_batches = batches if epoch == 0 else reshuffled(batches, cfg, seed=step_seed(shuffle_seed, epoch), pad_id=pad_id)
        for first in range(0, len(epoch_batches), per_step):
            step_batches = epoch_batches[first : first + per_step]
            tokens = sum(mb.num_response_tokens for mb in step_batches)  # the whole train batch's
            sums = all_reduce(accumulate_gradients(policy, share(step_batches, ctx), cfg, tokens=tokens, gap=gap), ctx,
                              op="sum")  # over every rank's micro-batches
            grad_norm = clip_and_step(policy, optimizer, max_grad_norm=cfg.max_grad_norm, loss=sums["loss"],
                                      step=optimizer_step + len(taken) + 1, on_nonfinite=on_nonfinite)
            if grad_norm is not None:
                taken.append(StepStats(epoch=epoch, tokens=tokens, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"],
                                       **sums))
    return taken


def reshuffled(batches: Sequence[MicroBatch], cfg: GRPOConfig, *, seed: int, pad_id: int) -> list[MicroBatch]:
    """The rollouts of ``batches`` in a seeded permutation, cut into train and micro-batches again
    (each rollout keeps its old log-probs and advantage)."""
    rollouts = [r for mb in batches for r in mb.rollouts]
    random.Random(seed).shuffle(rollouts)
    return micro_batches(rollouts, train_batch_size=cfg.train_batch_size, micro_batch_size=cfg.micro_train_batch_size,
                         pad_id=pad_id, device=batches[0].input_ids.device, length_grouping=cfg.length_grouping)


def accumulate_gradients(
    policy: torch.nn.Module, step_batches: Sequence[MicroBatch], cfg: GRPOConfig, *, tokens: int, gap: LogprobGap | None
) -> dict[str, float]:
    """Forward and backward over one optimizer step's micro-batches (gradients accumulate).

    pi_old is the recomputed old policy (off-policy), else the current one (detached), or, in
    async bypass mode, the generator's mu. With ``tis_cap`` each token's loss is weighed by
    min(pi_old / mu, tis_cap) (:func:`~cs336_alignment.losses.truncated_importance_weights`);
    with ``overlong_filter`` a response that ended at the length limit weighs 0 (DAPO, Yu et al.,
    2025, arXiv:2503.14476; the normalisers still count its tokens).

    With a reference policy (``mb.ref_log_probs``) the loss adds ``kl_coef`` times the KL penalty
    (:func:`~cs336_alignment.losses.kl_penalty`) and the KL is summed for the log either way.

    Returns the step's sums over its response tokens, read from the device once, named as
    :class:`StepStats` fields: loss, entropy_sum, clipped_tokens, ratio_sum, truncated_tokens,
    weight_sum, behaviour_kl_sum (the k3 estimate of KL(mu || pi)), kl_sum (of KL(pi || pi_ref)).
    """
    device = next(policy.parameters()).device
    names = ("loss", "entropy_sum", "clipped_tokens", "clipped_high_tokens", "clipped_low_tokens", "ratio_sum",
             "truncated_tokens", "weight_sum", "behaviour_kl_sum", "kl_sum")
    sums = {name: torch.zeros((), device=device) for name in names}  # () each
    for mb in step_batches:
        with autocast(device):
            out = get_response_log_probs(
                policy, mb.input_ids, mb.labels, return_token_entropy=True, chunk_size=cfg.logprob_chunk_size,
                positions_mask=mb.response_mask,
            )
        log_probs = out["log_probs"]  # (b, T) fp32
        if mb.old_log_probs is not None:
            old = mb.old_log_probs  # (b, T) recomputed pi_old
        else:
            old = mb.generator_logprobs if cfg.behaviour_is_old_policy else log_probs.detach()  # (b, T)
        weights = None
        if cfg.tis_cap is not None:
            weights, truncated = truncated_importance_weights(old, mb.generator_logprobs, cfg.tis_cap)  # (b, T) each
            sums["truncated_tokens"] += (truncated & mb.response_mask).sum()
            sums["weight_sum"] += torch.where(mb.response_mask, weights, torch.zeros((), device=device)).sum()
        if cfg.overlong_filter:  # a response cut off mid-answer says nothing about its answer: no gradient from it
            complete = torch.tensor([[r.finish_reason != "length"] for r in mb.rollouts], device=device)  # (b, 1)
            weights = complete.float() if weights is None else weights * complete  # (b, T) or (b, 1)
        loss, meta = grpo_microbatch_train_step(
            log_probs, mb.response_mask, gradient_accumulation_steps=cfg.gradient_accumulation_steps, loss_type=cfg.loss_type,
            raw_rewards=mb.raw_rewards, advantages=mb.advantages, old_log_probs=old, cliprange=cfg.clip_low,
            cliprange_high=cfg.clip_high,
            length_normalization=cfg.length_normalization, normalize_constant=float(cfg.sampling_max_tokens),
            num_tokens=tokens if cfg.length_normalization == "token_mean" else None, importance_weights=weights,
            ref_log_probs=mb.ref_log_probs, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
        )
        sums["loss"] += loss
        sums["entropy_sum"] += (out["token_entropy"].detach() * mb.response_mask).sum()  # ()
        sums["clipped_tokens"] += meta.get("clipped_tokens", 0.0)
        sums["clipped_high_tokens"] += meta.get("clipped_high_tokens", 0.0)
        sums["clipped_low_tokens"] += meta.get("clipped_low_tokens", 0.0)
        sums["ratio_sum"] += meta.get("ratio_sum", 0.0)
        sums["kl_sum"] += meta.get("kl_sum", 0.0)
        if cfg.corrected:
            kl = k3_kl(log_probs.detach(), mb.generator_logprobs)  # (b, T) KL(mu || pi) per token
            sums["behaviour_kl_sum"] += torch.where(mb.response_mask, kl, torch.zeros((), device=device)).sum()
        if gap is not None:
            gap.add(log_probs.detach(), mb)
    return dict(zip(names, torch.stack(list(sums.values())).tolist()))


def rollout_batch_metrics(
    rollouts: Sequence[Rollout],
    cfg: GRPOConfig,
    *,
    gap: LogprobGap,
    grader: GraderFailures,
    rollout_seconds: float,
    generation_seconds: float,
    old_logprob_seconds: float,
    train_seconds: float,
    wall_clock_train: float,
    skipped_steps: int,
    ref_logprob_seconds: float | None = None,
) -> dict[str, Any]:
    """The metrics a GRPO step shares among its optimizer steps' records: the rollouts' rewards,
    lengths and degeneracy, the generator-vs-policy gap, each phase's time and throughput.
    ``rollout_seconds`` is what the rollout phase cost the trainer (sampling, or with async
    rollouts the wait for the batch); throughput is over ``generation_seconds``, the sampling's own."""
    rollout_tokens = sum(r.num_tokens for r in rollouts)
    train_tokens = cfg.epochs_per_rollout_batch * rollout_tokens  # every epoch trains on every rollout
    optional = {}
    if cfg.overlong_buffer:
        optional["overlong_penalty_mean"] = sum(r.overlong_penalty for r in rollouts) / len(rollouts)
    if ref_logprob_seconds is not None:
        optional["ref_logprob_seconds"] = ref_logprob_seconds
    return optional | {
        **{f"train_{k}": v for k, v in rollout_stats(rollouts).items()},
        "frac_groups_all_equal": frac_groups_all_equal(torch.tensor([r.reward for r in rollouts]), cfg.group_size),
        "generator_policy_logprob_gap_mean": gap.mean,
        "generator_policy_logprob_gap_max": gap.max,
        "rollout_seconds": rollout_seconds,
        "rollout_tokens_per_second": rollout_tokens / generation_seconds if generation_seconds > 0 else None,
        "old_logprob_seconds": old_logprob_seconds,
        "train_seconds": train_seconds,
        "train_tokens_per_second": train_tokens / train_seconds if train_seconds > 0 else None,
        "wall_clock_train": wall_clock_train,
        "skipped_steps": skipped_steps,
        "grader_timeouts": grader.timeouts,
        "grader_errors": grader.errors,
    }


class LogprobGap:
    """|log pi_policy - log pi_generator| over response tokens: mean and max (read once per rollout batch)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.peak: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, policy_log_probs: torch.Tensor, mb: MicroBatch) -> None:
        diff = (policy_log_probs - mb.generator_logprobs).abs() * mb.response_mask  # (b, T), 0 off the response
        self.total = self.total + diff.sum()
        self.peak = torch.maximum(torch.as_tensor(self.peak, device=diff.device), diff.max())
        self.count += mb.num_response_tokens

    def all_reduce(self, ctx: DistContext) -> LogprobGap:
        """The gap over every rank's tokens (itself in one process)."""
        if ctx.world_size == 1:
            return self
        sums = all_reduce({"total": float(self.total), "count": self.count}, ctx, op="sum")
        reduced = LogprobGap()
        reduced.total, reduced.count = sums["total"], int(sums["count"])
        reduced.peak = all_reduce({"peak": float(self.peak)}, ctx, op="max")["peak"]
        return reduced

    @property
    def mean(self) -> float | None:
        return float(self.total) / self.count if self.count else None

    @property
    def max(self) -> float | None:
        return float(self.peak) if self.count else None
