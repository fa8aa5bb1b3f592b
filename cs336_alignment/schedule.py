"""What every study config and sweep point will do: optimizer steps, validations, peak learning rate.

``python -m cs336_alignment schedule [--markdown]`` prints one row per study config in
``configs/*.yaml`` and per point of every sweep in ``configs/sweeps/*.yaml``::

    study -> config file -> what varies -> optimizer steps / validations / peak LR -> deliverable

The configs are read with the package's own loader (:func:`~cs336_alignment.experiments.load_study`,
:func:`~cs336_alignment.experiments.expand_sweep`), so the numbers come from the validated config
dataclasses; the SFT learning rate comes from the recipe's own ``lr_at``. The counting follows
the recipes:

  SFT   steps = ceil(n_used / batch_size) x epochs, capped by max_steps, where n_used is
        n_examples or all of sft.jsonl (the filtered set with filter_correct). Validations:
        step 0 (eval_at_start), every eval_every steps except after the last, and the final one.
  EI    n_ei_steps EI steps of ceil(kept / batch_size) x sft_epochs optimizer steps each; kept is
        known only when the run samples it: at most rollouts_per_question per question, so the
        row gives the upper bound. Validations: step 0, after every EI step but the last, final.
  GRPO  n_grpo_steps x epochs_per_rollout_batch x rollout_batch_size / train_batch_size optimizer
        steps. Validations as SFT, every eval_every GRPO steps. Constant learning rate.

Dataset sizes are not read from disk (the data may live on another machine): they are
parameters, :class:`DatasetSizes`, with the defaults documented there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .experiments import expand_sweep, load_study

__all__ = [
    "HEADER",
    "DatasetSizes",
    "Schedule",
    "ScheduleRow",
    "ei_schedule",
    "eval_schedule",
    "format_markdown",
    "format_text",
    "grpo_schedule",
    "schedule_rows",
    "sft_schedule",
    "study_schedule",
]


@dataclass(frozen=True)
class DatasetSizes:
    """The example counts the schedule assumes; pass the real ones when they differ."""

    val: int = 5000  # MATH validation.jsonl: the handout's 5,000 validation examples
    train: int = 7500  # MATH train.jsonl: the 7,500 problems of the MATH train split (Hendrycks et al., 2021)
    sft: int = 4800  # sft.jsonl: an assumption (not in this repository); the run logs the real count
    sft_filtered: int = 3600  # sft.jsonl traces that earn reward 1: assumed 75% of sft; the run logs the real count

    def describe(self) -> str:
        """One line naming the sizes, for the top of the table."""
        return (f"Sizes assumed: validation {self.val:,}, MATH train {self.train:,}, sft.jsonl {self.sft:,}, "
                f"filtered sft.jsonl {self.sft_filtered:,}.")


@dataclass(frozen=True)
class Schedule:
    """What one run will do, computed from its config and the dataset sizes."""

    recipe: str  # eval | sft | ei | grpo
    optimizer_steps: int | None  # optimizer steps of the run (EI: the upper bound); None for eval
    steps_detail: str  # how optimizer_steps arises
    validations: int  # evaluations of the policy, step 0 and the final one included (eval: 1)
    validations_detail: str  # when they happen and on how many examples
    peak_lr: float | None  # the configured peak learning rate; None for eval
    peak_step: int | None  # first optimizer step (1-based) at peak_lr; None if never reached, or eval
    lr_detail: str  # the schedule: "warm-up 3, cosine" or "constant"
    deliverable: str  # what the study yields

    @property
    def peak_lr_reached(self) -> bool:
        """Whether some optimizer step runs at the peak learning rate."""
        return self.peak_step is not None


@dataclass(frozen=True)
class ScheduleRow:
    """A study config or sweep point and its schedule."""

    study: str  # the config's stem, or <sweep>/<run directory name> for a sweep point
    config: str  # the YAML file, as configs/...
    varies: str  # the sweep point's overrides of its base ("key=value, ..."); "" for a study config
    schedule: Schedule  # what its run will do


def schedule_rows(configs: str | Path, sizes: DatasetSizes | None = None) -> list[ScheduleRow]:
    """A row per study config in ``configs`` (``*.yaml``) and per point of each sweep in
    ``configs/sweeps`` (``*.yaml``), in file order."""
    configs, sizes = Path(configs), sizes or DatasetSizes()
    if not any(configs.glob("*.yaml")):
        raise ConfigError(f"{configs}: no study configs (*.yaml) here; run from the repository root or pass --configs")
    rows = []
    for path in sorted(configs.glob("*.yaml")):
        study = load_study(path)
        rows.append(ScheduleRow(path.stem, _shown(path, configs), "", study_schedule(study.recipe, study.config, sizes)))
    for path in sorted((configs / "sweeps").glob("*.yaml")):
        base, runs = expand_sweep(path)
        for run in runs:
            study = load_study(base, run.overrides)
            varies = ", ".join(o for o in run.overrides if not o.startswith("out="))
            schedule = study_schedule(study.recipe, study.config, sizes)
            rows.append(ScheduleRow(f"{path.stem}/{Path(run.out).name}", _shown(path, configs), varies, schedule))
    return rows


def _shown(path: Path, configs: Path) -> str:
    """``path`` as the table names it: configs/... whatever the folder's location."""
    return f"{configs.name}/{path.relative_to(configs).as_posix()}"


