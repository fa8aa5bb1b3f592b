"""Every command the documentation shows runs as written (issue 19).

Each shell line of a ```bash block in README.md, configs/README.md and docs/*.md is either run on
CPU through one stated transformation, or allowed with a reason. A new command that is neither
fails this test: document it here first.

Transformations (the command as written, then):
  run / grpo / sft / ei     + --dry-run: the config is resolved and checked exactly as a run would
                            (recipe key, overrides, --resume, --time-budget), nothing runs. That
                            every study config also trains is tests/test_configs.py's smoke runs.
  sweep                     + --dry-run: every grid point resolved and listed.
  eval                      $CS336_MODEL is the tiny model, $CS336_DATA a folder with a small
                            validation.jsonl; optional [--flag N] groups get small values.
  schedule, --help,         as written.
  tiny-model
  export, eval --model runs/...
                            a model folder that an earlier command of the block writes (under
                            runs/) is written first, as tiny-model does.
  torchrun [its flags] X    first read as the one process it starts, `python X` (X: -m
                            cs336_alignment ARGS, or a script), then as above: several
                            processes are tests/test_distributed.py's.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cs336_alignment.cli import app
from cs336_alignment.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = "python -m cs336_alignment"

ALLOWED = {  # a command's start -> why it is not run here
    "bash scripts/demo.sh": "set-up, then the demo: tests/test_demo.py runs the demo itself",
    "bash scripts/test.sh": "set-up, then this very suite",
    "export ": "sets an environment variable",
    "pip install": "installs packages from the network",
    f"{PREFIX} download": "downloads from the Hugging Face hub (no network here); tests/test_download.py fakes the hub",
    f"{PREFIX} report runs/": "needs the runs of a sweep; tests/test_report.py builds runs and reports on them",
    "python benchmarks/": "a benchmark (minutes, timings); tests/test_gpu_check.py runs the GPU check's dry run",
    "sbatch ": "needs a SLURM cluster; its srun line is a torchrun command like the README's",
}
SMALL = {"N": "2", "S": "0"}  # values for the placeholders of optional [--flag N] groups


def documented_commands() -> list[tuple[str, str]]:
    """(file:line, command) of every shell line in a ```bash block, comments and blank lines left out."""
    found = []
    for doc in DOCS:
        inside = False
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip().startswith("```"):
                inside = line.strip() in ("```bash", "```sh", "```shell") if not inside else False
                continue
            command = " ".join(shlex.split(line, comments=True)) if inside else ""
            if inside and command:
                found.append((f"{doc.relative_to(ROOT)}:{number}", line.split(" #")[0].strip()))
    return found


def one_process(command: str) -> str:
    """A ``torchrun [its flags] X ...`` line as the one process it starts, ``python X ...``; any other unchanged."""
    if not command.startswith("torchrun "):
        return command
    words = shlex.split(command)
    i = 1
    while words[i].startswith("--"):  # torchrun's own flags: --standalone alone, the others with a value
        i += 1 if words[i] == "--standalone" or "=" in words[i] else 2
    return shlex.join(["python", *words[i:]])


def allowed(command: str) -> str | None:
    """Why ``command`` is not run here, or None."""
    return next((why for start, why in ALLOWED.items() if one_process(command).startswith(start)), None)


def transformed(command: str, data_dir: Path) -> list[str] | None:
    """The CLI arguments this test runs for ``command``, or None when it is allowed unrun."""
    if allowed(command):
        return None
    command = one_process(command)
    if not command.startswith(PREFIX):
        raise AssertionError(f"not a command of ours and not allowed: {command!r}")
    command = re.sub(r"\[(--[\w-]+) (\w+)\]", lambda m: f"{m.group(1)} {SMALL.get(m.group(2), m.group(2))}", command)
    command = command.replace("$CS336_MODEL", "tiny").replace("$CS336_DATA", str(data_dir))
    args = shlex.split(command)[3:]
    if args and args[0] in ("run", "grpo", "sft", "ei", "sweep"):
        return args + ["--dry-run"]
    if args and args[0] == "eval":
        return args + ["--max-tokens", "4"]
    if args in (["schedule"], ["--help"]) or (args and args[0] in ("tiny-model", "export")):
        return args
    raise AssertionError(f"no transformation for {command!r}: add one (or an allowed reason) to {__file__}")


def test_the_docs_show_commands_and_this_test_knows_each():
    commands = documented_commands()
    assert len(commands) >= 20  # the README's quick start, knobs, study table and vLLM notes
    for where, command in commands:
        transformed(command, Path("/data"))  # raises for a command that is neither run nor allowed


@pytest.mark.parametrize("where, command", documented_commands(), ids=[w for w, _ in documented_commands()])
def test_a_documented_command_runs_as_written(where, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs (runs/eval) land in a scratch directory
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "validation.jsonl").write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n')
    args = transformed(command, tmp_path)
    if args is None:
        pytest.skip(f"allowed: {allowed(command)}")
    source = args[1] if args[0] == "export" else args[args.index("--model") + 1] if "--model" in args else ""
    if source.startswith("runs/"):  # written by an earlier command of the same block
        save_tiny_model(tmp_path / source)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{where}: {command}\n{result.output}"
    if args[-1] == "--dry-run" and args[0] != "sweep":
        assert result.output.startswith(f"# dry run: {'grpo' if args[0] == 'grpo' else ''}")  # resolved, not run
        assert "\nlearning_rate: " in result.output or "\nmax_tokens: " in result.output
        assert not (tmp_path / "runs").exists()
