"""tokenize_prompt_and_output: separate encoding, right padding, shift, and length-based masks."""

from __future__ import annotations

import copy

import pytest
import torch

from cs336_alignment import tokenize_prompt_and_output
from cs336_alignment.tokenization import pack_prompt_and_output_ids


def test_hand_built_ids():
    # prompt [5, 6], output [7]       -> full [5, 6, 7, 0, 0]
    # prompt [1],    output [2, 3, 4, 9] -> full [1, 2, 3, 4, 9]
    out = pack_prompt_and_output_ids([[5, 6], [1]], [[7], [2, 3, 4, 9]], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0], [1, 2, 3, 4]]
    assert out["labels"].tolist() == [[6, 7, 0, 0], [2, 3, 4, 9]]
    # labels positions holding output tokens: row 0 -> label 7 at t=1; row 1 -> 2, 3, 4, 9
    assert out["response_mask"].tolist() == [[False, True, False, False], [True, True, True, True]]
    assert out["response_mask"].dtype == torch.bool and out["input_ids"].dtype == torch.long


def test_matches_separate_encoding(tiny_tokenizer):
    prompts = ["What is 47 + 85?\nAssistant: <think>", "Hi"]
    outputs = [" 7 + 5 = 12 </think> <answer> 132 </answer>", " there"]
    out = tokenize_prompt_and_output(prompt_strs=prompts, output_strs=outputs, tokenizer=tiny_tokenizer)
    p_ids = [tiny_tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    o_ids = [tiny_tokenizer.encode(o, add_special_tokens=False) for o in outputs]
    max_len = max(len(p) + len(o) for p, o in zip(p_ids, o_ids))
    assert out["input_ids"].shape == (2, max_len - 1)
    for i in range(2):
        full = p_ids[i] + o_ids[i]
        n = len(full)
        assert out["input_ids"][i, : n - 1].tolist() == full[:-1]
        assert out["labels"][i, : n - 1].tolist() == full[1:]
        assert out["labels"][i, n - 1 :].eq(tiny_tokenizer.pad_token_id).all()
        mask = out["response_mask"][i]
        assert mask.sum().item() == len(o_ids[i])
        assert out["labels"][i][mask].tolist() == o_ids[i]


def test_eos_that_ends_a_response_is_in_the_mask(tiny_tokenizer):
    """Qwen's pad id equals EOS: the mask must come from lengths, not from ids != pad."""
    eos = tiny_tokenizer.eos_token
    out = tokenize_prompt_and_output(["Q: 1 + 1 =", "Q: a long prompt here ="], [" 2" + eos, " 3"], tiny_tokenizer)
    row = out["response_mask"][0]
    labels = out["labels"][0]
    assert labels[row][-1].item() == tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id
    # and padding after it (same id) is not in the mask
    assert (labels[~row] == tiny_tokenizer.pad_token_id).sum() >= 1


def test_tokenizer_without_pad_token_pads_with_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    out = tokenize_prompt_and_output(["a", "a much longer prompt"], ["b", "c"], tok)
    assert out["input_ids"][0, -1].item() == tok.eos_token_id


def test_tokenizer_without_pad_or_eos_is_a_clear_error():
    class Bare:
        pad_token_id = None
        eos_token_id = None

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        tokenize_prompt_and_output(["ab"], ["cd"], Bare())


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        tokenize_prompt_and_output(["a", "b"], ["c"], None)
    with pytest.raises(ValueError):
        pack_prompt_and_output_ids([[1], [2]], [[3]], 0)