def study_schedule(recipe: str, cfg: Any, sizes: DatasetSizes) -> Schedule:
    """The schedule of one loaded study config of ``recipe``."""
    if recipe == "sft":
        return sft_schedule(cfg, sizes)
    if recipe == "ei":
        return ei_schedule(cfg, sizes)
    if recipe == "grpo":
        return grpo_schedule(cfg, sizes)
    return eval_schedule(cfg, sizes)


def _validations(total: int, *, eval_every: int, at_start: bool, subset: int, final: int) -> tuple[int, str]:
    """(count, when) of a run's validations: step 0 when ``at_start``, every ``eval_every``
    steps but the last (the loop leaves that one to the final validation), then the final one
    on ``final`` examples. ``subset``: the in-run validation set's size."""
    during = (total - 1) // eval_every if eval_every else 0
    parts = (["step 0"] if at_start else []) + ([f"every {eval_every}"] if during else [])
    when = f"{', '.join(parts)} on {subset:,}; last on {final:,}" if parts else f"last on {final:,}"
    return int(at_start) + during + 1, when


def _final_size(cfg: Any, sizes: DatasetSizes) -> int:
    """Examples of the final validation: the whole validation set, or the in-run subset."""
    return sizes.val if cfg.final_eval_full else min(cfg.n_eval_examples, sizes.val)


