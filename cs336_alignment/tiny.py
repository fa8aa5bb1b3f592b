"""Tiny Qwen2-architecture models and a matching tokenizer, built offline.

Tests, the CPU demo and the benchmarks need a model shaped like Qwen2.5-Math-1.5B without
downloading anything. This module builds

- a byte-level BPE fast tokenizer trained on a small text file shipped with the package,
  with Qwen's conventions: digits split one per token, ``<|endoftext|>`` as both EOS and
  pad, no BOS, and ``<think>`` / ``<answer>`` left as several ordinary tokens;
- a random-init ``Qwen2ForCausalLM`` in miniature (tied embeddings, grouped-query
  attention, q/k/v bias), initialised so that its logits are far from flat (so greedy
  decoding has no near-ties that make tests flaky);
- the exact Qwen2.5-Math-1.5B configuration (random weights) for GPU benchmarks.

Both save and load with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "build_tiny_model",
    "build_tiny_tokenizer",
    "qwen25_math_1p5b_config",
    "save_tiny_model",
    "tiny_qwen2_config",
]

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenisation pattern: contractions, letter runs (with one leading
# non-letter), single digits, punctuation runs, newlines and spaces.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Logit scale at initialisation: std of the tied embedding rows. With the final RMSNorm
# the hidden state has unit RMS, so logits have std about EMBED_STD * sqrt(hidden_size).
EMBED_STD = 0.25


def _corpus_text() -> str:
    return resources.files("cs336_alignment").joinpath("assets/tokenizer_corpus.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_text().splitlines(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 768) -> Any:
    """A Hugging Face fast tokenizer (byte-level BPE) trained on the shipped corpus.

    Deterministic: the same ``vocab_size`` always yields the same vocabulary. Any text
    round-trips (byte-level), ``<|endoftext|>`` is EOS and pad, and there is no BOS.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tiny_qwen2_config(
    vocab_size: int,
    eos_token_id: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 176,
    max_position_embeddings: int = 2048,
    initializer_range: float | None = None,
) -> Any:
    """A Qwen2 configuration with Qwen2.5-Math-1.5B's structure at toy size.

    Same structure as the real model: tied embeddings, grouped-query attention (4 query
    heads share 2 key/value heads, as 12 share 2 there), q/k/v projection bias, SwiGLU MLP,
    RMSNorm eps 1e-6, RoPE theta 10,000, EOS = pad, no BOS.

    ``initializer_range`` defaults to 1.2 / sqrt(hidden_size) (0.15 at 64), far above
    Qwen's 0.02: at toy width a small init leaves the residual stream equal to the input
    embedding, and with tied embeddings the model then predicts "repeat the last token".
    """
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        attention_dropout=0.0,
        initializer_range=initializer_range if initializer_range is not None else 1.2 / hidden_size**0.5,
    )


def qwen25_math_1p5b_config() -> Any:
    """The exact architecture of Qwen2.5-Math-1.5B (1,543,714,304 parameters, tied).

    For benchmarks with random weights; the real checkpoint ships the same values in its
    config.json.
    """
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=21,
        bos_token_id=151643,
        eos_token_id=151643,
        pad_token_id=151643,
        attention_dropout=0.0,
    )


def build_tiny_model(
    tokenizer: Any | None = None,
    seed: int = 0,
    embed_std: float = EMBED_STD,
    config: Any | None = None,
    **config_overrides: Any,
) -> Any:
    """A random-init tiny ``Qwen2ForCausalLM`` (fp32, eval mode) matching ``tokenizer``.

    Args:
        tokenizer: the tokenizer whose vocabulary and EOS the model uses
            (default: :func:`build_tiny_tokenizer`).
        seed: initialisation seed; the global RNG state is left untouched.
        embed_std: std of the tied embedding, which sets the initial logit scale.
        config: a ready ``Qwen2Config`` (then ``tokenizer`` and overrides are ignored).
        config_overrides: passed to :func:`tiny_qwen2_config` (hidden_size, ...).
    """
    from transformers import GenerationConfig, Qwen2ForCausalLM

    if config is None:
        tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
        config = tiny_qwen2_config(len(tokenizer), tokenizer.eos_token_id, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model.eval()


def save_tiny_model(out_dir: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Build the tiny tokenizer and model and save both to ``out_dir`` (a usable model directory).

    The folder is made loadable by transformers 4.x as well as 5.x
    (:func:`cs336_alignment.hf_compat.make_compatible`).
    """
    from .hf_compat import make_compatible

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **config_overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_compatible(out)
    return out
