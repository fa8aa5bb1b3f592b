"""Figures and a Markdown report from run directories (``python -m cs336_alignment report``).

``report_main([dir, ...], out)`` reads the directories and writes into ``out``:

- ``summary.png``: one page with the key panels of every group of runs (below);
- ``fig_<group>.png``: one figure per group, the handout deliverable it belongs to: validation
  accuracy against step and against wall-clock time, and the training metrics that deliverable's
  discussion asks about (entropy, response length, gradient norm, ...), one panel each;
- ``val_accuracy_vs_step.png`` and ``val_accuracy_vs_wall_clock.png``: validation accuracy of
  every group, one panel per group;
- ``report.md``: the runs and what varies, the clock of each run's time axis and its validation
  sampling (temperature, max tokens, examples, seed), final metrics with 95% intervals (and
  pass@1 / pass@k / maj@k for runs that validated with k >= 2 samples per question), every
  figure (relative links), example validation rollouts over time, and for evaluation
  directories the format/answer category table with examples of each category.

Directories. A training run (``recipes/sft.py``, ``ei.py``, ``grpo.py``) holds ``config.yaml``,
``metrics.jsonl`` (records with ``kind`` train/ei/eval/data), ``eval/<tag>_stepNNNNN/`` with
``generations.jsonl`` and ``metrics.json`` per validation, and ``final.json`` when complete; an
evaluation run (``python -m cs336_alignment eval``) holds ``config.yaml``, ``metrics.json`` and
``generations.jsonl``. A directory that is neither but holds runs, such as a sweep's directory
(``configs/sweeps/*.yaml`` write ``runs/<sweep>/<point>/``), stands for the runs in it.

Groups. The runs of one sweep directory form a group; the other training runs are grouped by
recipe. A group is drawn in its own figure, so SFT, EI and GRPO never share an axis. Its
deliverable (learning-rate sweep, baselines, length or std normalisation, off-policy broad or
focused sweep, clip ablation, prompt ablation, SFT data sizes, EI grid, leaderboard) is read
from the recipe and the config keys its runs differ in (:func:`recognise`); a group of no known
deliverable gets its recipe's generic panels.

Axes. The step axis is the recipe's own: SFT optimizer steps, EI steps, GRPO steps (rollout
batches). Validation records sit at their ``eval_step``; an off-policy GRPO run's optimizer steps
(train records) are spread evenly over their GRPO step, so the last lands on it. The time axis is
the run's budget clock: the training clock (``wall_clock_train``: training only, validation
excluded; a validation sits at the reading of the latest train record before it) or, for a run
budgeted on the wall clock (``control.budget_clock: wall``), each record's own ``wall_clock``
(validation and start-up included). A run with a time budget has it marked, and its time axis
ends there (or at its last record, if later). Records logged again for a step (a resumed run)
replace the earlier ones.

Statistics. Validation accuracy carries a 95% Wilson score interval for its N examples
(``n_examples`` of the eval record). Per-optimizer-step training curves are drawn as an
exponential moving average over the faint raw values; its span, in units of the step axis (a
tenth of the group's longest run, 2 to 50), is in the legend. A run that started from another
given run's model (config ``model``) has that run's last validation accuracy drawn as a dotted line.

Labels. Runs are labelled by the config keys in which they differ within their group (config.yaml
flattened to dotted keys, ignoring ``out``, ``run_name`` and ``wandb_*``), e.g.
``learning_rate=3e-05``; a run that differs in nothing is labelled by its directory name.

matplotlib (the ``plot`` extra) is imported only when there is something to plot.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .checkpoint import parse_duration
from .errors import UserError
from .run_dir import atomic_write_text, read_jsonl, umask_mode

__all__ = [
    "DELIVERABLES",
    "Deliverable",
    "EvalSnapshot",
    "FigureResult",
    "Panel",
    "Point",
    "REPORT_NAME",
    "ReportError",
    "ReportFigures",
    "Run",
    "RunGroup",
    "Series",
    "assign_labels",
    "build_markdown",
    "category_counts",
    "clock_text",
    "config_labels",
    "differing_keys",
    "draw_figures",
    "ema",
    "ema_span",
    "expand_run_dirs",
    "flatten_config",
    "format_value",
    "group_runs",
    "group_span",
    "is_run_dir",
    "load_report_inputs",
    "load_run",
    "number",
    "panel_series",
    "pass_at_k_row",
    "pick_examples",
    "prompt_tail",
    "recognise",
    "record_span",
    "render_group_figure",
    "render_summary",
    "render_validation_overview",
    "report_main",
    "run_colors",
    "sampling_row",
    "spread",
    "starting_points",
    "truncate_middle",
    "validation_examples",
    "wilson_interval",
]

REPORT_NAME = "report.md"
SUMMARY_NAME = "summary.png"
OVERVIEW_NAMES = {"step": "val_accuracy_vs_step.png", "wall_clock": "val_accuracy_vs_wall_clock.png"}
GROUP_FIGURE_PREFIX = "fig_"
#: Config keys that never distinguish runs.
IGNORED_KEYS: tuple[str, ...] = ("out", "run_name", "trackers")
IGNORED_PREFIXES: tuple[str, ...] = ("wandb_",)
#: Validation snapshots shown per run in "Example rollouts", and examples per snapshot.
ROLLOUT_SNAPSHOTS = 4
ROLLOUT_EXAMPLES = 2
#: Examples shown per format/answer category of an evaluation.
CATEGORY_EXAMPLES = 2
PROMPT_TAIL_CHARS = 300
RESPONSE_HEAD_CHARS = 700
RESPONSE_TAIL_CHARS = 300
#: z of a two-sided 95% interval.
WILSON_Z = 1.959963984540054
#: SFT, EI and GRPO validate with the handout's sampling, ``SamplingParams.r1_zero``: these are fixed
#: there; max tokens and seed come from the config (a test checks these against the recipe's).
VALIDATION_TEMPERATURE = 1.0
VALIDATION_TOP_P = 1.0
FIG_DPI = 110
#: A group of more runs than this has no legend of its runs on the summary (it would hide the data).
MAX_INLINE_LEGEND = 6


class ReportError(UserError, RuntimeError):
    """A report that cannot be made (missing directory, unreadable run, no matplotlib)."""

    exit_code = 2  # bad input


# --------------------------------------------------------------------------------------------
# reading runs

Recipe = Literal["sft", "ei", "grpo", "eval", "training"]
Source = Literal["train", "ei", "eval"]
#: What one step is on each recipe's step axis.
STEP_AXIS: dict[str, str] = {"sft": "optimizer step", "ei": "EI step", "grpo": "GRPO step"}
RECIPE_NAMES: dict[str, str] = {"sft": "SFT", "ei": "EI", "grpo": "GRPO", "training": "training"}


@dataclass
class EvalSnapshot:
    """One validation directory of a training run: ``eval/<tag>_step<NNNNN>/``."""

    tag: str
    step: int
    path: Path


@dataclass(frozen=True)
class Point:
    """One value of a metric: its place on the step axis, on the run's clock (seconds, if known),
    the value, and for a validation the number of examples it was measured on."""

    step: float
    wall_clock: float | None
    value: float
    n: int | None = None


@dataclass
class Run:
    """A run directory as the report sees it.

    Attributes:
        path: the directory.
        kind: ``"training"`` (has metrics.jsonl) or ``"evaluation"`` (metrics.json only).
        config: config.yaml flattened to dotted keys (empty if absent).
        records: metrics.jsonl records in file order (training runs).
        eval_metrics: metrics.json (evaluation runs).
        snapshots: validation directories, by step (training runs).
        label: legend and heading text (set by :func:`assign_labels`).
    """

    path: Path
    kind: Literal["training", "evaluation"]
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    snapshots: list[EvalSnapshot] = field(default_factory=list)
    label: str = ""

    @property
    def name(self) -> str:
        return self.path.resolve().name or str(self.path)

    @property
    def recipe(self) -> Recipe:
        """The recipe that wrote the run: config.yaml's ``recipe`` key, else the field only that
        recipe's config has; ``"training"`` for a training run of no known recipe."""
        named = self.config.get("recipe")
        if named in ("sft", "ei", "grpo", "eval"):
            return named
        if self.kind == "evaluation":
            return "eval"
        for recipe, key in (("grpo", "n_grpo_steps"), ("ei", "n_ei_steps"), ("sft", "eval_max_tokens")):
            if key in self.config:
                return recipe  # type: ignore[return-value]
        return "training"

    @property
    def budget_clock(self) -> str:
        """The clock the run's time budget counted ("train": training steps only; "wall": everything,
        validation and start-up included); its time axis uses that clock."""
        return str(self.config.get("control.budget_clock") or "train")

    @property
    def time_budget(self) -> float | None:
        """The time budget in seconds (``control.time_budget``), None without one or when unreadable."""
        try:
            return parse_duration(self.config.get("control.time_budget"))
        except ValueError:
            return None

    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "train"]

    def eval_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"]

    def points(self, source: Source, key: str) -> list[Point]:
        """Finite values of ``key`` in ``source`` records, one per step (the last logged), by step.

        Steps are on the recipe's step axis and clocks on the run's budget clock (see the module
        docstring); a validation before any training sits at clock 0.
        """
        latest: dict[float, tuple[dict[str, Any], float | None]] = {}
        train_clock: float | None = 0.0  # the training clock at the latest train/ei record
        for record in self.records:
            kind = record.get("kind")
            if kind in ("train", "ei"):
                train_clock = number(record.get("wall_clock_train"))
            if kind != source:
                continue
            step = number(record.get(f"{kind}_step"))
            if step is None or number(record.get(key)) is None:
                continue
            if self.budget_clock == "wall":  # every record carries the run's wall clock itself
                clock = number(record.get("wall_clock"))
            else:
                clock = train_clock if kind == "eval" else number(record.get("wall_clock_train"))
            latest[step] = (record, clock)
        positions = self._train_positions() if source == "train" else {}
        points = []
        for step in sorted(latest):
            record, clock = latest[step]
            n = number(record.get("n_examples")) if source == "eval" else None
            points.append(Point(positions.get(step, step), clock, number(record[key]) or 0.0, int(n) if n else None))
        return sorted(points, key=lambda p: p.step)

    def train_extent(self) -> float:
        """Where the run's last train record sits on the step axis (0 without any)."""
        positions = self._train_positions()
        steps = [s for r in self.train_records() if (s := number(r.get("train_step"))) is not None]
        return max((positions.get(s, s) for s in steps), default=0.0)

    def _train_positions(self) -> dict[float, float]:
        """Train record step -> place on the step axis. GRPO and EI train records count optimizer
        steps; those of outer step g (``grpo_step`` / ``ei_step``, 0-based) are spread evenly over
        (g, g + 1], so that the last sits where that step's validation does. SFT: the step itself."""
        outer_key = {"grpo": "grpo_step", "ei": "ei_step"}.get(self.recipe)
        if outer_key is None:
            return {}
        outer_of: dict[float, float] = {}
        for record in self.train_records():
            step, outer = number(record.get("train_step")), number(record.get(outer_key))
            if step is not None and outer is not None:
                outer_of[step] = outer  # the last logged wins
        members: dict[float, list[float]] = {}
        for step in sorted(outer_of):
            members.setdefault(outer_of[step], []).append(step)
        return {step: outer + (i + 1) / len(steps) for outer, steps in members.items() for i, step in enumerate(steps)}


