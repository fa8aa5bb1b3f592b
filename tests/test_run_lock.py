"""A run owns its directory (issue 16, items 1 and 7): a second process aimed at it refuses at
once in one line, kill -9 leaves no stale lock, and `eval --out <a training run>` touches none of
the run's files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cs336_alignment.cli import app
from cs336_alignment.run_dir import RunDirectoryLocked, RunLock


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


GRPO_ARGS = ["grpo", "model=tiny", "device=cpu", "data.train=task:arithmetic", "n_grpo_steps=1", "rollout_batch_size=4",
             "group_size=2", "train_batch_size=4", "micro_batch_size=2", "sampling_max_tokens=4", "n_eval_examples=2",
             "control.progress=false"]


def test_a_second_run_on_a_held_directory_refuses_at_once_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "train_step": 1}\n')  # the first run's work so far
    (run / "log.txt").write_text("first run\n")
    holder = RunLock(run)  # the first run, still going
    try:
        before = _snapshot(run)
        for command in (GRPO_ARGS + [f"out={run}"], GRPO_ARGS + [f"out={run}", "--resume"]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2, result.output
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert lines[-1].startswith(f"error: {run} is in use by another process (pid {os.getpid()} on ")
            assert "Traceback" not in result.output
            assert _snapshot(run) == before  # no step logged twice, no config or log written
    finally:
        holder.release()
    again = RunLock(run)  # released: the directory can be taken again
    again.release()


def test_kill_9_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time\nfrom cs336_alignment.run_dir import RunLock\n"
            f"lock = RunLock({str(tmp_path)!r})\nprint('locked', flush=True)\ntime.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryLocked, match=rf"in use by another process \(pid {child.pid} on "):
            RunLock(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    lock = RunLock(tmp_path)  # the kernel dropped the dead holder's lock
    assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
    lock.release()
    assert (tmp_path / ".lock").exists()  # never deleted


def test_eval_into_a_training_run_leaves_its_files_byte_identical(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: grpo\nlearning_rate: 1.0e-05\n")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "train_step": 1}) + "\n")
    before = _snapshot(run)
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", "task:arithmetic", "--limit", "2",
                                      "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert f"is a training run's directory; evaluate into {run / 'eval' / 'NAME'} instead" in result.output
    assert _snapshot(run) == before and not (run / ".lock").exists()


def test_a_filesystem_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, caplog):
    import errno

    import cs336_alignment.run_dir as run_dir

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        lock = RunLock(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: this filesystem refuses file locks (No locks available); running unlocked"]
    lock.release()  # nothing to unlock: no error either


@pytest.mark.parametrize("out, why", [("", "empty; name the run's directory"), ("FILE", "is a file, not a directory")])
def test_out_must_name_a_directory(tmp_path, monkeypatch, out, why):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a user's file\n")
    before = _snapshot(tmp_path)
    for command in (GRPO_ARGS + [f"out={out}"], ["eval", "--model", "tiny", "--data", "task:arithmetic", "--out", out]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "error: field 'out': " in result.output and why in result.output and "Traceback" not in result.output
    assert _snapshot(tmp_path) == before  # nothing written in the current directory, the file untouched
