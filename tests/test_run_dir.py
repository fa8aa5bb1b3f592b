"""Run directory: resolved config, metrics JSONL, log, atomic writes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from cs336_alignment.run_dir import RunDir, atomic_write_text, read_jsonl


@dataclass
class Cfg:
    lr: float = 1e-5  # learning rate
    steps: int = 3  # steps


def test_run_dir_writes_config_metrics_and_log(tmp_path):
    run = RunDir(tmp_path / "run", console=False)
    run.save_config(Cfg())
    run.log_metrics({"step": 1, "loss": torch.tensor(0.5), "nan": float("nan")})
    run.log_metrics({"step": 2, "loss": 0.25})
    run.logger.info("hello from the run")
    run.close()
    assert "lr: 1.0e-05" in (tmp_path / "run" / "config.yaml").read_text()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[0]["nan"] == "nan" and "time" in records[0]
    assert "hello from the run" in (tmp_path / "run" / "log.txt").read_text()


def test_torn_last_line_is_ignored_but_a_bad_middle_line_is_named(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert read_jsonl(p) == [{"step": 1}]
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: invalid JSON"):
        read_jsonl(p)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]  # no temporary left behind