def number(value: Any) -> float | None:
    """A finite float from a metric value (numbers, or strings such as "nan"); else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted keys: ``{"data": {"train": x}}`` -> ``{"data.train": x}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


_SNAPSHOT_NAME = re.compile(r"^(?P<tag>.+)_step(?P<step>\d+)$")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a training run (metrics.jsonl) or an evaluation run (metrics.json)."""
    return (path / "metrics.jsonl").exists() or (path / "metrics.json").exists()


def load_run(path: str | Path) -> Run:
    """Read a training or evaluation run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    config: dict[str, Any] = {}
    config_path = path / "config.yaml"
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ReportError(f"{config_path}: invalid YAML: {e}") from e
        if isinstance(loaded, Mapping):
            config = flatten_config(loaded)
    if (path / "metrics.jsonl").exists():
        records = _read_jsonl(path / "metrics.jsonl")
        snapshots = []
        eval_root = path / "eval"
        if eval_root.is_dir():
            for child in eval_root.iterdir():
                m = _SNAPSHOT_NAME.match(child.name)
                if child.is_dir() and m:
                    snapshots.append(EvalSnapshot(m.group("tag"), int(m.group("step")), child))
        snapshots.sort(key=lambda s: (s.step, s.tag))
        return Run(path=path, kind="training", config=config, records=records, snapshots=snapshots)
    if (path / "metrics.json").exists():
        return Run(path=path, kind="evaluation", config=config, eval_metrics=_read_json(path / "metrics.json"))
    raise ReportError(f"{path}: neither metrics.jsonl (a training run) nor metrics.json (an evaluation run)")


def expand_run_dirs(paths: Sequence[str | Path]) -> list[tuple[Path | None, list[Path]]]:
    """Each given directory as (sweep directory or None, its run directories).

    A run directory stands for itself; a directory that is no run but holds run directories (a
    sweep's) stands for those, in name order (directories in it that are no runs, such as a
    report, are passed over).
    """
    expanded: list[tuple[Path | None, list[Path]]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory")
        if is_run_dir(path):
            expanded.append((None, [path]))
            continue
        children = sorted((c for c in path.iterdir() if c.is_dir() and is_run_dir(c)), key=lambda c: c.name)
        if not children:
            raise ReportError(f"{path}: neither metrics.jsonl (a training run) nor metrics.json (an evaluation run), "
                              "nor a sweep directory holding runs")
        expanded.append((path, children))
    return expanded


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except ValueError as e:
        raise ReportError(str(e)) from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read JSON: {e}") from e
    return obj if isinstance(obj, dict) else {}


# --------------------------------------------------------------------------------------------
# labels


def format_value(value: Any) -> str:
    """Compact text of a config value: ``3e-05``, ``true``, ``[0.9, 0.95]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "{}" if not value else json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or any(key.startswith(p) for p in IGNORED_PREFIXES)


def differing_keys(configs: Sequence[Mapping[str, Any]], require_common: bool = False) -> list[str]:
    """Flattened config keys whose values are not the same in every config, in first-seen order.

    A key missing from some configs counts as differing unless ``require_common`` is set (then
    only keys every config has are compared: a key added in a later version of a recipe does not
    distinguish runs).
    """
    keys: list[str] = []
    for config in configs:
        keys.extend(k for k in config if k not in keys and not _ignored(k))
    if require_common:
        keys = [k for k in keys if all(k in c for c in configs)]
    return [k for k in keys if len({format_value(c[k]) if k in c else "\0unset" for c in configs}) > 1]


