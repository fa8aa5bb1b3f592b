"""Pieces every recipe shares: data, policy, precision, optimizer, schedule, metrics sinks.

Recipes (``sft.py``, ``grpo.py``) are one readable loop each; what they have in common
lives here so that each loop shows only its own algorithm.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..evaluate import resolve_device


@dataclass
class DataConfig:
    """Where examples come from, how they are prompted, and how responses are rewarded."""

    train: str = ""  # JSONL (MATH / GSM8K / sft.jsonl), or "task:arithmetic" / "task:countdown"
    val: str = ""  # JSONL for validation; with a task and "" here, a generated validation split
    prompt: str = "r1_zero"  # prompt template: "r1_zero", "question_only", or a .prompt file
    reward: str = ""  # reward name or "module:function"; "" = the one matching the prompt / task
    task_knobs: dict[str, Any] = field(default_factory=dict)  # knobs of a built-in task (e.g. digits: 2)
    n_task_train: int = 2000  # generated training examples for a task
    n_task_val: int = 200  # generated validation examples for a task

    def __post_init__(self) -> None:
        if self.n_task_train < 1 or self.n_task_val < 1:
            raise ValueError("n_task_train and n_task_val must be >= 1")


def check_sft_batching(batch_size: int, micro_batch_size: int) -> None:
    """The SFT-style batch checks shared by SFT and expert iteration (ValueError with a clear message)."""
    if batch_size < 1 or micro_batch_size < 1:
        raise ValueError(f"batch_size and micro_batch_size must be >= 1, got {batch_size}, {micro_batch_size}")
    if batch_size % micro_batch_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by micro_batch_size ({micro_batch_size}); "
            "gradient accumulation steps = batch_size / micro_batch_size"
        )


@dataclass
class LoadedData:
    train: list[Any]  # Example records
    val: list[Any]
    template: str  # prompt template text with {question}
    reward_fn: Any  # (response, ground_truth) -> {"format_reward", "answer_reward", "reward"}


def load_data(cfg: DataConfig, seed: int) -> LoadedData:
    """Training and validation examples, the prompt template and the reward for a DataConfig."""
    from ..data import generate_splits, load_examples, load_template, make_task
    from ..rewards import resolve_reward_fn

    if not cfg.train:
        raise ValueError("data.train is empty: give a JSONL path or 'task:arithmetic' / 'task:countdown'")
    template = load_template(cfg.prompt)
    if cfg.train.startswith("task:"):
        task = make_task(cfg.train.removeprefix("task:"), **cfg.task_knobs)
        train, val = generate_splits(task, cfg.n_task_train, cfg.n_task_val, seed=seed)
        reward_fn = resolve_reward_fn(cfg.reward) if cfg.reward else task.reward_fn
    else:
        train = load_examples(cfg.train)
        val = []
        reward_fn = resolve_reward_fn(cfg.reward or ("question_only" if cfg.prompt == "question_only" else "r1_zero"))
    if cfg.val:
        val = load_examples(cfg.val)
    return LoadedData(train=train, val=val, template=template, reward_fn=reward_fn)


def seed_everything(seed: int) -> None:
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


def load_policy(path: str, device: torch.device, seed: int = 0, gradient_checkpointing: bool = False):
    """The trainable policy in fp32 (master weights) and its tokenizer."""
    from ..evaluate import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, device, dtype=torch.float32, seed=seed)
    if gradient_checkpointing:  # the method was renamed in transformers 5.2x; older versions have only the first
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model.train(), tokenizer


def autocast(device: torch.device):
    """bf16 autocast for forward and backward on GPU (fp32 master weights); nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW over all trainable parameters; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused or None)


