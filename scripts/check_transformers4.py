"""Check that model folders saved with transformers 5.x load identically under transformers 4.x.

    .venv/bin/python scripts/check_transformers4.py [--folder PATH ...] [--versions SPEC ...]
        [--venv-root DIR] [--record PATH | --no-record]

Our runs save Hugging Face folders with transformers 5.x and rewrite them with
``cs336_alignment.hf_compat.make_compatible``; users and older vLLM releases load them with 4.x.
This script, run with the project's (5.x) interpreter:

1. builds, or reuses, one separate virtual environment per 4.x release under
   ``${TMPDIR:-/tmp}/cs336-tf4-venv/<version>`` (default: the newest 4.57.x and 4.56.0, the oldest
   release ``pyproject.toml`` allows), with ``torch`` pinned to this interpreter's version (the CPU
   wheel on local disk; an unpinned torch would pull a multi-GB CUDA build);
2. saves the folders to check with our 5.x code, unless ``--folder`` names them:
   - ``tiny``: ``save_tiny_model`` (which calls ``make_compatible``);
   - ``qwen2-chat``: the tiny tokenizer as a real Qwen2.5 checkpoint has it (``tokenizer_class``
     ``Qwen2Tokenizer``, a ChatML chat template) loaded through ``AutoTokenizer`` and saved again, as
     a run saves its tokenizer;
   - ``rope``: the tiny model with RoPE theta 1,000,000 and YaRN scaling, where a 4.x that missed the
     RoPE fields would fall back to theta 10,000 without a word;
   - ``qwen2.5-math-1.5b-config``: the config.json alone of the real Qwen2.5-Math-1.5B architecture;
   - ``checkpoint`` and ``export-bf16``: a run checkpoint's model folder, as the checkpoint writer
     saves it, and the bf16 folder the ``export`` command writes from it;
3. loads each folder in a subprocess under 5.x and under every 4.x, records token ids (special
   tokens included, the chat template applied when there is one), special tokens, tokenizer
   settings, config values, RoPE frequencies, logits of a fixed input and a greedy continuation, and
   compares each 4.x record with the 5.x one;
4. shows that the rewrite is needed and harmless: the folders as 5.x wrote them (before
   ``make_compatible``) must load under 5.x exactly as the rewritten ones do, and are expected to
   fail or differ under 4.x (reported, with the 4.x error messages).

Prints the report and, for the default folders, writes it to
``benchmarks/results/transformers4_check.txt``. Exit status 0 when every 4.x load matches 5.x, 1 on
any mismatch. The probe (``--probe``) runs under either version and imports only the standard
library, torch and transformers.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["compare_records", "ensure_venv", "main", "probe"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VERSIONS = ("4.57.*", "4.56.0")
DEFAULT_RECORD = ROOT / "benchmarks" / "results" / "transformers4_check.txt"

# Texts every tokenizer check encodes: plain and mathematical text, Unicode, whitespace runs, the
# special tokens alone and inside text, near-misses of special tokens, and the empty string.
TEXTS = (
    "Hello, world!",
    "A conversation between User and Assistant. User: What is 47 + 85? Assistant: <think> 7 + 5 = 12 </think> "
    "<answer> 132 </answer>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "  leading spaces,\ttabs and\nnewlines\n\n   trailing   ",
    "\\frac{1}{2} héllo 🙂 naïve café 1234567890 x^2 - 3x + 2 = 0",
    "",
    "<|endoftext|><|endoftext|>",
    "<|im_start not special |> <|im_end|>x",
)
# The model input: LOGITS_LENGTH ids spread over the vocabulary (positions far enough apart for RoPE to matter).
LOGITS_LENGTH = 96
LOGITS_ID_STRIDE = 17
CHAT = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": "12 * 7 = 84."},
)
# Qwen2.5's ChatML template without tool calls (a default system message when none is given).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nPlease reason step by step.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CONFIG_FIELDS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "use_sliding_window",
    "sliding_window", "max_window_layers", "attention_dropout", "layer_types", "use_cache", "initializer_range",
)
NOTES = (
    "notes:",
    "- 5.x's AutoTokenizer builds Qwen2Tokenizer for model_type qwen2 whatever tokenizer_class says; 4.x builds",
    "  Qwen2TokenizerFast from the same tokenizer.json. Both default unk_token to <|endoftext|>.",
    "- 4.x lists additional_special_tokens in special_tokens_map, 5.x does not (an API change, not a folder",
    "  difference): the check compares the named tokens, the additional/extra list and all_special_tokens.",
    "- from_pretrained without dtype loads float32 in 4.x and the saved dtype in 5.x ('auto'), whatever the folder",
    "  says: pass dtype explicitly (the project does). The check loads with dtype='auto' in both.",
    "",
)
# Logits tolerance, relative to the largest logit: same torch, same CPU kernels, so any real
# difference (another RoPE theta, a missing bias) is orders of magnitude above it.
LOGITS_RTOL = {"float32": 1e-5, "float64": 1e-9}
LOGITS_RTOL_16BIT = 1e-2


# --------------------------------------------------------------------------------------------------
# The probe: runs under 4.x or 5.x, in a subprocess.
# --------------------------------------------------------------------------------------------------


def _error(exc: BaseException) -> dict[str, str]:
    """``{"error": message}``: the first exception of the chain (the cause), then those raised while handling it."""
    chain: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 3:
        message = " ".join(str(current).split())
        chain.append(f"{type(current).__name__}: {message[:200]}{'...' if len(message) > 200 else ''}")
        current = current.__cause__ or current.__context__
    return {"error": " [then, handling it] ".join(reversed(chain))}


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _tokenizer_record(tok: Any, major: int) -> dict[str, Any]:
    # special_tokens_map holds the named tokens that are set (and, in 4.x only, the additional ones).
    named = {name: (None if name not in tok.special_tokens_map else str(tok.special_tokens_map[name])) for name in NAMED_SPECIAL}
    extra = tok.extra_special_tokens if major >= 5 else tok.additional_special_tokens
    record: dict[str, Any] = {
        "class": type(tok).__name__,
        "special_tokens": {
            "named": named,
            "named_ids": {name: (None if v is None else tok.convert_tokens_to_ids(v)) for name, v in named.items()},
            "additional": [str(t) for t in extra],
            "all": sorted(str(t) for t in tok.all_special_tokens),
            "all_ids": sorted(tok.all_special_ids),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
        },
        "settings": {
            "model_max_length": tok.model_max_length,
            "padding_side": tok.padding_side,
            "truncation_side": tok.truncation_side,
            "clean_up_tokenization_spaces": tok.clean_up_tokenization_spaces,
            "len": len(tok),
        },
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "added_vocab": sorted(tok.get_added_vocab().items(), key=lambda kv: kv[1]),
        "encode": [],
        "decode": [],
    }
    for text in TEXTS:
        with_special = tok.encode(text, add_special_tokens=True)
        without = tok.encode(text, add_special_tokens=False)
        record["encode"].append({"text": text, "ids": with_special, "ids_no_special": without,
                                 "tokens": tok.convert_ids_to_tokens(without)})
        record["decode"].append({"text": text, "decode": tok.decode(with_special),
                                 "skip_special": tok.decode(with_special, skip_special_tokens=True)})
    batch = tok(list(TEXTS[:3]), padding=True)
    record["batch"] = {
        "padded": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        "truncated": tok(TEXTS[1], truncation=True, max_length=8)["input_ids"],
        "max_length": tok(TEXTS[0], padding="max_length", max_length=12)["input_ids"],
    }
    template = tok.chat_template
    record["chat_template"] = {"template": template if isinstance(template, (str, type(None))) else sorted(template.items())}
    if template:
        messages = [dict(m) for m in CHAT]
        full = tok.apply_chat_template(messages, tokenize=False)
        prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
        record["chat_template"].update({
            "conversation": full, "conversation_ids": tok.encode(full, add_special_tokens=False),
            "generation_prompt": prompt, "generation_prompt_ids": tok.encode(prompt, add_special_tokens=False),
        })
    return record


def _config_record(config: Any, major: int) -> dict[str, Any]:
    values = {name: getattr(config, name, "<absent>") for name in CONFIG_FIELDS}
    values["dtype"] = _dtype_name(getattr(config, "dtype", None))
    if major >= 5:
        rope = dict(getattr(config, "rope_parameters", None) or {})
    else:
        rope = {"rope_theta": getattr(config, "rope_theta", None), **dict(getattr(config, "rope_scaling", None) or {})}
        rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    if getattr(config, "partial_rotary_factor", None) is not None:
        rope.setdefault("partial_rotary_factor", config.partial_rotary_factor)
    return {"values": json.loads(json.dumps(values, default=str)), "rope": json.loads(json.dumps(rope, default=str))}


def probe(folder: Path, out_dir: Path) -> None:
    """Load ``folder`` with the running transformers and write ``out_dir/probe.json`` and ``out_dir/tensors.pt``."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    major = int(transformers.__version__.split(".")[0])
    import tokenizers

    record: dict[str, Any] = {
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
    }
    # Each part is loaded only where the folder has its files (5.x's AutoTokenizer builds an empty Qwen2Tokenizer
    # from a config.json alone).
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        try:
            record["tokenizer"] = _tokenizer_record(AutoTokenizer.from_pretrained(folder), major)
        except Exception as exc:  # noqa: BLE001 - the report shows what failed
            record["tokenizer"] = _error(exc)
    tensors: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            record["config"] = _config_record(AutoConfig.from_pretrained(folder), major)
        except Exception as exc:  # noqa: BLE001
            record["config"] = _error(exc)
    if (folder / "config.json").is_file() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))):
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", attn_implementation="eager").eval()
            gen = model.generation_config
            model_record: dict[str, Any] = {
                "param_dtype": _dtype_name(next(model.parameters()).dtype),
                "generation_config": {k: getattr(gen, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            }
            # Fixed ids, so that the model is compared even where the tokenizer fails to load.
            ids = [(LOGITS_ID_STRIDE * i + 3) % model.config.vocab_size for i in range(LOGITS_LENGTH)]
            input_ids = torch.tensor([ids])
            with torch.no_grad():
                tensors["logits"] = model(input_ids).logits.float()
                rotary = getattr(model.model, "rotary_emb", None)
                if rotary is not None:
                    tensors["inv_freq"] = rotary.inv_freq.float()
                    model_record["rotary"] = {"attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)),
                                              "rope_type": getattr(rotary, "rope_type", None)}
                eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
                eos = eos[0] if isinstance(eos, list) else eos
                generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12,
                                           do_sample=False, pad_token_id=eos)
            model_record["greedy_continuation"] = generated[0, len(ids):].tolist()
            record["model"] = model_record
        except Exception as exc:  # noqa: BLE001
            record["model"] = _error(exc)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.json").write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    torch.save(tensors, out_dir / "tensors.pt")


# --------------------------------------------------------------------------------------------------
# Comparison (runs under 5.x).
# --------------------------------------------------------------------------------------------------


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}: {'absent' if key not in a else repr(a[key])[:120]} vs " \
                       f"{'absent' if key not in b else repr(b[key])[:120]}"
            diff = _first_difference(a[key], b[key], f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0):
        return None
    return None if a == b else f"{path}: {a!r:.160} vs {b!r:.160}"


