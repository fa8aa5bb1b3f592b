"""The offline tiny tokenizer and Qwen2-shaped models."""

from __future__ import annotations

import math

import torch

from cs336_alignment import build_tiny_model, build_tiny_tokenizer, compute_entropy, qwen25_math_1p5b_config


def test_tokenizer_follows_qwen_conventions(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.bos_token is None
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) >= 2, f"{tag} must be several ordinary tokens, got {ids}"
        assert not set(ids) & set(tok.all_special_ids)
    assert len(tok.encode("12345", add_special_tokens=False)) == 5  # digits split one by one
    text = "User: \\frac{1}{2} héllo 🙂 </think> <answer> 42 </answer>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_is_deterministic(tiny_tokenizer):
    again = build_tiny_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()


def test_model_structure(tiny_model, tiny_tokenizer):
    cfg = tiny_model.config
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    attn = tiny_model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    assert cfg.vocab_size == len(tiny_tokenizer)
    assert cfg.eos_token_id == cfg.pad_token_id == tiny_tokenizer.eos_token_id
    assert tiny_model.generation_config.eos_token_id == tiny_tokenizer.eos_token_id


def test_logits_are_not_flat_and_not_degenerate(tiny_model, tiny_tokenizer):
    text = "A conversation between User and Assistant. User: What is 47 + 85? Assistant: <think> 7 + 5 = 12"
    ids = torch.tensor([tiny_tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0]  # (T, V)
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    assert (margins > 1e-3).float().mean() > 0.95  # greedy has clear winners
    assert compute_entropy(logits).mean() < math.log(len(tiny_tokenizer)) - 0.5  # not uniform
    assert (logits.argmax(-1) == ids[0]).float().mean() < 0.5  # not "repeat the last token"


def test_seed_controls_init_and_leaves_global_rng_alone(tiny_tokenizer):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(tiny_tokenizer, seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_tiny_model(tiny_tokenizer, seed=1)
    c = build_tiny_model(tiny_tokenizer, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_save_and_load(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    text = "What is 2 + 2? <think>"
    assert tok.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    ref = build_tiny_model(tiny_tokenizer, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_qwen25_math_1p5b_shape_has_the_real_parameter_count():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen25_math_1p5b_config())
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304
