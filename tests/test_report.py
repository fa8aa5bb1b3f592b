"""``report``: figures and report.md from run directories shaped exactly as the recipes write them.

Figures are checked through their matplotlib objects (panels, legends, gids of the artists), not pixels;
``saved`` captures every Figure the report writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cs336_alignment.config import dump_yaml
from cs336_alignment.evaluate import GenerationRecord, summarize, write_evaluation
from cs336_alignment.recipes.grpo import GRPOConfig
from cs336_alignment.recipes.sft import SFTConfig
from cs336_alignment.report import (
    ACC_STEP,
    CLIP_FRACTION,
    DELIVERABLES,
    ReportError,
    ReportFigures,
    Run,
    build_markdown,
    config_labels,
    ema,
    ema_span,
    expand_run_dirs,
    flatten_config,
    load_report_inputs,
    load_run,
    pick_examples,
    recognise,
    record_span,
    render_group_figure,
    report_main,
    spread,
    truncate_middle,
    wilson_interval,
)
from cs336_alignment.run_dir import RunDir, atomic_write_text, umask_mode

PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer.\n"
    "User: What is {a} + {b}?\nAssistant: <think>"
)


# --------------------------------------------------------------------------------------------
# building run directories the way the recipes and `eval` write them


def generation(i: int, step: int, correct: bool, formatted: bool = True, text: str | None = None) -> GenerationRecord:
    a, b = i, step
    answer = a + b if correct else a + b + 1
    body = text if text is not None else f" {a} plus {b} is {answer} </think> <answer> {answer} </answer>"
    if not formatted:
        body = f" {a} plus {b} maybe {answer}"
    earned = float(correct and formatted)
    reward = {"format_reward": float(formatted), "answer_reward": earned, "reward": earned}
    return GenerationRecord(i, 0, PROMPT.format(a=a, b=b), body, str(a + b), "stop", 12 + i, reward, mean_entropy=1.5)


def write_eval_dir(path: Path, records: list[GenerationRecord]) -> dict:
    metrics = summarize(records, max_tokens=64)
    write_evaluation(path, metrics, records)
    return metrics


def make_grpo_run(
    path: Path, n_steps: int = 5, learning_rate: float = 1e-5, loss_type: str = "reinforce_with_baseline",
    off_policy_steps: int = 1, eval_every: int = 1, run_name: str = "", model: str = "tiny",
) -> Path:
    """A GRPO run directory: config.yaml, metrics.jsonl (train + eval records), eval/ snapshots.

    Train record values at optimizer step s: grad_norm 1 + 0.1 s, loss 0.5 / s, wall_clock_train 10 s;
    validation after GRPO step g: accuracy g / 4 on 4 examples (capped at 1)."""
    cfg = GRPOConfig(model=model, out=str(path), learning_rate=learning_rate, loss_type=loss_type, run_name=run_name,
                     wandb_project=f"proj-{path.name}", n_grpo_steps=n_steps, eval_every=eval_every)
    run = RunDir(path, console=False)
    run.save_config(cfg)
    clock, opt_step = 0.0, 0
    for grpo_step in range(n_steps):
        for epoch in range(off_policy_steps):
            opt_step += 1
            clock += 10.0
            record = {
                "grpo_step": grpo_step, "epoch": epoch, "loss": 0.5 / opt_step, "grad_norm": 1.0 + 0.1 * opt_step,
                "token_entropy": 2.0 - 0.1 * opt_step, "lr": learning_rate,
                "train_reward_mean": 0.1 * grpo_step, "train_format_reward_mean": 0.2 * grpo_step,
                "train_answer_reward_mean": 0.1 * grpo_step, "train_response_length_mean": 100.0 + 5 * grpo_step,
                "train_response_length_correct": "nan" if grpo_step == 0 else 90.0,
                "train_truncated_fraction": 0.0, "frac_groups_all_equal": 0.5, "wall_clock_train": clock,
            }
            if loss_type in ("grpo_clip", "grpo_no_clip"):
                record["ratio_mean"] = 1.0
            if loss_type == "grpo_clip":
                record["clip_fraction"] = 0.01 * opt_step
            run.log_metrics({"kind": "train", "train_step": opt_step, **record})
        if (grpo_step + 1) % eval_every == 0 or grpo_step + 1 == n_steps:
            step = grpo_step + 1
            tag = "full" if step == n_steps else "subset"
            metrics = write_eval_dir(path / "eval" / f"{tag}_step{step:05d}",
                                     [generation(i, step, correct=i < step) for i in range(4)])
            run.log_metrics({"kind": "eval", "eval_step": step, **{k: metrics[k] for k in (
                "accuracy", "format_accuracy", "answer_accuracy", "mean_token_entropy", "mean_response_length",
                "mean_response_length_correct", "mean_response_length_incorrect", "truncated_fraction", "n_examples")},
                "split": tag, "seconds": 3.0})
    run.close()
    return path


def make_sft_run(path: Path, n_steps: int = 4, learning_rate: float = 2e-5) -> Path:
    """An SFT run directory: a data record, train records (no rewards, no clip fraction), final eval."""
    run = RunDir(path, console=False)
    run.save_config(SFTConfig(model="tiny", out=str(path), learning_rate=learning_rate))
    run.log_metrics({"kind": "data", "data_step": 0, "n_examples": 32, "n_available": 32, "n_cut": 0})
    for step in range(1, n_steps + 1):
        run.log_metrics({"kind": "train", "train_step": step, "epoch": 0, "loss": 2.0 / step, "grad_norm": 3.0 / step,
                         "lr": learning_rate, "token_entropy": 1.0 + 0.1 * step, "tokens": 512,
                         "tokens_per_second": 900.0, "wall_clock_train": 60.0 * step})
    final = [generation(i, n_steps, correct=i == 0) for i in range(3)]
    metrics = write_eval_dir(path / "eval" / f"final_step{n_steps:05d}", final)
    run.log_metrics({"kind": "eval", "eval_step": n_steps, **{k: metrics[k] for k in (
        "accuracy", "format_accuracy", "answer_accuracy", "mean_token_entropy", "mean_response_length",
        "truncated_fraction", "n_examples")}, "split": "final", "seconds": 2.0})
    run.close()
    return path


def make_eval_run(path: Path) -> Path:
    """An `eval` output directory: config.yaml, metrics.json, generations.jsonl (no metrics.jsonl).

    Categories: 2 correct, 1 formatted but wrong, 1 unformatted.
    """
    from cs336_alignment.recipes.eval import EvalConfig

    atomic_write_text(path / "config.yaml", dump_yaml(EvalConfig(model="models/qwen", data="data/val.jsonl", out=str(path))))
    write_eval_dir(path, [generation(0, 1, True), generation(1, 1, True), generation(2, 1, False),
                          generation(3, 1, False, formatted=False)])
    return path


def assert_real_png(path: Path) -> None:
    """The file decodes as a PNG of plot size whose pixels are not all one colour."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 500
    rgb = pixels[..., :3]
    assert float(rgb.max() - rgb.min()) > 0.5  # dark lines/text on a light background
    non_white = (rgb.min(axis=-1) < 0.9).mean()
    assert 0.01 < non_white < 0.9  # something drawn, not a blank or solid image
    colourful = int((rgb.max(axis=-1) - rgb.min(axis=-1) > 0.3).sum())
    assert colourful >= 20  # coloured curves or markers, not only black axes and text