# The parts of a probe record that load separately; when one failed, its sections are not compared one by one.
PARTS = ("tokenizer", "config", "model")
# The compared sections: (name, where it lies in a probe record). The tokenizer's class name is compared only
# between two 5.x loads (4.x names its classes differently: Qwen2TokenizerFast for 5.x's Qwen2Tokenizer).
CLASS_SECTION = ("tokenizer.class", ("tokenizer", "class"))
SECTIONS = (
    ("tokenizer.special_tokens", ("tokenizer", "special_tokens")),
    ("tokenizer.settings", ("tokenizer", "settings")),
    ("tokenizer.vocab", ("tokenizer", "vocab")),
    ("tokenizer.added_vocab", ("tokenizer", "added_vocab")),
    ("tokenizer.encode", ("tokenizer", "encode")),
    ("tokenizer.decode", ("tokenizer", "decode")),
    ("tokenizer.batch_padding_truncation", ("tokenizer", "batch")),
    ("tokenizer.chat_template", ("tokenizer", "chat_template")),
    ("config.values", ("config", "values")),
    ("config.rope", ("config", "rope")),
    ("model.param_dtype", ("model", "param_dtype")),
    ("model.generation_config", ("model", "generation_config")),
    ("model.rotary", ("model", "rotary")),
    ("model.greedy_continuation", ("model", "greedy_continuation")),
)


