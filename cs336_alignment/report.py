"""Plots and a Markdown report from run directories (``python -m cs336_alignment report``).

``report_main([run, ...], out)`` reads each directory and writes into ``out``:

- PNG plots with fixed names, one curve per training run (:data:`PLOTS`): validation accuracy
  against step and against training wall-clock time, train reward, token entropy, response
  length, gradient norm, clip fraction and train loss. A plot no run has data for is skipped
  (and any stale PNG of that name removed); the report lists what was skipped and why.
- ``report.md``: the runs and the config keys they differ in, a table of final metrics, the
  plots (relative links), example validation rollouts over time, and for evaluation
  directories the format/answer category table with examples of each category.

Two kinds of directory are understood:

- a training run (``recipes/sft.py``, ``recipes/grpo.py``): ``config.yaml``,
  ``metrics.jsonl`` (records with ``kind`` train/eval/data), ``eval/<tag>_stepNNNNN/`` with
  ``generations.jsonl`` and ``metrics.json`` per validation, optionally ``generations.jsonl``
  (in-loop logged generations with a ``step`` field);
- an evaluation run (``python -m cs336_alignment eval``): ``config.yaml``, ``metrics.json``
  and ``generations.jsonl``, no ``metrics.jsonl``.

Axes. "step" is the optimizer step (``train_step``). A validation record is placed at the
optimizer step and at the ``wall_clock_train`` of the latest train record logged before it in
``metrics.jsonl`` (eval records carry neither): this is the step at which validation ran, and
the training time spent until then, excluding validation. For SFT and on-policy GRPO the
optimizer step equals the logged ``eval_step``; for off-policy GRPO ``eval_step`` counts GRPO
steps, so the optimizer step keeps train and validation curves on one axis. Records logged
again for a step (a resumed run) replace the earlier ones.

Labels. Runs are labelled by the config keys in which they differ (config.yaml flattened to
dotted keys, ignoring ``out``, ``run_name`` and ``wandb_*``), e.g.
``learning_rate=3e-05, loss_type=grpo_clip``; training and evaluation runs are compared among
their own kind; a run whose config differs in nothing is labelled by its directory name.

matplotlib (the ``plot`` extra) is imported only when there is something to plot.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .checkpoint import parse_duration
from .errors import UserError
from .run_dir import atomic_write_text, read_jsonl, umask_mode

__all__ = [
    "Curve",
    "EvalSnapshot",
    "PLOTS",
    "PlotResult",
    "PlotSpec",
    "Point",
    "REPORT_NAME",
    "ReportError",
    "Run",
    "assign_labels",
    "build_markdown",
    "category_counts",
    "config_labels",
    "differing_keys",
    "flatten_config",
    "format_value",
    "load_run",
    "number",
    "pick_examples",
    "prompt_tail",
    "render_plot",
    "report_main",
    "spread",
    "truncate_middle",
]

REPORT_NAME = "report.md"
#: Config keys that never distinguish runs.
IGNORED_KEYS: tuple[str, ...] = ("out", "run_name")
IGNORED_PREFIXES: tuple[str, ...] = ("wandb_",)
#: Validation snapshots shown per run in "Example rollouts", and examples per snapshot.
ROLLOUT_SNAPSHOTS = 4
ROLLOUT_EXAMPLES = 2
#: Examples shown per format/answer category of an evaluation.
CATEGORY_EXAMPLES = 2
PROMPT_TAIL_CHARS = 300
#: Legends whose labels are longer than this go under the plot instead of over the data.
LEGEND_INSIDE_CHARS = 40
RESPONSE_HEAD_CHARS = 700
RESPONSE_TAIL_CHARS = 300


class ReportError(UserError, RuntimeError):
    """A report that cannot be made (missing directory, unreadable run, no matplotlib)."""

    exit_code = 2  # bad input


# --------------------------------------------------------------------------------------------
# reading runs


@dataclass
class EvalSnapshot:
    """One validation directory of a training run: ``eval/<tag>_step<NNNNN>/``."""

    tag: str
    step: int
    path: Path


@dataclass
class Point:
    """One value of a metric: optimizer step, training wall-clock seconds (if known), value."""

    step: float
    wall_clock: float | None
    value: float


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
    def budget_clock(self) -> str:
        """The clock the run's time budget counted ("train": training steps only; "wall": everything,
        validation and start-up included); its wall-clock plots use that clock."""
        return str(self.config.get("control.budget_clock") or "train")

    @property
    def name(self) -> str:
        return self.path.resolve().name or str(self.path)

    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "train"]

    def eval_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"]

    def points(self, source: Literal["train", "eval"], key: str) -> list[Point]:
        """Finite values of ``key`` in ``source`` records, one per step (the last logged), by step.

        Validation records are placed at the step and wall-clock of the latest train record
        before them (see the module docstring).
        """
        by_step: dict[float, Point] = {}
        last_train: dict[str, Any] | None = None
        for record in self.records:
            kind = record.get("kind")
            if kind == "train":
                last_train = record
            if kind != source:
                continue
            value = number(record.get(key))
            if value is None:
                continue
            if source == "train":
                step = number(record.get("train_step"))
                wall = number(record.get("wall_clock_train"))
            elif last_train is not None:
                step = number(last_train.get("train_step"))
                wall = number(last_train.get("wall_clock_train"))
            else:  # validation before any training
                step = number(record.get("eval_step"))
                wall = 0.0
            if self.budget_clock == "wall":  # every record carries the run's wall clock itself
                wall = number(record.get("wall_clock"))
            if step is None:
                continue
            by_step[step] = Point(step, wall, value)
        return [by_step[s] for s in sorted(by_step)]


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


def assign_labels(runs: Sequence[Run], labels: Sequence[str] | None = None) -> None:
    """Set each run's label: given labels, or config differences within each kind of run.

    Labels that would coincide get the directory name appended.
    """
    if labels is not None:
        if len(labels) != len(runs):
            raise ReportError(f"got {len(labels)} labels for {len(runs)} runs")
        for run, label in zip(runs, labels):
            run.label = label
        return
    for kind in ("training", "evaluation"):
        group = [r for r in runs if r.kind == kind]
        for run, label in zip(group, config_labels([r.config for r in group], [r.name for r in group])):
            run.label = label
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1 and run.label != run.name:
            run.label = f"{run.label} ({run.name})"


# --------------------------------------------------------------------------------------------
# plots


@dataclass(frozen=True)
class Curve:
    """One metric drawn for every run: ``source`` records' ``key``; ``suffix`` tags its legend entry."""

    source: Literal["train", "eval"]
    key: str
    suffix: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class PlotSpec:
    """A plot file: its curves, x axis and labels. ``note`` explains a typical reason it is skipped."""

    filename: str
    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    x: Literal["step", "wall_clock"] = "step"
    note: str = ""


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("val_accuracy_vs_step.png", "Validation accuracy vs step", "accuracy (mean reward)",
             (Curve("eval", "accuracy"),), note="no validation records"),
    PlotSpec("val_accuracy_vs_wall_clock.png", "Validation accuracy vs training wall-clock", "accuracy (mean reward)",
             (Curve("eval", "accuracy"),), x="wall_clock", note="no validation records after a train record with wall_clock_train"),
    PlotSpec("train_reward.png", "Train reward (rollouts)", "mean reward",
             (Curve("train", "train_reward_mean"), Curve("train", "train_format_reward_mean", " (format)", dashed=True)),
             note="only GRPO runs log train rewards"),
    PlotSpec("token_entropy.png", "Token entropy", "mean entropy (nats)",
             (Curve("train", "token_entropy", " (train)"), Curve("eval", "mean_token_entropy", " (val)", dashed=True))),
    PlotSpec("response_length.png", "Response length", "tokens",
             (Curve("train", "train_response_length_mean", " (train)"),
              Curve("eval", "mean_response_length", " (val)", dashed=True))),
    PlotSpec("grad_norm.png", "Gradient norm (before clipping)", "grad norm", (Curve("train", "grad_norm"),)),
    PlotSpec("clip_fraction.png", "Clip fraction", "fraction of tokens clipped", (Curve("train", "clip_fraction"),),
             note="only grpo_clip runs log clip_fraction"),
    PlotSpec("train_loss.png", "Train loss", "loss", (Curve("train", "loss"),)),
)


