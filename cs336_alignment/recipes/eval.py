"""The ``eval`` command: zero-shot evaluation of a model directory on a dataset.

    python -m cs336_alignment eval --model DIR --data validation.jsonl --out runs/eval

Loads the model and the examples, generates with the native engine or vLLM, grades with the
evaluation core (``evaluate.py``) and writes ``config.yaml``, ``generations.jsonl`` and
``metrics.json`` into the output directory. With ``n`` >= 2 samples per prompt (``--n-samples 8``)
metrics.json also holds pass@1 .. pass@n (Chen et al., 2021) and maj@n (self-consistency, Wang et
al., 2022); see :func:`cs336_alignment.evaluate.sampling_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import ConfigError, dump_yaml
from ..data import Example, format_prompts, load_examples, load_template, make_task
from ..distributed import refuse_several_processes
from ..evaluate import evaluate
from ..generation import NativeEngine, SamplingParams
from ..generation.vllm_backend import import_vllm, load_vllm_generator
from ..models import check_model_options, load_model_and_tokenizer, resolve_device
from ..rewards import RewardFn
from ..run_dir import (
    ForeignFiles,
    RunFiles,
    atomic_write_text,
    checked_out_dir,
    claim_directory,
)
from .common import check_common_fields, check_fits, check_model_path, reward_for

__all__ = [
    "EvalConfig",
    "load_eval_data",
    "run_evaluation",
]


@dataclass
class EvalConfig:
    """Zero-shot evaluation of a model directory on a dataset (``python -m cs336_alignment eval``)."""

    model: str = ""  # model directory (from_pretrained), a checkpoint or finished run (its model/), or "tiny"
    data: str = ""  # MATH / GSM8K / sft-style JSONL, or "task:arithmetic" / "task:countdown" (generated)
    out: str = "runs/eval"  # output directory for generations.jsonl and metrics.json
    prompt: str = "r1_zero"  # prompt template: "r1_zero", "question_only", or a path to a .prompt file
    reward: str = ""  # reward name or "module:function"; "" = the one matching the prompt (or the task's)
    limit: int | None = None  # evaluate only the first N examples (None: all)
    seed: int = 0  # sampling seed (and the seed of generated task data)
    n: int = 1  # samples per prompt (--n-samples); >= 2 also gives n_samples, pass@1 .. pass@n and maj@n in metrics.json
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling
    max_tokens: int = 1024  # maximum new tokens per response
    min_tokens: int = 0  # minimum new tokens before EOS / stop strings count (the handout's evaluation: none)
    stop: list[str] = field(default_factory=lambda: ["</answer>"])  # stop strings (kept in the output)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    backend: Literal["native", "vllm"] = "native"  # generation backend: our engine, or vLLM (CUDA, optional extra)
    max_num_seqs: int = 256  # native engine: sequences decoded together
    kv_cache_memory_fraction: float = 0.5  # native engine: share of free GPU memory for the KV cache
    gpu_memory_utilization: float = 0.85  # vLLM: share of its GPU's memory
    entropy: bool = True  # also compute mean token entropy with a forward pass of the model
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel of the native engine

    def __post_init__(self) -> None:
        check_common_fields(self)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be between 0 and max_tokens ({self.max_tokens})")

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            stop=tuple(self.stop),
            include_stop_str_in_output=True,
            n=self.n,
            seed=self.seed,
        )


def load_eval_data(cfg: EvalConfig) -> tuple[list[Example], RewardFn]:
    """Examples (the first ``limit``; a task generates ``limit`` or 200) and the reward of an eval config."""
    task = None
    if cfg.data.startswith("task:"):
        task = make_task(cfg.data.removeprefix("task:"))
        examples = task.generate(cfg.limit or 200, seed=cfg.seed)
    else:
        examples = load_examples(cfg.data)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    return examples, reward_for(cfg.reward, cfg.prompt, task, field="reward")


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Load model and data, evaluate, write results into ``cfg.out``; returns the metrics."""
    refuse_several_processes("eval")
    if not cfg.model or not cfg.data:
        missing = "model" if not cfg.model else "data"
        raise ConfigError(f"field '{missing}': empty; eval needs a model (a model directory or 'tiny') and data "
                          "(a JSONL path or 'task:<name>')")
    check_model_path(cfg.model)
    check_model_options(attn_implementation=cfg.attn_implementation, device=resolve_device(cfg.device))
    if cfg.backend == "vllm":
        import_vllm()  # a missing or too old vLLM is refused before anything is written
    examples, reward_fn = load_eval_data(cfg)  # bad data, prompt or reward: refused before anything is written
    template = load_template(cfg.prompt)
    check_fits(cfg.model, template, examples, new_tokens=cfg.max_tokens, new_tokens_field="max_tokens")
    prompts = format_prompts(template, examples)
    out = checked_out_dir(cfg.out)
    is_run = any((out / name).exists() for name in ("metrics.jsonl", "checkpoints", "log.txt"))  # eval writes none
    if is_run:  # never touch a training run's own files
        raise ConfigError(f"field 'out': {out} is a training run's directory; evaluate into {out / 'eval' / 'NAME'} instead")
    outputs = ("config.yaml", "generations.jsonl", "metrics.json")
    files = RunFiles(out)
    replaced = [name for name in outputs if (out / name).exists() and not files.owns(name)]
    if replaced:  # a file of the user's or of a tool before manifests existed: never replaced
        raise ForeignFiles(f"field 'out': {out / replaced[0]} exists and no run wrote it; choose another out=...")
    lock = claim_directory(out)  # one process per output directory, taken before anything is loaded
    try:
        files.record(*outputs)
        device = resolve_device(cfg.device)
        if cfg.backend == "vllm":
            engine = load_vllm_generator(cfg.model, device=device, seed=cfg.seed,
                                         gpu_memory_utilization=cfg.gpu_memory_utilization)
            model = None
            if cfg.entropy:  # entropy needs the model's forward pass
                model = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed, attn_implementation=cfg.attn_implementation)[0]
        else:
            model, tokenizer = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed,
                                                        attn_implementation=cfg.attn_implementation)
            engine = NativeEngine(
                model, tokenizer, copy_weights=False, max_num_seqs=cfg.max_num_seqs,
                kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
            )
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        metrics, _ = evaluate(
            engine, reward_fn, prompts, sampling=cfg.sampling(), ground_truths=[ex.ground_truth for ex in examples],
            out_dir=out, policy=model if cfg.entropy else None,
            extra_metrics={"model": cfg.model, "data": cfg.data, "device": str(device)},
        )
    finally:
        lock.release()
    return metrics
