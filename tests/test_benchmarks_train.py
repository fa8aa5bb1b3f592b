"""The training benchmarks run on CPU with the tiny model and write well-formed results.

Each script runs as a user would run it (a subprocess) at reduced sizes into a temporary
--out directory. Nothing here asserts a timing: only that every path and phase ran, that
the counts are what the sizes imply, and that plain and chunked log-probs agree.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", "--threads", "1", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_step_benchmark_writes_all_paths(tmp_path):
    proc = _run(
        "train_step.py", "--micro-batch", "2", "--seq-len", "48", "--prompt-len", "8", "--chunk-size", "20",
        "--steps", "1", "--warmup", "1", "--peak-size", "256", "--out", str(tmp_path),
    )
    record = json.loads((tmp_path / "train_step_cpu_tiny.json").read_text())
    for key in ("date", "device", "torch", "transformers", "python", "shape", "precision"):
        assert record[key], key
    assert record["device"].startswith("CPU") and record["precision"] == "fp32"
    assert (record["micro_batch"], record["seq_len"], record["prompt_len"], record["chunk_size"]) == (2, 48, 8, 20)
    flops = record["flops_per_token"]
    assert flops["total"] == flops["dense"] + flops["attention"] and flops["dense"] == 6 * flops["params"]
    assert _positive(record["matmul_peak"]["tflops"])
    assert set(record["results"]) == {"plain", "chunked", "chunked_response_only"}
    for name, r in record["results"].items():
        assert _positive(r["tokens_per_second"]) and _positive(r["seconds_per_step"]), name
        assert 0 < r["matmul_rate_fraction"], name
        assert r["peak_memory_gb"] is None  # not measured on CPU, never made up
        assert math.isfinite(r["mean_entropy"])
    # computed logits footprint: all 96 rows for plain, one chunk of 20 otherwise
    vocab_bytes = record["results"]["plain"]["fp32_logits_bytes_at_once_computed"] // 96
    assert record["results"]["chunked"]["fp32_logits_bytes_at_once_computed"] == 20 * vocab_bytes
    assert record["results"]["chunked_response_only"]["options"] == {"chunk_size": 20, "positions_mask": "response_mask"}
    assert all(v < 1e-4 for v in record["agreement_plain_vs_chunked"].values())
    assert "| plain |" in proc.stdout and "| chunked_response_only |" in proc.stdout


def test_train_step_benchmark_options_bf16_checkpointing_one_path(tmp_path):
    _run(
        "train_step.py", "--micro-batch", "1", "--seq-len", "32", "--steps", "1", "--warmup", "0",
        "--precision", "bf16", "--checkpointing", "--paths", "chunked", "--peak-size", "128", "--out", str(tmp_path),
    )
    record = json.loads((tmp_path / "train_step_cpu_tiny.json").read_text())
    assert record["precision"] == "bf16" and record["checkpointing"] is True
    assert list(record["results"]) == ["chunked"]
    assert _positive(record["results"]["chunked"]["tokens_per_second"])


def test_train_step_benchmark_refuses_unknown_path_and_missing_liger(tmp_path):
    proc = _run("train_step.py", "--paths", "fused", "--out", str(tmp_path), check=False)
    assert proc.returncode != 0 and "unknown paths" in proc.stderr
    if importlib.util.find_spec("liger_kernel") is None:
        proc = _run("train_step.py", "--liger", "--steps", "1", "--out", str(tmp_path), check=False)
        assert proc.returncode != 0 and "pip install liger-kernel" in proc.stderr
    assert not list(tmp_path.iterdir())  # refused runs write no results


@pytest.mark.parametrize("skip_hf", [False, True])
def test_grpo_step_benchmark_times_every_phase(tmp_path, skip_hf):
    args = ["--prompts", "2", "--group-size", "4", "--prompt-len", "12", "--new-tokens", "10", "--micro-batch", "2",
            "--chunk-size", "7", "--out", str(tmp_path)]
    proc = _run("grpo_step.py", *args, *(["--skip-hf"] if skip_hf else []))
    record = json.loads((tmp_path / "grpo_step_cpu_tiny.json").read_text())
    for key in ("date", "device", "torch", "transformers", "python", "shape"):
        assert record[key], key
    assert (record["rollouts"], record["gradient_accumulation_steps"]) == (8, 4)
    systems = ["ours"] if skip_hf else ["ours", "transformers"]
    assert list(record["results"]) == systems
    for name in systems:
        r = record["results"][name]
        assert set(r["phases"]) == {"generate", "rollouts", "old_log_probs", "train", "sync"}
        for phase, p in r["phases"].items():
            assert p["seconds"] >= 0 and p["peak_memory_gb"] is None, (name, phase)
        assert r["new_tokens"] == 8 * 10  # EOS ignored: every response is exactly --new-tokens long
        assert r["train_positions"] == 8 * (12 + 10 - 1)
        assert r["micro_batches"] == 4
        assert _positive(r["phases"]["generate"]["new_tokens_per_second"])
        assert all(math.isfinite(v) for v in r["metrics"].values()) and r["metrics"]["grad_norm"] >= 0
        assert f"| {name} |" in proc.stdout
    assert record["results"]["ours"]["log_prob_options"] == {"chunk_size": 7, "positions_mask": "response"}
