"""What the recipes share besides the run loop: data, seeds, the optimizer and its schedule, one
clipped optimizer step, and a phase timer.

The run plumbing (directory, resume, budget, checkpoints, validation cadence) is ``loop.py``.
"""

from __future__ import annotations

import functools
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..checkpoint import NonFiniteError, check_finite
from ..config import ConfigError
from ..data import DataError, Example, check_lengths, generate_splits, load_examples, load_template, make_task
from ..distributed import ONE, DistContext, DistributedError, shard_policy
from ..generation import Generator, load_generator
from ..models import is_sharded_checkpoint, load_policy, model_folder
from ..rewards import RewardFn, resolve_reward_fn
from ..tiny import build_tiny_tokenizer, tiny_qwen2_config

__all__ = [
    "DataConfig",
    "LoadedData",
    "check_common_fields",
    "check_fits",
    "check_model_path",
    "check_sft_batching",
    "check_sft_world_size",
    "clip_and_step",
    "data_reward",
    "load_data",
    "load_policy_and_generator",
    "lr_at",
    "make_optimizer",
    "reward_for",
    "seed_everything",
    "set_lr",
    "step_seed",
    "timed",
]


T = TypeVar("T")


@dataclass
class DataConfig:
    """Where examples come from, how they are prompted, and how responses are rewarded."""

    train: str = ""  # JSONL (MATH / GSM8K / sft.jsonl), or "task:arithmetic" / "task:countdown"
    val: str = ""  # JSONL for validation; "train": the training questions; "" only with a task (its generated split)
    prompt: str = "r1_zero"  # prompt template: "r1_zero", "question_only", or a .prompt file
    reward: str = ""  # reward name or "module:function"; "" = the one matching the prompt / task
    reward_in_process: bool = False  # run a user's reward in this process (shared state, no time bound), not in the sandbox
    task_knobs: dict[str, Any] = field(default_factory=dict)  # knobs of a built-in task (e.g. digits: 2)
    n_task_train: int = 2000  # generated training examples for a task
    n_task_val: int = 200  # generated validation examples for a task

    def __post_init__(self) -> None:
        if self.n_task_train < 1 or self.n_task_val < 1:
            raise ValueError("n_task_train and n_task_val must be >= 1")


@dataclass
class LoadedData:
    """A recipe's examples, prompt template and reward."""

    train: list[Example]
    val: list[Example]  # empty when there is no validation set
    template: str  # prompt template text with {question}
    reward_fn: RewardFn  # (response, ground_truth) -> {"format_reward", "answer_reward", "reward"}


def reward_for(reward: str, prompt: str, task: Any = None, *, field: str = "data.reward", in_process: bool = False) -> RewardFn:
    """The reward a data source gets: ``reward`` when named (a user's reward runs in the grader
    sandbox unless ``in_process``), else the task's, else the one matching the prompt template
    (question_only or r1_zero). A reward that cannot be resolved raises ConfigError naming ``field``."""
    if reward:
        try:
            return resolve_reward_fn(reward, in_process=in_process)
        except ValueError as e:
            raise ConfigError(f"field '{field}': {e}") from None
    if task is not None:
        return task.reward_fn
    return resolve_reward_fn("question_only" if prompt == "question_only" else "r1_zero")


def data_reward(cfg: DataConfig) -> RewardFn:
    """The reward :func:`load_data` gives ``cfg`` (a module-level function of a picklable config:
    a spawned process, such as the generator process grading for dynamic sampling, rebuilds the
    reward from it with ``functools.partial(data_reward, cfg)``)."""
    task = make_task(cfg.train.removeprefix("task:"), **cfg.task_knobs) if cfg.train.startswith("task:") else None
    return reward_for(cfg.reward, cfg.prompt, task, in_process=cfg.reward_in_process)


def load_data(cfg: DataConfig, seed: int) -> LoadedData:
    """Training and validation examples, the prompt template and the reward for a DataConfig."""
    if not cfg.train:
        raise ConfigError("field 'data.train': empty; give a JSONL path or 'task:arithmetic' / 'task:countdown'")
    template = load_template(cfg.prompt)
    task = None
    if cfg.train.startswith("task:"):
        try:
            task = make_task(cfg.train.removeprefix("task:"), **cfg.task_knobs)
        except (ValueError, TypeError) as e:  # an unknown task, or a knob it does not take
            raise ConfigError(f"field 'data.train': {e}") from None
        train, val = generate_splits(task, cfg.n_task_train, cfg.n_task_val, seed=seed)
    else:
        train, val = load_examples(cfg.train), []
    if cfg.val == "train":  # asked for explicitly: validate on the training questions
        val = train
    elif cfg.val:
        val = load_examples(cfg.val)
    elif not val:
        raise ConfigError("field 'data.val': empty; name the validation file (the handout's: MATH validation.jsonl), "
                          "or write data.val=train to validate on the training questions")
    reward_fn = reward_for(cfg.reward, cfg.prompt, task, in_process=cfg.reward_in_process)
    return LoadedData(train=train, val=val, template=template, reward_fn=reward_fn)


