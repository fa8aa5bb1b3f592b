"""The one-command CPU demo: a tiny model learns 2-digit addition by SFT, then GRPO improves it.

    python -m cs336_alignment demo            # about 2 minutes on 2 CPU cores, no GPU, no network

1. build   a random-init tiny Qwen2 model and its tokenizer (offline)
2. SFT     one epoch on arithmetic reasoning traces in the r1_zero format
3. measure validation reward after SFT (sampled at T=1, the handout's eval sampling)
4. GRPO    on-policy reinforce_with_baseline with group-normalised advantages
5. measure validation reward again, on the same questions with the same sampling seed
6. report  plots and a Markdown report of both runs, and a summary

Everything lands in one run directory: sft/, grpo/, report/, summary.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import load_config
from .distributed import refuse_several_processes
from .recipes.grpo import GRPOConfig, train_grpo
from .recipes.sft import SFTConfig, train_sft
from .report import report_main
from .run_dir import atomic_write_text, move_aside
from .tiny import save_tiny_model

__all__ = [
    "DemoConfig",
    "format_summary",
    "run_demo",
]


@dataclass
class DemoConfig:
    """Sizes of the demo. The defaults are the README's main command."""

    out: str = "runs/demo"  # run directory
    seed: int = 0  # seeds everything
    hidden_size: int = 128  # tiny model width
    num_layers: int = 4  # tiny model depth
    digits: int = 2  # digits per operand of the addition task
    allow_carry: bool = False  # carry-free additions (a tiny model learns the digit-wise rule)
    n_train: int = 3000  # generated training questions
    n_val: int = 200  # generated validation questions (held out)
    sft_epochs: int = 1  # SFT warm-up epochs
    sft_learning_rate: float = 3e-3  # SFT learning rate (tiny models want large rates)
    grpo_steps: int = 60  # GRPO steps
    grpo_learning_rate: float = 3e-4  # GRPO learning rate
    questions_per_step: int = 16  # GRPO: questions per rollout batch
    group_size: int = 8  # GRPO: responses per question
    max_tokens: int = 64  # rollout and validation length limit
    eval_every: int = 20  # GRPO validation interval (steps)
    progress: bool = True  # progress bars

    @classmethod
    def quick(cls, out: str) -> DemoConfig:
        """The reduced size the test suite runs (about a minute on 2 cores)."""
        return cls(out=out, hidden_size=64, num_layers=2, grpo_steps=60, eval_every=0, progress=False)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to <out>/summary.json)."""
    refuse_several_processes("demo")
    out = Path(cfg.out)
    t_start = time.perf_counter()
    data = {
        "train": "task:arithmetic",
        "task_knobs": {"digits": cfg.digits, "allow_carry": cfg.allow_carry},
        "n_task_train": cfg.n_train,
        "n_task_val": cfg.n_val,
    }
    if out.is_dir() and any(out.iterdir()):  # a rerun starts over; nothing is deleted
        print(f"demo: moved the earlier contents of {out} aside to {move_aside(out)}", flush=True)
    control = {"progress": cfg.progress}
    # ------------------------------------------------------------------ build
    init = save_tiny_model(out / "init_model", seed=cfg.seed, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers)
    # ------------------------------------------------------------------ SFT warm-up, then validation
    t0 = time.perf_counter()
    sft_cfg = load_config(SFTConfig, None, _kv(
        model=str(init), out=str(out / "sft"), seed=cfg.seed, data=data, epochs=cfg.sft_epochs,
        learning_rate=cfg.sft_learning_rate, batch_size=32, micro_batch_size=16, n_eval_examples=cfg.n_val,
        eval_max_tokens=cfg.max_tokens, device="cpu", control=control,
        normalize="batch_tokens",  # per token: the large learning rate a tiny model wants stays the same for any length
    ))
    after_sft = train_sft(sft_cfg)
    sft_seconds = time.perf_counter() - t0
    # ------------------------------------------------------------------ GRPO, then validation on the same questions
    t0 = time.perf_counter()
    rollouts = cfg.questions_per_step * cfg.group_size
    grpo_cfg = load_config(GRPOConfig, None, _kv(
        model=str(out / "sft" / "model"), out=str(out / "grpo"), seed=cfg.seed, data=data, n_grpo_steps=cfg.grpo_steps,
        learning_rate=cfg.grpo_learning_rate, rollout_batch_size=rollouts, group_size=cfg.group_size,
        train_batch_size=rollouts, gradient_accumulation_steps=max(1, rollouts // 32), sampling_max_tokens=cfg.max_tokens,
        n_eval_examples=cfg.n_val, eval_every=cfg.eval_every, eval_at_start=cfg.eval_every > 0, final_eval_full=False,
        device="cpu", control=control,
    ))
    after_grpo = train_grpo(grpo_cfg)
    grpo_seconds = time.perf_counter() - t0
    # ------------------------------------------------------------------ report and summary
    report_path = None
    try:
        report_path = report_main([out / "sft", out / "grpo"], out / "report", ["SFT warm-up", "GRPO"])
    except Exception as e:  # plots are optional (matplotlib extra); the numbers are not
        print(f"report skipped: {e}")
    summary = {
        "val_reward_after_sft": after_sft["accuracy"],
        "val_reward_after_grpo": after_grpo["accuracy"],
        "improvement_points": 100 * (after_grpo["accuracy"] - after_sft["accuracy"]),
        "val_format_after_sft": after_sft["format_accuracy"],
        "val_format_after_grpo": after_grpo["format_accuracy"],
        "n_val": after_grpo["n_examples"],
        "sft_seconds": sft_seconds,
        "grpo_seconds": grpo_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "report": str(report_path) if report_path else None,
        "config": asdict(cfg),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        "",
        "demo summary (validation reward = share of held-out questions answered correctly, sampled at T=1)",
        f"  after SFT : {summary['val_reward_after_sft']:.3f}  (format {summary['val_format_after_sft']:.3f})",
        f"  after GRPO: {summary['val_reward_after_grpo']:.3f}  (format {summary['val_format_after_grpo']:.3f})",
        f"  change    : {summary['improvement_points']:+.1f} points on {summary['n_val']} questions",
        f"  time      : SFT {summary['sft_seconds']:.0f}s, GRPO {summary['grpo_seconds']:.0f}s, total {summary['total_seconds']:.0f}s",
    ]
    if summary.get("report"):
        lines.append(f"  report    : {summary['report']}")
    return "\n".join(lines)


def _kv(**fields: Any) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in fields.items()]