def config_labels(configs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """``key=value, ...`` over the keys in which the configs differ; the name where none differ.

    Keys every config has are preferred; keys only some configs have are used too when no common
    key differs or the common ones leave two runs with the same label.
    """

    def labels_for(keys: list[str]) -> list[str]:
        return [
            ", ".join(f"{k}={format_value(c[k])}" for k in keys if k in c) or name for c, name in zip(configs, names)
        ]

    if len(configs) < 2:
        return list(names)
    common = differing_keys(configs, require_common=True)
    labels = labels_for(common)
    if not common or len(set(labels)) < len(labels):
        labels = labels_for(differing_keys(configs))
    return labels


def assign_labels(runs: Sequence[Run], labels: Sequence[str] | None = None,
                  groups: Sequence[Sequence[Run]] | None = None) -> None:
    """Set each run's label: the given labels (one per run, in order), or the config differences
    within each group (default: within each kind of run).

    Labels that would coincide get the directory name appended.
    """
    if labels is not None:
        if len(labels) != len(runs):
            raise ReportError(f"got {len(labels)} labels for {len(runs)} runs")
        for run, label in zip(runs, labels):
            run.label = label
        return
    if groups is None:
        groups = [[r for r in runs if r.kind == kind] for kind in ("training", "evaluation")]
    for group in groups:
        for run, label in zip(group, config_labels([r.config for r in group], [r.name for r in group])):
            run.label = label
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1 and run.label != run.name:
            run.label = f"{run.label} ({run.name})"


# --------------------------------------------------------------------------------------------
# statistics


def wilson_interval(accuracy: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``accuracy`` measured on ``n`` examples (95% for
    the default ``z``): (c - h, c + h) with c = (p + z^2/2n) / (1 + z^2/n) and
    h = z sqrt(p(1 - p)/n + z^2/4n^2) / (1 + z^2/n). Unlike p +- z sqrt(p(1-p)/n) it stays in
    [0, 1] and does not collapse to a point at 0 or 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = min(1.0, max(0.0, accuracy))
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def ema(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with alpha = 2 / (span + 1), started at the first value:
    e[0] = x[0], e[t] = alpha x[t] + (1 - alpha) e[t-1]. A span of 1 returns the values."""
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    alpha = 2.0 / (span + 1)
    smoothed: list[float] = []
    for value in values:
        smoothed.append(value if not smoothed else alpha * value + (1 - alpha) * smoothed[-1])
    return smoothed


def ema_span(n_points: int) -> int:
    """The EMA span for a curve of ``n_points`` per-step values: a tenth of them, between 2 and 50;
    1 (no smoothing) for fewer than 20 points."""
    return 1 if n_points < 20 else max(2, min(50, round(n_points / 10)))


# --------------------------------------------------------------------------------------------
# panels and deliverables


@dataclass(frozen=True)
class Panel:
    """One axes: ``metric`` of ``source`` records of every run in a group, against the step axis or
    the run's clock. ``note`` says why a run may lack it."""

    name: str
    title: str
    ylabel: str
    source: Source
    metric: str
    x: Literal["step", "wall_clock"] = "step"
    note: str = ""

    @property
    def is_accuracy(self) -> bool:
        return self.source == "eval" and self.metric == "accuracy"

    @property
    def smoothed(self) -> bool:
        """Per-optimizer-step values: drawn as an EMA over the raw values."""
        return self.source == "train"


ACC_STEP = Panel("val_accuracy_step", "Validation accuracy", "accuracy (95% Wilson interval)", "eval", "accuracy",
                 note="no validation records")
ACC_WALL = Panel("val_accuracy_wall", "Validation accuracy vs time", "accuracy (95% Wilson interval)", "eval", "accuracy",
                 x="wall_clock", note="no validation with a clock reading")
TRAIN_REWARD = Panel("train_reward", "Train reward (rollouts)", "mean reward", "train", "train_reward_mean",
                     note="only GRPO logs rollout rewards per step")
TOKEN_ENTROPY = Panel("token_entropy", "Token entropy (training batches)", "mean entropy (nats)", "train", "token_entropy")
RESPONSE_LENGTH = Panel("response_length", "Response length (rollouts)", "mean tokens", "train",
                        "train_response_length_mean", note="only GRPO logs rollout lengths per step")
VAL_LENGTH = Panel("val_response_length", "Response length (validation)", "mean tokens", "eval", "mean_response_length")
VAL_ENTROPY = Panel("val_entropy", "Response entropy (validation)", "mean entropy (nats)", "eval", "mean_token_entropy")
GRAD_NORM = Panel("grad_norm", "Gradient norm (before clipping)", "L2 norm", "train", "grad_norm")
CLIP_FRACTION = Panel("clip_fraction", "Clip fraction", "fraction of tokens clipped", "train", "clip_fraction",
                      note="only grpo_clip runs log it")
LOSS = Panel("train_loss", "Train loss", "loss", "train", "loss")
EI_ENTROPY = Panel("rollout_entropy", "Rollout entropy (per EI step)", "mean entropy (nats)", "ei", "rollout_entropy",
                   note="EI logs it with log_entropy: true")
EI_REWARD = Panel("rollout_reward", "Rollout reward (per EI step)", "mean reward", "ei", "rollout_reward_mean")
EI_KEPT = Panel("kept", "Expert responses kept (per EI step)", "responses", "ei", "n_kept")


@dataclass(frozen=True)
class Deliverable:
    """A figure of the handout: its runs' recipe, what it asks, its panels, and the two panels of
    each group that go on the summary page."""

    key: str
    title: str
    recipe: str
    asks: str
    panels: tuple[Panel, ...]
    summary: tuple[Panel, ...]


# Panels of each figure; the handout's discussions ask about entropy, response length and gradient norm.
_SFT = (ACC_STEP, ACC_WALL, LOSS, GRAD_NORM, TOKEN_ENTROPY, VAL_LENGTH)
_EI = (ACC_STEP, ACC_WALL, EI_ENTROPY, VAL_ENTROPY, EI_REWARD, VAL_LENGTH)
_GRPO = (ACC_STEP, ACC_WALL, TRAIN_REWARD, TOKEN_ENTROPY, RESPONSE_LENGTH, GRAD_NORM)
_GRPO_NORMS = (ACC_STEP, ACC_WALL, RESPONSE_LENGTH, GRAD_NORM, TOKEN_ENTROPY, TRAIN_REWARD)
_OFF_POLICY = (ACC_STEP, ACC_WALL, TRAIN_REWARD, TOKEN_ENTROPY, CLIP_FRACTION, GRAD_NORM)
_ABLATION = (ACC_STEP, ACC_WALL, TOKEN_ENTROPY, RESPONSE_LENGTH, GRAD_NORM)


DELIVERABLES: dict[str, Deliverable] = {d.key: d for d in (
    Deliverable("sft_sizes", "SFT: training set size", "sft",
                "validation accuracy curves for 128, 256, 512, 1024 and all examples", _SFT, (ACC_STEP, LOSS)),
    Deliverable("sft_filtered", "SFT: filtered vs unfiltered traces", "sft",
                "validation accuracy with only the correct traces, against all of them", _SFT, (ACC_STEP, LOSS)),
    Deliverable("ei_grid", "Expert iteration: D_b, G and SFT epochs", "ei",
                "validation accuracy curves per rollout configuration, and the entropy of the responses over training",
                _EI, (ACC_STEP, EI_ENTROPY)),
    Deliverable("grpo_lr", "GRPO: learning rate", "grpo",
                "validation reward curves for each learning rate", _GRPO, (ACC_STEP, TRAIN_REWARD)),
    Deliverable("grpo_baselines", "GRPO: baselines", "grpo",
                "validation reward curves with and without the group-mean baseline", _GRPO, (ACC_STEP, TRAIN_REWARD)),
    Deliverable("grpo_length_norm", "GRPO: length normalisation", "grpo",
                "validation reward curves for masked_mean vs masked_normalize, and the metrics with a trend",
                _GRPO_NORMS, (ACC_STEP, RESPONSE_LENGTH)),
    Deliverable("grpo_std_norm", "GRPO: group std normalisation", "grpo",
                "validation reward curves with and without std normalisation, and the metrics with a trend",
                _GRPO_NORMS, (ACC_STEP, GRAD_NORM)),
    Deliverable("grpo_off_policy_broad", "Off-policy GRPO: broad sweep", "grpo",
                "validation reward against GRPO steps and wall-clock time over epochs per rollout batch and train "
                "batch size (< 50 steps)", _OFF_POLICY, (ACC_STEP, ACC_WALL)),
    Deliverable("grpo_off_policy_focused", "Off-policy GRPO: focused sweep", "grpo",
                "validation reward against GRPO steps and wall-clock time around the broad sweep's best settings "
                "(200 steps)", _OFF_POLICY, (ACC_STEP, ACC_WALL)),
    Deliverable("grpo_clip_ablation", "GRPO: clip ablation (GRPO-Clip vs GRPO-No-Clip)", "grpo",
                "validation reward curves with and without clipping, and entropy, response length and gradient norm",
                (*_ABLATION, CLIP_FRACTION), (ACC_STEP, TOKEN_ENTROPY)),
    Deliverable("grpo_prompt_ablation", "GRPO: prompt ablation (r1_zero vs question_only)", "grpo",
                "validation reward curves for each prompt, and entropy, response length and gradient norm",
                (*_ABLATION, TRAIN_REWARD), (ACC_STEP, RESPONSE_LENGTH)),
    Deliverable("leaderboard", "Leaderboard: accuracy within the time budget", "grpo",
                "the best validation accuracy within the wall-clock budget",
                (ACC_WALL, ACC_STEP, *_GRPO[2:]), (ACC_WALL, TRAIN_REWARD)),
    # the generic figure of each recipe: a group of runs that is no study of the handout
    Deliverable("sft", "SFT", "sft", "", _SFT, (ACC_STEP, LOSS)),
    Deliverable("ei", "Expert iteration", "ei", "", (*_EI, EI_KEPT, LOSS), (ACC_STEP, EI_ENTROPY)),
    Deliverable("grpo", "GRPO", "grpo", "", (*_GRPO, CLIP_FRACTION, LOSS), (ACC_STEP, TRAIN_REWARD)),
    Deliverable("training", "Training runs", "training", "", (ACC_STEP, ACC_WALL, LOSS, GRAD_NORM, TOKEN_ENTROPY),
                (ACC_STEP, LOSS)),
)}


#: Config keys that say how a run was executed or validated, not what it trained: a group of runs that
#: differ in these too is still the study its other keys make it (``control.`` covers every key under it).
EXECUTION_KEYS = frozenset({
    "control.", "device", "generator_device", "backend", "gradient_checkpointing", "micro_batch_size",
    "gradient_accumulation_steps", "max_num_seqs", "kv_cache_memory_fraction", "gpu_memory_utilization",
    "attn_implementation", "use_liger_kernel", "logprob_chunk_size", "export_dtype", "length_grouping", "eval_every",
    "eval_at_start", "n_eval_examples", "final_eval_full", "log_rollout_examples", "log_entropy",
})


def _execution_key(key: str) -> bool:
    return key in EXECUTION_KEYS or any(key.startswith(k) for k in EXECUTION_KEYS if k.endswith("."))


def recognise(recipe: str, configs: Sequence[Mapping[str, Any]]) -> Deliverable:
    """The deliverable a group of runs of one recipe belongs to: the study whose keys are the only
    ones (execution keys aside, :data:`EXECUTION_KEYS`) in which the runs differ; the recipe's
    generic figure when no study fits. A single run is the leaderboard when it has a wall-clock budget."""
    varying = {k for k in differing_keys(configs) if not _execution_key(k)}
    loss_types = {format_value(c.get("loss_type")) for c in configs}

    def only(*keys: str) -> bool:
        return bool(varying) and varying <= set(keys)

    key = recipe
    if recipe == "sft":
        if only("filter_correct", "n_examples", "answers") and "filter_correct" in varying:
            key = "sft_filtered"
        elif only("n_examples", "epochs", "batch_size", "warmup_steps", "warmup_ratio") and "n_examples" in varying:
            key = "sft_sizes"
    elif recipe == "ei":
        if only("batch_questions", "rollouts_per_question", "sft_epochs"):
            key = "ei_grid"
    elif recipe == "grpo":
        steps = [n for c in configs if (n := number(c.get("n_grpo_steps"))) is not None]
        clip_ablation = "loss_type" in varying and loss_types <= {"grpo_clip", "grpo_no_clip"}
        if clip_ablation and only("loss_type", "n_grpo_steps", "cliprange"):
            key = "grpo_clip_ablation"
        elif only("loss_type") and loss_types <= {"no_baseline", "reinforce_with_baseline"}:
            key = "grpo_baselines"
        elif only("data.prompt", "data.reward"):
            key = "grpo_prompt_ablation"
        elif only("length_normalization"):
            key = "grpo_length_norm"
        elif only("use_std_normalization"):
            key = "grpo_std_norm"
        elif only("epochs_per_rollout_batch", "train_batch_size"):
            key = "grpo_off_policy_broad" if steps and max(steps) < 50 else "grpo_off_policy_focused"
        elif only("learning_rate"):
            key = "grpo_lr"
        elif not varying and all(c.get("control.budget_clock") == "wall" and c.get("control.time_budget") for c in configs):
            key = "leaderboard"
    return DELIVERABLES.get(key, DELIVERABLES["training"])


@dataclass
class RunGroup:
    """Training runs of one recipe drawn together: a sweep directory's, or the loose runs of a recipe.

    Attributes:
        runs: in legend order (a sweep's by the values of the keys its runs differ in).
        deliverable: what the group's figure shows (:func:`recognise`).
        sweep: the sweep directory the runs came from, if any.
        slug: the figure's file name is ``fig_<slug>.png``.
    """

    runs: list[Run]
    deliverable: Deliverable
    sweep: Path | None = None
    slug: str = ""

    @property
    def recipe(self) -> str:
        return self.deliverable.recipe

    @property
    def title(self) -> str:
        where = f" ({self.sweep.name})" if self.sweep is not None else ""
        return self.deliverable.title + where

    @property
    def varying(self) -> list[str]:
        return differing_keys([r.config for r in self.runs], require_common=True) if len(self.runs) > 1 else []

    @property
    def filename(self) -> str:
        return f"{GROUP_FIGURE_PREFIX}{self.slug}.png"


def _sort_key(run: Run, keys: Sequence[str]) -> tuple[tuple[int, float, str], ...]:
    """Numbers by value, then text, then unset/null (``n_examples: null`` is "all": last)."""
    def one(value: Any) -> tuple[int, float, str]:
        x = number(value)
        if x is not None:
            return (0, x, "")
        return (2, 0.0, "") if value is None else (1, 0.0, format_value(value))

    return tuple(one(run.config.get(k)) for k in keys)


def group_runs(sources: Sequence[tuple[Path | None, Sequence[Run]]]) -> list[RunGroup]:
    """The groups of the training runs, in order of first appearance: each sweep directory's runs
    (one group per recipe in it, sorted by the values they differ in), and the other runs by recipe.
    Figure slugs are the sweep directory's name or the deliverable's key, made unique."""
    buckets: dict[tuple[str, str], tuple[Path | None, list[Run]]] = {}
    for sweep, runs in sources:
        for run in runs:
            if run.kind != "training":
                continue
            key = (str(sweep) if sweep is not None else "", run.recipe)
            buckets.setdefault(key, (sweep, []))[1].append(run)
    groups, used = [], set()
    for (_, recipe), (sweep, runs) in buckets.items():
        if sweep is not None:
            keys = differing_keys([r.config for r in runs])
            runs = sorted(runs, key=lambda r: _sort_key(r, keys))
        deliverable = recognise(recipe, [r.config for r in runs])
        base = re.sub(r"[^A-Za-z0-9_.=-]+", "_", sweep.name if sweep is not None else deliverable.key)
        slug, i = base, 2
        while slug in used:
            slug, i = f"{base}_{i}", i + 1
        used.add(slug)
        groups.append(RunGroup(runs, deliverable, sweep, slug))
    return groups


# --------------------------------------------------------------------------------------------
# figures


@dataclass
class Series:
    """One run's points in one panel, in the run's colour."""

    run: Run
    points: list[Point]
    color: Any


@dataclass
class FigureResult:
    """A figure written to ``path`` (None: nothing to draw, no file), the matplotlib Figure, the
    panels drawn and those no run had data for, and per drawn panel title the runs it lacks."""

    path: Path | None
    figure: Any = None
    drawn: list[Panel] = field(default_factory=list)
    skipped: list[Panel] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)


#: A run's starting point drawn on its accuracy panels: run key -> (label of the run it started from, accuracy).
Starts = Mapping[str, tuple[str, float]]


def _key(run: Run) -> str:
    """A run's identity across groups (two sweeps may hold runs of the same directory name)."""
    return str(run.path.resolve())


def _require_matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or a one-line ReportError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'cs336-alignment[plot]'") from None
    return Figure, FigureCanvasAgg


def _new_figure(n_panels: int, cols: int, panel: tuple[float, float], *, top: float, bottom: float,
                gap: tuple[float, float] = (0.8, 0.85)) -> tuple[Any, list[Any]]:
    """A Figure with ``n_panels`` axes of ``panel`` inches on a grid ``cols`` wide (unused cells
    removed), ``top`` inches above for the title and ``bottom`` below for labels and legends, ``gap``
    inches between panels (for tick and axis labels, and the next row's titles). The layout is
    fixed rather than constrained: drawing is several times faster."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    rows = math.ceil(n_panels / cols)
    left, right = 0.75, 0.3
    width = left + right + cols * panel[0] + (cols - 1) * gap[0]
    height = top + bottom + rows * panel[1] + (rows - 1) * gap[1]
    fig = Figure(figsize=(width, height), dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=gap[0] / panel[0], hspace=gap[1] / panel[1])
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def _grid_columns(n_panels: int) -> int:
    return n_panels if n_panels <= 3 else 2 if n_panels == 4 else 3 if n_panels <= 6 else 4


def run_colors(group: RunGroup) -> list[Any]:
    """One colour per run: a sweep along one ordered key (each run its own value) on a sequential
    map, low to high; other groups on the qualitative tab10 (tab20 beyond 10 runs)."""
    import matplotlib

    runs, keys = group.runs, group.varying
    first = [r.config.get(keys[0]) for r in runs] if keys else []
    numeric = all(v is None or number(v) is not None for v in first)  # None: "all" (n_examples), the largest
    distinct = len({format_value(v) for v in first}) == len(runs)
    if group.sweep is not None and len(runs) >= 3 and first and numeric and distinct:
        cmap = matplotlib.colormaps["viridis"]
        return [cmap(0.85 * i / (len(runs) - 1)) for i in range(len(runs))]
    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(len(runs))]


def group_span(group: RunGroup) -> int:
    """The EMA span of a group's training curves in units of its step axis (GRPO steps, EI steps,
    SFT optimizer steps), from the run that reaches furthest (see :func:`ema_span`)."""
    return ema_span(int(max((run.train_extent() for run in group.runs), default=0.0)))


def record_span(span: int, xs: Sequence[float]) -> int:
    """An EMA span of ``span`` step-axis units in records of a curve at ``xs``: an off-policy run
    with 4 optimizer steps per GRPO step smooths over 4 records per GRPO step of the span."""
    per_unit = len(xs) / xs[-1] if xs and xs[-1] > 0 else 1.0
    return max(1, round(span * per_unit))


def panel_series(panel: Panel, runs: Sequence[Run]) -> tuple[list[Series], list[str]]:
    """The runs' points for ``panel`` (on a time panel, those with a clock reading), not yet
    coloured (:func:`_paint`), and the labels of the runs with none."""
    series, missing = [], []
    for run in runs:
        points = run.points(panel.source, panel.metric)
        if panel.x == "wall_clock":
            points = [p for p in points if p.wall_clock is not None]
        if points:
            series.append(Series(run, points, None))
        else:
            missing.append(run.label)
    return series, missing


def _paint(group: RunGroup, series: Iterable[Series]) -> list[Any]:
    """Colour each series by its run (:func:`run_colors`); returns the group's colours. Only called
    once there is something to draw: it imports matplotlib."""
    _require_matplotlib()  # a one-line error without it
    colors = run_colors(group)
    color_of = {_key(r): c for r, c in zip(group.runs, colors)}
    for s in series:
        s.color = color_of[_key(s.run)]
    return colors


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 1800:
        return 3600.0, "hours"
    if max_seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _time_label(series: Sequence[Series], unit: str) -> str:
    clocks = {s.run.budget_clock for s in series}
    if clocks == {"wall"}:
        return f"wall clock ({unit}; validation and start-up included)"
    if clocks == {"train"}:
        return f"training time ({unit}; validation excluded)"
    return f"time ({unit}; each run on its budget clock)"


def _draw_panel(ax: Any, panel: Panel, recipe: str, series: Sequence[Series], span: int, starts: Starts) -> None:
    """Draw every run's curve of ``panel`` on ``ax``, with Wilson bands, start lines and budgets.

    Artists carry gids naming what they are (``ema:<label>``, ``raw:<label>``, ``value:<label>``,
    ``wilson:<label>``, ``start:<label>``, ``budget``) for tests and readers of the figure.
    """
    budgets = sorted({b for s in series if (b := s.run.time_budget)}) if panel.x == "wall_clock" else []
    latest = max((p.wall_clock or 0.0 for s in series for p in s.points), default=0.0)
    scale, unit = _time_unit(max([latest, *budgets])) if panel.x == "wall_clock" else (1.0, "")
    for s in series:
        xs = [p.step if panel.x == "step" else (p.wall_clock or 0.0) / scale for p in s.points]
        ys = [p.value for p in s.points]
        label = s.run.label
        if panel.smoothed and span > 1:
            ax.plot(xs, ys, color=s.color, alpha=0.25, linewidth=0.8, gid=f"raw:{label}")
            ax.plot(xs, ema(ys, record_span(span, xs)), color=s.color, linewidth=1.6, gid=f"ema:{label}", label=label)
        else:
            marker = "o" if not panel.smoothed or len(xs) <= 30 else None
            ax.plot(xs, ys, color=s.color, linewidth=1.4, marker=marker, markersize=3.5, gid=f"value:{label}", label=label)
        if panel.is_accuracy:
            _draw_wilson(ax, xs, s.points, s.color, label, alpha=0.18 if len(series) <= 4 else 0.08)
            if _key(s.run) in starts:
                ax.axhline(starts[_key(s.run)][1], color=s.color, linestyle=(0, (1, 2)), linewidth=1.1, gid=f"start:{label}")
    if budgets:
        _mark_budgets(ax, budgets, scale, latest)
    else:
        ax.set_xlim(left=0.0)  # steps and clocks start at 0
    if panel.is_accuracy:
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, -0.02), min(high, 1.02))
    ax.set_xlabel(STEP_AXIS.get(recipe, "step") if panel.x == "step" else _time_label(series, unit), fontsize=8)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def _mark_budgets(ax: Any, budgets: Sequence[float], scale: float, latest: float) -> None:
    """A dotted line at each time budget (seconds; the axis is in ``scale`` seconds), and the axis
    ending at the largest budget, or at the last record (``latest``) if that came later."""
    for budget in budgets:
        ax.axvline(budget / scale, color="0.3", linestyle=":", linewidth=1.3, gid="budget")
        ax.annotate(f"time budget {_fmt_duration(budget)}", (budget / scale, 0.98), xycoords=("data", "axes fraction"),
                    xytext=(-3, 0), textcoords="offset points", rotation=90, ha="right", va="top", fontsize=7, color="0.3")
    ax.set_xlim(0.0, max(max(budgets), latest) / scale)


def _draw_wilson(ax: Any, xs: Sequence[float], points: Sequence[Point], color: Any, label: str, alpha: float) -> None:
    """The 95% Wilson interval of each validation with a known N: a band, or an error bar for a
    single validation."""
    banded = [(x, wilson_interval(p.value, p.n)) for x, p in zip(xs, points) if p.n]
    if len(banded) == 1:
        x, (low, high) = banded[0]
        value = next(p.value for p in points if p.n)
        bars = ax.errorbar([x], [value], yerr=[[value - low], [high - value]], fmt="none", ecolor=color, capsize=3,
                           linewidth=1.0)
        bars.lines[2][0].set_gid(f"wilson:{label}")  # the vertical bar: a LineCollection from low to high
    elif banded:
        ax.fill_between([x for x, _ in banded], [lo for _, (lo, _) in banded], [hi for _, (_, hi) in banded],
                        color=color, alpha=alpha, linewidth=0, gid=f"wilson:{label}")


def _wrap(text: str, width: int = 60) -> str:
    return textwrap.fill(text, width) if len(text) > width else text


def _style_entries(panels: Iterable[Panel], recipe: str, span: int, series: Iterable[Series], starts: Starts
                   ) -> list[tuple[Any, str]]:
    """Legend entries for how things are drawn: validation bands, the EMA and its span, budget, start."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels, series = list(panels), list(series)
    entries: list[tuple[Any, str]] = []
    if any(p.is_accuracy for p in panels):
        entries.append(((Patch(color="0.5", alpha=0.3, linewidth=0), Line2D([], [], color="0.3", marker="o", markersize=3.5)),
                        "validation: mean and 95% Wilson interval"))
    if span > 1 and any(p.smoothed for p in panels):
        entries.append(((Line2D([], [], color="0.3", alpha=0.3, linewidth=0.8), Line2D([], [], color="0.3", linewidth=1.6)),
                        f"training: EMA, span {span} {STEP_AXIS.get(recipe, 'step')}s (faint: each optimizer step)"))
    if any(p.x == "wall_clock" for p in panels) and any(s.run.time_budget for s in series):
        entries.append((Line2D([], [], color="0.3", linestyle=":"), "time budget"))
    if any(p.is_accuracy for p in panels):
        origins = dict.fromkeys(starts[_key(s.run)] for s in series if _key(s.run) in starts)
        for label, accuracy in origins:
            entries.append((Line2D([], [], color="0.3", linestyle=(0, (1, 2))),
                            _wrap(f"start: last validation of {label} ({accuracy:.3f})")))
    return entries


def _run_entries(runs: Sequence[Run], colors: Sequence[Any]) -> list[tuple[Any, str]]:
    from matplotlib.lines import Line2D

    return [(Line2D([], [], color=c, linewidth=2), _wrap(r.label)) for r, c in zip(runs, colors)]


def _save_atomically(fig: Any, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".png")
    os.fchmod(fd, umask_mode())  # readable as the umask allows, like every file we write
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=FIG_DPI)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_group_figure(group: RunGroup, out_dir: Path, starts: Starts | None = None) -> FigureResult:
    """The group's deliverable figure, ``fig_<slug>.png``: one panel per metric some run logged,
    one legend of the runs (what varies) and of how curves are drawn. No data: no file."""
    starts = starts or {}
    target = out_dir / group.filename
    result = FigureResult(None)
    cells = []
    for panel in group.deliverable.panels:
        series, missing = panel_series(panel, group.runs)
        if not series:
            result.skipped.append(panel)
            continue
        cells.append((panel, series))
        result.drawn.append(panel)
        if missing:
            result.missing[panel.title] = missing
    if not cells:
        target.unlink(missing_ok=True)
        return result
    colors = _paint(group, [s for _, series in cells for s in series])
    span = group_span(group)
    runs = _run_entries(group.runs, colors)
    styles = _style_entries(result.drawn, group.recipe, span, [s for _, series in cells for s in series], starts)
    run_cols = min(len(runs), 4 if max(len(r.label) for r in group.runs) <= 30 else 2)
    fig, axes = _new_figure(len(cells), _grid_columns(len(cells)), (4.4, 3.1), top=0.6, bottom=2.0)
    for ax, (panel, series) in zip(axes, cells):
        _draw_panel(ax, panel, group.recipe, series, span, starts)
        ax.set_title(panel.title, fontsize=9)
    legends = [fig.legend([h for h, _ in runs], [t for _, t in runs], loc="lower center", fontsize=8, ncols=run_cols,
                          title_fontsize=8, title=f"varies: {', '.join(group.varying)}" if group.varying else None)]
    legends[0].set_gid("runs")
    if styles:
        legends.insert(0, fig.legend([h for h, _ in styles], [t for _, t in styles], loc="lower center", fontsize=7.5,
                                     ncols=len(styles), frameon=False))
        legends[0].set_gid("styles")
    _fit_bottom_legends(fig, legends, below_axes=0.5)
    fig.suptitle(group.title, fontsize=11)
    _save_atomically(fig, target)
    result.path, result.figure = target, fig
    return result


