"""hf_compat.make_compatible: saved folders keep loading identically under transformers 5.x, in the 4.x-readable form.

The 4.x side is checked by scripts/check_transformers4.py (a separate virtual environment; minutes); these
tests run in-process under the installed 5.x and pin the rewritten files to hand-worked values.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cs336_alignment.hf_compat import (
    TOKENIZER_CONFIG_KEYS,
    compatible_config,
    compatible_tokenizer_config,
    make_compatible,
)
from cs336_alignment.tiny import save_tiny_model

# The tiny folder's tokenizer_config.json after the rewrite, worked out by hand: 5.x's "TokenizersBackend"
# becomes the class 5.x loads for model_type qwen2 anyway, and the extra-special-token list moves to the key
# 4.x reads (5.x reads it too).
EXPECTED_TOKENIZER_CONFIG = {
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    "backend": "tokenizers",
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|endoftext|>",
    "model_max_length": 4096,
    "pad_token": "<|endoftext|>",
    "padding_side": "right",
    "tokenizer_class": "Qwen2Tokenizer",
}
TEXTS = (
    "A conversation between User and Assistant. User: What is 47 + 85? Assistant: <think> 7 + 5 = 12 </think>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "\\frac{1}{2} héllo 🙂 12345",
)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _rewritten(folder: Path, config: dict | None = None, tokenizer_config: dict | None = None) -> tuple[dict, dict]:
    """Write the given config.json / tokenizer_config.json into ``folder``, make_compatible it, read both back."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if value is not None:
            (folder / name).write_text(json.dumps(value), encoding="utf-8")
    make_compatible(folder)
    return tuple(_json(folder / name) if (folder / name).exists() else {} for name in ("config.json", "tokenizer_config.json"))


@pytest.fixture(scope="module")
def plain_save(tmp_path_factory, tiny_tokenizer):
    """The tiny model and tokenizer as 5.x's save_pretrained writes them (no make_compatible)."""
    from cs336_alignment.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("plain-save")
    build_tiny_model(tiny_tokenizer, seed=0).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture()
def raw_and_fixed(plain_save, tmp_path):
    """A copy of the plain 5.x save, and another after make_compatible."""
    raw = tmp_path / "raw"
    shutil.copytree(plain_save, raw)
    fixed = tmp_path / "fixed"
    shutil.copytree(raw, fixed)
    make_compatible(fixed)
    return raw, fixed


def test_save_tiny_model_writes_the_compatible_fields(tmp_path):
    out = save_tiny_model(tmp_path / "tiny")
    tokenizer_config = _json(out / "tokenizer_config.json")
    assert tokenizer_config == EXPECTED_TOKENIZER_CONFIG
    assert set(tokenizer_config) <= TOKENIZER_CONFIG_KEYS
    assert isinstance(tokenizer_config["additional_special_tokens"], list)  # 4.x: a list here ...
    assert not isinstance(tokenizer_config.get("extra_special_tokens", {}), list)  # ... and never a list here
    config = _json(out / "config.json")
    # 4.x reads the top-level names (and would silently default them); the 5.x ones stay beside them.
    assert (config["rope_theta"], config["rope_scaling"], config["torch_dtype"]) == (10000.0, None, "float32")
    assert (config["rope_parameters"], config["dtype"]) == ({"rope_theta": 10000.0, "rope_type": "default"}, "float32")


def test_the_folder_reloads_identically_under_5x(raw_and_fixed):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    raw, fixed = raw_and_fixed
    assert _json(fixed / "tokenizer_config.json") != _json(raw / "tokenizer_config.json")  # something was rewritten
    assert "rope_theta" in _json(fixed / "config.json") and "rope_theta" not in _json(raw / "config.json")
    before, after = AutoTokenizer.from_pretrained(raw), AutoTokenizer.from_pretrained(fixed)
    assert type(after) is type(before)
    for text in TEXTS:
        assert after.encode(text) == before.encode(text)
    assert after.encode(TEXTS[1])[-1] == after.eos_token_id == 0  # the special tokens stay single tokens
    assert after.all_special_tokens == before.all_special_tokens == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert after.extra_special_tokens == before.extra_special_tokens == ["<|im_start|>", "<|im_end|>"]
    assert (after.eos_token_id, after.pad_token_id, after.bos_token_id) == (before.eos_token_id, before.pad_token_id, None)
    assert after.special_tokens_map == before.special_tokens_map
    assert (after.model_max_length, after.padding_side, after.chat_template) == (4096, "right", before.chat_template)
    config_before, config_after = AutoConfig.from_pretrained(raw), AutoConfig.from_pretrained(fixed)
    assert config_after.rope_parameters == config_before.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert config_after.to_diff_dict() == config_before.to_diff_dict()
    ids = torch.tensor([before.encode(TEXTS[0])])
    with torch.no_grad():
        logits_before = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)(ids).logits
        logits_after = AutoModelForCausalLM.from_pretrained(fixed, dtype=torch.float32)(ids).logits
    assert torch.equal(logits_after, logits_before)


