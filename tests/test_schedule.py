"""The study schedule: every study reaches its peak learning rate and validates at least 5 times,
configs/README.md shows the current table, and the counting is right on hand-worked cases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cs336_alignment.cli import app
from cs336_alignment.recipes.ei import EIConfig
from cs336_alignment.recipes.grpo import GRPOConfig
from cs336_alignment.recipes.sft import SFTConfig
from cs336_alignment.schedule import (
    DatasetSizes,
    ei_schedule,
    format_markdown,
    grpo_schedule,
    schedule_rows,
    sft_schedule,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = DatasetSizes()


@pytest.fixture(scope="module")
def rows():
    return schedule_rows(CONFIGS, SIZES)


def test_every_study_reaches_its_peak_lr_and_validates_at_least_five_times(rows):
    studies = {row.study.split("/")[0] for row in rows}
    assert {"sft", "sft_filtered", "sft_sizes", "ei", "ei_grid", "grpo", "grpo_lr", "leaderboard"} <= studies
    assert sum(row.study.startswith("sft_sizes/") for row in rows) == 5
    for row in rows:
        s = row.schedule
        if s.recipe == "eval":
            continue
        assert s.peak_lr_reached, (row.study, s.lr_detail)
        assert s.validations >= 5, (row.study, s.validations_detail)
        assert s.validations_detail.startswith("step 0"), row.study  # every curve starts at the base model


def test_the_table_in_configs_readme_is_the_commands_output():
    result = CliRunner().invoke(app, ["schedule", "--markdown", "--configs", str(CONFIGS)])
    assert result.exit_code == 0, result.output
    readme = (CONFIGS / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- schedule:begin -->\n(.*?)<!-- schedule:end -->", readme, re.DOTALL)
    assert found, "configs/README.md has no <!-- schedule:begin --> ... <!-- schedule:end --> block"
    assert found.group(1) == result.output, (
        "configs/README.md's table is out of date: paste `python -m cs336_alignment schedule --markdown` between the markers"
    )


def test_sft_128_examples_by_hand():
    cfg = SFTConfig(n_examples=128, epochs=8, batch_size=32, micro_batch_size=4, warmup_ratio=0.1, schedule="cosine",
                    eval_every=4, eval_at_start=True, final_eval_full=True, n_eval_examples=1024)
    s = sft_schedule(cfg, SIZES)
    # ceil(128 / 32) = 4 optimizer steps per epoch x 8 epochs = 32 steps
    assert s.optimizer_steps == 32
    # warm-up round(0.1 x 32) = 3 steps; lr_at gives base x (step + 1) / 3 at steps 0, 1, 2 (0-based),
    # so the third optimizer step is the first at the peak
    assert s.peak_lr == 2e-5 and s.peak_step == 3
    # step 0, then steps 4, 8, ..., 28 (7; step 32 is the last, left to the final), then the final: 9
    assert s.validations == 9
    assert s.validations_detail == "step 0, every 4 on 1,024; last on 5,000"


def test_sft_with_the_old_fixed_warm_up_never_reaches_the_peak():
    cfg = SFTConfig(n_examples=128, epochs=2, batch_size=64, micro_batch_size=4, warmup_steps=20, schedule="cosine",
                    eval_every=50)
    s = sft_schedule(cfg, SIZES)
    # ceil(128 / 64) x 2 = 4 steps, all inside the 20-step warm-up: at most 2e-5 x 4 / 20 = 4e-6
    assert s.optimizer_steps == 4 and not s.peak_lr_reached and "at most 4e-06" in s.lr_detail
    assert s.validations == 1  # eval_every 50 > 4 steps, no step 0: the final validation only


def test_sft_counting_edges():
    # eval_every divides the steps: ceil(4,800 / 64) = 75 x 2 = 150 steps; every 15 -> 15, 30, ..., 135 (9;
    # step 150 is the last, left to the final validation) + the final = 10 (no step 0 by default)
    s = sft_schedule(SFTConfig(batch_size=64, micro_batch_size=4, epochs=2, eval_every=15), SIZES)
    assert (s.optimizer_steps, s.validations, s.peak_step) == (150, 10, 1)  # no warm-up: peak at step 1
    # filter_correct trains on the filtered set, max_steps caps; n_examples above the set uses the set
    cfg = SFTConfig(filter_correct=True, n_examples=10_000, batch_size=32, micro_batch_size=4, max_steps=100, eval_every=0)
    s = sft_schedule(cfg, DatasetSizes(sft_filtered=1000))
    assert s.optimizer_steps == 32 and s.validations == 1  # ceil(1,000 / 32) = 32 < 100
    s = sft_schedule(cfg, DatasetSizes(sft_filtered=4000))
    assert s.optimizer_steps == 100 and "max_steps" in s.steps_detail  # 125 capped at 100
    # warm-up as long as the run still reaches the peak on its last step (lr_at: step < warmup ramps up to base)
    s = sft_schedule(SFTConfig(n_examples=64, batch_size=32, micro_batch_size=4, warmup_steps=2), SIZES)
    assert (s.optimizer_steps, s.peak_step) == (2, 2)


def test_ei_and_grpo_by_hand():
    ei = ei_schedule(EIConfig(n_ei_steps=5, batch_questions=512, rollouts_per_question=4, sft_epochs=2, batch_size=64,
                              micro_batch_size=4, eval_at_start=True), SIZES)
    # at most 512 x 4 = 2,048 kept -> ceil(2,048 / 64) = 32 steps per epoch x 2 epochs x 5 EI steps = 320
    assert ei.optimizer_steps == 320
    assert ei.validations == 6  # step 0, after EI steps 1-4, the final after step 5
    grpo = grpo_schedule(GRPOConfig(n_grpo_steps=40, eval_every=10, epochs_per_rollout_batch=2, train_batch_size=128,
                                    gradient_accumulation_steps=64, eval_at_start=True), SIZES)
    # 2 epochs x 256 / 128 = 4 optimizer steps per rollout batch x 40; validations: 0, 10, 20, 30, final
    assert (grpo.optimizer_steps, grpo.validations, grpo.peak_step) == (160, 5, 1)


def test_the_command_runs_with_other_sizes(rows):
    args = ["schedule", "--configs", str(CONFIGS), "--val-size", "500", "--train-size", "1000", "--sft-size", "2000",
            "--sft-filtered-size", "1600"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sizes = "Sizes assumed: validation 500, MATH train 1,000, sft.jsonl 2,000, filtered sft.jsonl 1,600."
    assert result.output.startswith(sizes)
    line = next(x for x in result.output.splitlines() if x.startswith("sft_sizes/n=all"))
    assert "steps 64 (ceil(2,000/64) x 2 epochs)" in line and "last on 500" in line  # 32 x 2 epochs
    line = next(x for x in result.output.splitlines() if x.startswith("sft_filtered "))
    assert "steps 50 (ceil(1,600/64) x 2 epochs)" in line  # 25 x 2 epochs: 0, 16, 32, 48, final = 5
    assert "validations 5 " in line
    assert result.output != format_markdown(rows, SIZES)
    assert CliRunner().invoke(app, ["schedule", "--configs", str(CONFIGS), "--sft-size", "0"]).exit_code == 2


def test_a_folder_without_configs_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["schedule", "--configs", str(tmp_path)])
    assert result.exit_code == 2 and "no study configs (*.yaml) here" in result.output