def _fit_bottom_legends(fig: Any, legends: Sequence[Any], below_axes: float) -> None:
    """Stack ``legends`` (the lowest first) under the axes, ``below_axes`` inches under them (the
    x labels), and make the figure's bottom margin as tall as they are; the axes keep their size."""
    renderer = fig.canvas.get_renderer()
    heights = [legend.get_window_extent(renderer).height / fig.dpi for legend in legends]
    width, height = fig.get_size_inches()
    params = fig.subplotpars
    top, axes_height = (1 - params.top) * height, (params.top - params.bottom) * height
    bottom = below_axes + sum(heights) + 0.1
    height = top + axes_height + bottom
    fig.set_size_inches(width, height)
    fig.subplots_adjust(top=1 - top / height, bottom=bottom / height)
    y = 0.05
    for legend, legend_height in zip(legends, heights):
        legend.set_bbox_to_anchor((0.5, y / height), transform=fig.transFigure)
        y += legend_height


def _render_panel_grid(
    cells: Sequence[tuple[RunGroup, Panel]], target: Path, title: str, cols: int, starts: Starts
) -> FigureResult:
    """A page of panels from several groups, each with its own small legend: the runs (on the
    group's first panel) and how its curves are drawn."""
    result = FigureResult(None)
    drawable = []
    for group, panel in cells:
        series, _ = panel_series(panel, group.runs)
        if series:
            drawable.append((group, panel, series))
            result.drawn.append(panel)
        else:
            result.skipped.append(panel)
    if not drawable:
        target.unlink(missing_ok=True)
        return result
    for group in {id(g): g for g, _, _ in drawable}.values():
        _paint(group, [s for g, _, series in drawable if g is group for s in series])
    cols = min(cols, len(drawable))
    fig, axes = _new_figure(len(drawable), cols, (4.0, 3.0), top=0.75, bottom=0.55, gap=(0.8, 1.0))
    first_of: set[int] = set()
    for ax, (group, panel, series) in zip(axes, drawable):
        span = group_span(group)
        _draw_panel(ax, panel, group.recipe, series, span, starts)
        ax.set_title(_wrap(f"{group.title}: {panel.title}", 55), fontsize=8.5)
        entries = []
        if id(group) not in first_of and len(series) > MAX_INLINE_LEGEND:  # the group's figure has the legend
            ax.text(0.01, 0.99, f"runs: see {group.filename}", transform=ax.transAxes, va="top", fontsize=6.5)
        elif id(group) not in first_of:
            entries = _run_entries([s.run for s in series], [s.color for s in series])
        first_of.add(id(group))
        entries += _style_entries([panel], group.recipe, span, series, starts)
        if entries:
            ax.legend([h for h, _ in entries], [t for _, t in entries], fontsize=6.5, loc="best", framealpha=0.8)
    fig.suptitle(title, fontsize=10)
    _save_atomically(fig, target)
    result.path, result.figure = target, fig
    return result


