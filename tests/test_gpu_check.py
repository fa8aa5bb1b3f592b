"""The GPU check's dry run: every section's code on CPU at tiny shapes, so the script cannot rot.

Nothing here asserts a timing; only that every section ran and recorded finite figures, that
the engine's log-probs match the policy's in fp32, that the FSDP2 path at world size 1 (a
one-process gloo group) trains exactly as the plain model and leaves no process group or
torchrun variable behind, that the two-GPU sections say why they are skipped, and that the JSON
is rewritten after every section (a failing one loses nothing).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _figures(section: dict) -> dict[str, float | None]:
    return {figure: value for figure, value, _ in section["figures"]}


def test_dry_run_runs_every_section_and_records_its_figures(gpu_check, tmp_path, capsys, monkeypatch):
    for name in gpu_check.PG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_PORT", "1")  # someone else's: restored after the FSDP section
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--dry-run", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["device"].startswith("CPU") and record["date"] and record["torch"]
    assert list(record["sections"]) == list(gpu_check.SECTIONS)  # every registered section, in order
    for name in ("grpo_step_2gpu", "grpo_async_2gpu"):
        assert record["sections"][name]["status"] == "skipped: needs 2 GPUs" and not record["sections"][name]["figures"]
    for name in ("numerics", "generate", "train", "grpo_step", "fsdp_ws1"):
        section = record["sections"][name]
        assert section["status"] == "ok", (name, section["status"])
        for figure, value, unit in section["figures"]:
            if unit == "GB":
                assert value is None, figure  # memory is not measured on CPU, never made up
            elif isinstance(value, (int, float)):
                assert math.isfinite(value) and value >= 0, (figure, value)
    numerics = _figures(record["sections"]["numerics"])
    assert numerics["engine vs fp32 policy sampled-token log-prob: max |diff|"] < 1e-4  # both fp32 on CPU
    assert 0 < numerics["bf16 autocast vs fp32 log-prob: max |diff|"] < 1.0  # CPU bf16 autocast ran
    assert _figures(record["sections"]["generate"])["native engine / transformers"] > 0
    train = _figures(record["sections"]["train"])
    assert {f for f in train if f.endswith("tokens/s")} == {
        f"{p} log-probs, checkpointing {c}: tokens/s" for p in ("plain", "chunked") for c in ("on", "off")}
    phases = _figures(record["sections"]["grpo_step"])
    assert all(phases[f"{p}: seconds"] > 0 for p in ("generate", "old_log_probs", "train", "sync"))
    # world size 1 through FSDP2: every parameter sharded, the same numbers as the plain model, then no group left
    fsdp = _figures(record["sections"]["fsdp_ws1"])
    done, total = fsdp["parameters sharded (DTensor) / all"].split(" / ")
    assert done == total and int(total) > 0
    for what in ("loss", "gradient", "gradient norm", "parameter"):
        assert fsdp[f"sharded vs plain, 2 steps: {what} max |diff|"] <= 1e-6, what
    assert fsdp["full_weights vs plain state_dict: max |diff|"] == 0.0
    assert fsdp["full_weights pass (one rank: all-gather of 1)"] > 0 and fsdp["full_weights bytes per pass"] > 0.1  # MB
    assert not dist.is_initialized()
    assert {name: os.environ.get(name) for name in gpu_check.PG_ENV} == {
        "MASTER_ADDR": None, "MASTER_PORT": "1", "RANK": None, "WORLD_SIZE": None}
    printed = capsys.readouterr().out
    assert "| grpo_step_2gpu | skipped: needs 2 GPUs | |" in printed and "DRY RUN" in printed
    assert "| grpo_async_2gpu | skipped: needs 2 GPUs | |" in printed


def test_the_one_process_group_is_destroyed_and_the_environment_restored_even_on_failure(gpu_check, monkeypatch):
    monkeypatch.setenv("RANK", "7")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="inside"):
        with gpu_check.one_process_group(gpu_check.resolve_device("cpu")) as mesh:
            assert dist.is_initialized() and dist.get_world_size() == 1 and mesh.size() == 1
            assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")
            raise RuntimeError("inside")
    assert not dist.is_initialized()
    assert os.environ["RANK"] == "7" and "WORLD_SIZE" not in os.environ


def test_the_result_file_is_rewritten_after_every_section(gpu_check, tmp_path, monkeypatch):
    seen_on_disk = []
    out = tmp_path / "r.json"

    def first(ctx):
        return [("a figure", 1.5, "s")]

    def broken(ctx):
        seen_on_disk.append(json.loads(out.read_text())["sections"])  # the first section is already saved
        raise RuntimeError("boom")

    sections = {}
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    gpu_check.section("first", "a working section")(first)
    gpu_check.section("broken", "a failing section")(broken)
    gpu_check.section("twin", "needs two GPUs", gpus=2)(first)
    record = gpu_check.run(list(sections), dry_run=True, out=out, device=gpu_check.resolve_device("cpu"))
    assert list(seen_on_disk[0]) == ["first"] and seen_on_disk[0]["first"]["figures"] == [["a figure", 1.5, "s"]]
    saved = json.loads(out.read_text())["sections"]
    assert saved["first"]["status"] == "ok" and saved["broken"]["status"] == "failed: RuntimeError: boom"
    assert saved["twin"]["status"] == "skipped: needs 2 GPUs"
    assert "| broken | failed: RuntimeError: boom | |" in gpu_check.table(record)
