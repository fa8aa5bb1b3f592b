"""``report``: PNG plots and report.md from run directories shaped exactly as the recipes write them."""

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
    PLOTS,
    ReportError,
    Run,
    config_labels,
    flatten_config,
    load_run,
    pick_examples,
    render_plot,
    report_main,
    spread,
    truncate_middle,
)
from cs336_alignment.run_dir import RunDir, atomic_write_text

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
    reward = {"format_reward": float(formatted), "answer_reward": float(correct and formatted), "reward": float(correct and formatted)}
    return GenerationRecord(i, 0, PROMPT.format(a=a, b=b), body, str(a + b), "stop", 12 + i, reward, mean_entropy=1.5)


def write_eval_dir(path: Path, records: list[GenerationRecord]) -> dict:
    metrics = summarize(records, max_tokens=64)
    write_evaluation(path, metrics, records)
    return metrics


def make_grpo_run(
    path: Path, n_steps: int = 5, learning_rate: float = 1e-5, loss_type: str = "reinforce_with_baseline",
    off_policy_steps: int = 1, eval_every: int = 1, run_name: str = "",
) -> Path:
    """A GRPO run directory: config.yaml, metrics.jsonl (train + eval records), eval/ snapshots."""
    cfg = GRPOConfig(model="tiny", out=str(path), learning_rate=learning_rate, loss_type=loss_type, run_name=run_name,
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
    metrics = write_eval_dir(path / "eval" / f"final_step{n_steps:05d}", [generation(i, n_steps, correct=i == 0) for i in range(3)])
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
    write_eval_dir(path, [generation(0, 1, True), generation(1, 1, True), generation(2, 1, False), generation(3, 1, False, formatted=False)])
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


# --------------------------------------------------------------------------------------------
# end to end


def test_report_from_a_real_grpo_run_renders_every_plot(tmp_path):
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
    names = [spec.filename for spec in PLOTS]
    # a grpo_clip run logs every plotted metric, so nothing is skipped
    assert sorted(image_links(text)) == sorted(names)
    for name in names:
        assert_real_png(out / name)
    assert "Skipped plots" not in text
    assert "| grpo_real |" in text  # a single run is labelled by its directory name
    assert "#### Validation at step 1 (subset" in text and "#### Validation at step 2 (full" in text
    assert "User: What is" in text  # prompt tails of example rollouts


def test_runs_are_overlaid_and_labelled_by_the_config_keys_they_differ_in(tmp_path):
    a = make_grpo_run(tmp_path / "a", learning_rate=3e-5, loss_type="grpo_clip", run_name="first")
    b = make_grpo_run(tmp_path / "b", learning_rate=1e-5, loss_type="reinforce_with_baseline", run_name="second")
    out = tmp_path / "out"
    text = report_main([a, b], out).read_text()
    # out, run_name and wandb_project differ too but are ignored
    assert "| learning_rate=3e-05, loss_type=grpo_clip | " in text
    assert "| learning_rate=1e-05, loss_type=reinforce_with_baseline | " in text
    assert "Training runs differ in: `learning_rate`, `loss_type`." in text
    assert "run_name=" not in text and "wandb_project=" not in text and "out=" not in text
    # clip fraction is drawn for the clip run only, and the report says which run is missing
    clip = text.split("### Clip fraction", 1)[1].split("###", 1)[0]
    assert "![Clip fraction](clip_fraction.png)" in clip
    assert "Not in this plot (no data): learning_rate=1e-05, loss_type=reinforce_with_baseline." in clip
    for name in ("val_accuracy_vs_step.png", "train_reward.png", "clip_fraction.png"):
        assert_real_png(out / name)


def test_plots_a_run_lacks_are_skipped_and_reported(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip_fraction.png").write_bytes(b"stale plot from an earlier report")
    sft = make_sft_run(tmp_path / "sft")
    text = report_main([sft], out).read_text()
    links = image_links(text)
    assert "train_reward.png" not in links and "clip_fraction.png" not in links
    assert not (out / "train_reward.png").exists()
    assert not (out / "clip_fraction.png").exists()  # a stale file of a skipped plot is removed
    skipped = text.split("**Skipped plots**", 1)[1].split("\n## ", 1)[0]
    assert "`train_reward.png`" in skipped and "`clip_fraction.png`" in skipped
    assert "`clip_fraction`" in skipped and "`train_reward_mean`" in skipped
    # SFT still gets validation, entropy, length (from validation), grad norm and loss plots
    for name in ("val_accuracy_vs_step.png", "val_accuracy_vs_wall_clock.png", "token_entropy.png",
                 "response_length.png", "grad_norm.png", "train_loss.png"):
        assert name in links
        assert_real_png(out / name)


def test_final_metrics_table_uses_the_last_validation_and_train_wall_clock(tmp_path):
    sft = make_sft_run(tmp_path / "sft", n_steps=4)  # wall_clock_train 240 s, final accuracy 1/3
    grpo = make_grpo_run(tmp_path / "grpo", n_steps=3)  # final accuracy 3/4 (i < 3 of 4), 30 s
    text = report_main([sft, grpo], tmp_path / "out").read_text()
    table = text.split("## Final metrics", 1)[1].split("\n\n", 3)[2]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    # keys both recipes have, with different values
    sft_label = "learning_rate=2e-05, micro_batch_size=2, eval_every=0"
    grpo_label = "learning_rate=1e-05, micro_batch_size=null, eval_every=1"
    assert set(rows) == {sft_label, grpo_label}
    rows = {"sft": rows[sft_label], "grpo": rows[grpo_label]}
    sft_row = rows["sft"]
    assert sft_row[2:5] == ["4", "final", "3"]
    assert sft_row[5] == "0.3333" and sft_row[6] == "1.0000"
    assert sft_row[-1].rstrip(" |") == "4m 00s"
    grpo_row = rows["grpo"]
    assert grpo_row[2:5] == ["3", "full", "4"] and grpo_row[5] == "0.7500" and grpo_row[-1].rstrip(" |") == "30.0s"
    # the category table of the last validation
    assert "| learning_rate=1e-05, micro_batch_size=null, eval_every=1 | full step 3 | 3 (75%) | 1 (25%) | 0 (0%) |" in text


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
    for name in ("format 1, answer 1 (correct)", "format 1, answer 0 (formatted, wrong answer)", "format 0, answer 0 (unformatted)"):
        assert f"**Examples: {name}**" in section
    wrong = section.split("**Examples: format 1, answer 0", 1)[1].split("**Examples", 1)[0]
    assert "What is 2 + 1?" in wrong and "2 plus 1 is 4" in wrong
    assert "| zero_shot | eval |" in text  # final metrics row of the evaluation


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
    text = report_main([a, b], tmp_path / "out", labels=["baseline", "low lr"]).read_text()
    assert "| baseline | " in text and "| low lr | " in text and "learning_rate=" not in text


# --------------------------------------------------------------------------------------------
# axes, labels, examples


def test_validation_points_take_step_and_wall_clock_of_the_latest_train_record(tmp_path):
    # off-policy: 2 optimizer steps per GRPO step; eval_step counts GRPO steps
    run = load_run(make_grpo_run(tmp_path / "off", n_steps=3, off_policy_steps=2))
    val = run.points("eval", "accuracy")
    assert [(p.step, p.wall_clock) for p in val] == [(2, 20.0), (4, 40.0), (6, 60.0)]
    assert [p.value for p in val] == [0.25, 0.5, 0.75]
    # "nan" strings in train records are dropped, not plotted
    lengths = run.points("train", "train_response_length_correct")
    assert [p.step for p in lengths] == [3, 4, 5, 6]


def test_records_logged_again_for_a_step_replace_earlier_ones(tmp_path):
    path = make_grpo_run(tmp_path / "resumed", n_steps=2)
    rd = RunDir(path, console=False)  # a resumed run re-logs step 2
    rd.log_metrics({"kind": "train", "train_step": 2, "grad_norm": 9.0, "wall_clock_train": 25.0})
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
    text = report_main([path], tmp_path / "out").read_text()
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


def test_run_kind_detection(tmp_path):
    assert load_run(make_sft_run(tmp_path / "s")).kind == "training"
    ev = load_run(make_eval_run(tmp_path / "e"))
    assert ev.kind == "evaluation" and ev.eval_metrics["count_format1_answer1"] == 2
    assert isinstance(ev, Run) and ev.config["model"] == "models/qwen"
    assert np.isclose(ev.eval_metrics["accuracy"], 0.5)


def test_a_wall_budgeted_run_is_plotted_against_its_own_wall_clock(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    import cs336_alignment.report as report

    lines, limits, real_axvline, real_save = [], [], Axes.axvline, report._save_atomically
    monkeypatch.setattr(Axes, "axvline", lambda self, x, **kw: lines.append((x, kw.get("label"))) or real_axvline(self, x, **kw))
    monkeypatch.setattr(report, "_save_atomically", lambda fig, target: limits.append(fig.axes[0].get_xlim()) or
                        real_save(fig, target))
    path = tmp_path / "leaderboard"
    rd = RunDir(path, console=False)
    atomic_write_text(path / "config.yaml", "recipe: grpo\ncontrol:\n  budget_clock: wall\n  time_budget: 4h\n")
    rd.log_metrics({"kind": "eval", "eval_step": 0, "accuracy": 0.1, "wall_clock": 90.0})  # after loading: 90 s in
    rd.log_metrics({"kind": "train", "train_step": 1, "grad_norm": 1.0, "wall_clock_train": 10.0, "wall_clock": 150.0})
    rd.log_metrics({"kind": "eval", "eval_step": 1, "accuracy": 0.3, "wall_clock": 210.0})  # the validation's 60 s count
    rd.close()
    run = load_run(path)
    assert run.budget_clock == "wall"
    assert [(p.step, p.wall_clock) for p in run.points("eval", "accuracy")] == [(0, 90.0), (1, 210.0)]
    assert [p.wall_clock for p in run.points("train", "grad_norm")] == [150.0]
    spec = next(p for p in PLOTS if p.filename == "val_accuracy_vs_wall_clock.png")
    (tmp_path / "plots").mkdir()
    result = render_plot(spec, [run], tmp_path / "plots")
    assert result.path is not None and result.path.stat().st_size > 0
    assert lines == [(240.0, "time budget")]  # 4 h on an axis in minutes (the data spans 3.5 minutes)
    assert limits[-1][1] == 240.0  # and the axis ends there
    train_only = load_run(make_grpo_run(tmp_path / "train", n_steps=1))
    assert train_only.budget_clock == "train" and [p.wall_clock for p in train_only.points("eval", "accuracy")] == [10.0]