def render_summary(groups: Sequence[RunGroup], out_dir: Path, starts: Starts | None = None) -> FigureResult:
    """``summary.png``: the two key panels of every group's deliverable (four panels a row)."""
    cells = [(g, p) for g in groups for p in g.deliverable.summary]
    return _render_panel_grid(cells, out_dir / SUMMARY_NAME, "Summary", 4, starts or {})


def render_validation_overview(groups: Sequence[RunGroup], out_dir: Path, x: Literal["step", "wall_clock"],
                               starts: Starts | None = None) -> FigureResult:
    """Validation accuracy of every group against step or time, one panel per group."""
    panel = ACC_STEP if x == "step" else ACC_WALL
    title = "Validation accuracy vs " + ("step" if x == "step" else "time")
    return _render_panel_grid([(g, panel) for g in groups], out_dir / OVERVIEW_NAMES[x], title, 3, starts or {})


def starting_points(runs: Sequence[Run]) -> dict[str, tuple[str, float]]:
    """Runs that started from another given run's model (config ``model`` is that run's directory or
    its ``model/``): run key -> (that run's label, its last validation accuracy)."""
    starts: dict[str, tuple[str, float]] = {}
    training = [r for r in runs if r.kind == "training"]
    for run in training:
        model = run.config.get("model")
        if not isinstance(model, str) or not model:
            continue
        origin = Path(model).resolve()
        for other in training:
            if other is not run and origin in (other.path.resolve(), (other.path / "model").resolve()):
                accuracy = other.points("eval", "accuracy")
                if accuracy:
                    starts[_key(run)] = (other.label, accuracy[-1].value)
    return starts


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any, digits: int = 4) -> str:
    x = number(value)
    if x is None:
        return "–"
    if float(x).is_integer() and abs(x) < 1e15 and not isinstance(value, float):
        return str(int(x))
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _fence(text: str, info: str = "text") -> str:
    """A fenced code block whose fence is longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{info}\n{text}\n{ticks}"


def truncate_middle(text: str, head: int = RESPONSE_HEAD_CHARS, tail: int = RESPONSE_TAIL_CHARS) -> str:
    """``text`` if short, else its first ``head`` and last ``tail`` characters around a marker."""
    if len(text) <= head + tail + 40:
        return text
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[-tail:]}"


def prompt_tail(prompt: str, chars: int = PROMPT_TAIL_CHARS, max_turn_chars: int = 1000) -> str:
    """The end of a prompt, where the question is, marked when cut.

    An r1_zero-style prompt is shown from its last ``User:`` turn (when that is at most
    ``max_turn_chars`` long, so the shared instructions are left out but the whole question is
    kept); any other prompt by its last ``chars`` characters.
    """
    turn = prompt.rfind("User:")
    if turn > 0 and len(prompt) - turn <= max_turn_chars:
        return "[...] " + prompt[turn:]
    return prompt if len(prompt) <= chars else "[...] " + prompt[-chars:]


def _reward_text(reward: Any) -> str:
    if not isinstance(reward, Mapping):
        return f"reward {_fmt(reward, 3)}"
    parts = [f"{k.removesuffix('_reward')} {_fmt(v, 3)}" for k, v in reward.items() if k != "reward"]
    return f"reward {_fmt(reward.get('reward'), 3)}" + (f" ({', '.join(parts)})" if parts else "")


def _generation_block(g: Mapping[str, Any]) -> list[str]:
    """Markdown for one generation record: reward line, prompt tail, truncated response."""
    meta = [_reward_text(g.get("reward"))]
    if "ground_truth" in g:
        meta.append(f"ground truth `{_cell(format_value(g['ground_truth']))}`")
    if g.get("finish_reason"):
        meta.append(f"finish: {g['finish_reason']}")
    if number(g.get("num_tokens")) is not None:
        meta.append(f"{int(number(g['num_tokens']))} tokens")  # type: ignore[arg-type]
    return [
        "- " + "; ".join(meta),
        "",
        "  Prompt (end):",
        "",
        _indent(_fence(prompt_tail(str(g.get("prompt", ""))))),
        "",
        "  Response:",
        "",
        _indent(_fence(truncate_middle(str(g.get("generation", g.get("response", "")))))),
        "",
    ]


def _indent(block: str) -> str:
    return "\n".join("  " + line for line in block.splitlines())


def _answer(g: Mapping[str, Any]) -> float:
    reward = g.get("reward")
    if isinstance(reward, Mapping):
        return number(reward.get("answer_reward", reward.get("reward"))) or 0.0
    return number(reward) or 0.0


def _format(g: Mapping[str, Any]) -> float:
    reward = g.get("reward")
    return (number(reward.get("format_reward")) or 0.0) if isinstance(reward, Mapping) else 0.0


def pick_examples(generations: Sequence[Mapping[str, Any]], n: int = ROLLOUT_EXAMPLES) -> list[Mapping[str, Any]]:
    """Up to ``n`` generations, deterministically: a correct one and an incorrect one first, if any."""
    correct = [g for g in generations if _answer(g) > 0]
    wrong = [g for g in generations if _answer(g) <= 0]
    picked: list[Mapping[str, Any]] = []
    for pool in (correct, wrong):
        if pool and len(picked) < n:
            picked.append(pool[0])
    for g in generations:
        if len(picked) >= n:
            break
        if not any(g is p for p in picked):
            picked.append(g)
    return picked


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` items evenly spread over ``items``, always including the first and the last."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    indices = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in indices]


CATEGORIES: tuple[tuple[str, str, int, int], ...] = (
    ("count_format1_answer1", "format 1, answer 1 (correct)", 1, 1),
    ("count_format1_answer0", "format 1, answer 0 (formatted, wrong answer)", 1, 0),
    ("count_format0_answer0", "format 0, answer 0 (unformatted)", 0, 0),
    ("count_format0_answer1", "format 0, answer 1", 0, 1),
)


def category_counts(metrics: Mapping[str, Any], generations: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Format/answer category counts from metrics.json, or counted from the generations."""
    if all(number(metrics.get(key)) is not None for key, *_ in CATEGORIES[:3]):
        return {key: int(number(metrics.get(key)) or 0) for key, *_ in CATEGORIES}
    counts = {key: 0 for key, *_ in CATEGORIES}
    for g in generations:
        f, a = int(_format(g) > 0), int(_answer(g) > 0)
        for key, _, cf, ca in CATEGORIES:
            if (f, a) == (cf, ca):
                counts[key] += 1
    return counts


