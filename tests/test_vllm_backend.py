"""The vLLM backend's contract, tested against fake vllm modules (tests/fake_vllm).

What these tests cover: the sampling mapping, the calls the backend makes to vLLM (engine
arguments, device placement, the course's patches, seeding), weight loading on the V0
(0.7.2) and V1 layouts including tied embeddings and bf16, and the mapping of vLLM's
outputs to our completion records. What they cannot cover: vLLM itself on a GPU; that is
``test_real_vllm_generates_and_reloads``, which runs only where vllm imports and CUDA exists.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import fake_vllm
import pytest
import torch

from cs336_alignment.generation import SamplingParams
from cs336_alignment.generation.vllm_backend import (
    EXTENSION_CLS,
    BackendUnavailable,
    VLLMGenerator,
    from_vllm_sampling,
    load_vllm_generator,
    to_vllm_sampling_kwargs,
)
from cs336_alignment.vllm_compat import evaluate_vllm, init_vllm, load_policy_into_vllm_instance


@pytest.fixture()
def fake_v0(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return fake_vllm.install(monkeypatch, "v0")


@pytest.fixture()
def fake_v1(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return fake_vllm.install(monkeypatch, "v1")


def _perturbed(model, seed=1):
    """The policy after a 'training step': every parameter changed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _assert_engine_matches(engine_model, policy):
    engine = dict(engine_model.inner.named_parameters(remove_duplicate=False))
    for name, p in policy.named_parameters(remove_duplicate=False):
        assert engine[name].dtype == torch.bfloat16
        assert torch.equal(engine[name], p.detach().to(torch.bfloat16)), name


# --------------------------------------------------------------------------- pure mapping


def test_sampling_kwargs_for_the_handout_settings():
    kw = to_vllm_sampling_kwargs(SamplingParams.r1_zero(n=8, seed=3, min_tokens=4))  # a GRPO rollout
    assert kw == dict(
        n=8, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=1024, min_tokens=4, stop=["</answer>"],
        include_stop_str_in_output=True, ignore_eos=False, seed=3, logprobs=1,
    )
    kw = to_vllm_sampling_kwargs(SamplingParams(temperature=0.0, top_k=5, stop=("a", "b"), ignore_eos=True))
    assert (kw["temperature"], kw["top_k"], kw["stop"], kw["ignore_eos"], kw["seed"]) == (0.0, 5, ["a", "b"], True, None)


@pytest.mark.parametrize("layout", ["v0", "v1"])
def test_sampling_kwargs_are_accepted_by_both_layouts(monkeypatch, layout):
    vllm = fake_vllm.make_fake_vllm(layout)[0]["vllm"]
    params = vllm.SamplingParams(**to_vllm_sampling_kwargs(SamplingParams(top_k=0)))
    assert params.top_k == -1  # 0 would be rejected by 0.7.2


def test_vllm_sampling_params_convert_back():
    vllm = fake_vllm.make_fake_vllm("v0")[0]["vllm"]
    theirs = vllm.SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, min_tokens=2, stop="</answer>",
                                 include_stop_str_in_output=True, n=3, seed=5)
    ours = from_vllm_sampling(theirs)
    assert ours == SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_tokens=64, min_tokens=2,
                                  stop=("</answer>",), include_stop_str_in_output=True, n=3, seed=5)
    assert from_vllm_sampling(ours) is ours
    with pytest.raises(ValueError, match="max_tokens"):
        from_vllm_sampling(vllm.SamplingParams(max_tokens=None))


# --------------------------------------------------------------------------- availability


def test_missing_vllm_is_a_one_line_actionable_error(monkeypatch, tiny_model_dir):
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(BackendUnavailable) as err:
        load_vllm_generator(str(tiny_model_dir))
    msg = str(err.value)
    assert "\n" not in msg and "not installed" in msg and "pip install" in msg and "backend: native" in msg


def test_too_old_vllm_is_refused(monkeypatch, tiny_model_dir):
    fake_vllm.install(monkeypatch, "v0", version="0.6.3.post1")
    with pytest.raises(BackendUnavailable, match=r"0\.6\.3.*vllm>=0\.7\.2"):
        init_vllm(str(tiny_model_dir), "cuda:1", seed=0)


def test_backend_module_does_not_import_vllm():
    import subprocess

    code = "import cs336_alignment.generation.vllm_backend, cs336_alignment.vllm_compat, sys; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# --------------------------------------------------------------------------- V0 (vLLM 0.7.2 layout)


