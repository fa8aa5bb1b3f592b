"""Config files for whole studies: run one, run a sweep of them, or smoke-test any of them on CPU.

A study config is a recipe's config with one extra top-level key naming the recipe::

    recipe: grpo                      # eval | sft | ei | grpo
    model: ${CS336_MODEL:-/data/a5-alignment/models/Qwen2.5-Math-1.5B}
    learning_rate: 1.0e-5
    ...

A sweep file names a base config, a grid of overrides and an output pattern::

    base: ../grpo.yaml
    out: runs/grpo_lr/lr={learning_rate}
    grid:
      learning_rate: [3.0e-6, 1.0e-5, 3.0e-5]
      "train_batch_size,gradient_accumulation_steps": [[256, 128], [128, 64]]   # varied together

The grid is the product of its entries; dotted fields appear in the pattern with "_"
(``{data_prompt}``).

``sweep`` runs the grid one run after another, skips runs already complete (their
``final.json`` / ``metrics.json`` exists) and resumes interrupted ones from their last
checkpoint. ``--smoke`` applies :func:`smoke_overrides` to every run: the tiny model, a
built-in task, CPU, and tiny sizes — never a different algorithm setting.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, apply_overrides, expand_env, from_dict, read_yaml, to_dict
from .run_dir import RunDirectoryLocked

__all__ = [
    "StudyRun",
    "SweepRun",
    "expand_sweep",
    "is_complete",
    "load_study",
    "recipe_classes",
    "run_study",
    "run_sweep",
    "smoke_overrides",
]

RECIPES = ("eval", "sft", "ei", "grpo")


def recipe_classes(recipe: str) -> tuple[type, Callable[[Any], dict[str, Any]]]:
    """The config dataclass and the entry function of a recipe name. Only that recipe's module
    is imported, and only when a command needs it, so ``--help`` stays instant."""
    if recipe == "eval":
        from .recipes.eval import EvalConfig, run_evaluation

        return EvalConfig, run_evaluation
    if recipe == "sft":
        from .recipes.sft import SFTConfig, train_sft

        return SFTConfig, train_sft
    if recipe == "ei":
        from .recipes.ei import EIConfig, train_ei

        return EIConfig, train_ei
    if recipe == "grpo":
        from .recipes.grpo import GRPOConfig, train_grpo

        return GRPOConfig, train_grpo
    raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")


@dataclass
class StudyRun:
    recipe: str
    config: Any  # the recipe's config dataclass, validated


def load_study(path: str | Path, overrides: list[str] | None = None, smoke: bool = False) -> StudyRun:
    """Read a study config (with its ``recipe:`` key), apply overrides, then the smoke overlay if asked."""
    data, lines = read_yaml(path)
    data = expand_env(data, str(path), lines)
    recipe = data.pop("recipe", None)
    if recipe is None:
        raise ConfigError(f"{path}:1: field 'recipe': missing; a study config names its recipe ({', '.join(RECIPES)})")
    cls, _ = recipe_classes(recipe)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    cfg = from_dict(cls, data, source=source, lines=lines)
    if smoke:
        cfg = from_dict(cls, apply_overrides(to_dict(cfg), smoke_overrides(recipe, cfg)), source=f"{source} + smoke")
    return StudyRun(recipe, cfg)


def run_study(study: StudyRun) -> dict[str, Any]:
    _, fn = recipe_classes(study.recipe)
    return fn(study.config)


# ---------------------------------------------------------------------------------------
# The smoke overlay: tiny model, built-in task, CPU, tiny sizes; algorithm settings untouched
# ---------------------------------------------------------------------------------------

# Fields the overlay may change: sizes, devices and paths. The test suite checks that a
# smoke run differs from its study config only in these.
SMOKE_FIELDS = frozenset(
    {
        "model", "out", "device", "generator_device", "data.train", "data.val", "data.n_task_train",
        "data.n_task_val", "data.task_knobs", "n_grpo_steps", "n_ei_steps", "epochs", "max_steps",
        "rollout_batch_size", "train_batch_size", "gradient_accumulation_steps", "batch_size", "micro_batch_size",
        "batch_questions", "sampling_max_tokens", "eval_max_tokens", "max_tokens", "n_eval_examples", "limit",
        "final_eval_full", "max_num_seqs", "kv_cache_memory_fraction", "gradient_checkpointing", "data",
        "control.progress", "control.time_budget", "control.checkpoint_every", "wandb_project", "max_seq_len",
        "overlong_buffer",
    }
)


def smoke_overrides(recipe: str, cfg: Any) -> list[str]:
    """key=value overrides that shrink a study to one step of the tiny model on CPU."""
    out = Path(getattr(cfg, "out", "runs/x"))
    common = {
        "model": "tiny",
        "device": "cpu",
        "out": str(out.parent / "smoke" / out.name),
        "wandb_project": "",
    }
    data = {"data.train": "task:arithmetic", "data.val": "", "data.n_task_train": 64, "data.n_task_val": 8,
            "data.task_knobs": {"digits": 1}}
    if recipe == "eval":
        common.pop("wandb_project")
        return _kv({**common, "data": "task:arithmetic", "limit": 4, "max_tokens": 16})
    if recipe == "sft":
        return _kv({**common, **data, "max_steps": 1, "batch_size": 4, "micro_batch_size": 2, "eval_max_tokens": 16,
                    "n_eval_examples": 4, "max_seq_len": 512, "control.progress": False})
    if recipe == "ei":
        return _kv({**common, **data, "n_ei_steps": 1, "batch_questions": 4, "sampling_max_tokens": 16, "batch_size": 4,
                    "micro_batch_size": 2, "n_eval_examples": 4, "final_eval_full": False, "control.progress": False})
    if recipe == "grpo":
        # Shrink the batch sizes by one factor so their ratios (on- vs off-policy) stay the same, and the
        # overlong penalty's buffer with the length limit (the same share of it).
        factor = max(1, cfg.rollout_batch_size // (4 * cfg.group_size))
        while factor > 1 and (cfg.train_batch_size % factor or cfg.train_batch_size // factor < cfg.group_size):
            factor //= 2
        train = cfg.train_batch_size // factor
        micro = next(m for m in (4, 2, 1) if train % m == 0)
        shrunk = {"overlong_buffer": max(1, cfg.overlong_buffer * 16 // cfg.sampling_max_tokens)} if cfg.overlong_buffer else {}
        return _kv({**common, **data, **shrunk, "generator_device": "same", "n_grpo_steps": 1,
                    "rollout_batch_size": cfg.rollout_batch_size // factor, "train_batch_size": train,
                    "micro_batch_size": micro, "gradient_accumulation_steps": None, "sampling_max_tokens": 16,
                    "n_eval_examples": 4, "final_eval_full": False, "control.progress": False, "control.time_budget": ""})
    raise ConfigError(f"unknown recipe {recipe!r}")


def _kv(fields: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in fields.items()]


# ---------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------


@dataclass
class SweepRun:
    out: str
    overrides: list[str]


def expand_sweep(path: str | Path) -> tuple[Path, list[SweepRun]]:
    """The base config of a sweep file and one run per grid point (in file order)."""
    data, lines = read_yaml(path)
    data = expand_env(data, str(path), lines)
    for key in ("base", "out", "grid"):
        if key not in data:
            raise ConfigError(f"{path}:1: field '{key}': missing (a sweep needs base, out and grid)")
    unknown = set(data) - {"base", "out", "grid", "overrides"}
    if unknown:
        raise ConfigError(f"{path}:{lines.get((sorted(unknown)[0],), 1)}: unknown sweep field(s) {sorted(unknown)}")
    base = (Path(path).parent / data["base"]).resolve()
    grid: dict[str, list[Any]] = data["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}:{lines.get(('grid',), 1)}: field 'grid': a mapping of field -> non-empty list of values")
    fixed = [f"{k}={json.dumps(v)}" for k, v in (data.get("overrides") or {}).items()]
    runs = []
    for values in itertools.product(*grid.values()):
        point: dict[str, Any] = {}
        for key, value in zip(grid.keys(), values):
            if "," in key:  # "a,b": [[a1, b1], [a2, b2]] varies fields together
                names = [k.strip() for k in key.split(",")]
                if not isinstance(value, list) or len(value) != len(names):
                    raise ConfigError(f"{path}: grid entry {key!r} needs lists of {len(names)} values, got {value!r}")
                point.update(zip(names, value))
            else:
                point[key] = value
        names = {k.replace(".", "_"): _fmt(v) for k, v in point.items()}
        try:
            out = str(data["out"]).format(**names)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"{path}:{lines.get(('out',), 1)}: field 'out': {data['out']!r} cannot be filled in ({type(e).__name__}: {e}); "
                f"it may name the grid's fields, written with _ for .: {', '.join('{' + n + '}' for n in names)}"
            ) from None
        runs.append(SweepRun(out, fixed + [f"{k}={json.dumps(v)}" for k, v in point.items()] + [f"out={json.dumps(out)}"]))
    return base, runs


def _fmt(value: Any) -> str:
    return "all" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def is_complete(recipe: str, out: str | Path) -> bool:
    out = Path(out)
    return (out / ("metrics.json" if recipe == "eval" else "final.json")).exists()


def run_sweep(path: str | Path, smoke: bool = False, dry_run: bool = False, echo: Callable[[str], None] = print) -> list[str]:
    """Run every grid point of a sweep in turn; returns the run directories. Complete runs are
    skipped, and so are runs another process holds (two processes can share one sweep)."""
    base, runs = expand_sweep(path)
    outs = []
    for i, run in enumerate(runs, start=1):
        study = load_study(base, run.overrides, smoke=smoke)
        out = study.config.out
        outs.append(out)
        if is_complete(study.recipe, out):
            echo(f"[{i}/{len(runs)}] {out}: complete, skipped")
            continue
        echo(f"[{i}/{len(runs)}] {out}: {'would run' if dry_run else 'running'} ({' '.join(run.overrides[:-1])})")
        if dry_run:
            continue
        if study.recipe != "eval":  # an interrupted run continues from its last checkpoint
            study.config.control.resume = True
        try:
            run_study(study)
        except RunDirectoryLocked as e:
            echo(f"[{i}/{len(runs)}] {out}: skipped, {e}")
    return outs
