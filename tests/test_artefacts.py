"""Artefacts the ecosystem opens (issue 20): every checkpoint is a Hugging Face folder of the fp32
master weights (stored once) that from_pretrained, ``eval --model`` and ``export`` open; the final
model is written in ``export_dtype``; model options (attention kernel, Liger) refuse in one line
when their package is missing; the declared dependencies are the ones the code imports."""

from __future__ import annotations

import ast
import json
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_recipe_parts import LoopConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cs336_alignment.checkpoint import (
    Checkpointer,
    CheckpointError,
    RunControl,
    load_weights,
)
from cs336_alignment.cli import app
from cs336_alignment.export import export_dtype, save_model_folder
from cs336_alignment.logprobs import get_response_log_probs
from cs336_alignment.models import (
    MissingPackage,
    check_model_options,
    load_policy,
    model_folder,
)
from cs336_alignment.recipes.loop import RunLoop

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 9, 12, 7, 30, 4, 18, 2]])  # (B=1, T=8): any in-vocabulary ids


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()  # (1, T, V)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-step run of the tiny model (SGD on a toy loss), checkpointed after each step; returns
    (run directory, the policy's logits after step 1, after step 2)."""
    from cs336_alignment.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    out = tmp_path_factory.mktemp("artefacts") / "run"
    cfg = LoopConfig(out=str(out), control=RunControl(checkpoint_every=1, progress=False, keep_last=5))
    after = []
    with RunLoop(cfg, "TEST") as loop:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loop.attach(model, optimizer, tokenizer=tokenizer)
        for _ in loop.steps(2):
            model(IDS).logits[..., 3].mean().backward()  # push one token's logit up: every step moves the weights
            optimizer.step()
            optimizer.zero_grad()
            after.append(_logits(model))
            loop.end_of_step()
        loop.finish(model, tokenizer, {"accuracy": 0.0})
    assert not torch.allclose(after[0], after[1])  # the two checkpoints differ
    return out, after


def test_every_checkpoint_is_a_hugging_face_folder_of_the_master_weights_stored_once(tiny_run):
    out, after = tiny_run
    done = Checkpointer(out).complete()
    assert [step for step, _ in done] == [1, 2]
    for (step, path), logits in zip(done, after):
        folder = path / "model"
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        assert not (path / "model.pt").exists()  # no second copy of the weights
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.dtype == torch.float32
        torch.testing.assert_close(_logits(model), logits, rtol=0, atol=0)  # the very weights of that step
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            names = set(f.keys())
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: stored once
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("1+2=3")["input_ids"] == AutoTokenizer.from_pretrained(out / "model")("1+2=3")["input_ids"]


def test_a_checkpoint_a_run_and_a_model_folder_all_name_the_model(tiny_run):
    out, _ = tiny_run
    step = Checkpointer(out).latest()
    assert model_folder(str(step)) == str(step / "model")
    assert model_folder(str(out)) == str(out / "model")  # a finished run: its final model
    assert model_folder(str(out / "model")) == str(out / "model")
    assert model_folder("tiny") == "tiny" and model_folder(str(out / "nope")) == str(out / "nope")


def test_a_run_that_never_finished_is_not_taken_for_its_model_folder(tiny_run, tmp_path):
    import shutil

    out, _ = tiny_run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out / "model", unfinished / "model")  # a model/ left by an earlier attempt, no final.json
    assert model_folder(str(unfinished)) == str(unfinished)  # so `model=` refuses it instead of using stale weights
    (unfinished / "final.json").write_text("{}")
    assert model_folder(str(unfinished)) == str(unfinished / "model")