def image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.fixture
def saved(monkeypatch):
    """Every Figure the report writes, by file name (written as usual too)."""
    from cs336_alignment import report

    figures, real_save = {}, report._save_atomically

    def save(fig, target):
        figures[target.name] = fig
        real_save(fig, target)

    monkeypatch.setattr(report, "_save_atomically", save)
    return figures


def markdown_only(paths, out: Path, labels=None) -> str:
    """report.md as report_main writes it, without drawing (no figures)."""
    runs, groups = load_report_inputs(paths, labels)
    return build_markdown(runs, groups, ReportFigures(), out)


def by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def artist(ax, gid: str):
    found = [a for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, (gid, [a.get_gid() for a in ax.get_children() if a.get_gid()])
    return found[0]


def run_labels(ax) -> set[str]:
    """The runs drawn on ``ax``, from the gids of their artists (``ema:<label>``, ``wilson:<label>``, ...)."""
    return {gid.split(":", 1)[1] for a in ax.get_children() if (gid := a.get_gid()) and ":" in gid}


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


# --------------------------------------------------------------------------------------------
# statistics


def test_wilson_interval_against_hand_worked_values():
    # p = 1/4, n = 4, z = 1.96: z^2/n = 0.9604, centre = (0.25 + 0.4802) / 1.9604 = 0.37246,
    # half = 1.96 * sqrt(0.25 * 0.75 / 4 + 3.8416 / 64) / 1.9604 = 1.96 * 0.32696 / 1.9604 = 0.32689
    assert wilson_interval(0.25, 4) == pytest.approx((0.0456, 0.6994), abs=2e-4)
    # p = 0, n = 10: the lower bound is 0 and the upper z^2/n / (1 + z^2/n) = 0.38416 / 1.38416 = 0.2775
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=2e-4)
    # p = 1/3, n = 3: centre (0.3333 + 0.6403) / 2.2805 = 0.4269, half 1.96 * sqrt(0.0741 + 0.1067) / 2.2805 = 0.3654
    assert wilson_interval(1 / 3, 3) == pytest.approx((0.0615, 0.7923), abs=2e-4)
    # p = 0.5, n = 1000: close to the normal interval 0.5 +- 1.96 * sqrt(0.25 / 1000) = 0.5 +- 0.0310
    assert wilson_interval(0.5, 1000) == pytest.approx((0.4691, 0.5309), abs=2e-4)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_ema_against_hand_worked_values():
    # span 3: alpha = 2 / (3 + 1) = 0.5; e = [0, 0.5*4 + 0.5*0, 0.5*2 + 0.5*2, 0.5*6 + 0.5*2] = [0, 2, 2, 4]
    assert ema([0.0, 4.0, 2.0, 6.0], 3) == [0.0, 2.0, 2.0, 4.0]
    # span 2: alpha = 2/3; e1 = 2/3 * 3 + 1/3 * 0 = 2, e2 = 2/3 * 0 + 1/3 * 2 = 0.6667
    assert ema([0.0, 3.0, 0.0], 2) == pytest.approx([0.0, 2.0, 2 / 3])
    assert ema([1.0, 5.0], 1) == [1.0, 5.0]
    assert ema([], 4) == []
    with pytest.raises(ValueError):
        ema([1.0], 0)
    assert [ema_span(n) for n in (5, 19, 20, 40, 200, 5000)] == [1, 1, 2, 4, 20, 50]
    # a span in step-axis units, in records: 2 records a GRPO step (off-policy) -> 4 records for 2 GRPO steps
    assert record_span(2, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]) == 4 and record_span(3, [1.0, 2.0, 3.0]) == 3