def _category_section(metrics: Mapping[str, Any], generations: Sequence[Mapping[str, Any]]) -> list[str]:
    counts = category_counts(metrics, generations)
    total = sum(counts.values())
    lines = ["| Category | Count | Share |", "| --- | ---: | ---: |"]
    for key, name, _, _ in CATEGORIES:
        if key == "count_format0_answer1" and not counts[key]:
            continue  # impossible with our graders; shown only when a custom reward produces it
        share = f"{counts[key] / total:.1%}" if total else "–"
        lines.append(f"| {name} | {counts[key]} | {share} |")
    lines.append(f"| total | {total} | |")
    lines.append("")
    for key, name, cf, ca in CATEGORIES:
        members = [g for g in generations if (int(_format(g) > 0), int(_answer(g) > 0)) == (cf, ca)]
        if not members:
            continue
        lines += [f"**Examples: {name}**", ""]
        for g in members[:CATEGORY_EXAMPLES]:
            lines += _generation_block(g)
    return lines




def _rollout_section(run: Run) -> list[str]:
    lines: list[str] = []
    snapshots = [s for s in run.snapshots if (s.path / "generations.jsonl").exists()]
    if snapshots:
        for snap in spread(snapshots, ROLLOUT_SNAPSHOTS):
            gens = _read_jsonl(snap.path / "generations.jsonl")
            metrics = _read_json(snap.path / "metrics.json") if (snap.path / "metrics.json").exists() else {}
            acc = f", accuracy {_fmt(metrics.get('accuracy'))}" if "accuracy" in metrics else ""
            lines += [f"#### Validation at step {snap.step} ({snap.tag}{acc})", ""]
            lines += [line for g in pick_examples(gens) for line in _generation_block(g)] or ["(no generations)", ""]
        return lines
    logged = _read_jsonl(run.path / "generations.jsonl")  # in-loop logged generations, tagged with "step"
    steps = sorted({int(s) for g in logged if (s := number(g.get("step"))) is not None})
    for step in spread(steps, ROLLOUT_SNAPSHOTS):
        lines += [f"#### Logged generations at step {step}", ""]
        at_step = [g for g in logged if number(g.get("step")) == step]
        lines += [line for g in pick_examples(at_step) for line in _generation_block(g)]
    return lines