def _section(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = record
    for key in keys:
        if isinstance(value, dict) and "error" in value and isinstance(value["error"], str):
            return value  # the whole part failed to load: the error is the value
        if not isinstance(value, dict) or key not in value:
            return "<absent>"
        value = value[key]
    return value


def _failed(record: dict[str, Any], part: str) -> str | None:
    value = record.get(part)
    return value["error"] if isinstance(value, dict) and isinstance(value.get("error"), str) else None


def compare_records(ref: dict[str, Any], ref_tensors: dict[str, Any], got: dict[str, Any],
                    got_tensors: dict[str, Any], same_version: bool = False) -> list[tuple[str, bool, str]]:
    """Compare a probe record with the 5.x reference: one (check, passed, detail) per section.

    A part (tokenizer, config, model) that failed to load on either side is one failed check.
    ``same_version`` also compares the tokenizer's class name (both records from the same release).
    """
    import torch

    results: list[tuple[str, bool, str]] = []
    failed = {part: (_failed(ref, part), _failed(got, part)) for part in PARTS}
    for part, (ref_error, got_error) in failed.items():
        if ref_error and got_error:  # e.g. the config of a tokenizer-only folder
            results.append((part, True, f"loads under neither version (5.x: {ref_error[:100]})"))
        elif ref_error or got_error:
            side = "this load" if got_error else "the 5.x reference"
            results.append((part, False, f"{side} failed: {got_error or ref_error}"))
    for name, keys in ((CLASS_SECTION,) if same_version else ()) + SECTIONS:
        if any(failed[part][0] or failed[part][1] for part in PARTS if keys[0] == part):
            continue
        a, b = _section(ref, keys), _section(got, keys)
        if a == "<absent>" and b == "<absent>":
            continue
        diff = _first_difference(a, b)
        if diff is None:
            detail = "identical"
        elif len(repr(a)) + len(repr(b)) < 300:
            detail = f"differs: 5.x {a!r} vs this {b!r}"
        else:
            detail = f"differs at {diff.lstrip('.') or '(value)'} (5.x vs this)"
        if name == "tokenizer.encode" and diff is None:
            detail = f"identical ids for {len(a)} texts"
        results.append((name, diff is None, detail))
    for key in ("logits", "inv_freq"):
        if (key not in ref_tensors and key not in got_tensors) or any(failed["model"]):
            continue
        if key not in ref_tensors or key not in got_tensors:
            results.append((f"model.{key}", False, "missing on one side (the model did not load)"))
            continue
        x, y = ref_tensors[key], got_tensors[key]
        if x.shape != y.shape:
            results.append((f"model.{key}", False, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"))
            continue
        scale = float(x.abs().max()) or 1.0
        dtype = (_section(ref, ("model", "param_dtype")) or "float32") if key == "logits" else "float32"
        rtol = LOGITS_RTOL.get(dtype, LOGITS_RTOL_16BIT)
        max_diff = float((x - y).abs().max())
        ok = max_diff <= rtol * scale
        exact = " (bit-identical)" if torch.equal(x, y) else ""
        results.append((f"model.{key}", ok, f"max |diff| {max_diff:.3g} (tolerance {rtol * scale:.3g}; "
                                            f"shape {tuple(x.shape)}){exact}"))
    return results


# --------------------------------------------------------------------------------------------------
# Environments, folders, the driver (runs under 5.x).
# --------------------------------------------------------------------------------------------------


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed(python: Path) -> dict[str, str] | None:
    if not python.is_file():
        return None
    code = "import json, torch, transformers, tokenizers; print(json.dumps({'transformers': transformers.__version__, " \
           "'torch': torch.__version__, 'tokenizers': tokenizers.__version__}))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def ensure_venv(spec: str, root: Path, torch_version: str, log: Any = print) -> tuple[Path, dict[str, str]]:
    """The Python of a virtual environment holding ``transformers==spec`` and ``torch==torch_version``; built if needed."""
    venv = root / spec.replace("*", "x")
    python = _venv_python(venv)
    have = _installed(python)
    if have and fnmatch.fnmatch(have["transformers"], spec) and have["torch"].split("+")[0] == torch_version:
        return python, have
    log(f"building {venv} (transformers=={spec}, torch=={torch_version}) ...")
    t0 = time.perf_counter()
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           f"transformers=={spec}", f"torch=={torch_version}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip install into {venv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    have = _installed(python)
    if not have:
        raise SystemExit(f"{venv}: transformers/torch do not import after installing")
    log(f"  built in {time.perf_counter() - t0:.0f} s: transformers {have['transformers']}, torch {have['torch']}")
    return python, have


def _save_raw(out: Path, tokenizer: Any, model: Any) -> Path:
    """Save as a plain 5.x ``save_pretrained`` does (no make_compatible)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _compatible_copy(raw: Path, out: Path, config_too: bool = True) -> Path:
    from cs336_alignment.hf_compat import compatible_tokenizer_config, make_compatible

    shutil.copytree(raw, out)
    if config_too:
        make_compatible(out)
    else:  # only the tokenizer: shows what the config rewrite alone prevents
        path = out / "tokenizer_config.json"
        model_type = json.loads((out / "config.json").read_text())["model_type"]
        fixed = compatible_tokenizer_config(json.loads(path.read_text()), model_type)
        path.write_text(json.dumps(fixed, indent=2, sort_keys=True) + "\n")
    return out


def build_default_folders(work: Path) -> list[dict[str, Any]]:
    """The default cases: for each, the folder as 5.x saved it ("raw") and after make_compatible."""
    from transformers import AutoTokenizer

    from cs336_alignment.tiny import (
        build_tiny_model,
        build_tiny_tokenizer,
        qwen25_math_1p5b_config,
        save_tiny_model,
        tiny_qwen2_config,
    )

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    cases = []

    # 1. save_tiny_model as the package ships it (make_compatible included) and a plain save of the same.
    fixed = save_tiny_model(work / "tiny" / "compatible", seed=0)
    raw = _save_raw(work / "tiny" / "raw", tokenizer, model)
    cases.append({"name": "tiny", "about": "save_tiny_model (tiny Qwen2 model and tokenizers-backed tokenizer)",
                  "raw": raw, "compatible": fixed})

    # 2. A Qwen2Tokenizer with a chat template, loaded through AutoTokenizer and saved again (what a run
    #    started from a real Qwen2.5 checkpoint saves).
    seed_dir = work / "qwen2-chat" / "seed"
    _save_raw(seed_dir, tokenizer, model)
    config_path = seed_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.update(tokenizer_class="Qwen2Tokenizer", chat_template=CHAT_TEMPLATE)
    config_path.write_text(json.dumps(tok_config, indent=2))
    qwen_tok = AutoTokenizer.from_pretrained(seed_dir)
    raw = _save_raw(work / "qwen2-chat" / "raw", qwen_tok, model)
    cases.append({"name": "qwen2-chat", "about": "Qwen2Tokenizer (via AutoTokenizer) with a ChatML chat template, re-saved",
                  "raw": raw, "compatible": _compatible_copy(raw, work / "qwen2-chat" / "compatible")})

    # 3. RoPE theta 1e6 with YaRN scaling: 4.x's defaults (theta 1e4, no scaling) would differ silently.
    config = tiny_qwen2_config(len(tokenizer), tokenizer.eos_token_id, max_position_embeddings=4096)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0,
                              "original_max_position_embeddings": 1024}
    rope_model = build_tiny_model(config=config, seed=0)
    raw = _save_raw(work / "rope" / "raw", tokenizer, rope_model)
    cases.append({"name": "rope", "about": "tiny model with rope_theta 1e6 and YaRN scaling (factor 4)",
                  "raw": raw, "compatible": _compatible_copy(raw, work / "rope" / "compatible"),
                  "tokenizer_only": _compatible_copy(raw, work / "rope" / "tokenizer-only", config_too=False)})

    # 4. The real Qwen2.5-Math-1.5B architecture: its config.json alone (no weights).
    raw = work / "qwen2.5-math-1.5b-config" / "raw"
    qwen25_math_1p5b_config().save_pretrained(raw)
    cases.append({"name": "qwen2.5-math-1.5b-config", "about": "config.json of the real Qwen2.5-Math-1.5B architecture",
                  "raw": raw, "compatible": _compatible_copy(raw, work / "qwen2.5-math-1.5b-config" / "compatible")})

    # 5. What a run writes: a checkpoint's model folder (fp32 master weights, through the checkpoint
    #    writer) and the bf16 folder the export command makes from it.
    from cs336_alignment.checkpoint import Checkpointer
    from cs336_alignment.export import export_model

    step = Checkpointer(work / "run").save(1, model, None, {"step": 1}, tokenizer=tokenizer)
    cases.append({"name": "checkpoint", "about": "a run checkpoint's model/ folder (Checkpointer.save, fp32)",
                  "compatible": step / "model"})
    cases.append({"name": "export-bf16", "about": "the export command's bf16 folder made from that checkpoint",
                  "compatible": export_model(step, work / "export-bf16", dtype="bfloat16")})
    return cases


def _run_probe(python: Path, folder: Path, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(python), str(Path(__file__).resolve()), "--probe", str(folder), "--probe-out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if done.returncode != 0 or not (out / "probe.json").is_file():
        return {"probe": _error(RuntimeError(done.stderr[-1500:]))}, {}
    return json.loads((out / "probe.json").read_text(encoding="utf-8")), torch.load(out / "tensors.pt")


def _tokenizer_class(record: dict[str, Any]) -> str:
    if "tokenizer" not in record:
        return "none in the folder"
    return record["tokenizer"].get("class") or "none: it failed to load"


def _fmt(results: list[tuple[str, bool, str]], indent: str = "    ") -> list[str]:
    return [f"{indent}{'PASS' if ok else 'FAIL'}  {name:<34} {detail}" for name, ok, detail in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, action="append", help="check this saved folder as it stands (repeatable)")
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS), help="transformers 4.x version specs")
    parser.add_argument("--venv-root", type=Path,
                        default=Path(os.environ.get("TMPDIR") or "/tmp") / "cs336-tf4-venv", help="where the 4.x venvs live")
    parser.add_argument("--record", type=Path, help=f"write the report here (default for the built-in folders: {DEFAULT_RECORD})")
    parser.add_argument("--no-record", action="store_true", help="print the report only")
    parser.add_argument("--jobs", type=int, default=2, help="probes run at once")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        probe(args.probe, args.probe_out)
        return 0

    sys.path.insert(0, str(ROOT))
    import tokenizers
    import torch
    import transformers

    from cs336_alignment.hf_compat import TOKENIZER_CONFIG_KEYS

    transformers.utils.logging.disable_progress_bar()

    t_start = time.perf_counter()
    torch_version = torch.__version__.split("+")[0]
    envs = [ensure_venv(spec, args.venv_root, torch_version) for spec in args.versions]
    here = Path(sys.executable)
    lines = [
        "transformers 4.x compatibility check of saved model folders (scripts/check_transformers4.py)",
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"reference: transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
    ]
    for spec, (_, have) in zip(args.versions, envs):
        lines.append(f"checked:   transformers {have['transformers']} (spec {spec}), tokenizers {have['tokenizers']}, "
                     f"torch {have['torch']}")
    lines.append("each folder is loaded in a fresh subprocess (AutoTokenizer, AutoConfig, AutoModelForCausalLM with "
                 "dtype='auto', eager attention) and compared section by section with the 5.x load")
    lines.append("")

    with tempfile.TemporaryDirectory(prefix="cs336-tf4-check-") as tmp:
        work = Path(tmp)
        if args.folder:
            cases = [{"name": str(f), "about": "given folder, as it stands", "compatible": f.resolve()} for f in args.folder]
        else:
            cases = build_default_folders(work)
        jobs: list[tuple[str, str, Path, Path]] = []  # (case, variant, python, folder)
        for case in cases:
            jobs.append((case["name"], "compatible@5", here, case["compatible"]))
            for spec, (python, _) in zip(args.versions, envs):
                jobs.append((case["name"], f"compatible@{spec}", python, case["compatible"]))
            if "raw" in case:
                jobs.append((case["name"], "raw@5", here, case["raw"]))
                for spec, (python, _) in zip(args.versions, envs):
                    jobs.append((case["name"], f"raw@{spec}", python, case["raw"]))
            if "tokenizer_only" in case:
                jobs.append((case["name"], f"tokenizer_only@{args.versions[0]}", envs[0][0], case["tokenizer_only"]))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {(c, v): pool.submit(_run_probe, py, folder, work / "probes" / c.replace("/", "_") / v)
                       for c, v, py, folder in jobs}
            probes = {key: future.result() for key, future in futures.items()}

        failures: list[str] = []  # what did not match
        demos: list[bool] = []  # per 4.x load of a folder without the rewrite: did it fail or differ?
        for case in cases:
            name = case["name"]
            lines.append(f"== {name}: {case['about']}")
            folder = case["compatible"]
            files = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
            tok_cfg = Path(folder) / "tokenizer_config.json"
            if tok_cfg.is_file():
                keys = set(json.loads(tok_cfg.read_text()))
                outside = sorted(keys - TOKENIZER_CONFIG_KEYS)
                lines.append(f"   tokenizer_config.json keys: {', '.join(sorted(keys))}"
                             + (f" (outside hf_compat.TOKENIZER_CONFIG_KEYS: {', '.join(outside)})" if outside else ""))
            lines.append(f"   files: {', '.join(files)}")
            ref, ref_t = probes[(name, "compatible@5")]
            if "probe" in ref:
                lines.append(f"   FAIL  the 5.x probe itself failed: {ref['probe']['error']}")
                failures.append(f"{name}: 5.x probe")
                continue
            tok_class = _tokenizer_class(ref)
            if "raw" in case:
                raw, raw_t = probes[(name, "raw@5")]
                res = compare_records(raw, raw_t, ref, ref_t, same_version=True)
                bad = [r for r in res if not r[1]]
                failures += [f"{name}: 5.x before vs after make_compatible"] if bad else []
                lines.append(f"   5.x, before vs after make_compatible: {'unchanged' if not bad else 'CHANGED'} "
                             f"({len(res)} checks; tokenizer class {tok_class})")
                lines.extend(_fmt(bad))
            for spec in args.versions:
                got, got_t = probes[(name, f"compatible@{spec}")]
                version = got.get("versions", {}).get("transformers", spec)
                if "probe" in got:
                    lines.append(f"   transformers {version}: FAIL  probe failed: {got['probe']['error']}")
                    failures.append(f"{name}: transformers {version}")
                    continue
                res = compare_records(ref, ref_t, got, got_t)
                bad = [r for r in res if not r[1]]
                failures += [f"{name}: transformers {version}"] if bad else []
                lines.append(f"   transformers {version} (tokenizer class {_tokenizer_class(got)}): "
                             f"{'PASS' if not bad else 'FAIL'} ({len(res) - len(bad)}/{len(res)} checks identical to 5.x)")
                lines.extend(_fmt(res))
            for variant, title in (("raw", "WITHOUT make_compatible (as 5.x saved it)"),
                                   ("tokenizer_only", "with only tokenizer_config.json rewritten (config.json as 5.x saved it)")):
                keys = [k for k in probes if k[0] == name and k[1].startswith(variant + "@") and not k[1].endswith("@5")]
                for key in keys:
                    got, got_t = probes[key]
                    version = got.get("versions", {}).get("transformers", key[1].split("@")[1])
                    res = compare_records(ref, ref_t, got, got_t) if "probe" not in got else \
                        [("probe", False, got["probe"]["error"])]
                    bad = [r for r in res if not r[1]]
                    demos.append(bool(bad))
                    verdict = "fails or differs, as expected: the rewrite is needed" if bad else \
                        "NOTE: loads identically even without the rewrite"
                    lines.append(f"   {title}, transformers {version}: {verdict}")
                    lines.extend(_fmt(bad, indent="      "))
            lines.append("")

    lines.extend(NOTES)
    total = len(cases) * len(args.versions)
    lines.append(f"result: {'PASS' if not failures else 'FAIL'}: {len(cases)} folder(s) x {len(args.versions)} 4.x release(s) = "
                 f"{total} loads compared with 5.x" + (f"; mismatches: {'; '.join(failures)}" if failures else ", all identical"))
    if demos:
        lines.append(f"without the rewrite: {sum(demos)} of {len(demos)} 4.x loads fail or differ from 5.x")
    lines.append(f"wall time: {time.perf_counter() - t_start:.0f} s")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    record = args.record or (None if args.folder else DEFAULT_RECORD)
    if record is not None and not args.no_record:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(report, encoding="utf-8")
        print(f"(written to {record})")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