def test_training_recipes_validate_with_the_temperature_the_report_states():
    from cs336_alignment.generation.types import SamplingParams
    from cs336_alignment.report import VALIDATION_TEMPERATURE, VALIDATION_TOP_P

    handout = SamplingParams.r1_zero(max_tokens=64, seed=1)
    assert (handout.temperature, handout.top_p) == (VALIDATION_TEMPERATURE, VALIDATION_TOP_P)


# --------------------------------------------------------------------------------------------
# end to end


def test_report_from_a_real_grpo_run_renders_every_figure(tmp_path, saved):
    from cs336_alignment.recipes.common import DataConfig
    from cs336_alignment.recipes.grpo import train_grpo

    run = tmp_path / "grpo_real"
    train_grpo(GRPOConfig(
        model="tiny", out=str(run), loss_type="grpo_clip", device="cpu",
        data=DataConfig(train="task:arithmetic", task_knobs={"digits": 1}, n_task_train=16, n_task_val=16),
        n_grpo_steps=2, rollout_batch_size=16, group_size=4, train_batch_size=16, gradient_accumulation_steps=2,
        sampling_max_tokens=16, eval_every=1, n_eval_examples=8,
    ))
    out = tmp_path / "report"
    report = report_main([run], out)
    assert report == out / "report.md"
    text = report.read_text()
    names = ["summary.png", "fig_grpo.png", "val_accuracy_vs_step.png", "val_accuracy_vs_wall_clock.png"]
    assert sorted(image_links(text)) == sorted(names) == sorted(p.name for p in out.glob("*.png"))
    for name in names:
        assert_real_png(out / name)
    # a grpo_clip run logs every metric of the generic GRPO figure
    assert list(by_title(saved["fig_grpo.png"])) == [p.title for p in DELIVERABLES["grpo"].panels]
    assert "Not drawn" not in text
    assert "| grpo_real |" in text  # a single run is labelled by its directory name
    assert "#### Validation at step 1 (subset" in text and "#### Validation at step 2 (full" in text
    assert "User: What is" in text  # prompt tails of example rollouts