# Ranges of the fields several configs share: (fields, test, the valid range in words).
_RANGES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("seed", "eval_seed"), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1] (the range numpy and vLLM seed with)"),
    (("learning_rate",), lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    (("weight_decay", "warmup_steps", "n_eval_examples", "eval_every", "log_rollout_examples"),
     lambda v: math.isfinite(v) and v >= 0, ">= 0"),
    (("max_grad_norm", "normalize_constant"), lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    (("advantage_eps",), lambda v: math.isfinite(v) and v > 0, "a finite number > 0 (it keeps (r - mean) / (std + eps) finite)"),
    (("betas",), lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    (("sampling_temperature", "temperature"), lambda v: math.isfinite(v) and v >= 0, ">= 0 (0 is greedy)"),
    (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("max_num_seqs", "sampling_max_tokens", "eval_max_tokens", "max_tokens", "eval_n_samples"), lambda v: v >= 1, ">= 1"),
    (("logprob_chunk_size",), lambda v: v is None or v >= 1, ">= 1, or null for the whole sequence at once"),
    (("kv_cache_memory_fraction",), lambda v: 0 < v < 1, "in (0, 1)"),
    (("gpu_memory_utilization",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("device",), lambda v: v != "same" and _is_device(v), '"auto" or a torch device such as cpu, cuda, cuda:1'),
    (("generator_device", "reference_device"), lambda v: _is_device(v),
     '"same" (the policy\'s), "auto" or a torch device such as cpu, cuda, cuda:1'),
)


def _is_device(value: Any) -> bool:
    """Whether a device field's value names a device: "auto", "same", or what torch.device reads."""
    if value in ("auto", "same"):
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def check_common_fields(cfg: Any) -> None:
    """Check the fields a config shares with others against their valid ranges (a config's
    ``__post_init__`` calls this): every bad value at once in one ValueError, each with its range.
    A field the config lacks is skipped."""
    problems = []
    for names, ok, valid in _RANGES:
        for name in names:
            if hasattr(cfg, name) and not ok(getattr(cfg, name)):
                problems.append(f"{name} must be {valid}, got {getattr(cfg, name)!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_model_path(model: str) -> None:
    """Refuse (ConfigError) a ``model`` that names a file, or a local path that does not exist;
    "tiny" and Hugging Face hub ids ("org/name", resolved by transformers) pass."""
    if model == "tiny":
        return
    if not model.strip():
        raise ConfigError("field 'model': empty; name the starting model: a directory (e.g. an SFT run's model/) or 'tiny'")
    path = Path(model_folder(str(Path(model).expanduser())))
    if path.is_file():
        raise ConfigError(f"field 'model': {model} is a file; expected a model directory (from save_pretrained) or 'tiny'")
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")
    if not path.exists() and not hub_id:
        raise ConfigError(f"field 'model': no such directory {model}; expected a model directory (from save_pretrained) "
                          "or 'tiny'")
    if is_sharded_checkpoint(path):
        raise ConfigError(f"field 'model': {model} is a multi-process (sharded) checkpoint; write a model folder from it "
                          f"with: python -m cs336_alignment export {model} --out DIR")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"field 'model': {model} holds no config.json, so it is neither a saved model nor a checkpoint "
                          "or finished run (whose model/ folder holds one)")


@functools.lru_cache(maxsize=4)
def tokenizer_and_context(model: str) -> tuple[Any, int]:
    """``model``'s tokenizer and context length (``max_position_embeddings``), without its weights
    (a ``model`` that is no model directory: ConfigError, see :func:`check_model_path`)."""
    check_model_path(model)
    if model == "tiny":
        tokenizer = build_tiny_tokenizer()
        return tokenizer, tiny_qwen2_config(len(tokenizer), tokenizer.eos_token_id).max_position_embeddings
    from transformers import AutoConfig, AutoTokenizer

    folder = model_folder(model)
    return AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder).max_position_embeddings


def check_fits(
    model: str,
    template: str,
    examples: Sequence[Example],
    *,
    new_tokens: int = 0,
    new_tokens_field: str = "",
    with_response: bool = False,
) -> None:
    """Refuse, before anything runs, an example that cannot fit ``model``'s context: its prompt
    (and reference response, ``with_response``) plus ``new_tokens`` to generate (the field
    ``new_tokens_field``). A DataError naming file:line (exit 2); a huge line is refused by its
    length in characters without being tokenized."""
    tokenizer, context = tokenizer_and_context(model)
    room = context - new_tokens
    if room < 1:
        raise ConfigError(f"field '{new_tokens_field}': {new_tokens} new tokens leave no room for a prompt in the "
                          f"model's {context}-token context")
    try:
        check_lengths(examples, template=template, tokenizer=tokenizer, max_tokens=room, with_response=with_response)
    except DataError as e:
        if not new_tokens:
            raise
        raise DataError(e.path, e.line, f"{e.reason} ({context} tokens, less {new_tokens_field}={new_tokens} for the "
                        "response)") from None


def check_sft_batching(batch_size: int, micro_batch_size: int) -> None:
    """The SFT-style batch checks shared by SFT and expert iteration (ValueError with a clear message)."""
    if batch_size < 1 or micro_batch_size < 1:
        raise ValueError(f"batch_size and micro_batch_size must be >= 1, got {batch_size}, {micro_batch_size}")
    if batch_size % micro_batch_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by micro_batch_size ({micro_batch_size}); "
            "gradient accumulation steps = batch_size / micro_batch_size"
        )


def check_sft_world_size(batch_size: int, micro_batch_size: int, world_size: int) -> None:
    """Several processes: each optimizer step's micro-batches (batch_size / micro_batch_size) must
    split evenly over them (DistributedError, exit 2), so that no rank idles in a full batch."""
    per_step = batch_size // micro_batch_size
    if world_size > 1 and per_step % world_size:
        raise DistributedError(f"batch_size / micro_batch_size = {per_step} micro-batches per optimizer step do not split "
                               f"over {world_size} processes; make it a multiple of {world_size} or start fewer processes")


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def step_seed(seed: int, *parts: int) -> int:
    """A seed for one step of a run, derived from the run seed (resumable without RNG state)."""
    value = seed & 0xFFFFFFFF
    for p in parts:
        value = (value * 1_000_003 + p + 0x9E3779B9) & 0x7FFFFFFF
    return value


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """AdamW over all trainable parameters; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused or None)


def lr_at(step: int, total: int, base: float, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then constant or cosine decay.

    warmup:  base * (step + 1) / warmup                                  for step < warmup
    cosine:  base * (m + (1 - m) * (1 + cos(pi * p)) / 2),  p = (step - warmup) / (total - warmup)
    """
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def load_policy_and_generator(
    cfg: Any, *, device: torch.device, generator_device: torch.device, ctx: DistContext = ONE
) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer, Generator]:
    """What GRPO and expert iteration start from: the trainable policy (fp32) and its tokenizer,
    its AdamW, and the generator ``cfg.backend`` names, on ``generator_device``, holding the
    policy's weights. Several processes (``ctx``): the policy is sharded (FSDP2) before the
    optimizer is made, so its state is sharded too; each rank's generator holds the whole model.
    Reads model, seed, gradient_checkpointing, attn_implementation, use_liger_kernel,
    learning_rate, weight_decay, betas, backend, max_num_seqs, kv_cache_memory_fraction,
    gpu_memory_utilization."""
    policy, tokenizer = load_policy(cfg.model, device, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
                                    attn_implementation=cfg.attn_implementation, liger_kernel=cfg.use_liger_kernel)
    policy = shard_policy(policy, ctx)  # one process: unchanged
    optimizer = make_optimizer(policy, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=cfg.betas)
    generator = load_generator(
        cfg.backend, policy, tokenizer, model_path=cfg.model, device=generator_device, seed=cfg.seed,
        max_num_seqs=cfg.max_num_seqs, kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
    )
    return policy, tokenizer, optimizer, generator


def clip_and_step(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float,
    loss: float,
    step: int,
    on_nonfinite: Callable[[NonFiniteError], None],
) -> float | None:
    """Clip the accumulated gradient to ``max_grad_norm``, step the optimizer, zero the gradients.

    Returns the gradient norm before clipping. When ``loss`` or that norm is NaN or infinite,
    the gradients are dropped without a step (the weights stay finite), ``on_nonfinite`` gets
    the error (it re-raises, or counts the skipped step) and the result is None.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # sharded: a DTensor
    try:
        check_finite("loss", loss, step)
        check_finite("gradient norm", grad_norm, step)
    except NonFiniteError as e:
        optimizer.zero_grad(set_to_none=True)
        on_nonfinite(e)
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """(fn(*args, **kwargs), wall seconds it took): how each phase of a step is timed."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0
