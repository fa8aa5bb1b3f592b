"""The one-command CPU demo: a tiny model learns 2-digit addition by SFT, then GRPO improves it.

    python -m cs336_alignment demo            # about 2 minutes on 2 CPU cores, no GPU, no network
    python -m cs336_alignment demo --async    # GRPO samples in a generator process, one step ahead of training

1. build   a random-init tiny Qwen2 model and its tokenizer (offline)
2. SFT     one epoch on arithmetic reasoning traces in the r1_zero format
3. measure validation reward after SFT (sampled at T=1, the handout's eval sampling)
4. GRPO    on-policy reinforce_with_baseline with group-normalised advantages
5. measure validation reward again, on the same questions with the same sampling seed
6. report  plots and a Markdown report of both runs, and a summary

Everything lands in one run directory: sft/, grpo/, report/, summary.json.

Async (``async_rollouts``): step 4 runs with a generator process on the CPU that samples batch k
with the weights after k - 1 steps while the trainer trains on batch k - 1 (``max_staleness`` 1;
``tis_cap`` 2.0 corrects reinforce_with_baseline for the one-step-old samples); the two share
torch's CPU threads half and half (one each on 2 cores). ``sft_run`` starts GRPO from an earlier
SFT run (e.g. another demo's ``sft/``) instead of steps 1-3: its final validation, on the same
questions with the same sampling seed, is the "after SFT" figure.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config, read_yaml
from .distributed import refuse_several_processes
from .recipes.grpo import GRPOConfig, train_grpo
from .recipes.sft import SFTConfig, train_sft
from .report import report_main
from .run_dir import atomic_write_text, move_aside
from .tiny import save_tiny_model

__all__ = [
    "ASYNC_GRPO",
    "DemoConfig",
    "format_summary",
    "run_demo",
]


# The GRPO settings of the async demo: a generator process on the CPU samples batch k with the weights after
# k - 1 steps; reinforce_with_baseline has no ratio to correct one-step-old samples, the truncated weight does.
ASYNC_GRPO = {"async_rollouts": True, "generator_device": "cpu", "max_staleness": 1, "tis_cap": 2.0}


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
    async_rollouts: bool = False  # GRPO with a generator process sampling ahead (ASYNC_GRPO); half the CPU threads each
    sft_run: str = ""  # a finished SFT run (e.g. a demo's <out>/sft) to start GRPO from, skipping SFT ("": run SFT)
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
    sft_dir = Path(cfg.sft_run) if cfg.sft_run else out / "sft"
    if cfg.sft_run:
        after_sft = _earlier_sft(sft_dir, cfg, data, out)  # checked before anything is moved or written
    if out.is_dir() and any(out.iterdir()):  # a rerun starts over; nothing is deleted
        print(f"demo: moved the earlier contents of {out} aside to {move_aside(out)}", flush=True)
    control = {"progress": cfg.progress}
    sft_seconds = 0.0
    if not cfg.sft_run:
        # -------------------------------------------------------------- build
        init = save_tiny_model(out / "init_model", seed=cfg.seed, hidden_size=cfg.hidden_size,
                               num_hidden_layers=cfg.num_layers)
        # -------------------------------------------------------------- SFT warm-up, then validation
        t0 = time.perf_counter()
        sft_cfg = load_config(SFTConfig, None, _kv(
            model=str(init), out=str(sft_dir), seed=cfg.seed, data=data, epochs=cfg.sft_epochs,
            learning_rate=cfg.sft_learning_rate, batch_size=32, micro_batch_size=16, n_eval_examples=cfg.n_val,
            eval_max_tokens=cfg.max_tokens, device="cpu", control=control,
            normalize="batch_tokens",  # per token: the large learning rate a tiny model wants stays the same for any length
        ))
        after_sft = train_sft(sft_cfg)
        sft_seconds = time.perf_counter() - t0
    # ------------------------------------------------------------------ GRPO, then validation on the same questions
    t0 = time.perf_counter()
    rollouts = cfg.questions_per_step * cfg.group_size
    asynchronous = ASYNC_GRPO if cfg.async_rollouts else {}
    grpo_cfg = load_config(GRPOConfig, None, _kv(
        model=str(sft_dir / "model"), out=str(out / "grpo"), seed=cfg.seed, data=data, n_grpo_steps=cfg.grpo_steps,
        learning_rate=cfg.grpo_learning_rate, rollout_batch_size=rollouts, group_size=cfg.group_size,
        train_batch_size=rollouts, gradient_accumulation_steps=max(1, rollouts // 32), sampling_max_tokens=cfg.max_tokens,
        n_eval_examples=cfg.n_val, eval_every=cfg.eval_every, eval_at_start=cfg.eval_every > 0, final_eval_full=False,
        device="cpu", control=control, **asynchronous,
    ))
    after_grpo = train_grpo(grpo_cfg)  # async: the trainer and the generator process share the CPU threads half and half
    grpo_seconds = time.perf_counter() - t0
    # ------------------------------------------------------------------ report and summary
    report_path = None
    try:
        report_path = report_main([sft_dir, out / "grpo"], out / "report", ["SFT warm-up", "GRPO"])
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
        "sft_run": str(sft_dir) if cfg.sft_run else None,  # SFT reused from there (sft_seconds 0)
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
    if summary.get("sft_run"):
        lines.append(f"  SFT from  : {summary['sft_run']} (not rerun)")
    if summary.get("config", {}).get("async_rollouts"):
        lines.append(f"  GRPO      : asynchronous rollouts (a generator process; max_staleness {ASYNC_GRPO['max_staleness']}, "
                     f"tis_cap {ASYNC_GRPO['tis_cap']})")
    if summary.get("report"):
        lines.append(f"  report    : {summary['report']}")
    return "\n".join(lines)


def _earlier_sft(sft_dir: Path, cfg: DemoConfig, data: dict[str, Any], out: Path) -> dict[str, Any]:
    """The final validation of a finished SFT run that GRPO can start from; ConfigError (one line)
    when it is not finished, lies inside ``out`` (moved aside on a rerun) or validated other
    questions than this demo's."""
    if sft_dir.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"sft_run={sft_dir}: inside this demo's out ({out}), which a rerun moves aside; copy it elsewhere "
                          "or give another out")
    final, model = sft_dir / "final.json", sft_dir / "model"
    if not final.is_file() or not model.is_dir():
        raise ConfigError(f"sft_run={sft_dir}: not a finished SFT run (no final.json and model/ there)")
    earlier, _ = read_yaml(sft_dir / "config.yaml")
    wanted = {"data": data, "n_eval_examples": cfg.n_val, "eval_max_tokens": cfg.max_tokens,
              "eval_seed": GRPOConfig.eval_seed}  # the questions and sampling seed GRPO validates with
    got = {"data": {k: earlier.get("data", {}).get(k) for k in data}, **{k: earlier.get(k) for k in wanted if k != "data"}}
    if got != wanted:
        differ = ", ".join(f"{k}: {got[k]} (this demo: {wanted[k]})" for k in wanted if got[k] != wanted[k])
        raise ConfigError(f"sft_run={sft_dir}: validated on other questions than this demo's ({differ})")
    return json.loads(final.read_text())


def _kv(**fields: Any) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in fields.items()]