def test_recipes_get_their_own_panels_with_wilson_bands_smoothing_and_legends(tmp_path, saved):
    sft = make_sft_run(tmp_path / "sft", n_steps=4)  # 4 steps: unsmoothed; one validation, 1 of 3 correct
    start = str(sft / "model")  # both GRPO runs start from the SFT run's model
    clip = make_grpo_run(tmp_path / "clip", n_steps=20, learning_rate=3e-5, loss_type="grpo_clip", model=start)
    plain = make_grpo_run(tmp_path / "plain", n_steps=20, learning_rate=1e-5, model=start)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig_stale.png").write_bytes(b"a figure of an earlier report")
    text = report_main([sft, clip, plain], out).read_text()
    clip_label, plain_label = "learning_rate=3e-05, loss_type=grpo_clip", "learning_rate=1e-05, loss_type=reinforce_with_baseline"

    # every figure written is linked from the Markdown, and the stale one is gone
    names = {"summary.png", "fig_sft.png", "fig_grpo.png", "val_accuracy_vs_step.png", "val_accuracy_vs_wall_clock.png"}
    assert {p.name for p in out.glob("*.png")} == names == set(image_links(text)) == set(saved)
    assert_real_png(out / "summary.png")
    assert all((out / name).stat().st_mode & 0o777 == umask_mode() for name in names)  # as the umask allows
    assert not list(out.glob(".*"))  # no temporary file left behind

    # SFT and GRPO never share an axes, nor a y-axis
    summary = saved["summary.png"]
    assert list(by_title(summary)) == ["SFT: Validation accuracy", "SFT: Train loss", "GRPO: Validation accuracy",
                                       "GRPO: Train reward (rollouts)"]
    for fig in saved.values():
        for ax in fig.axes:
            drawn = run_labels(ax)
            assert drawn and (drawn <= {"sft"} or drawn <= {clip_label, plain_label}), drawn
            assert ax.get_shared_y_axes().get_siblings(ax) == [ax]
    sft_fig, grpo_fig = saved["fig_sft.png"], saved["fig_grpo.png"]
    assert {ax.get_xlabel() for ax in by_title(sft_fig).values()} >= {"optimizer step"}
    assert by_title(grpo_fig)["Validation accuracy"].get_xlabel() == "GRPO step"
    time_axis = by_title(grpo_fig)["Validation accuracy vs time"]
    assert time_axis.get_xlabel() == "training time (minutes; validation excluded)"  # 20 steps of 10 s
    assert not [a for ax in grpo_fig.axes for a in ax.get_children() if a.get_gid() == "budget"]  # no budget

    # the generic GRPO figure: its panels, one legend of the runs and what varies, one of the styles
    assert list(by_title(grpo_fig)) == [p.title for p in DELIVERABLES["grpo"].panels]
    runs_legend, styles_legend = grpo_fig.legends
    assert legend_texts(runs_legend) == [clip_label, plain_label]
    assert runs_legend.get_title().get_text() == "varies: learning_rate, loss_type"
    assert legend_texts(styles_legend) == ["validation: mean and 95% Wilson interval",
                                           "training: EMA, span 2 GRPO steps (faint: each optimizer step)",
                                           "start: last validation of sft (0.333)"]

    # 20 steps: EMA of span 2, alpha = 2/3, over grad_norm = 1 + 0.1 step:
    # e = [1.1, 2/3 * 1.2 + 1/3 * 1.1, 2/3 * 1.3 + 1/3 * 1.16667] = [1.1, 1.16667, 1.25556]
    grad = by_title(grpo_fig)["Gradient norm (before clipping)"]
    assert artist(grad, f"ema:{plain_label}").get_ydata()[:3] == pytest.approx([1.1, 1.16667, 1.25556], abs=1e-5)
    assert artist(grad, f"raw:{plain_label}").get_ydata()[:3] == pytest.approx([1.1, 1.2, 1.3])
    assert artist(grad, f"raw:{plain_label}").get_alpha() < 0.5  # faint

    # the Wilson band: validation at GRPO step 1 has accuracy 1/4 on 4 examples -> [0.0456, 0.6994]
    # (see test_wilson_interval_against_hand_worked_values for the arithmetic)
    from matplotlib.collections import LineCollection, PolyCollection

    accuracy = by_title(grpo_fig)["Validation accuracy"]
    band = artist(accuracy, f"wilson:{plain_label}")
    assert isinstance(band, PolyCollection)
    vertices = band.get_paths()[0].vertices
    for corner in ((1.0, 0.0456), (1.0, 0.6994)):
        assert np.isclose(vertices, corner, atol=2e-4).all(axis=1).any(), corner
    assert list(artist(accuracy, f"value:{plain_label}").get_ydata()[:4]) == [0.25, 0.5, 0.75, 1.0]
    # the runs started from the SFT model: its last validation (1/3) is drawn as their start
    assert list(artist(accuracy, f"start:{plain_label}").get_ydata()) == pytest.approx([1 / 3, 1 / 3])
    # one SFT validation: an error bar from 0.0615 to 0.7923 (1 of 3, hand-worked above) at step 4
    bar = artist(by_title(sft_fig)["Validation accuracy"], "wilson:sft")
    assert isinstance(bar, LineCollection)
    assert np.allclose(bar.get_segments()[0], [[4, 0.0615], [4, 0.7923]], atol=2e-4)

    # Markdown: clocks and validation sampling per run, intervals, what a panel lacks
    assert ("| sft | training clock (`wall_clock_train`: validation excluded) | – | 1.0 | 1.0 | 1024 (`eval_max_tokens`) "
            "| final 3 | 1234 |") in text
    assert f"| {plain_label} | training clock (`wall_clock_train`: validation excluded) | – | 1.0 | 1.0 | " \
           "1024 (`sampling_max_tokens`) | subset 4, full 4 | 1234 |" in text
    assert "| sft | sft | 4 | final | 3 | 0.3333 | [0.061, 0.792] |" in text
    assert f"Not in clip fraction (no data): {plain_label}." in text
    assert "GRPO: runs differ in `learning_rate`, `loss_type`." in text
    assert f"{plain_label} started from the model of sft: its last validation accuracy (0.3333)" in text
    assert "2 GRPO runs; they differ in `learning_rate`, `loss_type`." in text
    assert "run_name=" not in text and "wandb_project=" not in text and "out=" not in text