def _final_row(run: Run) -> list[str]:
    if run.kind == "evaluation":
        m = run.eval_metrics
        return [_cell(run.label), "eval", "–", "–", _fmt(m.get("n_examples")), _fmt(m.get("accuracy")),
                _interval_text(m.get("accuracy"), m.get("n_examples")), _fmt(m.get("format_accuracy")),
                _fmt(m.get("answer_accuracy")), _fmt(m.get("mean_token_entropy"), 3), _fmt(m.get("mean_response_length"), 1),
                "–"]
    evals = run.eval_records()
    last = evals[-1] if evals else {}
    trains = run.train_records()
    step = last.get("eval_step", trains[-1].get("train_step") if trains else None)
    wall = number(trains[-1].get("wall_clock_train")) if trains else None
    return [_cell(run.label), run.recipe, _fmt(step), str(last.get("split", "–")), _fmt(last.get("n_examples")),
            _fmt(last.get("accuracy")), _interval_text(last.get("accuracy"), last.get("n_examples")),
            _fmt(last.get("format_accuracy")), _fmt(last.get("answer_accuracy")), _fmt(last.get("mean_token_entropy"), 3),
            _fmt(last.get("mean_response_length"), 1), _fmt_duration(wall)]


def pass_at_k_row(run: Run) -> list[str] | None:
    """``[run, k, pass@1, pass@k, maj@k]`` of a run's last validation (an evaluation run's
    metrics.json), or None when it sampled one response per question (no ``n_samples``)."""
    last = run.eval_metrics if run.kind == "evaluation" else (run.eval_records() or [{}])[-1]
    k = number(last.get("n_samples"))
    if not k or k < 2:
        return None
    k = int(k)
    return [_cell(run.label), str(k), _fmt(last.get("pass@1")), _fmt(last.get(f"pass@{k}")), _fmt(last.get(f"maj@{k}"))]


def _interval_text(accuracy: Any, n: Any) -> str:
    """``[low, high]`` of the 95% Wilson interval, or – when accuracy or N is unknown."""
    p, count = number(accuracy), number(n)
    if p is None or not count or count < 1:
        return "–"
    low, high = wilson_interval(p, int(count))
    return f"[{low:.3f}, {high:.3f}]"


# ---------------------------------------------------------------- clocks and validation sampling


def _config_text(value: Any) -> str:
    if value is None:
        return "–"
    return repr(value) if isinstance(value, float) else format_value(value)


def validation_examples(run: Run) -> str:
    """How many examples the run's validations used, per split: ``subset 1024, full 5000``
    (from the eval records; the configured ``n_eval_examples`` when there are none)."""
    if run.kind == "evaluation":
        return _fmt(run.eval_metrics.get("n_examples"))
    sizes: dict[str, str] = {}
    for record in run.eval_records():
        if number(record.get("n_examples")) is not None:
            sizes[str(record.get("split", "validation"))] = _fmt(record.get("n_examples"))
    if not sizes:
        configured = run.config.get("n_eval_examples")
        return f"{_config_text(configured)} (configured)" if configured is not None else "–"
    return ", ".join(f"{split} {n}" for split, n in sizes.items())


def sampling_row(run: Run) -> list[str]:
    """Temperature, top-p, max tokens, examples and seed of the run's validations, from config.yaml.

    SFT, EI and GRPO validate with the handout's sampling (T = 1, top-p 1, fixed in the recipes);
    their max tokens are ``eval_max_tokens`` (SFT) or ``sampling_max_tokens`` (EI, GRPO), their
    seed ``eval_seed``. An evaluation run reads ``temperature``, ``top_p``, ``max_tokens``, ``seed``.
    """
    c = run.config
    if run.kind == "evaluation":
        return [_config_text(c.get("temperature")), _config_text(c.get("top_p")), _config_text(c.get("max_tokens")),
                validation_examples(run), _config_text(c.get("seed"))]
    if run.recipe in ("sft", "ei", "grpo"):
        key = "eval_max_tokens" if run.recipe == "sft" else "sampling_max_tokens"
        return [_config_text(VALIDATION_TEMPERATURE), _config_text(VALIDATION_TOP_P),
                f"{_config_text(c.get(key))} (`{key}`)", validation_examples(run), _config_text(c.get("eval_seed"))]
    return ["–", "–", "–", validation_examples(run), _config_text(c.get("eval_seed"))]


def clock_text(run: Run) -> str:
    """Which clock the run's time axis uses."""
    if run.budget_clock == "wall":
        return "wall clock (`wall_clock`: validation and start-up included)"
    return "training clock (`wall_clock_train`: validation excluded)"