def test_init_vllm_v0_places_engine_with_course_patches(fake_v0, tiny_model_dir):
    get_world_size = torch.distributed.get_world_size
    llm = init_vllm(str(tiny_model_dir), "cuda:1", seed=7, gpu_memory_utilization=0.5)
    assert fake_v0.llm_kwargs == dict(
        model=str(tiny_model_dir), device="cuda:1", dtype=torch.bfloat16, enable_prefix_caching=True,
        gpu_memory_utilization=0.5, seed=7,
    )
    assert fake_v0.events[0] == ("seed", 7) and fake_v0.events[1][0] == "LLM"  # seeded before the engine
    assert fake_v0.world_size_at_init == 1 and fake_v0.profiling_assert_patched_at_init
    # patches are undone once the engine exists
    assert fake_v0.worker_cls.__dict__["_assert_memory_footprint_increased_during_profiling"] is fake_v0.original_assert
    assert torch.distributed.get_world_size is get_world_size
    assert type(llm).__name__ == "LLM"


def test_v0_weight_loading_tied_embeddings_in_bf16(fake_v0, tiny_model_dir, tiny_model):
    llm = init_vllm(str(tiny_model_dir), "cuda:1", seed=0)
    policy = _perturbed(tiny_model)
    load_policy_into_vllm_instance(policy, llm)
    names = [n for n, _ in fake_v0.loaded]
    assert "lm_head.weight" not in names  # tied: the embedding carries it
    assert sorted(names) == sorted(k for k in policy.state_dict() if k != "lm_head.weight")
    assert {d for _, d in fake_v0.loaded} == {torch.bfloat16}
    _assert_engine_matches(fake_v0.model, policy)
    assert fake_v0.events[-1] == "reset_prefix_cache"  # cached prompt KV came from the old weights