def test_a_sweep_directory_stands_for_its_runs_and_its_deliverable_is_recognised(tmp_path, saved):
    sweep = tmp_path / "grpo_lr"
    for lr in (1e-5, 3e-6):
        make_grpo_run(sweep / f"lr={lr:g}", n_steps=2, learning_rate=lr)
    (sweep / "report").mkdir()  # an earlier report inside the sweep: no run, passed over
    (sweep / "report" / "report.md").write_text("# Run report\n")
    [(where, paths)] = expand_run_dirs([sweep])
    assert where == sweep and [p.name for p in paths] == ["lr=1e-05", "lr=3e-06"]
    runs, [group] = load_report_inputs([sweep])
    assert len(runs) == 2 and group.sweep == sweep
    assert (group.deliverable.key, group.title, group.filename) == ("grpo_lr", "GRPO: learning rate (grpo_lr)", "fig_grpo_lr.png")
    assert [r.label for r in group.runs] == ["learning_rate=3e-06", "learning_rate=1e-05"]  # by value, not by name
    out = tmp_path / "out"
    out.mkdir()
    result = render_group_figure(group, out)
    assert result.path == out / "fig_grpo_lr.png" and result.path.exists()
    assert [p.title for p in result.drawn] == [p.title for p in DELIVERABLES["grpo_lr"].panels]
    runs_legend = result.figure.legends[0]
    assert legend_texts(runs_legend) == ["learning_rate=3e-06", "learning_rate=1e-05"]
    assert runs_legend.get_title().get_text() == "varies: learning_rate"
    text = build_markdown(runs, [group], ReportFigures(groups=[(group, result)]), out)
    assert "### GRPO: learning rate (grpo_lr)" in text and "![GRPO: learning rate (grpo_lr)](fig_grpo_lr.png)" in text
    assert "The handout asks for validation reward curves for each learning rate." in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="nor a sweep directory"):
        expand_run_dirs([tmp_path / "empty"])


def _study_configs(*files: str) -> tuple[str, list[dict]]:
    """(recipe, flattened config.yaml of each run) of study configs, or of a sweep's grid points and of
    its base with the overrides given after it (``"key=value key=value"``)."""
    import yaml

    from cs336_alignment.experiments import expand_sweep, load_study

    root = Path(__file__).resolve().parents[1] / "configs"
    if files[0].startswith("sweeps/"):
        base, points = expand_sweep(root / files[0])
        studies = [load_study(base, p.overrides) for p in points] + [load_study(base, x.split()) for x in files[1:]]
    else:
        studies = [load_study(root / f) for f in files]
    return studies[0].recipe, [flatten_config(yaml.safe_load(dump_yaml(s.config))) for s in studies]


@pytest.mark.parametrize("files, key", [
    (("sweeps/grpo_lr.yaml",), "grpo_lr"),
    (("sweeps/grpo_baselines.yaml",), "grpo_baselines"),
    (("sweeps/grpo_length_norm.yaml",), "grpo_length_norm"),
    (("sweeps/grpo_std_norm.yaml",), "grpo_std_norm"),
    (("sweeps/grpo_off_policy_broad.yaml",), "grpo_off_policy_broad"),
    (("sweeps/grpo_off_policy_focused.yaml",), "grpo_off_policy_focused"),
    (("sweeps/sft_sizes.yaml",), "sft_sizes"),
    (("sweeps/ei_grid.yaml",), "ei_grid"),
    (("grpo_off_policy.yaml", "grpo_no_clip.yaml"), "grpo_clip_ablation"),
    (("grpo.yaml", "grpo_question_only.yaml"), "grpo_prompt_ablation"),
    (("sft.yaml", "sft_filtered.yaml"), "sft_filtered"),
    (("leaderboard.yaml",), "leaderboard"),
    (("grpo.yaml",), "grpo"),
    (("grpo.yaml", "leaderboard.yaml"), "grpo"),  # they differ in many keys: no study, the generic GRPO figure
    (("sweeps/grpo_lr.yaml", "learning_rate=1e-5 loss_type=grpo_clip"), "grpo"),  # a sweep plus another change
    (("ei.yaml",), "ei"),
])
def test_each_study_of_the_handout_is_recognised_from_its_configs(files, key):
    recipe, configs = _study_configs(*files)
    deliverable = recognise(recipe, configs)
    assert deliverable.key == key and deliverable.recipe == recipe
    assert ACC_STEP in deliverable.panels and len(deliverable.summary) == 2


