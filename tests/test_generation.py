"""The native engine on the tiny model: greedy = argmax, stop strings, min_tokens, the sampling
distribution, seeds, batch independence, load_weights."""

from __future__ import annotations

import math

import pytest
import torch

from cs336_alignment import get_response_log_probs
from cs336_alignment.generation import NativeEngine, SamplingParams
from cs336_alignment.generation.sampling import sample_tokens, stream_keys, stream_uniforms

PROMPTS = [
    "What is 47 + 85?",
    "A conversation between User and Assistant. The User asks a question.",
    "Hi",
    "Compute \\frac{3}{8} + \\frac{1}{8}.",
]


@pytest.fixture()
def engine(tiny_model, tiny_tokenizer):
    return NativeEngine(tiny_model, tiny_tokenizer)


def _argmax_continuation(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by full forwards, with the top-2 margin of every step."""
    x, margins = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([x])).logits[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            x.append(int(logits.argmax()))
    return x[len(ids) :], margins


def test_greedy_equals_step_by_step_argmax(engine, tiny_model, tiny_tokenizer):
    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    checked = 0
    for prompt, result in zip(PROMPTS, results):
        ids = tiny_tokenizer.encode(prompt, add_special_tokens=False)
        assert result.prompt_token_ids == ids and result.prompt == prompt
        want, margins = _argmax_continuation(tiny_model, ids, 40)
        got = result.completions[0].token_ids
        for t, (g, w, m) in enumerate(zip(got, want, margins)):
            if m <= 1e-3:  # a near-tie: later tokens may legitimately differ
                break
            assert g == w, f"prompt {prompt!r}: token {t} differs"
            checked += 1
    assert checked >= 100


def test_batch_of_mixed_lengths_equals_each_prompt_alone(engine):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    together = engine.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, together):
        alone = engine.generate([prompt], params)[0]
        assert alone.completions[0].token_ids == result.completions[0].token_ids


def test_sampling_does_not_depend_on_batch_size(tiny_model, tiny_tokenizer):
    params = SamplingParams(temperature=1.0, max_tokens=20, n=3, seed=7)
    outs = []
    for max_num_seqs in (1, 4, 64):
        eng = NativeEngine(tiny_model, tiny_tokenizer, max_num_seqs=max_num_seqs)
        outs.append([[c.token_ids for c in r.completions] for r in eng.generate(PROMPTS, params)])
    assert outs[0] == outs[1] == outs[2]


def test_a_batch_split_in_two_with_prompt_offsets_samples_what_one_call_does(engine):
    """What data-parallel ranks rely on: the samples of the whole batch do not depend on the split."""
    params = SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=11)
    ids = lambda rs: [[c.token_ids for c in r.completions] for r in rs]  # noqa: E731
    whole = ids(engine.generate(PROMPTS, params))
    half = len(PROMPTS) // 2
    first = ids(engine.generate(PROMPTS[:half], params))  # rank 0: offset 0
    second = ids(engine.generate(PROMPTS[half:], SamplingParams(**{**params.__dict__, "prompt_offset": half})))  # rank 1
    assert first + second == whole
    assert ids(engine.generate(PROMPTS[half:], params)) != whole[half:]  # without the offset: other streams


def test_seed_and_n_semantics(engine):
    a = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=12, n=4, seed=1))
    b = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=12, n=4, seed=1))
    c = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=12, n=4, seed=2))
    ids = lambda rs: [[x.token_ids for x in r.completions] for r in rs]  # noqa: E731
    assert [len(r.completions) for r in a] == [4, 4]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert len({tuple(t) for t in ids(a)[0]}) > 1  # the n samples of a prompt differ
    unseeded = [ids(engine.generate(PROMPTS[:1], SamplingParams(max_tokens=12, n=2))) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_stop_string_across_token_boundaries(engine, tiny_tokenizer):
    base = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].completions[0]
    pieces = [tiny_tokenizer.decode([t]) for t in base.token_ids]
    # A stop string made of the end of token 5 and the start of token 6 spans a boundary.
    i = next(i for i in range(3, 25) if len(pieces[i].strip()) >= 1 and len(pieces[i + 1].strip()) >= 1 and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[i][-1] + pieces[i + 1][0]
    prefix_text = "".join(pieces[:i]) + pieces[i][:-1]
    assert stop not in prefix_text + pieces[i][-1]  # the first occurrence completes at token i + 1
    for include in (True, False):
        out = engine.generate(
            [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, stop=(stop,), include_stop_str_in_output=include)
        )[0].completions[0]
        assert out.finish_reason == "stop" and out.stop_str == stop
        assert out.token_ids == base.token_ids[: i + 2]  # through the token that completed the stop string
        assert out.text == (prefix_text + stop if include else prefix_text)


def _eos_heavy_model(tiny_model, tiny_tokenizer):
    """Make EOS by far the most likely next token (tied embeddings: scale its row)."""
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight[tiny_tokenizer.eos_token_id] *= 40
    return tiny_model


def test_eos_ends_a_response_and_is_part_of_it(tiny_model, tiny_tokenizer):
    eng = NativeEngine(_eos_heavy_model(tiny_model, tiny_tokenizer), tiny_tokenizer)
    out = eng.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    eos = tiny_tokenizer.eos_token_id
    for r in out:
        c = r.completions[0]
        assert c.finish_reason == "eos" and c.token_ids[-1] == eos
        assert eos not in c.token_ids[:-1] and "<|endoftext|>" not in c.text


def test_min_tokens_suppresses_eos(tiny_model, tiny_tokenizer):
    eng = NativeEngine(_eos_heavy_model(tiny_model, tiny_tokenizer), tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    out = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=20, min_tokens=6, n=4, seed=0))
    for r in out:
        for c in r.completions:
            assert eos not in c.token_ids[:6] and len(c.token_ids) >= 7


def test_min_tokens_suppresses_stop_strings(engine):
    """A stop string that would match at once is ignored until min_tokens tokens exist."""
    eng = engine
    first = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].completions[0]
    stop = eng.tokenizer.decode(first.token_ids[:1])[-1]
    early = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, stop=(stop,), ignore_eos=True))
    assert len(early[0].completions[0].token_ids) == 1 and early[0].completions[0].finish_reason == "stop"
    out = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, min_tokens=5, stop=(stop,), ignore_eos=True))
    c = out[0].completions[0]
    assert len(c.token_ids) >= 5 and c.token_ids[:1] == first.token_ids[:1]


def test_length_finish_and_logprobs_match_the_policy(engine, tiny_model, tiny_tokenizer):
    out = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=15, seed=3, ignore_eos=True))
    prompts, responses, lps = [], [], []
    for r in out:
        c = r.completions[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 15 == len(c.logprobs)
        prompts.append(r.prompt_token_ids)
        responses.append(c.token_ids)
        lps.append(c.logprobs)
    from cs336_alignment.tokenization import pack_prompt_and_output_ids

    batch = pack_prompt_and_output_ids(prompts, responses, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        policy = get_response_log_probs(tiny_model, batch["input_ids"], batch["labels"])["log_probs"]
    for b in range(2):
        got = policy[b][batch["response_mask"][b]]
        torch.testing.assert_close(got, torch.tensor(lps[b]), rtol=1e-4, atol=1e-4)


def test_load_weights_makes_the_engine_follow_the_policy(engine, tiny_model, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer.encode(PROMPTS[1], add_special_tokens=False)])
    # Change the policy (embedding too: it is tied to the output layer).
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        want = tiny_model(ids).logits[0, -1]
    before, _ = engine._prefill(ids, torch.tensor([ids.shape[1]]))
    assert (before[0] - want).abs().max() > 1e-2  # the engine kept its own copy
    engine.load_weights(tiny_model)
    after, _ = engine._prefill(ids, torch.tensor([ids.shape[1]]))
    torch.testing.assert_close(after[0], want, rtol=1e-4, atol=1e-4)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_distribution_matches_softmax(engine, tiny_model, tiny_tokenizer):
    n = 3000
    prompt = PROMPTS[0]
    out = engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=1, n=n, seed=11))[0]
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out.completions]), minlength=len(tiny_tokenizer)).double()
    ids = torch.tensor([tiny_tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        p = torch.softmax(tiny_model(ids).logits[0, -1].double(), -1)
    expected = p * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    df = int(big.sum())
    assert df >= 10
    assert chi2 < _chi2_critical(df), f"chi2={chi2:.1f} df={df}"


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    u = stream_uniforms(stream_keys(0, torch.zeros(2000, dtype=torch.long), torch.arange(2000)), torch.zeros(2000, dtype=torch.long))
    tok, lp = sample_tokens(logits, u, temperature=1.0, top_k=2)
    assert set(tok.tolist()) == {0, 1}
    assert abs((tok == 0).double().mean().item() - 0.5 / 0.8) < 0.05
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[tok])  # raw model log-probs
    tok, _ = sample_tokens(logits, u, temperature=1.0, top_p=0.7)  # mass before token 2 is 0.8 >= 0.7
    assert set(tok.tolist()) == {0, 1}
    tok, _ = sample_tokens(logits, u, temperature=1.0, top_p=0.5)  # only the top token
    assert set(tok.tolist()) == {0}
    tok, _ = sample_tokens(logits, u, temperature=1.0, suppress=torch.ones(2000, dtype=torch.bool), suppress_ids=torch.tensor([0]))
    assert 0 not in set(tok.tolist())


def test_uniform_streams_are_uniform_and_independent():
    keys = stream_keys(123, torch.arange(500).repeat_interleave(8), torch.arange(8).repeat(500))
    assert keys.unique().numel() == 4000
    u = stream_uniforms(keys, torch.zeros(4000, dtype=torch.long))
    assert ((u > 0) & (u < 1)).all()
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert ((hist - 400).abs() < 100).all()
    u2 = stream_uniforms(keys, torch.ones(4000, dtype=torch.long))
    assert abs(torch.corrcoef(torch.stack([u, u2]))[0, 1].item()) < 0.1


def test_bad_requests_are_clear(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate(["ok", ""], SamplingParams())
    with pytest.raises(ValueError, match="exceeds the model's"):
        engine.generate(["ok"], SamplingParams(max_tokens=5000))
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    r1 = SamplingParams.r1_zero(n=8, seed=0)
    assert (r1.temperature, r1.top_p, r1.max_tokens, r1.min_tokens, r1.stop, r1.include_stop_str_in_output) == (
        1.0, 1.0, 1024, 0, ("</answer>",), True,  # the handout's evaluation: no min_tokens (rollouts set 4)
    )


def test_bf16_engine_copy_follows_the_fp32_policy(tiny_model, tiny_tokenizer):
    """CPU counterpart of the GPU set-up: a bf16 engine copy of an fp32 policy, refreshed by load_weights."""
    engine = NativeEngine(tiny_model, tiny_tokenizer, dtype=torch.bfloat16)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert next(tiny_model.parameters()).dtype == torch.float32  # the policy keeps fp32 master weights
    out = engine.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    ref = NativeEngine(tiny_model, tiny_tokenizer).generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for a, b in zip(out, ref):
        assert a.completions[0].token_ids[:2] == b.completions[0].token_ids[:2]  # large-margin first tokens agree
        assert all(isinstance(x, float) for x in a.completions[0].logprobs)
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight.mul_(1.5)
    engine.load_weights(tiny_model)
    torch.testing.assert_close(
        engine.model.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight.to(torch.bfloat16)
    )
    assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()  # still tied