def test_eval_takes_a_checkpoint_directory_as_its_model(tiny_run, tmp_path):
    out, _ = tiny_run
    step = Checkpointer(out).latest()
    result = CliRunner().invoke(app, ["eval", "--model", str(step), "--data", "task:arithmetic", "--limit", "2",
                                      "--max-tokens", "4", "--out", str(tmp_path / "eval"), "device=cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_examples"] == 2 and metrics["model"] == str(step)


def test_resume_loads_the_checkpoint_folder_exactly(tiny_run, tiny_model):
    out, after = tiny_run
    first = Checkpointer(out).complete()[0][1]
    load_weights(first / "model", tiny_model)
    torch.testing.assert_close(_logits(tiny_model), after[0], rtol=0, atol=0)  # lm_head too: tied, stored once


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tiny_run):
    from cs336_alignment.tiny import build_tiny_model, build_tiny_tokenizer

    out, _ = tiny_run
    wider = build_tiny_model(build_tiny_tokenizer(), seed=0, hidden_size=32, intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight has shape \(\d+, 64\), the model's is \(\d+, 32\)"):
        load_weights(Checkpointer(out).latest() / "model", wider)


def test_the_export_command_writes_a_bf16_folder_whose_log_probs_match_the_fp32_policy(tiny_run, tmp_path):
    out, after = tiny_run
    step = Checkpointer(out).latest()
    dest = tmp_path / "served"
    result = CliRunner().invoke(app, ["export", str(step), "--out", str(dest)])
    assert result.exit_code == 0, result.output
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(dest / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    assert (dest / "model.safetensors").stat().st_size < 0.6 * (step / "model" / "model.safetensors").stat().st_size
    served = AutoModelForCausalLM.from_pretrained(dest)  # dtype from config.json
    master = AutoModelForCausalLM.from_pretrained(step / "model")
    assert served.dtype == torch.bfloat16
    labels = torch.roll(IDS, -1, dims=1)  # (1, T)
    want = get_response_log_probs(master, IDS, labels)["log_probs"]  # (1, T) fp32
    got = get_response_log_probs(served, IDS, labels)["log_probs"]  # (1, T) from bf16 weights
    assert not torch.equal(got, want)  # really bf16
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)  # bf16 keeps 8 bits of mantissa: ~1% of each logit
    assert AutoTokenizer.from_pretrained(dest)("1+2=3")["input_ids"] == AutoTokenizer.from_pretrained(step / "model")(
        "1+2=3")["input_ids"]


def test_export_refuses_a_destination_with_files_and_a_source_that_is_no_model(tiny_run, tmp_path):
    out, _ = tiny_run
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(dest)])
    assert result.exit_code == 2 and "already exists and is not an empty directory" in result.output
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "new")])
    assert result.exit_code == 2 and "is no checkpoint, finished run or model folder" in result.output
    assert not (tmp_path / "new").exists()
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "new"), "--dtype", "int8"])
    assert result.exit_code == 2 and "--dtype 'int8'" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "link")])
    assert result.exit_code == 2 and "already exists" in result.output and not any((tmp_path / "empty").iterdir())


def test_the_final_model_is_written_in_export_dtype(tiny_run, tiny_model, tiny_tokenizer, tmp_path):
    out, _ = tiny_run
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "float32"  # "auto" on CPU: as trained
    assert export_dtype("auto", torch.device("cuda")) == torch.bfloat16  # on a GPU: as served
    assert export_dtype("float16", torch.device("cpu")) == torch.float16
    recorded = tiny_model.config.dtype
    files = save_model_folder(tiny_model, tiny_tokenizer, tmp_path / "half", dtype=torch.bfloat16)
    assert tiny_model.dtype == torch.float32 and tiny_model.config.dtype == recorded  # the live policy untouched
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "tokenizer.json"}
    with safe_open(str(tmp_path / "half" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # the cast kept the tied tensors tied


def test_attention_implementations_agree_and_missing_packages_are_refused_in_one_line(monkeypatch):
    eager, _ = load_policy("tiny", torch.device("cpu"), attn_implementation="eager")
    sdpa, _ = load_policy("tiny", torch.device("cpu"))
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(eager), _logits(sdpa), rtol=1e-4, atol=1e-5)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable, as on a machine without it
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "flash_attn" else object())
    with pytest.raises(MissingPackage, match="flash_attention_2 needs the flash-attn package") as e:
        load_policy("tiny", torch.device("cpu"), attn_implementation="flash_attention_2")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_use_liger_kernel_refuses_without_the_package_before_the_run_and_applies_it_when_present(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails, as when absent
    result = CliRunner().invoke(app, ["grpo", "model=tiny", f"out={tmp_path / 'run'}", "data.train=task:arithmetic",
                                      "data.val=train", "use_liger_kernel=true", "device=cpu"])
    assert result.exit_code == 2 and "use_liger_kernel=true runs on CUDA only, and this run is on cpu" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "liger_kernel" else object())
    with pytest.raises(MissingPackage, match="field 'use_liger_kernel': needs the liger-kernel package") as e:
        check_model_options(liger_kernel=True, device=torch.device("cuda"))  # on a GPU machine without it
    assert e.value.exit_code == 2
    monkeypatch.undo()
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen2 = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    policy, _ = load_policy("tiny", torch.device("cpu"), liger_kernel=True)
    assert len(calls) == 1 and calls[0].pop("model") is policy
    assert calls[0] == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                        "fused_linear_cross_entropy": False}  # our log-probs need the logits