def test_make_compatible_is_idempotent_and_touches_nothing_else(raw_and_fixed):
    raw, fixed = raw_and_fixed
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (fixed / name).read_bytes() == (raw / name).read_bytes()
    assert (fixed / "tokenizer_config.json").read_bytes() != (raw / "tokenizer_config.json").read_bytes()
    assert (fixed / "config.json").read_bytes() != (raw / "config.json").read_bytes()
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in fixed.iterdir()}
    make_compatible(fixed)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in fixed.iterdir()} == stats
    tokenizer_config, config = _json(raw / "tokenizer_config.json"), _json(raw / "config.json")
    once = compatible_tokenizer_config(tokenizer_config, "qwen2")
    assert compatible_tokenizer_config(once, "qwen2") == once != tokenizer_config
    assert compatible_config(compatible_config(config)) == compatible_config(config) != config


def test_rewritten_files_get_the_umask_mode_atomically(plain_save, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(plain_save, folder)
    for name in ("tokenizer_config.json", "config.json"):
        (folder / name).chmod(0o600)  # as a writer using mkstemp leaves them
    names = sorted(p.name for p in folder.iterdir())
    inode = (folder / "config.json").stat().st_ino
    old = os.umask(0o022)
    try:
        make_compatible(folder)
    finally:
        os.umask(old)
    assert (folder / "tokenizer_config.json").stat().st_mode & 0o777 == 0o644
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o644
    assert (folder / "config.json").stat().st_ino != inode  # replaced by a new file, not written over
    assert sorted(p.name for p in folder.iterdir()) == names  # no temporary file left behind


def test_rope_and_dtype_get_their_4x_names_and_5x_reads_the_same_rope(tmp_path):
    from transformers import Qwen2Config

    yarn = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 1024}
    saved = {"model_type": "qwen2", "dtype": "bfloat16", "max_position_embeddings": 4096, "rope_parameters": dict(yarn)}
    fixed, _ = _rewritten(tmp_path / "yarn", config=saved)
    assert compatible_config(saved) == fixed
    assert fixed == {**saved, "torch_dtype": "bfloat16", "rope_theta": 1_000_000.0,
                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}
    assert saved["rope_parameters"] == yarn  # the input is not modified
    assert Qwen2Config.from_dict(fixed).rope_parameters == Qwen2Config.from_dict(saved).rope_parameters == yarn
    # Keys already there win (5.x gives rope_scaling precedence too); a per-layer-type dict has no 4.x spelling.
    assert compatible_config({"dtype": "float32", "torch_dtype": "float16"})["torch_dtype"] == "float16"
    assert compatible_config({**saved, "rope_theta": 5.0})["rope_theta"] == 5.0
    nested = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    assert compatible_config(nested) == nested
    partial = compatible_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})
    assert (partial["rope_theta"], partial["partial_rotary_factor"], partial["rope_scaling"]) == (1e4, 0.5, None)


def test_tokenizer_config_rewrites_by_hand(tmp_path):
    # What 5.x writes for a Qwen2Tokenizer it loaded through AutoTokenizer (leaked load arguments included).
    saved = {"add_prefix_space": None, "backend": "tokenizers", "bos_token": None, "eos_token": "<|endoftext|>",
             "extra_special_tokens": ["<|im_start|>", "<|im_end|>"], "is_local": True, "local_files_only": False,
             "model_max_length": 4096, "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer",
             "unk_token": "<|endoftext|>"}
    _, fixed = _rewritten(tmp_path / "qwen2", config={"model_type": "qwen2"}, tokenizer_config=saved)
    assert compatible_tokenizer_config(saved, "qwen2") == fixed
    assert fixed == {"add_prefix_space": None, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                     "backend": "tokenizers", "bos_token": None, "eos_token": "<|endoftext|>", "model_max_length": 4096,
                     "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer", "unk_token": "<|endoftext|>"}
    assert set(fixed) <= TOKENIZER_CONFIG_KEYS
    # Another model type gets the generic fast class (5.x: an alias of TokenizersBackend); tokens already
    # listed under additional_special_tokens are not repeated; a dict of named tokens (4.x's form) stays.
    other = {"tokenizer_class": "TokenizersBackend", "additional_special_tokens": ["<a>"], "extra_special_tokens": ["<a>", "<b>"]}
    assert _rewritten(tmp_path / "llama", config={"model_type": "llama"}, tokenizer_config=other)[1] == {
        "tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<a>", "<b>"]}
    assert _rewritten(tmp_path / "no-config", tokenizer_config={"tokenizer_class": "TokenizersBackend"})[1] == {
        "tokenizer_class": "PreTrainedTokenizerFast"}
    named = {"tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": {"image_token": "<image>"}}
    assert compatible_tokenizer_config(named, None) == named