@dataclass
class PlotResult:
    """A rendered plot (``path`` set) or a skipped one (``path`` None), and the runs lacking its data."""

    spec: PlotSpec
    path: Path | None
    missing: list[str]


def _require_matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or a one-line ReportError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'cs336-alignment[plot]'") from None
    return Figure, FigureCanvasAgg


def _wall_clock_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 3 * 3600:
        return 3600.0, "hours"
    if max_seconds >= 3 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def render_plot(spec: PlotSpec, runs: Sequence[Run], out_dir: Path) -> PlotResult:
    """Draw one plot over the training runs; skip it (removing a stale file) when no run has data."""
    target = out_dir / spec.filename
    series: list[tuple[int, Run, Curve, list[Point]]] = []
    missing = []
    for index, run in enumerate(runs):
        found = False
        for curve in spec.curves:
            points = run.points(curve.source, curve.key)
            if spec.x == "wall_clock":
                points = [p for p in points if p.wall_clock is not None]
            if points:
                series.append((index, run, curve, points))
                found = True
        if not found:
            missing.append(run.label)
    if not series:
        target.unlink(missing_ok=True)
        return PlotResult(spec, None, missing)

    Figure, FigureCanvasAgg = _require_matplotlib()
    fig = Figure(figsize=(8, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    scale, unit = 1.0, ""
    if spec.x == "wall_clock":
        scale, unit = _wall_clock_unit(max(p.wall_clock or 0.0 for *_, pts in series for p in pts))
    for index, run, curve, points in series:
        xs = [(p.wall_clock or 0.0) / scale if spec.x == "wall_clock" else p.step for p in points]
        ys = [p.value for p in points]
        marker = "o" if curve.source == "eval" or len(points) <= 30 else None
        ax.plot(xs, ys, color=colors[index], linestyle="--" if curve.dashed else "-", marker=marker,
                markersize=4, linewidth=1.5, label=f"{run.label}{curve.suffix}")
    ax.set_title(spec.title)
    clocks = {run.budget_clock for _, run, _, _ in series}
    if spec.x != "wall_clock":
        xlabel = "optimizer step"
    elif clocks == {"wall"}:
        xlabel = f"wall-clock ({unit}, the budget clock: validation and start-up included)"
    elif clocks == {"train"}:
        xlabel = f"training wall-clock ({unit}, excluding validation)"
    else:
        xlabel = f"wall-clock ({unit}, each run on the clock its budget counted)"
    ax.set_xlabel(xlabel)
    budgets = {parse_duration(run.config.get("control.time_budget")) for _, run, _, _ in series if run.budget_clock == "wall"}
    for budget in sorted(b for b in budgets if b) if spec.x == "wall_clock" else ():
        ax.axvline(budget / scale, color="0.5", linestyle=":", linewidth=1.0, label="time budget")
        ax.set_xlim(right=budget / scale)  # the axis ends at the (largest) budget: what counts for a leaderboard
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    if max(len(run.label) for _, run, _, _ in series) > LEGEND_INSIDE_CHARS:
        # Long labels: a legend under the axes, each entry wrapped, so that it hides no data.
        handles, texts = ax.get_legend_handles_labels()
        ax.legend(handles, [textwrap.fill(t, 90) for t in texts], fontsize=7, loc="upper left",
                  bbox_to_anchor=(0.0, -0.14), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8, loc="best")
    _save_atomically(fig, target)
    return PlotResult(spec, target, missing)


def _save_atomically(fig: Any, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".png")
    os.fchmod(fd, umask_mode())  # readable as the umask allows, like every file we write
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    minutes, secs = divmod(int(round(seconds)), 60)
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


def _final_row(run: Run) -> list[str]:
    if run.kind == "evaluation":
        m = run.eval_metrics
        return [_cell(run.label), "eval", "–", "–", _fmt(m.get("n_examples")), _fmt(m.get("accuracy")),
                _fmt(m.get("format_accuracy")), _fmt(m.get("answer_accuracy")), _fmt(m.get("mean_token_entropy"), 3),
                _fmt(m.get("mean_response_length"), 1), "–"]
    evals = run.eval_records()
    last = evals[-1] if evals else {}
    trains = run.train_records()
    step = last.get("eval_step", trains[-1].get("train_step") if trains else None)
    wall = number(trains[-1].get("wall_clock_train")) if trains else None
    return [_cell(run.label), "train", _fmt(step), str(last.get("split", "–")), _fmt(last.get("n_examples")),
            _fmt(last.get("accuracy")), _fmt(last.get("format_accuracy")), _fmt(last.get("answer_accuracy")),
            _fmt(last.get("mean_token_entropy"), 3), _fmt(last.get("mean_response_length"), 1), _fmt_duration(wall)]


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
        lines += [line for g in pick_examples([g for g in logged if number(g.get("step")) == step]) for line in _generation_block(g)]
    return lines


def build_markdown(runs: Sequence[Run], plots: Sequence[PlotResult], out_dir: Path) -> str:
    """The report text; plot links are relative to ``out_dir`` (where report.md is written)."""
    training = [r for r in runs if r.kind == "training"]
    evaluations = [r for r in runs if r.kind == "evaluation"]
    lines = ["# Run report", ""]

    # ---------------------------------------------------------------- runs
    lines += ["## Runs", "", "| Label | Directory | Kind | Train records | Validations |", "| --- | --- | --- | ---: | ---: |"]
    for run in runs:
        n_train = len(run.train_records()) if run.kind == "training" else 0
        n_eval = len(run.eval_records()) if run.kind == "training" else 1
        lines.append(f"| {_cell(run.label)} | `{_cell(str(run.path))}` | {run.kind} | {n_train} | {n_eval} |")
    lines.append("")
    for kind, group in (("Training", training), ("Evaluation", evaluations)):
        if len(group) > 1:
            keys = differing_keys([r.config for r in group], require_common=True)
            text = ", ".join(f"`{k}`" for k in keys) if keys else "nothing (identical configs)"
            lines += [f"{kind} runs differ in: {text}.", ""]

    # ---------------------------------------------------------------- final metrics
    lines += [
        "## Final metrics",
        "",
        "Last validation of each training run (and the metrics of each evaluation run). Wall-clock is the "
        "training time excluding validation (`wall_clock_train` of the last train record).",
        "",
        "| Run | Kind | Step | Split | N | Accuracy | Format acc. | Answer acc. | Entropy | Length | Wall-clock |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(_final_row(run)) + " |" for run in runs]
    lines.append("")
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

    # ---------------------------------------------------------------- plots
    if training:
        lines += ["## Plots", "",
                  "Step is the optimizer step; a validation is placed at the step and training wall-clock of the "
                  "last train record before it. A run budgeted on the wall clock (`control.budget_clock: wall`) is "
                  "plotted against that clock instead (validation and start-up included, each record's own "
                  "`wall_clock`). Solid lines are training metrics, dashed lines with markers validation metrics.", ""]
        rel = os.path.relpath
        for result in plots:
            if result.path is None:
                continue
            lines += [f"### {result.spec.title}", "", f"![{result.spec.title}]({Path(rel(result.path, out_dir)).as_posix()})", ""]
            if result.missing:
                lines += [f"Not in this plot (no data): {', '.join(_cell(m) for m in result.missing)}.", ""]
        skipped = [r for r in plots if r.path is None]
        if skipped:
            lines += ["**Skipped plots** (no run has the data):", ""]
            for result in skipped:
                metrics = ", ".join(f"`{c.key}`" for c in result.spec.curves)
                why = f"; {result.spec.note}" if result.spec.note else ""
                lines.append(f"- `{result.spec.filename}` ({result.spec.title}): no run logged {metrics}{why}.")
            lines.append("")

    # ---------------------------------------------------------------- rollouts
    rollout_lines = []
    for run in training:
        section = _rollout_section(run)
        if section:
            rollout_lines += [f"### {run.label}", "", *section]
    if rollout_lines:
        lines += ["## Example rollouts over time", "",
                  f"Up to {ROLLOUT_EXAMPLES} validation examples (a correct one first when there is one) at up to "
                  f"{ROLLOUT_SNAPSHOTS} validation steps per run; prompts show their end, long responses their "
                  "beginning and end.", "", *rollout_lines]

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


def report_main(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Write PNG plots and ``report.md`` for one or more run directories into ``out``; returns report.md.

    Args:
        run_dirs: training run directories (with metrics.jsonl) and/or evaluation output
            directories (with metrics.json and generations.jsonl).
        out: output directory (created if missing); plots are written beside report.md under the
            fixed names of :data:`PLOTS`.
        labels: legend labels, one per run, instead of the config-difference labels.

    Raises:
        ReportError: no runs, a directory that is not a run, labels of the wrong length, or
            matplotlib missing when there is something to plot.
    """
    if not run_dirs:
        raise ReportError("report needs at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    assign_labels(runs, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    training = [r for r in runs if r.kind == "training"]
    plots = [render_plot(spec, training, out) for spec in PLOTS] if training else []
    report = out / REPORT_NAME
    atomic_write_text(report, build_markdown(runs, plots, out))
    return report