def sft_schedule(cfg: Any, sizes: DatasetSizes) -> Schedule:
    """The schedule of an SFT run (``SFTConfig``), its learning rates from the recipe's ``lr_at``."""
    from .recipes.common import lr_at  # imports torch: only when a schedule is computed

    available = sizes.sft_filtered if cfg.filter_correct else sizes.sft
    n_used = min(cfg.n_examples or available, available)
    per_epoch = math.ceil(n_used / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(per_epoch * cfg.epochs, cfg.max_steps)
    detail = f"ceil({n_used:,}/{cfg.batch_size}) x {cfg.epochs} epochs"
    if total < per_epoch * cfg.epochs:
        detail += f", max_steps {cfg.max_steps}"
    warmup = cfg.warmup_for(total)
    lrs = [lr_at(s, total=total, base=cfg.learning_rate, warmup=warmup, schedule=cfg.schedule) for s in range(total)]
    peak = next((s + 1 for s, lr in enumerate(lrs) if math.isclose(lr, cfg.learning_rate, rel_tol=1e-9)), None)
    count, when = _validations(total, eval_every=cfg.eval_every, at_start=cfg.eval_at_start,
                               subset=min(cfg.n_eval_examples, sizes.val), final=_final_size(cfg, sizes))
    deliverable = f"accuracy-vs-step curve, {count} points" + ("; the filtered set's size" if cfg.filter_correct else "")
    lr_detail = f"warm-up {warmup}, {cfg.schedule}" + ("" if peak else f"; at most {max(lrs, default=0.0):.2g}")
    return Schedule(recipe="sft", optimizer_steps=total, steps_detail=detail, validations=count, validations_detail=when,
                    peak_lr=cfg.learning_rate, peak_step=peak, lr_detail=lr_detail, deliverable=deliverable)


def ei_schedule(cfg: Any, sizes: DatasetSizes) -> Schedule:
    """The schedule of an expert-iteration run (``EIConfig``). Optimizer steps: the upper bound,
    every sampled response kept; the learning rate is constant from the first optimizer step."""
    kept_max = min(cfg.batch_questions, sizes.train) * cfg.rollouts_per_question  # at most G per question
    per_step = math.ceil(kept_max / cfg.batch_size) * cfg.sft_epochs
    detail = f"ceil({kept_max:,} kept/{cfg.batch_size}) x E={cfg.sft_epochs} per EI step x {cfg.n_ei_steps}"
    count, when = _validations(cfg.n_ei_steps, eval_every=1, at_start=cfg.eval_at_start,  # ei.py: after every EI step
                               subset=min(cfg.n_eval_examples, sizes.val), final=_final_size(cfg, sizes))
    return Schedule(recipe="ei", optimizer_steps=per_step * cfg.n_ei_steps, steps_detail=detail, validations=count,
                    validations_detail=when.replace("every 1 ", "every EI step "), peak_lr=cfg.learning_rate,
                    peak_step=1, lr_detail="constant", deliverable=f"accuracy-vs-EI-step curve, {count} points")


def grpo_schedule(cfg: Any, sizes: DatasetSizes) -> Schedule:
    """The schedule of a GRPO run (``GRPOConfig``): a constant learning rate, peak at step 1.
    A time budget may end the run sooner: then the counts are upper bounds."""
    per_batch = cfg.optimizer_steps_per_rollout_batch
    detail = f"{cfg.n_grpo_steps} GRPO steps x {per_batch}"
    count, when = _validations(cfg.n_grpo_steps, eval_every=cfg.eval_every, at_start=cfg.eval_at_start,
                               subset=min(cfg.n_eval_examples, sizes.val), final=_final_size(cfg, sizes))
    deliverable = f"accuracy-vs-step curve, {count} points"
    if cfg.control.time_budget:
        detail += f"; the {cfg.control.time_budget} budget may stop it sooner"
        deliverable = f"best accuracy in {cfg.control.time_budget}; curve of up to {count} points"
    if cfg.n_prompts_per_rollout_batch > sizes.train:
        deliverable = f"none: {cfg.n_prompts_per_rollout_batch} questions per rollout batch > {sizes.train:,} train"
    return Schedule(recipe="grpo", optimizer_steps=cfg.n_grpo_steps * per_batch, steps_detail=detail, validations=count,
                    validations_detail=when, peak_lr=cfg.learning_rate, peak_step=1, lr_detail="constant",
                    deliverable=deliverable)


def eval_schedule(cfg: Any, sizes: DatasetSizes) -> Schedule:
    """An evaluation (``EvalConfig``): no training; one evaluation of ``limit`` or all validation examples."""
    n = min(cfg.limit or sizes.val, sizes.val)
    return Schedule(recipe="eval", optimizer_steps=None, steps_detail="no training", validations=1,
                    validations_detail=f"{n:,} examples x {cfg.n} sample(s)", peak_lr=None, peak_step=None,
                    lr_detail="", deliverable=f"zero-shot accuracy on {n:,} examples")


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

HEADER = ("study", "config", "varies", "optimizer steps", "validations", "peak LR", "deliverable")  # the table's columns


def _cells(row: ScheduleRow) -> tuple[str, ...]:
    """The row as the table's cells (plain text)."""
    s = row.schedule
    if s.optimizer_steps is None:
        steps, peak = "-", "-"
    else:
        steps = f"{'<= ' if s.recipe == 'ei' else ''}{s.optimizer_steps:,} ({s.steps_detail})"
        peak = f"yes, {s.peak_lr:g} at step {s.peak_step}" if s.peak_lr_reached else f"NO, {s.peak_lr:g} never"
        peak += f" ({s.lr_detail})"
    validations = f"{s.validations} ({s.validations_detail})"
    return (row.study, row.config, row.varies or "-", steps, validations, peak, s.deliverable)


def format_markdown(rows: list[ScheduleRow], sizes: DatasetSizes) -> str:
    """The rows as a Markdown table, after a line naming the sizes assumed."""
    lines = [sizes.describe(), "", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for row in rows:
        study, config, *rest = _cells(row)
        lines.append("| " + " | ".join([f"`{study}`", f"`{config}`", *rest]) + " |")
    return "\n".join(lines) + "\n"


def format_text(rows: list[ScheduleRow], sizes: DatasetSizes) -> str:
    """The rows as plain text, one line each: study -> config -> varies -> steps / validations / peak LR -> deliverable."""
    lines = [sizes.describe()]
    for row in rows:
        study, config, varies, steps, validations, peak, deliverable = _cells(row)
        lines.append(f"{study} -> {config} -> {varies} -> steps {steps} / validations {validations} / "
                     f"peak LR {peak} -> {deliverable}")
    return "\n".join(lines) + "\n"