def test_v0_weight_loading_untied_sends_lm_head(fake_v0, tmp_path, tiny_tokenizer):
    from cs336_alignment.tiny import build_tiny_model, tiny_qwen2_config

    config = tiny_qwen2_config(len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    config.tie_word_embeddings = False
    policy = build_tiny_model(config=config)
    policy.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    llm = init_vllm(str(tmp_path), "cuda:1", seed=0)
    policy = _perturbed(policy, seed=2)
    assert not torch.equal(policy.lm_head.weight, policy.model.embed_tokens.weight)
    load_policy_into_vllm_instance(policy, llm)
    assert "lm_head.weight" in [n for n, _ in fake_v0.loaded]
    _assert_engine_matches(fake_v0.model, policy)


def test_compiled_policy_names_lose_their_prefix(fake_v0, tiny_model_dir, tiny_model):
    class Wrapped(torch.nn.Module):  # what torch.compile / DDP produce: _orig_mod. / module. prefixes
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
            self.config = inner.config

    llm = init_vllm(str(tiny_model_dir), "cuda:1", seed=0)
    policy = _perturbed(tiny_model, seed=3)
    load_policy_into_vllm_instance(Wrapped(policy), llm)
    _assert_engine_matches(fake_v0.model, policy)


def _scripted(prompt_ids, params, i):
    """Sample 0 ends at the stop string, 1 at EOS (id 0 in the tiny vocabulary), 2 at max_tokens."""
    lp = lambda toks: [{t: fake_vllm.Logprob(-0.5 - k), 99: fake_vllm.Logprob(-7.0)} for k, t in enumerate(toks)]  # noqa: E731
    if i == 0:
        return fake_vllm.CompletionOutput(0, "x</answer>", [5, 6], None, lp([5, 6]), "stop", "</answer>")
    if i == 1:
        return fake_vllm.CompletionOutput(1, "y", [7, 0], None, lp([7, 0]), "stop", None)
    return fake_vllm.CompletionOutput(2, "zzz", [8, 8, 8], None, lp([8, 8, 8]), "length", None)


def test_v0_generate_passes_token_ids_and_maps_outputs(fake_v0, tiny_model_dir, tiny_tokenizer):
    fake_v0.script = _scripted
    gen = load_vllm_generator(str(tiny_model_dir), device="cuda:1", tokenizer=tiny_tokenizer)
    sampling = SamplingParams.r1_zero(n=3, seed=11, max_tokens=3, min_tokens=1)
    results = gen.generate(["What is 2+2?", [4, 5, 6]], sampling, progress=False)

    call = fake_v0.generate_calls[-1]
    assert call["prompts"] == [
        {"prompt_token_ids": tiny_tokenizer.encode("What is 2+2?", add_special_tokens=False)},
        {"prompt_token_ids": [4, 5, 6]},
    ]
    assert {k: getattr(call["params"], k) for k in to_vllm_sampling_kwargs(sampling)} == to_vllm_sampling_kwargs(sampling)
    assert call["use_tqdm"] is False

    assert [r.prompt for r in results] == ["What is 2+2?", None]
    assert results[1].prompt_token_ids == [4, 5, 6]
    stop, eos, length = results[0].completions
    assert (stop.finish_reason, stop.stop_str, stop.text, stop.token_ids) == ("stop", "</answer>", "x</answer>", [5, 6])
    assert (eos.finish_reason, eos.stop_str, eos.token_ids) == ("eos", None, [7, 0])  # EOS stays in the ids
    assert (length.finish_reason, length.num_tokens) == ("length", 3)
    assert stop.logprobs == [-0.5, -1.5] and length.logprobs == [-0.5, -1.5, -2.5]  # the sampled tokens' values


def test_generator_load_weights_and_empty_prompts(fake_v0, tiny_model_dir, tiny_model):
    gen = load_vllm_generator(str(tiny_model_dir), device="cuda:1")
    assert gen.generate([], SamplingParams()) == [] and fake_v0.generate_calls == []
    gen.load_weights(_perturbed(tiny_model, seed=4))
    _assert_engine_matches(fake_v0.model, tiny_model)
    assert gen.tokenizer.encode("2+2", add_special_tokens=False)  # the engine's tokenizer by default


# --------------------------------------------------------------------------- V1 (current API)


def test_init_vllm_v1_registers_worker_extension_in_process(fake_v1, tiny_model_dir):
    init_vllm(str(tiny_model_dir), "cuda", seed=5)
    assert fake_v1.llm_kwargs == dict(
        model=str(tiny_model_dir), dtype=torch.bfloat16, enable_prefix_caching=True, gpu_memory_utilization=0.85,
        seed=5, worker_extension_cls=EXTENSION_CLS,
    )
    assert fake_v1.multiprocessing_env_at_init == "0"
    assert fake_v1.events[0] == ("seed", 5)
    assert fake_v1.world_size_at_init == "error"  # no V0 worker, so no patches


def test_init_vllm_v1_respects_users_multiprocessing_choice(fake_v1, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    init_vllm(str(tiny_model_dir), "cuda:0", seed=0)
    assert fake_v1.multiprocessing_env_at_init == "1"


def test_v1_cannot_be_placed_on_another_gpu_in_process(fake_v1, tiny_model_dir):
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        init_vllm(str(tiny_model_dir), "cuda:1", seed=0)
    assert fake_v1.llm_kwargs is None


def test_under_torchrun_every_rank_builds_its_own_engine_in_vllms_launcher_mode(fake_v1, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; rank 1 asks for its own GPU
    load_vllm_generator(str(tiny_model_dir), device="cuda:1", seed=3)
    kwargs = fake_v1.llm_kwargs
    assert kwargs["distributed_executor_backend"] == "external_launcher" and kwargs["data_parallel_size"] == 2
    assert kwargs["worker_extension_cls"] == EXTENSION_CLS and kwargs["seed"] == 3  # weights still sync by collective_rpc
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):  # one process: the in-process placement rules again
        load_vllm_generator(str(tiny_model_dir), device="cuda:1", seed=3)


def test_a_vllm_without_the_launcher_mode_is_refused_under_torchrun(fake_v0, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BackendUnavailable, match=r"^vllm 0\.7\.2 has no torchrun \(external_launcher\) data-parallel mode "
                                                 r"for 2 processes \(vllm >= 0\.10\): upgrade vllm, or use backend: native$"):
        load_vllm_generator(str(tiny_model_dir), device="cuda:0", seed=0)
    assert fake_v0.llm_kwargs is None


def test_a_vllm_older_than_its_launcher_data_parallel_mode_is_refused_under_torchrun(tiny_model_dir, monkeypatch):
    fake = fake_vllm.install(monkeypatch, "v1", version="0.9.2")  # has the fields, not yet the mode
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BackendUnavailable, match=r"^vllm 0\.9\.2 has no torchrun"):
        load_vllm_generator(str(tiny_model_dir), device="cuda:0", seed=0)
    assert fake.llm_kwargs is None


def test_v1_weight_loading_through_collective_rpc(fake_v1, tiny_model_dir, tiny_model):
    llm = init_vllm(str(tiny_model_dir), "cuda", seed=0)
    policy = _perturbed(tiny_model, seed=5)
    load_policy_into_vllm_instance(policy, llm)
    rpcs = [e for e in fake_v1.events if isinstance(e, tuple) and e[0] == "rpc"]
    assert [e[1] for e in rpcs] == ["cs336_load_weights"]  # the tiny model fits one 1 GiB chunk
    assert "lm_head.weight" not in [n for n, _ in fake_v1.loaded]
    assert {d for _, d in fake_v1.loaded} == {torch.bfloat16}
    _assert_engine_matches(fake_v1.model, policy)
    assert fake_v1.events[-1] == "reset_prefix_cache"


def test_v1_weights_go_in_chunks(fake_v1, tiny_model_dir, tiny_model):
    gen = VLLMGenerator(init_vllm(str(tiny_model_dir), "cuda", seed=0), chunk_bytes=16 * 1024)
    policy = _perturbed(tiny_model, seed=6)
    gen.load_weights(policy)
    rpcs = [e for e in fake_v1.events if isinstance(e, tuple) and e[0] == "rpc"]
    assert len(rpcs) > 1 and sum(e[2] for e in rpcs) == len(policy.state_dict()) - 1
    _assert_engine_matches(fake_v1.model, policy)


def test_v1_without_extension_gives_actionable_error(fake_v1, tiny_model_dir, tiny_model):
    import vllm  # the fake

    llm = vllm.LLM(model=str(tiny_model_dir))  # built by hand, without worker_extension_cls
    with pytest.raises(BackendUnavailable, match="worker_extension_cls"):
        load_policy_into_vllm_instance(tiny_model, llm)


def test_evaluate_vllm_with_vllm_sampling_params(fake_v1, tiny_model_dir, tmp_path):
    import vllm  # the fake

    fake_v1.script = _scripted
    llm = init_vllm(str(tiny_model_dir), "cuda", seed=0)
    params = vllm.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=3, min_tokens=1, stop=["</answer>"],
                                 include_stop_str_in_output=True, n=3)

    def reward_fn(response, truth):
        ok = float(response == truth)
        return {"format_reward": ok, "answer_reward": ok, "reward": ok}

    metrics, records = evaluate_vllm(llm, reward_fn, ["q1", "q2"], params, ground_truths=["x</answer>", "y"],
                                     out_dir=tmp_path, progress=False)
    assert len(records) == 6 and metrics["n_completions"] == 6
    assert metrics["n_answer_correct"] == 2  # sample 0 of q1, sample 1 of q2
    assert metrics["truncated_fraction"] == pytest.approx(2 / 6)
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x)["finish_reason"] for x in lines[:3]] == ["stop", "eos", "length"]
    assert json.loads((tmp_path / "metrics.json").read_text())["sampling"]["n"] == 3
    with pytest.raises(ValueError, match="ground_truths"):
        evaluate_vllm(llm, reward_fn, ["q1"], params)


# --------------------------------------------------------------------------- the real package


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (the fakes above test the contract)")
def test_real_vllm_generates_and_reloads(tiny_model_dir, tiny_model, tiny_tokenizer):
    gen = load_vllm_generator(str(tiny_model_dir), device="cuda", seed=0, gpu_memory_utilization=0.3,
                              tokenizer=tiny_tokenizer, enforce_eager=True)
    sampling = SamplingParams.r1_zero(n=2, seed=0, max_tokens=16, min_tokens=0)
    results = gen.generate(["1+1=", "2+3="], sampling)
    assert [len(r.completions) for r in results] == [2, 2]
    for c in (c for r in results for c in r.completions):
        assert c.finish_reason in ("stop", "eos", "length") and 1 <= c.num_tokens <= 16
        assert len(c.logprobs) == c.num_tokens and all(lp <= 0 for lp in c.logprobs)
    gen.load_weights(_perturbed(tiny_model.to("cuda"), seed=7))
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    assert gen.generate([[1, 2, 3]], greedy)[0].completions[0].num_tokens >= 1