def test_a_wall_budgeted_run_ends_its_time_axis_at_the_budget(tmp_path):
    path = tmp_path / "leaderboard"
    rd = RunDir(path, console=False)
    config = "recipe: grpo\nn_eval_examples: 2\ncontrol:\n  budget_clock: wall\n  time_budget: 4h\n"
    atomic_write_text(path / "config.yaml", config)
    rd.log_metrics({"kind": "eval", "eval_step": 0, "accuracy": 0.1, "n_examples": 2, "wall_clock": 90.0})  # after loading
    rd.log_metrics({"kind": "train", "train_step": 1, "grpo_step": 0, "grad_norm": 1.0, "wall_clock_train": 10.0,
                    "wall_clock": 150.0})
    rd.log_metrics({"kind": "eval", "eval_step": 1, "accuracy": 0.3, "n_examples": 2, "wall_clock": 210.0})  # its 60 s count
    rd.close()
    run = load_run(path)
    assert run.budget_clock == "wall" and run.time_budget == 4 * 3600
    assert [(p.step, p.wall_clock, p.n) for p in run.points("eval", "accuracy")] == [(0, 90.0, 2), (1, 210.0, 2)]
    assert [p.wall_clock for p in run.points("train", "grad_norm")] == [150.0]
    train_only = load_run(make_grpo_run(tmp_path / "train", n_steps=1))
    assert train_only.budget_clock == "train" and [p.wall_clock for p in train_only.points("eval", "accuracy")] == [10.0]

    runs, [group] = load_report_inputs([path])
    assert group.deliverable.key == "leaderboard"  # recognised from its config: a wall-clock budget
    out = tmp_path / "out"
    out.mkdir()
    result = render_group_figure(group, out)
    wall = by_title(result.figure)["Validation accuracy vs time"]
    assert list(artist(wall, "budget").get_xdata()) == [4.0, 4.0]  # 4 h, on an axis in hours
    assert wall.get_xlim() == (0.0, 4.0)  # and the axis ends there
    assert wall.get_xlabel() == "wall clock (hours; validation and start-up included)"
    assert "time budget" in legend_texts(result.figure.legends[1])
    assert [p.metric for p in result.skipped] == ["train_reward_mean", "token_entropy", "train_response_length_mean"]
    section = build_markdown(runs, [group], ReportFigures(groups=[(group, result)]), out).split("### Leaderboard", 1)[1]
    assert "Not drawn, no run logged it: train reward (rollouts) (`train_reward_mean`, only GRPO logs" in section
    text = markdown_only([path, train_only.path], out, labels=["leaderboard", "plain"])
    assert "| leaderboard | wall clock (`wall_clock`: validation and start-up included) | 4h 00m (wall clock) |" in text
    assert "| plain | training clock (`wall_clock_train`: validation excluded) | – |" in text


def test_evaluation_run_gets_category_table_with_examples_and_needs_no_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # nothing to plot for an evaluation run
    ev = make_eval_run(tmp_path / "zero_shot")
    text = report_main([ev], tmp_path / "out").read_text()
    assert image_links(text) == []
    section = text.split("## Evaluation runs", 1)[1]
    assert "Model `models/qwen` on `data/val.jsonl`." in section
    assert "| format 1, answer 1 (correct) | 2 | 50.0% |" in section
    assert "| format 1, answer 0 (formatted, wrong answer) | 1 | 25.0% |" in section
    assert "| format 0, answer 0 (unformatted) | 1 | 25.0% |" in section
    assert "| total | 4 | |" in section
    assert "format 0, answer 1" not in section  # impossible category hidden when empty
    for name in ("format 1, answer 1 (correct)", "format 1, answer 0 (formatted, wrong answer)",
                 "format 0, answer 0 (unformatted)"):
        assert f"**Examples: {name}**" in section
    wrong = section.split("**Examples: format 1, answer 0", 1)[1].split("**Examples", 1)[0]
    assert "What is 2 + 1?" in wrong and "2 plus 1 is 4" in wrong
    assert "| zero_shot | eval |" in text  # final metrics row of the evaluation
    assert "| zero_shot | – | – | 1.0 | 1.0 | 1024 | 4 | 0 |" in text  # its sampling, from its config.yaml


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    run = make_grpo_run(tmp_path / "run", n_steps=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError) as err:
        report_main([run], tmp_path / "out")
    assert str(err.value) == "plots need matplotlib: pip install 'cs336-alignment[plot]'"


