"""A fresh start deletes nothing it did not write (issue 16, item 2): every run keeps a manifest
of the files it wrote; a directory holding anything else is refused before anything is written,
and control.overwrite moves the old contents aside instead of deleting them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_recipe_parts import LoopConfig
from typer.testing import CliRunner

from cs336_alignment.checkpoint import RunControl, RunDirectoryInUse
from cs336_alignment.cli import app
from cs336_alignment.recipes.loop import RunLoop
from cs336_alignment.run_dir import ForeignFiles, RunFiles, move_aside, read_jsonl

GRPO_ARGS = ["grpo", "model=tiny", "device=cpu", "data.train=task:arithmetic", "n_grpo_steps=1", "rollout_batch_size=4",
             "group_size=2", "train_batch_size=4", "micro_batch_size=2", "sampling_max_tokens=4", "n_eval_examples=2",
             "control.progress=false"]
NOTES = "my notes: lr 1e-5 diverged, try 5e-6\n"  # a user's own file


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's checksum, except the lock's (each holder writes its pid and start time there)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _cfg(out: Path, **control) -> LoopConfig:
    return LoopConfig(out=str(out), control=RunControl(progress=False, **control))


def _earlier_attempt(out: Path, finish: tuple | None = None) -> None:
    """A run of ours in ``out`` that logged a step and wrote a validation folder, then was killed
    before its first checkpoint (or, with ``finish=(model, tokenizer)``, finished)."""
    loop = RunLoop(_cfg(out), "TEST")
    loop.sink.log("train", 1, {"loss": 1.0})
    loop.run.files.record("eval/val_step00001/")  # what RunLoop.validate records before evaluating
    (out / "eval" / "val_step00001").mkdir(parents=True)
    (out / "eval" / "val_step00001" / "metrics.json").write_text('{"accuracy": 0.5}\n')
    if finish:
        loop.finish(*finish, {"accuracy": 0.5})
    loop.close()


def test_the_manifest_lists_a_path_before_it_exists_and_owns_whole_directories(tmp_path):
    files = RunFiles(tmp_path)
    files.record("metrics.jsonl", "eval/val_step00002/", tmp_path / "model" / "config.json")
    assert files.recorded() == {"metrics.jsonl", "eval/val_step00002/", "model/config.json"}
    (tmp_path / "eval" / "val_step00002").mkdir(parents=True)
    (tmp_path / "eval" / "val_step00002" / "generations.jsonl").write_text("{}\n")
    (tmp_path / "eval" / "mine.txt").write_text(NOTES)  # beside a folder the run owns: not the run's
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "notes.txt").write_text(NOTES)  # beside a file the run wrote: not the run's
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / ".lock").write_text("pid 1\n")  # the lock and the manifest are the run's own
    assert files.foreign() == ["eval/mine.txt", "model/notes.txt"]
    with open(files.path, "a") as f:
        f.write('{"path": "model/notes.tx')  # a kill mid-append: the torn line lists nothing
    assert files.foreign() == ["eval/mine.txt", "model/notes.txt"]
    with pytest.raises(ValueError, match="is not inside the run directory"):
        files.record(tmp_path.parent / "elsewhere.txt")


def test_a_directory_that_was_never_a_run_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "results"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text(NOTES)
    before = _snapshot(out)
    result = CliRunner().invoke(app, GRPO_ARGS + [f"out={out}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: field 'out': {out} holds files that no run wrote (model/notes.txt); choose another out=..., "
                     "or set control.overwrite=true to move everything in it aside to results.old-<time>/"]
    assert _snapshot(out) == before and not (out / ".lock").exists()  # not even a lock file


def test_an_earlier_attempt_is_cleared_but_a_users_file_in_it_is_refused_and_survives(tmp_path):
    out = tmp_path / "run"
    _earlier_attempt(out)
    (out / "model").mkdir()
    (out / "model" / "notes.txt").write_text(NOTES)  # dropped in by the user afterwards
    before = _snapshot(out)
    with pytest.raises(ForeignFiles, match=r"holds files that no run wrote \(model/notes.txt\)"):
        RunLoop(_cfg(out), "TEST")
    assert _snapshot(out) == before
    (out / "model" / "notes.txt").rename(tmp_path / "notes.txt")  # the user takes it out: the attempt is ours alone
    with RunLoop(_cfg(out), "TEST") as loop:
        assert loop.run.read_metrics() == []  # the killed attempt's step is not counted twice
    assert not (out / "eval" / "val_step00001").exists()  # its validation folder, the run's own, is gone
    log = (out / "log.txt").read_text()
    assert "holds an earlier attempt that never checkpointed; starting over (removed its eval/val_step00001/" in log


def test_overwrite_moves_a_finished_run_aside_and_deletes_nothing(tmp_path, tiny_model, tiny_tokenizer):
    out = tmp_path / "run"
    _earlier_attempt(out, finish=(tiny_model, tiny_tokenizer))
    assert (out / "final.json").exists() and (out / "model" / "config.json").exists()
    assert RunFiles(out).foreign() == []  # finish() recorded every model file it wrote
    (out / "model" / "notes.txt").write_text(NOTES)
    with pytest.raises(ForeignFiles, match="model/notes.txt"):
        RunLoop(_cfg(out), "TEST")
    (out / "model" / "notes.txt").unlink()
    before = _snapshot(out)
    with pytest.raises(RunDirectoryInUse, match="already holds a finished run .final.json.; choose another out="):
        RunLoop(_cfg(out), "TEST")  # a finished run whose checkpoints were pruned is still a run
    assert _snapshot(out) == before
    lock_inode = (out / ".lock").stat().st_ino
    with RunLoop(_cfg(out, overwrite=True), "TEST") as loop:
        loop.sink.log("train", 1, {"loss": 2.0})
    (aside,) = tmp_path.glob("run.old-*")
    moved = _snapshot(aside)
    assert before == moved  # every byte of the old run, in one place
    assert (out / ".lock").stat().st_ino == lock_inode and not (aside / ".lock").exists()  # the lock never moves
    assert sorted(p.name for p in out.iterdir()) == [".files.jsonl", ".lock", "config.yaml", "log.txt", "metrics.jsonl"]
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl")] == [2.0]
    assert f"control.overwrite: moved the earlier contents of {out} aside to {aside}" in (out / "log.txt").read_text()


def test_overwrite_refuses_a_starting_model_inside_the_directory_it_would_move(tmp_path, tiny_model, tiny_tokenizer):
    out = tmp_path / "sft"
    _earlier_attempt(out, finish=(tiny_model, tiny_tokenizer))
    before = _snapshot(out)
    cfg = _cfg(out, overwrite=True)
    cfg.model = str(out / "model")
    with pytest.raises(RunDirectoryInUse, match=f"model {out / 'model'} is inside out={out}"):
        RunLoop(cfg, "TEST")
    assert _snapshot(out) == before and not list(tmp_path.glob("sft.old-*"))


def test_move_aside_never_reuses_a_folder(tmp_path):
    out = tmp_path / "run"
    asides = []
    for i in range(2):  # twice in the same second
        out.mkdir(exist_ok=True)
        (out / "f.txt").write_text(str(i))
        asides.append(move_aside(out))
    assert asides[0] != asides[1] and [(a / "f.txt").read_text() for a in asides] == ["0", "1"]
    assert list(out.iterdir()) == []


def test_eval_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", "tiny", "--data", "task:arithmetic", "--limit", "2", "--max-tokens", "4", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = json.loads((out / "metrics.json").read_text())
    result = CliRunner().invoke(app, args)  # a rerun into its own output directory replaces it
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n_examples"] == first["n_examples"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"accuracy": 0.61, "note": "my own baseline"}\n')
    before = _snapshot(mine)
    result = CliRunner().invoke(app, args[:-1] + [str(mine)])
    assert result.exit_code == 2, result.output
    want = f"error: field 'out': {mine / 'metrics.json'} exists and no run wrote it; choose another out=..."
    assert result.output.strip() == want
    assert _snapshot(mine) == before and os.listdir(mine) == ["metrics.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_a_run_writes_respects_the_umask(tmp_path, tiny_model, tiny_tokenizer, umask, mode):
    import os

    import torch

    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        with RunLoop(_cfg(out, checkpoint_every=1), "TEST") as loop:
            loop.attach(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1))
            for _ in loop.steps(1):
                loop.sink.log("train", 1, {"loss": 1.0})
                loop.end_of_step()
            loop.finish(tiny_model, tiny_tokenizer, {"accuracy": 0.5})
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {"config.yaml", "final.json", "checkpoints/step_000001/model/model.safetensors", "model/config.json"} <= set(modes)
    wrong = {name: oct(m) for name, m in modes.items() if m != mode and name != ".lock"}
    assert not wrong, wrong  # config.yaml and final.json were mkstemp's 0o600 before
