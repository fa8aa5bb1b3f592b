"""The README's main command at reduced size: validation reward must rise after GRPO, also with
asynchronous rollouts (a generator process one step ahead of the trainer, from the same SFT model)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cs336_alignment.config import ConfigError
from cs336_alignment.demo import DemoConfig, format_summary, run_demo

ASYNC_STEPS = 40  # the async test's GRPO steps (the sync demo's 60 would double its time); it learns by then


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick demo, run once: its summary and run directory (the async test starts from its SFT)."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    return run_demo(DemoConfig.quick(str(out))), out


@pytest.mark.timeout(600)
def test_quick_demo_learns(quick_demo):
    summary, out = quick_demo
    # Same held-out questions, same sampling seed, before and after GRPO.
    assert summary["n_val"] == 200
    assert summary["improvement_points"] >= 5.0, format_summary(summary)
    assert summary["val_reward_after_sft"] > 0.05  # the SFT warm-up worked
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["val_reward_after_grpo"] == summary["val_reward_after_grpo"]
    report = (out / "report" / "report.md").read_text()
    assert "val_accuracy_vs_step.png" in report and (out / "report" / "val_accuracy_vs_step.png").exists()
    assert (out / "grpo" / "final.json").exists()


@pytest.mark.timeout(600)
def test_async_demo_learns_from_the_same_sft_model_and_stays_one_step_stale(quick_demo, tmp_path):
    sync_summary, sync_out = quick_demo
    threads = torch.get_num_threads()
    cfg = dataclasses.replace(DemoConfig.quick(str(tmp_path / "async")), async_rollouts=True, sft_run=str(sync_out / "sft"),
                              grpo_steps=ASYNC_STEPS)
    summary = run_demo(cfg)
    assert torch.get_num_threads() == threads  # the trainer's one thread was only for the GRPO phase
    # the same SFT model and its validation on the same questions; then the sync demo's threshold
    assert summary["val_reward_after_sft"] == sync_summary["val_reward_after_sft"] and summary["n_val"] == 200
    assert summary["improvement_points"] >= 5.0, format_summary(summary)
    assert "asynchronous rollouts" in format_summary(summary) and summary["sft_run"] == str(sync_out / "sft")
    records = [json.loads(line) for line in (tmp_path / "async" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["grpo_step"] for r in train] == list(range(ASYNC_STEPS))
    staleness = [r["staleness"] for r in train]
    assert max(staleness) <= 1 and staleness.count(1) == ASYNC_STEPS - 1  # batch k sampled with the weights after step k - 1
    assert all(r["weights_version"] == r["grpo_step"] - r["staleness"] for r in train)
    assert all(0 <= r["truncated_fraction"] <= 1 and r["generation_seconds"] > 0 for r in train)
    assert (tmp_path / "async" / "report" / "report.md").exists() and not (tmp_path / "async" / "sft").exists()


@pytest.mark.timeout(600)  # the shared quick demo may run in this test's set-up (random order)
def test_an_sft_run_that_validated_other_questions_is_refused_before_anything_is_written(quick_demo, tmp_path):
    _, sync_out = quick_demo
    for change, says in (({"n_val": 100}, "n_eval_examples"), ({"digits": 3}, "data")):
        cfg = dataclasses.replace(DemoConfig.quick(str(tmp_path / "other")), sft_run=str(sync_out / "sft"), **change)
        with pytest.raises(ConfigError, match=f"other questions.*{says}"):
            run_demo(cfg)
    with pytest.raises(ConfigError, match="not a finished SFT run"):
        run_demo(dataclasses.replace(DemoConfig.quick(str(tmp_path / "other")), sft_run=str(tmp_path)))
    with pytest.raises(ConfigError, match="inside this demo's out"):
        run_demo(dataclasses.replace(DemoConfig.quick(str(sync_out)), sft_run=str(sync_out / "sft")))
    assert not (tmp_path / "other").exists() and (sync_out / "summary.json").exists()  # nothing moved or written