def lr_at(step: int, total: int, base: float, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then constant or cosine decay."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class MetricsSink:
    """Every metric goes to the run's metrics.jsonl; also to wandb when enabled.

    Train records carry ``train_step`` and eval records ``eval_step``; in wandb they are
    logged as ``train/*`` and ``eval/*`` against those axes.
    """

    def __init__(
        self, run_dir: Any, wandb_project: str | None = None, run_name: str | None = None, config: Any = None,
        resume: bool = False,
    ):
        self.run_dir = run_dir
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("wandb logging is enabled but wandb is not installed: pip install wandb") from e
            import uuid

            from ..config import to_dict

            # A resumed run continues the same wandb run (its id is kept in the run directory).
            id_file = run_dir.path / "wandb_id.txt"
            run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(
                project=wandb_project, name=run_name, config=to_dict(config) if config else None, id=run_id, resume="allow"
            )
            self.wandb.define_metric("train_step")
            self.wandb.define_metric("eval_step")
            self.wandb.define_metric("train/*", step_metric="train_step")
            self.wandb.define_metric("eval/*", step_metric="eval_step")

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = self.run_dir.log_metrics({"kind": kind, f"{kind}_step": step, **metrics})
        if self.wandb is not None:
            numeric = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb.log({f"{kind}_step": step, **numeric})
        return record

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def grader_counts() -> dict[str, int]:
    """Process-wide grader totals (timeouts, errors, ...); subtract two to count a phase's."""
    from ..rewards import grading_stats

    return grading_stats()


def grader_delta(before: dict[str, int]) -> dict[str, int]:
    """Grader timeouts and errors since ``before`` (each counted as a wrong answer, never fatal)."""
    after = grader_counts()
    return {f"grader_{k}": after.get(k, 0) - before.get(k, 0) for k in ("timeouts", "errors")}


def make_generator(
    backend: str, policy: Any, tokenizer: Any, model_path: str, device: torch.device, seed: int,
    max_num_seqs: int = 256, kv_cache_memory_fraction: float = 0.3, gpu_memory_utilization: float = 0.85,
) -> Any:
    """The generation backend a config selects, holding ``policy``'s current weights.

    "native": our engine (any device). "vllm": an in-process vLLM engine on ``device``
    (CUDA only; a one-line BackendUnavailable error where vLLM is missing).
    """
    if backend == "native":
        from ..generation import NativeEngine

        return NativeEngine(
            policy, tokenizer, device=device, max_num_seqs=max_num_seqs, kv_cache_memory_fraction=kv_cache_memory_fraction
        )
    if backend == "vllm":
        from ..generation.vllm_backend import load_vllm_generator

        generator = load_vllm_generator(
            model_path, device=device, seed=seed, gpu_memory_utilization=gpu_memory_utilization, tokenizer=tokenizer
        )
        generator.load_weights(policy)  # e.g. after a resume, the policy is no longer the checkpoint on disk
        return generator
    raise ValueError(f"unknown generation backend {backend!r}; expected 'native' or 'vllm'")


def free_cuda_cache(device: torch.device) -> None:
    """Return cached blocks between phases when generator and policy share a GPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = [
    "DataConfig",
    "LoadedData",
    "MetricsSink",
    "autocast",
    "free_cuda_cache",
    "grader_counts",
    "grader_delta",
    "load_data",
    "load_policy",
    "lr_at",
    "make_optimizer",
    "resolve_device",
    "seed_everything",
    "set_lr",
    "step_seed",
]


# ---------------------------------------------------------------------------------------
# Opening, validating and closing a run: the same in every recipe
# ---------------------------------------------------------------------------------------


@dataclass
class RunSession:
    """What a recipe opens before its loop."""

    run: Any  # RunDir: config.yaml, metrics.jsonl, log.txt
    sink: MetricsSink
    ckpt: Any  # Checkpointer
    latest: Any  # path of the checkpoint to resume from, or None for a fresh start
    device: torch.device


def open_run(cfg: Any, recipe: str) -> RunSession:
    """Seed, create the run directory, decide fresh start vs resume, save the resolved config."""
    from ..checkpoint import Checkpointer, start_fresh
    from ..run_dir import RunDir

    if not cfg.model:
        raise ValueError(f"{recipe} needs a starting model: model=<directory> (e.g. an SFT output) or model=tiny")
    seed_everything(cfg.seed)
    run = RunDir(cfg.out)
    ckpt = Checkpointer(run.path, cfg.control.keep_last)
    latest = ckpt.latest() if cfg.control.resume else None
    if latest is None:
        start_fresh(run, cfg.control)  # a new run: clear what an earlier attempt left here
    run.save_config(cfg)
    sink = MetricsSink(run, cfg.wandb_project or None, cfg.run_name or None, cfg, resume=latest is not None)
    return RunSession(run, sink, ckpt, latest, resolve_device(cfg.device))


EVAL_KEYS = (
    "accuracy", "format_accuracy", "answer_accuracy", "mean_token_entropy", "mean_response_length",
    "mean_response_length_correct", "mean_response_length_incorrect", "truncated_fraction", "n_examples",
)


def validate(
    session: RunSession, generator: Any, policy: Any, data: LoadedData, examples: list[Any], sampling: Any,
    step: int, tag: str, n_logged: int = 0,
) -> dict[str, Any]:
    """Evaluate ``policy`` (through ``generator``, which must hold its weights) on ``examples``.

    Writes <run>/eval/<tag>_stepNNNNN/{generations.jsonl,metrics.json}, logs an eval record
    (accuracy, format accuracy, entropy, lengths) and ``n_logged`` example rollouts.
    """
    import time
    from pathlib import Path

    from ..data import format_prompt
    from ..evaluate import evaluate

    t0 = time.perf_counter()
    with autocast(session.device):
        metrics, records = evaluate(
            generator, data.reward_fn, [format_prompt(data.template, ex) for ex in examples], sampling,
            [ex.ground_truth for ex in examples], Path(session.run.path) / "eval" / f"{tag}_step{step:05d}",
            policy=policy, progress=False,
        )
    policy.train()
    record = {k: metrics[k] for k in EVAL_KEYS} | {"split": tag, "seconds": time.perf_counter() - t0}
    session.sink.log("eval", step, record)
    for r in records[:n_logged]:
        session.run.logger.info("eval step %d example: reward=%s | %r -> %r", step, r.reward, r.prompt[-80:], r.generation[:300])
    session.run.logger.info(
        "eval step %d (%s): accuracy %.4f, format %.4f", step, tag, record["accuracy"], record["format_accuracy"]
    )
    return record


def finish_run(session: RunSession, policy: Any, tokenizer: Any, final: dict[str, Any]) -> dict[str, Any]:
    """Save the final model and tokenizer, write final.json (which marks the run complete), close sinks."""
    import json
    from pathlib import Path

    from ..run_dir import atomic_write_text

    out = Path(session.run.path)
    policy.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    session.run.logger.info("saved model and tokenizer to %s", out / "model")
    atomic_write_text(out / "final.json", json.dumps(final, indent=2, default=str) + "\n")
    session.sink.close()
    session.run.close()
    return final
