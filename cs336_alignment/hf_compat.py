"""Make a Hugging Face folder written by transformers 5.x load identically under transformers 4.x.

Our runs save model folders (``save_pretrained``) with transformers 5.x, but the CS336 course
environment and older vLLM releases run transformers 4.x. :func:`make_compatible` rewrites, in
place, the two JSON files of such a folder that 4.x misreads; every other file is left alone.

tokenizer_config.json
  ``tokenizer_class``
      5.x writes ``"TokenizersBackend"``, a class 4.x does not have: 4.x's ``AutoTokenizer`` fails with
      ``ValueError: Tokenizer class TokenizersBackend does not exist or is not currently imported.``
      It becomes the class that 5.x's ``AutoTokenizer`` actually loads for the folder, named so that
      4.x finds it too. For ``model_type`` ``qwen2`` 5.x ignores the saved class and builds a
      ``Qwen2Tokenizer`` (which defaults ``unk_token`` to ``<|endoftext|>``), so we write
      ``"Qwen2Tokenizer"``: 4.x then loads ``Qwen2TokenizerFast``, with the same defaults, from the
      same tokenizer.json. For any other model type we write ``"PreTrainedTokenizerFast"``: 5.x treats
      that name as an alias of ``TokenizersBackend`` and 4.x loads tokenizer.json as it stands.
  ``extra_special_tokens``
      5.x writes the additional special tokens (``<|im_start|>``, ...) as a LIST under this key. In 4.x
      the key means a DICT of named model-specific tokens (``{"image_token": "<image>"}``), and a list
      fails in ``PreTrainedTokenizerBase.__init__`` with ``AttributeError: 'list' object has no attribute
      'keys'``. The list moves to ``additional_special_tokens``, which 4.x reads natively and 5.x still
      reads (it renames the key to ``extra_special_tokens`` on load). A dict is left in place: both
      versions read it alike.
  ``is_local``, ``local_files_only``
      Arguments of the ``from_pretrained`` call that loaded the tokenizer, which 5.x leaks into the
      files it saves. They describe no property of the tokenizer (5.x overwrites both on every load),
      and 4.x would hand them to the tokenizer's ``__init__``; they are dropped.
  ``backend``
      5.x-only (``"tokenizers"``); 4.x keeps unknown keys as harmless init arguments, so it stays.

config.json
  ``rope_theta`` / ``rope_scaling``
      5.x stores RoPE as ``rope_parameters = {"rope_type": ..., "rope_theta": ..., <scaling keys>}``.
      4.x's ``Qwen2Config`` does not read that dict: it takes ``rope_theta`` and ``rope_scaling`` from
      the top level and SILENTLY falls back to its defaults (theta 10,000, no scaling) when they are
      missing, so a model trained with theta 1,000,000 (Qwen2.5-7B) or with YaRN scaling would load
      without error and compute different logits. Both are added beside ``rope_parameters``:
      ``rope_theta`` its theta, ``rope_scaling`` None for the plain ``default`` type and otherwise
      the dict less ``rope_theta`` (and less ``partial_rotary_factor``, which 4.x reads at the top
      level, where it is copied). 5.x rebuilds the very same ``rope_parameters`` from these legacy
      keys (its ``convert_rope_params_to_dict`` lets ``rope_scaling`` replace the dict and fills in
      ``rope_theta``), so both versions agree. Keys already present are never overwritten (a
      ``rope_scaling`` already there takes precedence in 5.x too). A ``rope_parameters`` nested by
      layer type (Gemma-style) has no 4.x spelling in these keys and is left alone.
  ``torch_dtype``
      5.x writes ``dtype``; 4.56+ reads it, older 4.x (and tools built on it) read ``torch_dtype``
      only. The same string is added beside it; every version prefers ``dtype`` when both are there.

Every rewrite keeps the 5.x field when 4.x tolerates it and adds the 4.x name beside it, so the
folder still loads in 5.x exactly as before; it is idempotent (a second call changes nothing and
leaves the files untouched). Each file is replaced atomically (a temporary file in the same folder,
then ``os.replace``), with the mode a plain ``open()`` would give it (0o666 less the umask).

``scripts/check_transformers4.py`` proves the result: it loads such a folder under 4.57.x and 4.56.0
in a separate virtual environment and compares token ids, special tokens, chat template, config
values and logits with 5.x.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .run_dir import atomic_write_text

__all__ = [
    "CONFIG_4X_KEYS",
    "TOKENIZER_CONFIG_KEYS",
    "compatible_config",
    "compatible_tokenizer_config",
    "make_compatible",
]

# The tokenizer_config.json keys whose meaning transformers 4.x (>= 4.56) and 5.x share, so a saved
# folder may carry them. A key outside this set must be checked with scripts/check_transformers4.py
# before it is added here.
TOKENIZER_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        # which class to build, and from which library (5.x-only; 4.x ignores "backend")
        "tokenizer_class",
        "backend",
        # named special tokens and the additional ones (a list: the 4.x key, which 5.x also reads)
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
        # encoding and decoding behaviour
        "add_prefix_space",
        "add_bos_token",
        "add_eos_token",
        "clean_up_tokenization_spaces",
        "split_special_tokens",
        "model_input_names",
        "model_max_length",
        "padding_side",
        "truncation_side",
        "errors",
        "chat_template",
    }
)

# The config.json keys make_compatible adds for 4.x beside the 5.x ones.
CONFIG_4X_KEYS: frozenset[str] = frozenset({"rope_theta", "rope_scaling", "partial_rotary_factor", "torch_dtype"})

# model_type -> the tokenizer class 5.x's AutoTokenizer loads whatever class the folder names, by the
# name 4.x also knows. Other model types get the generic fast tokenizer.
_TOKENIZER_CLASS_BY_MODEL_TYPE: dict[str, str] = {"qwen2": "Qwen2Tokenizer"}
_GENERIC_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Arguments of from_pretrained that 5.x leaks into the saved tokenizer_config.json.
_LEAKED_LOAD_ARGUMENTS = ("is_local", "local_files_only")


def compatible_tokenizer_config(tokenizer_config: dict[str, Any], model_type: str | None = None) -> dict[str, Any]:
    """The 4.x- and 5.x-compatible form of a tokenizer_config.json dict (a new dict; the input is unchanged).

    Args:
        tokenizer_config: the parsed tokenizer_config.json.
        model_type: ``model_type`` from the folder's config.json, if it has one; it decides which
            class replaces ``TokenizersBackend``.
    """
    out = dict(tokenizer_config)
    if out.get("tokenizer_class") in (None, "TokenizersBackend"):
        out["tokenizer_class"] = _TOKENIZER_CLASS_BY_MODEL_TYPE.get(model_type or "", _GENERIC_TOKENIZER_CLASS)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        additional = list(out.get("additional_special_tokens") or [])
        out["additional_special_tokens"] = additional + [token for token in extra if token not in additional]
    for key in _LEAKED_LOAD_ARGUMENTS:
        out.pop(key, None)
    return out


def compatible_config(config: dict[str, Any]) -> dict[str, Any]:
    """The 4.x- and 5.x-compatible form of a config.json dict (a new dict; the input is unchanged)."""
    out = dict(config)
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and not any(isinstance(v, dict) for v in rope.values()):
        out.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if "rope_scaling" not in out:
            scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
            out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1 else scaling
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _rewrite(path: Path, before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Replace ``path`` atomically with ``after`` (Hugging Face's JSON layout) when it differs from ``before``."""
    if after == before:
        return False
    atomic_write_text(path, json.dumps(after, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return True


def make_compatible(folder: str | Path) -> None:
    """Rewrite ``folder``'s tokenizer_config.json and config.json so that transformers 4.x and 5.x load them alike.

    ``folder`` is a directory just written by ``save_pretrained`` (model, tokenizer or both); a file
    it lacks is skipped. See the module docstring for each rewrite and why. Idempotent; touches no
    other file, and a file already compatible is not rewritten.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = _read_json(config_path)
    if config is not None:
        _rewrite(config_path, config, compatible_config(config))
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path)
    if tokenizer_config is not None:
        model_type = config.get("model_type") if config is not None else None
        _rewrite(tokenizer_config_path, tokenizer_config, compatible_tokenizer_config(tokenizer_config, model_type))
