"""Checkpoints load no code, carry a manifest of sizes and checksums, and a broken latest one
falls back to the newest intact one (issue 16, items 3 to 5; the write-failure cases are in
test_ei_and_resume.py)."""

from __future__ import annotations

import hashlib
import json
import pathlib
from pathlib import Path

import pytest
import torch
from test_recipe_parts import LoopConfig

from cs336_alignment.checkpoint import (
    Checkpointer,
    CheckpointError,
    RunControl,
    UnsafeCheckpoint,
    verify,
)
from cs336_alignment.config import load_config
from cs336_alignment.recipes.grpo import GRPOConfig, train_grpo
from cs336_alignment.recipes.loop import RunLoop
from cs336_alignment.run_dir import RunFiles, read_jsonl

TIMING = ("time", "seconds", "per_second", "wall_clock")


class WritesAMarker:
    """Unpickling this (with weights_only=False) would write a file: the stand-in for any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


def _two_checkpoints(root: Path) -> tuple[Checkpointer, torch.nn.Linear]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saver = Checkpointer(root)
    for step in (1, 2):
        saver.save(step, model, optimizer, {"step": step})
    return saver, model


def _rewrite_manifest(path: Path) -> None:
    """Make the manifest match the files as they are now (a tamperer can do that too)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest:
        data = (path / name).read_bytes()
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_every_file_is_in_the_manifest_with_its_size_and_checksum(tmp_path):
    saver, _ = _two_checkpoints(tmp_path)
    latest = saver.latest()
    manifest = json.loads((latest / "manifest.json").read_text())
    assert set(manifest) == {"model/model.safetensors", "optimizer.pt", "trainer.pt"}  # a plain module: weights only
    for name, entry in manifest.items():
        data = (latest / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify(latest) is None
    flipped = bytearray((latest / "optimizer.pt").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one byte changed
    (latest / "optimizer.pt").write_bytes(bytes(flipped))
    assert verify(latest) == "optimizer.pt does not match its checksum (changed or corrupted)"


@pytest.mark.parametrize("name", ["trainer.pt", "optimizer.pt"])
def test_a_crafted_checkpoint_file_is_refused_and_runs_no_code(tmp_path, name):
    run = tmp_path / "run"
    saver, _ = _two_checkpoints(run)
    marker = tmp_path / "marker.txt"
    latest = saver.latest()
    torch.save({"state": WritesAMarker(marker)}, latest / name)
    _rewrite_manifest(latest)  # intact as far as the manifest can tell: the load itself must refuse
    model = torch.nn.Linear(3, 2)
    with RunLoop(LoopConfig(out=str(run), control=RunControl(resume=True, progress=False)), "TEST") as loop:
        with pytest.raises(UnsafeCheckpoint, match=rf"{name} holds objects that are not tensors or plain values") as e:
            loop.attach(model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()
    assert e.value.exit_code == 2 and "\n" not in str(e.value)  # one line, exit 2, no fallback to step 1
    assert "step_000002" in str(e.value)


def test_a_tampered_file_that_breaks_its_checksum_is_skipped_and_runs_no_code(tmp_path):
    run = tmp_path / "run"
    saver, model = _two_checkpoints(run)
    marker = tmp_path / "marker.txt"
    latest = saver.latest()
    written = json.loads((latest / "manifest.json").read_text())["trainer.pt"]["bytes"]
    torch.save(WritesAMarker(marker), latest / "trainer.pt")  # manifest left as written
    size = (latest / "trainer.pt").stat().st_size
    warnings = []
    assert saver.latest_intact(warn=warnings.append) == run / "checkpoints" / "step_000001"
    expected = f"skipping checkpoint {latest}: trainer.pt has {size} bytes, {written} were written"
    assert len(warnings) == 1 and warnings[0].startswith(f"{expected} (moved aside to .corrupt_step_000002_")
    assert not marker.exists()
    # moved aside, kept for inspection: no longer counted, pruned or named as the latest
    assert [s for s, _ in saver.complete()] == [1] and len(list((run / "checkpoints").glob(".corrupt_step_000002_*"))) == 1


def test_resume_with_no_intact_checkpoint_fails_in_one_line(tmp_path):
    run = tmp_path / "run"
    saver, _ = _two_checkpoints(run)
    for _, path in saver.complete():
        (path / "model" / "model.safetensors").write_bytes(b"")  # truncated to nothing
    cfg = LoopConfig(out=str(run), control=RunControl(resume=True, progress=False))
    with pytest.raises(CheckpointError, match="--resume: no checkpoint in .* is intact"):
        RunLoop(cfg, "TEST")
    log = (run / "log.txt").read_text()
    assert "skipping checkpoint" in log and "model/model.safetensors has 0 bytes" in log


def _grpo(out: Path, **control) -> GRPOConfig:
    fields = dict(
        model="tiny", out=str(out), device="cpu", seed=5,
        data={"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 32, "n_task_val": 8},
        n_grpo_steps=4, rollout_batch_size=8, group_size=4, train_batch_size=8, micro_batch_size=4,
        learning_rate=1e-3, sampling_max_tokens=10, eval_every=2, n_eval_examples=4, final_eval_full=False,
        control={"checkpoint_every": 1, "progress": False, **control},
    )
    return load_config(GRPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in fields.items()])


def _comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in read_jsonl(out / "metrics.jsonl")]


def test_a_truncated_latest_checkpoint_falls_back_and_the_resumed_run_reproduces_the_metrics(tmp_path):
    train_grpo(_grpo(tmp_path / "clean"))
    out = tmp_path / "broken"
    train_grpo(_grpo(out))
    latest = Checkpointer(out).latest()
    assert latest.name == "step_000004"
    weights = latest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # half of it lost
    train_grpo(_grpo(out, resume=True))  # warns, resumes from step 3, runs step 4 again
    log = (out / "log.txt").read_text()
    assert "skipping checkpoint" in log and "model/model.safetensors has" in log
    assert _comparable(out) == _comparable(tmp_path / "clean")
    assert verify(Checkpointer(out).latest()) is None  # step 4 written anew
    assert RunFiles(out).foreign() == []  # every file the run wrote is in its manifest (so a fresh start may clear it)


def test_a_lock_is_released_when_its_object_goes(tmp_path):
    from cs336_alignment.run_dir import RunLock

    lock = RunLock(tmp_path)
    del lock  # never released explicitly
    RunLock(tmp_path).release()
