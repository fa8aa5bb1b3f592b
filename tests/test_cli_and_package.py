"""Package import hygiene, the top-level API, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import cs336_alignment
from cs336_alignment.cli import app

HANDOUT_NAMES = [
    "tokenize_prompt_and_output",
    "compute_entropy",
    "get_response_log_probs",
    "masked_normalize",
    "masked_mean",
    "sft_microbatch_train_step",
    "compute_group_normalized_rewards",
    "compute_naive_policy_gradient_loss",
    "compute_grpo_clip_loss",
    "compute_policy_gradient_loss",
    "grpo_microbatch_train_step",
]


def test_import_is_light():
    code = (
        "import sys, cs336_alignment\n"
        "heavy = [m for m in ('torch', 'transformers', 'sympy', 'vllm', 'wandb', 'math_verify') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_exported_name_resolves():
    for name in cs336_alignment.__all__:
        assert getattr(cs336_alignment, name) is not None, name
    with pytest.raises(AttributeError):
        cs336_alignment.no_such_name  # noqa: B018


def test_handout_signatures():
    import inspect

    for name in HANDOUT_NAMES:
        assert callable(getattr(cs336_alignment, name))
    sig = inspect.signature(cs336_alignment.grpo_microbatch_train_step)
    assert list(sig.parameters)[:8] == [
        "policy_log_probs", "response_mask", "gradient_accumulation_steps", "loss_type",
        "raw_rewards", "advantages", "old_log_probs", "cliprange",
    ]
    assert list(inspect.signature(cs336_alignment.masked_normalize).parameters) == [
        "tensor", "mask", "normalize_constant", "dim",
    ]


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in _commands():
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_tiny_model_command_writes_a_loadable_model(tmp_path):
    result = CliRunner().invoke(app, ["tiny-model", "--out", str(tmp_path / "m"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.vocab_size == len(tok)


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "cs336_alignment", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "tiny-model" in out.stdout


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed here")
@pytest.mark.parametrize("command", [
    ["eval", "--model", "tiny", "--data", "task:arithmetic", "--limit", "2", "backend=vllm"],
    ["grpo", "model=tiny", "data.train=task:arithmetic", "backend=vllm", "device=cpu", "n_grpo_steps=1",
     "rollout_batch_size=8", "group_size=4", "train_batch_size=8", "gradient_accumulation_steps=2"],
])
def test_selecting_vllm_without_vllm_is_a_one_line_error(tmp_path, command):
    out = subprocess.run([sys.executable, "-m", "cs336_alignment", *command, f"out={tmp_path / 'o'}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2  # a missing optional extra: found before the run
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: vLLM backend selected but vllm is not installed")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()  # before anything is written