def _sampling_section(runs: Sequence[Run]) -> list[str]:
    lines = [
        "## Time axes and validation sampling", "",
        ("The time axis of a training run is the clock its time budget counts (`control.budget_clock`): the training "
         "clock by default (seconds spent training; a validation sits at the reading of the train record before it), "
         "or the wall clock since the run started. Validations of SFT, EI and GRPO sample with the handout's settings "
         "(temperature 1, top-p 1, stop at `</answer>`), on a fixed subset of the validation set chosen with the seed "
         "(the last one on the full set with `final_eval_full`); an evaluation run with its own."), "",
        "| Run | Time axis | Time budget | Temperature | top-p | Max tokens | Examples per validation | Seed |",
        "| --- | --- | --- | ---: | ---: | --- | --- | ---: |",
    ]
    for run in runs:
        if run.kind == "training":
            budget = run.time_budget
            budget_text = f"{_fmt_duration(budget)} ({run.budget_clock} clock)" if budget else "–"
            cells = [_cell(run.label), clock_text(run), budget_text, *sampling_row(run)]
        else:
            cells = [_cell(run.label), "–", "–", *sampling_row(run)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


# ---------------------------------------------------------------- figures


@dataclass
class ReportFigures:
    """The figures of a report: the summary page, one per group, and the validation overviews."""

    summary: FigureResult = field(default_factory=lambda: FigureResult(None))
    groups: list[tuple[RunGroup, FigureResult]] = field(default_factory=list)
    overviews: list[FigureResult] = field(default_factory=list)

    def written(self) -> list[Path]:
        results = [self.summary, *(r for _, r in self.groups), *self.overviews]
        return [r.path for r in results if r.path is not None]


def draw_figures(groups: Sequence[RunGroup], out_dir: Path, starts: Starts) -> ReportFigures:
    """Every figure of the report, written into ``out_dir``; figures of earlier reports there that
    this one does not write (``fig_*.png``, the summary, the overviews) are removed."""
    figures = ReportFigures()
    if groups:
        figures.summary = render_summary(groups, out_dir, starts)
        figures.groups = [(g, render_group_figure(g, out_dir, starts)) for g in groups]
        figures.overviews = [render_validation_overview(groups, out_dir, x, starts) for x in ("step", "wall_clock")]
    written = set(figures.written())
    fixed = [out_dir / SUMMARY_NAME, *(out_dir / name for name in OVERVIEW_NAMES.values())]
    stale = [*out_dir.glob(f"{GROUP_FIGURE_PREFIX}*.png"), *fixed]
    for path in stale:
        if path not in written:
            path.unlink(missing_ok=True)
    return figures


def _link(title: str, path: Path, out_dir: Path) -> str:
    return f"![{title}]({Path(os.path.relpath(path, out_dir)).as_posix()})"


def _figures_section(figures: ReportFigures, out_dir: Path, starts: Starts) -> list[str]:
    lines = [
        "## Figures", "",
        ("Each group of runs has its own figure, so different recipes never share an axis. The step axis is the "
         "recipe's: SFT optimizer steps, EI steps, GRPO steps (rollout batches; an off-policy run's optimizer steps are "
         "spread over their GRPO step). The time axis is each run's clock (see above). Validation accuracy is drawn "
         "with its 95% Wilson interval for the N examples of each validation: a dip or rise that stays inside the band "
         "is within sampling noise. Training metrics logged per optimizer step are drawn as an exponential "
         "moving average (its span in the legend) over the faint per-step values. A run with a time budget has the "
         "budget marked, and its time axis ends there."), "",
    ]
    if figures.summary.path is not None:
        lines += ["### Summary", "", _link("Summary", figures.summary.path, out_dir), ""]
    for group, result in figures.groups:
        lines += [f"### {group.title}", ""]
        where = f" from `{_cell(str(group.sweep))}`" if group.sweep is not None else ""
        varies = f"; they differ in {', '.join(f'`{k}`' for k in group.varying)}" if group.varying else ""
        n = len(group.runs)
        lines += [f"{n} {RECIPE_NAMES.get(group.recipe, group.recipe)} run{'s' if n > 1 else ''}{where}{varies}."
                  + (f" The handout asks for {group.deliverable.asks}." if group.deliverable.asks else ""), ""]
        for run in group.runs:
            if _key(run) in starts:
                origin, accuracy = starts[_key(run)]
                lines += [(f"{_cell(run.label)} started from the model of {_cell(origin)}: its last validation accuracy "
                           f"({accuracy:.4f}) is the dotted line on the accuracy panels."), ""]
        if result.path is None:
            lines += ["No figure: no run of this group logged any of its metrics.", ""]
            continue
        lines += [_link(group.title, result.path, out_dir), "",
                  "Panels: " + ", ".join(p.title.lower() if i else p.title for i, p in enumerate(result.drawn)) + ".", ""]
        if result.skipped:
            why = "; ".join(f"{p.title.lower()} (`{p.metric}`{', ' + p.note if p.note else ''})" for p in result.skipped)
            lines += [f"Not drawn, no run logged it: {why}.", ""]
        for title, labels in result.missing.items():
            lines += [f"Not in {title.lower()} (no data): {', '.join(_cell(label) for label in labels)}.", ""]
    overviews = [r for r in figures.overviews if r.path is not None]
    if overviews:
        lines += ["### Validation accuracy of every group", ""]
        for result in overviews:
            lines += [_link(result.path.stem.replace("_", " "), result.path, out_dir), ""]
    return lines


# ---------------------------------------------------------------- the report


def build_markdown(runs: Sequence[Run], groups: Sequence[RunGroup], figures: ReportFigures, out_dir: Path,
                   starts: Starts | None = None) -> str:
    """The report text; figure links are relative to ``out_dir`` (where report.md is written);
    ``starts`` as :func:`starting_points` finds them."""
    training = [r for r in runs if r.kind == "training"]
    evaluations = [r for r in runs if r.kind == "evaluation"]
    group_of = {_key(r): g for g in groups for r in g.runs}
    lines = ["# Run report", ""]

    # ---------------------------------------------------------------- runs
    lines += ["## Runs", "", "| Label | Group | Recipe | Directory | Train records | Validations |",
              "| --- | --- | --- | --- | ---: | ---: |"]
    for run in runs:
        n_train = len(run.train_records()) if run.kind == "training" else 0
        n_eval = len(run.eval_records()) if run.kind == "training" else 1
        group = group_of[_key(run)].title if _key(run) in group_of else "–"
        lines.append(f"| {_cell(run.label)} | {_cell(group)} | {run.recipe} | `{_cell(str(run.path))}` | {n_train} | {n_eval} |")
    lines.append("")
    for group in groups:
        if len(group.runs) > 1:
            keys = group.varying
            text = ", ".join(f"`{k}`" for k in keys) if keys else "nothing (identical configs)"
            lines += [f"{group.title}: runs differ in {text}.", ""]
    if len(evaluations) > 1:
        keys = differing_keys([r.config for r in evaluations], require_common=True)
        text = ", ".join(f"`{k}`" for k in keys) if keys else "nothing (identical configs)"
        lines += [f"Evaluation runs differ in: {text}.", ""]

    lines += _sampling_section(runs)

    # ---------------------------------------------------------------- final metrics
    lines += [
        "## Final metrics",
        "",
        ("Last validation of each training run (and the metrics of each evaluation run), with the 95% Wilson "
         "interval of its accuracy. Step is on the recipe's step axis; wall-clock is the training time excluding "
         "validation (`wall_clock_train` of the last train record)."),
        "",
        ("| Run | Recipe | Step | Split | N | Accuracy | 95% interval | Format acc. | Answer acc. | Entropy | Length "
         "| Wall-clock |"),
        "| --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(_final_row(run)) + " |" for run in runs]
    lines.append("")
    sampled_rows = [row for row in map(pass_at_k_row, runs) if row is not None]
    if sampled_rows:  # only runs that sampled k >= 2 responses per question have these
        lines += [("Several samples per question (the same validations, k = `n_samples`): pass@1 is their mean "
                   "accuracy, pass@k the unbiased estimate of the chance that one of k samples is correct (Chen et "
                   "al., 2021), maj@k the share of questions whose most common answer is correct (self-consistency, "
                   "Wang et al., 2022)."), "",
                  "| Run | k | pass@1 | pass@k | maj@k |", "| --- | ---: | ---: | ---: | ---: |",
                  *("| " + " | ".join(row) + " |" for row in sampled_rows), ""]
    category_rows = []
    for run in training:
        final = next((s for s in reversed(run.snapshots) if (s.path / "metrics.json").exists()), None)
        if final is None:
            continue
        counts = category_counts(_read_json(final.path / "metrics.json"), [])
        total = sum(counts.values())
        if total:
            cells = [f"{counts[k]} ({counts[k] / total:.0%})" for k, *_ in CATEGORIES[:3]]
            category_rows.append(f"| {_cell(run.label)} | {final.tag} step {final.step} | " + " | ".join(cells) + " |")
    if category_rows:
        lines += ["Format/answer categories of the last validation:", "",
                  "| Run | Validation | format 1, answer 1 | format 1, answer 0 | format 0, answer 0 |",
                  "| --- | --- | ---: | ---: | ---: |", *category_rows, ""]

    if training:
        lines += _figures_section(figures, out_dir, starts or {})

    # ---------------------------------------------------------------- rollouts
    rollout_lines = []
    for run in training:
        section = _rollout_section(run)
        if section:
            rollout_lines += [f"### {run.label}", "", *section]
    if rollout_lines:
        lines += ["## Example rollouts over time", "",
                  (f"Up to {ROLLOUT_EXAMPLES} validation examples (a correct one first when there is one) at up to "
                   f"{ROLLOUT_SNAPSHOTS} validation steps per run; prompts show their end, long responses their "
                   "beginning and end."), "", *rollout_lines]

    # ---------------------------------------------------------------- evaluation runs
    if evaluations:
        lines += ["## Evaluation runs", ""]
        for run in evaluations:
            gens = _read_jsonl(run.path / "generations.jsonl")
            lines += [f"### {run.label}", ""]
            model, data = run.config.get("model"), run.config.get("data")
            if model or data:
                lines += [f"Model `{model}` on `{data}`.", ""]
            lines += _category_section(run.eval_metrics, gens)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# entry point


def load_report_inputs(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> tuple[list[Run], list[RunGroup]]:
    """The runs of the given directories (sweep directories expanded), labelled, and their groups."""
    if not run_dirs:
        raise ReportError("report needs at least one run directory")
    sources = [(sweep, [load_run(p) for p in paths]) for sweep, paths in expand_run_dirs(run_dirs)]
    runs = [run for _, group in sources for run in group]
    groups = group_runs(sources)
    assign_labels(runs, labels, [g.runs for g in groups] + [[r for r in runs if r.kind == "evaluation"]])
    return runs, groups


def report_main(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Write the figures and ``report.md`` for run directories into ``out``; returns report.md.

    Args:
        run_dirs: training run directories (with metrics.jsonl), evaluation output directories
            (with metrics.json and generations.jsonl), and directories holding runs (a sweep's),
            which stand for the runs in them.
        out: output directory (created if missing); figures are written beside report.md.
        labels: legend labels, one per run (a sweep directory counts as its runs, in name order),
            instead of the config-difference labels.

    Raises:
        ReportError: no runs, a directory that is not a run, labels of the wrong length, or
            matplotlib missing when there is something to plot.
    """
    runs, groups = load_report_inputs(run_dirs, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    starts = starting_points(runs)
    figures = draw_figures(groups, out, starts)
    report = out / REPORT_NAME
    atomic_write_text(report, build_markdown(runs, groups, figures, out, starts))
    return report
