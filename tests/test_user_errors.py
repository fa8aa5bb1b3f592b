"""One line for every user error, before anything is written (issue 17): each bad input below
exits 2 with one `error: ...` line naming the culprit, no traceback, and no run directory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cs336_alignment.cli import app

GRPO = ["grpo", "model=tiny", "device=cpu", "data.train=task:arithmetic", "n_grpo_steps=1", "rollout_batch_size=4",
        "group_size=2", "train_batch_size=4", "micro_batch_size=2", "sampling_max_tokens=4", "n_eval_examples=2",
        "control.progress=false"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NOT_UTF8 = b'{"problem": "caf\xe9", "answer": "1"}\n'  # Latin-1, not UTF-8
HUGE_LINE = '{"problem": "' + "7" * 16_000_000 + '", "answer": "7"}\n'  # refused by its length, untokenized
LONG_LINE = '{"problem": "' + "7 " * 3000 + '", "answer": "7"}\n'  # few enough characters, too many tokens
GOOD_LINE = '{"problem": "What is 1+1?", "answer": "2"}\n'


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _readonly_parent(tmp: Path) -> Path:
    """A directory nobody may create anything in (for root too: sysfs refuses every mkdir)."""
    import os

    if os.geteuid() == 0:
        return Path("/sys/cs336_alignment_readonly")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


# (name, arguments given tmp_path, the text the one line must contain); every out is tmp/"run".
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("config not UTF-8", lambda t: GRPO[:1] + ["--config", str(_write(t / "c.yaml", b"model: tiny\nrun_name: caf\xe9\n"))],
     "c.yaml:2: not UTF-8 (byte 0xe9 at offset 25)"),
    ("duplicate YAML key",
     lambda t: GRPO[:1] + ["--config", str(_write(t / "c.yaml", "seed: 1\nlearning_rate: 1e-5\nseed: 2\n"))],
     "c.yaml:3: field 'seed' given twice (first on line 1)"),
    ("data not UTF-8", lambda t: GRPO + [f"data.train={_write(t / 'd.jsonl', GOOD_LINE.encode() + NOT_UTF8)}"],
     "d.jsonl:2"),
    ("data is a directory", lambda t: GRPO + [f"data.train={t}"], "is a directory"),
    ("empty training file", lambda t: GRPO + [f"data.train={_write(t / 'e.jsonl', '')}"], "e.jsonl"),
    ("prompt without {question}", lambda t: GRPO + [f"data.prompt={_write(t / 'p.prompt', 'Answer: <think>')}"],
     "does not contain {question}"),
    ("unknown reward function", lambda t: GRPO + ["data.reward=os:nonexistent"], "field 'data.reward': cannot resolve reward"),
    ("no model", lambda t: GRPO + ["model="], "field 'model': empty; name the starting model"),
    ("model is a file", lambda t: GRPO + [f"model={_write(t / 'm.bin', 'x')}"], "is a file; expected a model directory"),
    ("model does not exist", lambda t: GRPO + [f"model={t / 'nope'}"], "field 'model': no such directory"),
    ("out is a file", lambda t: GRPO + [f"out={_write(t / 'o.txt', 'x')}"], "is a file, not a directory"),
    ("read-only out", lambda t: GRPO + [f"out={_readonly_parent(t) / 'run'}"], "field 'out': cannot write in"),
    ("wandb not installed", lambda t: GRPO + ["wandb_project=p"], "field 'wandb_project': 'p' needs wandb"),
    ("negative n_eval_examples", lambda t: GRPO + ["n_eval_examples=-3"], "n_eval_examples must be >= 0, got -3"),
    ("seed beyond 2**63", lambda t: GRPO + [f"seed={2**64}"], "seed must be an integer in [0, 2**32 - 1]"),
    ("logprob_chunk_size=0", lambda t: GRPO + ["logprob_chunk_size=0"], "logprob_chunk_size must be >= 1"),
    ("max_num_seqs=0", lambda t: GRPO + ["max_num_seqs=0"], "max_num_seqs must be >= 1, got 0"),
    ("negative temperature", lambda t: GRPO + ["sampling_temperature=-1"], "sampling_temperature must be >= 0"),
    ("NaN learning rate", lambda t: GRPO + ["learning_rate=nan"], "learning_rate must be a finite number > 0, got nan"),
    ("advantage_eps=0", lambda t: GRPO + ["advantage_eps=0"], "advantage_eps must be a finite number > 0"),
    ("betas out of range", lambda t: GRPO + ["betas=[0.9, 1.5]"], "betas must be two numbers in [0, 1), got (0.9, 1.5)"),
    ("too few questions", lambda t: GRPO + ["data.n_task_train=1"], "1 training questions cannot fill one rollout batch of 2"),
    ("no validation data", lambda t: GRPO + [f"data.train={_write(t / 'd.jsonl', GOOD_LINE * 4)}"],
     "field 'data.val': empty; name the validation file"),
    ("unknown task", lambda t: GRPO + ["data.train=task:chess"], "field 'data.train': unknown task 'chess'"),
    ("sweep out names an unknown field",
     lambda t: ["sweep", str(_write(t / "s.yaml",
                                    f"base: {CONFIGS}/grpo.yaml\nout: runs/{{lr}}\ngrid:\n  learning_rate: [1e-5]\n"))],
     "s.yaml:2: field 'out': 'runs/{lr}' cannot be filled in"),
    ("a 16 MB prompt line", lambda t: GRPO + [f"data.train={_write(t / 'big.jsonl', HUGE_LINE + GOOD_LINE)}", "data.val=train"],
     "big.jsonl:1: prompt is 16,000,"),
    ("a prompt longer than the context",
     lambda t: GRPO + [f"data.train={_write(t / 'long.jsonl', LONG_LINE + GOOD_LINE)}", "data.val=train"],
     "long.jsonl:1: prompt is "),
    ("SFT data without responses",
     lambda t: ["sft", "model=tiny", "device=cpu", f"data.train={_write(t / 'math.jsonl', GOOD_LINE)}", "data.val=train"],
     "math.jsonl has a reference response; SFT needs (prompt, response) pairs"),
    ("SFT validation through a missing vLLM",
     lambda t: ["sft", "model=tiny", "device=cpu", "data.train=task:arithmetic", "backend=vllm"],
     "vLLM backend selected but vllm is not installed"),
    ("a study config of another recipe", lambda t: ["sft", "--config", str(CONFIGS / "grpo.yaml")],
     "grpo.yaml:2: field 'recipe': this is a grpo study config, not sft; run it with"),
    ("eval without data", lambda t: ["eval", "--model", "tiny"], "field 'data': empty; eval needs a model"),
    ("eval data is a directory", lambda t: ["eval", "--model", "tiny", "--data", str(t)], "is a directory"),
]


@pytest.mark.parametrize("name, make_args, culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, name, make_args, culprit):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whatever this machine has
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.chdir(tmp_path)
    args = make_args(tmp_path)
    if "out=" not in " ".join(args) and args[0] in ("grpo", "sft"):
        args += [f"out={tmp_path / 'run'}"]
    if args[0] == "eval":
        args += ["--out", str(tmp_path / "run")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.output
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no run directory, nothing written


def test_a_recipe_command_takes_the_study_config_of_its_recipe(monkeypatch, tmp_path):
    monkeypatch.delenv("CS336_MODEL", raising=False)
    monkeypatch.setenv("CS336_RUNS", str(tmp_path))
    result = CliRunner().invoke(app, ["config", "grpo", "--config", str(CONFIGS / "grpo.yaml")])
    assert result.exit_code == 0, result.output
    assert "\nloss_type: reinforce_with_baseline" in result.output  # configs/grpo.yaml's, read through
    result = CliRunner().invoke(app, ["grpo", "--config", str(CONFIGS / "grpo.yaml")])  # as the README writes it
    assert result.exit_code == 2 and "field 'recipe'" not in result.output  # read; stopped only by the absent data
    assert result.output.strip() == "error: /data/a5-alignment/MATH/train.jsonl: no such file"
    assert not list(tmp_path.iterdir())