def test_bad_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="neither metrics.jsonl"):
        report_main([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ReportError, match="not a directory"):
        report_main([tmp_path / "missing"], tmp_path / "out")
    run = make_grpo_run(tmp_path / "run", n_steps=1)
    with pytest.raises(ReportError, match="got 2 labels for 1 runs"):
        report_main([run], tmp_path / "out", labels=["a", "b"])
    with pytest.raises(ReportError, match="at least one run"):
        report_main([], tmp_path / "out")


def test_given_labels_replace_config_labels(tmp_path):
    a = make_grpo_run(tmp_path / "a", learning_rate=3e-5)
    b = make_grpo_run(tmp_path / "b", learning_rate=1e-5)
    text = markdown_only([a, b], tmp_path / "out", labels=["baseline", "low lr"])
    assert "| baseline | " in text and "| low lr | " in text and "learning_rate=" not in text.split("## Final", 1)[1]


def test_final_metrics_table_uses_the_last_validation_and_train_wall_clock(tmp_path):
    sft = make_sft_run(tmp_path / "sft", n_steps=4)  # wall_clock_train 240 s, final accuracy 1/3
    grpo = make_grpo_run(tmp_path / "grpo", n_steps=3)  # final accuracy 3/4 (i < 3 of 4), 30 s
    text = markdown_only([sft, grpo], tmp_path / "out")
    table = text.split("## Final metrics", 1)[1].split("\n\n", 3)[2]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert set(rows) == {"sft", "grpo"}  # each alone in its recipe's group: labelled by directory
    sft_row = rows["sft"]
    assert sft_row[1:5] == ["sft", "4", "final", "3"]
    assert sft_row[5] == "0.3333" and sft_row[6] == "[0.061, 0.792]" and sft_row[7] == "1.0000"
    assert sft_row[-1].rstrip(" |") == "4m 00s"
    grpo_row = rows["grpo"]
    assert grpo_row[1:6] == ["grpo", "3", "full", "4", "0.7500"] and grpo_row[-1].rstrip(" |") == "30.0s"
    # the category table of the last validation
    assert "| grpo | full step 3 | 3 (75%) | 1 (25%) | 0 (0%) |" in text


# --------------------------------------------------------------------------------------------
# axes, labels, examples


def test_validation_and_training_points_sit_on_the_grpo_step_axis(tmp_path):
    # off-policy: 2 optimizer steps per GRPO step; eval_step counts GRPO steps
    run = load_run(make_grpo_run(tmp_path / "off", n_steps=3, off_policy_steps=2))
    val = run.points("eval", "accuracy")
    assert [(p.step, p.wall_clock, p.n) for p in val] == [(1, 20.0, 4), (2, 40.0, 4), (3, 60.0, 4)]
    assert [p.value for p in val] == [0.25, 0.5, 0.75]
    # optimizer steps spread over their GRPO step, the last on it
    assert [p.step for p in run.points("train", "grad_norm")] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert run.train_extent() == 3.0
    # "nan" strings in train records are dropped, not plotted
    lengths = run.points("train", "train_response_length_correct")
    assert [p.step for p in lengths] == [1.5, 2.0, 2.5, 3.0]
    sft = load_run(make_sft_run(tmp_path / "sft", n_steps=2))  # SFT: the optimizer step itself
    assert [p.step for p in sft.points("train", "loss")] == [1, 2] and [p.step for p in sft.points("eval", "accuracy")] == [2]


def test_expert_iteration_is_drawn_against_ei_steps(tmp_path):
    from cs336_alignment.recipes.ei import EIConfig

    path = tmp_path / "ei"
    rd = RunDir(path, console=False)
    rd.save_config(EIConfig(model="tiny", out=str(path), n_ei_steps=2))
    rd.log_metrics({"kind": "eval", "eval_step": 0, "accuracy": 0.1, "n_examples": 10})
    step = 0
    for ei_step, n_optimizer_steps in ((0, 3), (1, 2)):  # as many optimizer steps as kept responses make
        for _ in range(n_optimizer_steps):
            step += 1
            rd.log_metrics({"kind": "train", "train_step": step, "ei_step": ei_step, "loss": 1.0 / step,
                            "wall_clock_train": 10.0 * step})
        rd.log_metrics({"kind": "ei", "ei_step": ei_step + 1, "rollout_entropy": 1.5 - ei_step, "n_kept": 5,
                        "wall_clock_train": 10.0 * step})
        rd.log_metrics({"kind": "eval", "eval_step": ei_step + 1, "accuracy": 0.2 + 0.1 * ei_step, "n_examples": 10})
    rd.close()
    run = load_run(path)
    assert run.recipe == "ei" and recognise("ei", [run.config]).key == "ei"
    assert [p.step for p in run.points("train", "loss")] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.5, 2.0])
    assert [(p.step, p.value) for p in run.points("ei", "rollout_entropy")] == [(1, 1.5), (2, 0.5)]
    assert [(p.step, p.wall_clock) for p in run.points("eval", "accuracy")] == [(0, 0.0), (1, 30.0), (2, 50.0)]