# ---------------------------------------------------------------------------- dependencies

def _imported_packages() -> dict[str, set[str]]:
    """Top-level module -> the package files importing it, over cs336_alignment/ (function-level too)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "cs336_alignment").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_declared_dependency_is_imported_and_every_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower().replace("-", "_")
                for dep in project["dependencies"]}
    optional = {dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower().replace("-", "_")
                for deps in project["optional-dependencies"].values() for dep in deps}
    imports = {"pyyaml": "yaml", "math_verify": "math_verify", "liger_kernel": "liger_kernel"}
    used = _imported_packages()
    third_party = {name for name in used if name not in sys.stdlib_module_names and name != "cs336_alignment"}
    # every core dependency is imported by the package
    assert {imports.get(d, d) for d in declared} <= third_party, {imports.get(d, d) for d in declared} - third_party
    # every imported third-party module is a core dependency, or an optional one (imported lazily, refused in one line)
    assert third_party <= {imports.get(d, d) for d in declared | optional} | {"flash_attn", "numpy"}, third_party
    assert used["numpy"] == {"cs336_alignment/generation/vllm_backend.py"}  # only where vLLM (which needs it) runs


def test_the_vllm_extra_is_the_range_the_backend_is_written_for():
    from cs336_alignment.generation.vllm_backend import MIN_VLLM_VERSION

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (spec,) = extras["vllm"]
    low, high = spec.removeprefix("vllm").split(",")
    assert low == ">=" + ".".join(map(str, MIN_VLLM_VERSION)) and high.startswith("<")  # never an unbounded vllm


def test_a_sharded_checkpoint_is_exported_and_never_taken_for_a_model_folder(tiny_model, tiny_tokenizer, tmp_path):
    """A multi-process run's checkpoint (dcp/ shards, model/ with config and tokenizer only), written
    here at world size 1 the way the writer lays it out: export gathers it into a model folder."""
    from cs336_alignment.config import ConfigError
    from cs336_alignment.distributed import save_sharded
    from cs336_alignment.recipes.common import check_model_path

    step = tmp_path / "step_000003"
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=0.1)
    tiny_model(IDS).logits.mean().backward()
    optimizer.step()  # DCP wants an optimizer with state
    save_sharded(step / "dcp", tiny_model, optimizer)
    tiny_model.config.save_pretrained(step / "model")
    tiny_tokenizer.save_pretrained(step / "model")
    (step / "COMPLETE").write_text("3\n")
    assert model_folder(str(step)) == str(step)  # its model/ has no weights: never loaded as a model
    with pytest.raises(ConfigError, match="sharded.*python -m cs336_alignment export"):
        check_model_path(str(step))
    result = CliRunner().invoke(app, ["export", str(step), "--out", str(tmp_path / "gathered"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "gathered")), _logits(tiny_model),
                               rtol=0, atol=0)
