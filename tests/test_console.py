"""What a run prints (issue 21): log lines above the progress bars, never inside one; one ETA on
the step bar; validation draws its own bar; ``--quiet`` leaves only warnings and errors."""

from __future__ import annotations

import re

import pytest
import torch
from test_recipe_parts import LoopConfig
from typer.testing import CliRunner

from cs336_alignment import console
from cs336_alignment.checkpoint import RunControl
from cs336_alignment.cli import app
from cs336_alignment.data import Example
from cs336_alignment.generation import NativeEngine, SamplingParams
from cs336_alignment.recipes.common import LoadedData
from cs336_alignment.recipes.loop import RunLoop

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) ")


@pytest.fixture()
def quiet():
    console.set_quiet(True)
    yield
    console.set_quiet(False)


def _two_steps_and_a_validation(out, tiny_model, tiny_tokenizer) -> None:
    examples = [Example(question=f"{i} + 1", ground_truth=str(i + 1)) for i in range(3)]
    data = LoadedData(train=examples, val=examples, template="{question}", reward_fn=lambda r, g: {"reward": 0.0})
    engine = NativeEngine(tiny_model, tiny_tokenizer, device=torch.device("cpu"))
    with RunLoop(LoopConfig(out=str(out), control=RunControl(progress=True)), "TEST") as loop:
        loop.attach(tiny_model, None)
        for _ in loop.steps(2):
            loop.end_of_step("a step", loss=0.5)
        loop.logger.warning("something to look at")
        loop.validate(engine, tiny_model, data=data, examples=examples, sampling=SamplingParams(max_tokens=4), step=2,
                      tag="val")


def test_log_lines_print_above_the_bars_and_the_step_bar_shows_one_eta(tmp_path, capsys, tiny_model, tiny_tokenizer):
    _two_steps_and_a_validation(tmp_path / "run", tiny_model, tiny_tokenizer)
    err = capsys.readouterr().err
    pieces = [p for p in re.split(r"[\r\n]", err) if p.strip()]  # what each redraw or line leaves on the screen
    logged = [p for p in pieces if "TEST step" in p or "something to look at" in p or "eval step 2" in p]
    assert len(logged) >= 4 and all(LOG_LINE.match(p) for p in logged), logged  # whole lines, no bar in front
    step_bars = [p for p in pieces if p.startswith("test: ") and "%|" in p]
    assert step_bars and all("<" not in p and "step/s" not in p for p in step_bars)  # tqdm's own ETA and rate: gone
    assert any(p.count("eta=") == 1 and "loss=0.5" in p for p in step_bars)  # ours, once, with the step's numbers
    assert any(p.startswith("generate: ") for p in pieces)  # the validation's own bar


def test_quiet_prints_only_warnings_and_the_log_file_keeps_everything(tmp_path, capsys, tiny_model, tiny_tokenizer, quiet):
    _two_steps_and_a_validation(tmp_path / "run", tiny_model, tiny_tokenizer)
    err = capsys.readouterr().err
    assert "%|" not in err  # no bars
    assert [line for line in err.splitlines() if LOG_LINE.match(line)] == [
        line for line in err.splitlines() if " WARNING something to look at" in line]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "INFO TEST step 2/2: a step" in log and "WARNING something to look at" in log


def test_the_quiet_flag_reaches_the_commands(tmp_path):
    try:
        result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", "task:arithmetic", "--limit", "2",
                                          "--max-tokens", "4", "--out", str(tmp_path / "e"), "device=cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        assert console.is_quiet() and "generate:" not in result.output and "accuracy:" in result.output
        from transformers.utils import logging as hf_logging

        assert not hf_logging.is_progress_bar_enabled()  # transformers' "Loading weights" bars too
    finally:
        console.set_quiet(False)
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
