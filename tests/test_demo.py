"""The README's main command at reduced size: validation reward must rise after GRPO."""

from __future__ import annotations

import json

import pytest

from cs336_alignment.demo import DemoConfig, format_summary, run_demo


@pytest.mark.timeout(600)
def test_quick_demo_learns(tmp_path):
    summary = run_demo(DemoConfig.quick(str(tmp_path / "demo")))
    # Same held-out questions, same sampling seed, before and after GRPO.
    assert summary["n_val"] == 200
    assert summary["improvement_points"] >= 5.0, format_summary(summary)
    assert summary["val_reward_after_sft"] > 0.05  # the SFT warm-up worked
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert on_disk["val_reward_after_grpo"] == summary["val_reward_after_grpo"]
    report = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "val_accuracy_vs_step.png" in report and (tmp_path / "demo" / "report" / "val_accuracy_vs_step.png").exists()
    assert (tmp_path / "demo" / "grpo" / "final.json").exists()