def test_records_logged_again_for_a_step_replace_earlier_ones(tmp_path):
    path = make_grpo_run(tmp_path / "resumed", n_steps=2)
    rd = RunDir(path, console=False)  # a resumed run re-logs step 2
    rd.log_metrics({"kind": "train", "train_step": 2, "grpo_step": 1, "grad_norm": 9.0, "wall_clock_train": 25.0})
    rd.log_metrics({"kind": "eval", "eval_step": 2, "accuracy": 0.9})
    rd.close()
    run = load_run(path)
    assert [(p.step, p.value) for p in run.points("train", "grad_norm")] == [(1, 1.1), (2, 9.0)]
    assert [(p.step, p.wall_clock, p.value) for p in run.points("eval", "accuracy")] == [(1, 10.0, 0.25), (2, 25.0, 0.9)]


def test_config_labels():
    base = flatten_config({"model": "tiny", "out": "runs/a", "learning_rate": 1e-5,
                           "data": {"train": "gsm8k.jsonl", "task_knobs": {}}, "wandb_project": "x"})
    assert base["data.train"] == "gsm8k.jsonl" and base["data.task_knobs"] == {}
    other = {**base, "out": "runs/b", "wandb_project": "y", "data.train": "math.jsonl", "betas": [0.9, 0.99]}
    assert config_labels([base], ["a"]) == ["a"]
    # betas is only in one config: a common key already tells the runs apart
    assert config_labels([base, other], ["a", "b"]) == ["data.train=gsm8k.jsonl", "data.train=math.jsonl"]
    assert config_labels([base, dict(base)], ["a", "b"]) == ["a", "b"]  # identical configs: directory names
    newer = {**base, "control.keep_last": 2}
    assert config_labels([base, newer], ["a", "b"]) == ["a", "control.keep_last=2"]


def test_example_rollouts_spread_over_time_and_prefer_a_correct_example(tmp_path):
    path = make_grpo_run(tmp_path / "long", n_steps=6)
    long_text = "``` fenced " + "x" * 3000 + " </think> <answer> 7 </answer>"
    write_eval_dir(path / "eval" / "subset_step00003", [generation(0, 3, False, text=long_text), generation(1, 3, True)])
    text = markdown_only([path], tmp_path / "out")
    shown = re.findall(r"#### Validation at step (\d+)", text)
    assert shown == ["1", "3", "4", "6"]  # 4 of 6 validations, first and last included
    step3 = text.split("#### Validation at step 3", 1)[1].split("####", 1)[0]
    assert step3.index("reward 1.000") < step3.index("reward 0.000")  # the correct example comes first
    assert "characters omitted" in step3 and "<answer> 7 </answer>" in step3  # head and tail of a long response
    assert "````text" in step3  # a fence longer than the ``` inside the response
    assert "x" * 1200 not in step3


def test_helpers():
    assert spread(list(range(6)), 4) == [0, 2, 3, 5]
    assert spread([1, 2], 4) == [1, 2]
    assert truncate_middle("short") == "short"
    cut = truncate_middle("a" * 500 + "b" * 2000 + "c" * 500, head=100, tail=50)
    assert cut.startswith("a" * 100) and cut.endswith("c" * 50) and "[... 2850 characters omitted ...]" in cut
    gens = [{"reward": {"answer_reward": 0.0}, "i": 0}, {"reward": {"answer_reward": 0.0}, "i": 1},
            {"reward": {"answer_reward": 1.0}, "i": 2}]
    assert [g["i"] for g in pick_examples(gens, 2)] == [2, 0]
    assert [g["i"] for g in pick_examples(gens[:2], 2)] == [0, 1]
    assert CLIP_FRACTION.smoothed and not ACC_STEP.smoothed and ACC_STEP.is_accuracy


def test_run_kind_and_recipe_detection(tmp_path):
    sft = load_run(make_sft_run(tmp_path / "s"))
    assert (sft.kind, sft.recipe) == ("training", "sft")
    assert load_run(make_grpo_run(tmp_path / "g", n_steps=1)).recipe == "grpo"
    ev = load_run(make_eval_run(tmp_path / "e"))
    assert (ev.kind, ev.recipe) == ("evaluation", "eval") and ev.eval_metrics["count_format1_answer1"] == 2
    assert isinstance(ev, Run) and ev.config["model"] == "models/qwen"
    assert np.isclose(ev.eval_metrics["accuracy"], 0.5)
