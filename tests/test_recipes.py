"""SFT and GRPO recipes on CPU with the tiny model and the built-in arithmetic task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cs336_alignment.config import ConfigError, load_config
from cs336_alignment.recipes.grpo import GRPOConfig, train_grpo
from cs336_alignment.recipes.sft import SFTConfig, train_sft
from cs336_alignment.run_dir import read_jsonl

ARITH = {"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 1000, "n_task_val": 60}


def _sft_config(out: Path, **kw) -> SFTConfig:
    base = dict(
        model="tiny", out=str(out), device="cpu", data=ARITH, epochs=1, learning_rate=3e-3, batch_size=32,
        micro_batch_size=16, n_eval_examples=60, eval_max_tokens=40,
    )
    return load_config(SFTConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """A short SFT warm-up (2 epochs of 1-digit addition): partly right, so RL has room."""
    out = tmp_path_factory.mktemp("sft-warmup")
    train_sft(_sft_config(out, epochs=2, n_eval_examples=20))
    return out / "model"


def test_sft_lowers_loss_and_raises_accuracy(tmp_path, tiny_model, tiny_tokenizer):
    from cs336_alignment import get_response_log_probs, tokenize_prompt_and_output
    from cs336_alignment.data import format_prompt, load_template, make_task
    from cs336_alignment.evaluate import evaluate
    from cs336_alignment.generation import NativeEngine, SamplingParams

    fixed = make_task("arithmetic", digits=1).generate(40, seed=99)
    template = load_template("r1_zero")
    prompts = [format_prompt(template, ex) for ex in fixed]
    batch = tokenize_prompt_and_output(prompts, [ex.response for ex in fixed], tiny_tokenizer)

    def nll(model) -> float:
        with torch.no_grad():
            lp = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        return -(lp * batch["response_mask"]).sum().item() / batch["response_mask"].sum().item()

    def accuracy(model) -> float:
        engine = NativeEngine(model, tiny_tokenizer)
        sampling = SamplingParams.r1_zero(max_tokens=40, seed=0, temperature=0)
        metrics, _ = evaluate(engine, make_task("arithmetic").reward_fn, prompts, sampling,
                              [ex.ground_truth for ex in fixed], progress=False)
        return metrics["accuracy"]

    before_nll, before_acc = nll(tiny_model), accuracy(tiny_model)
    final = train_sft(_sft_config(tmp_path / "sft", epochs=2))
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    after_nll, after_acc = nll(trained), accuracy(trained)
    assert after_nll < 0.5 * before_nll, (before_nll, after_nll)
    assert before_acc == 0.0 and after_acc >= 0.1, (before_acc, after_acc)
    assert final["format_accuracy"] > 0.8
    records = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    data = next(r for r in records if r["kind"] == "data")
    assert len(train) == 2 * -(-data["n_examples"] // 32)
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(k in train[0] for k in ("grad_norm", "lr", "token_entropy", "tokens_per_second"))
    assert (tmp_path / "sft" / "config.yaml").exists() and (tmp_path / "sft" / "model" / "tokenizer.json").exists()


def test_sft_filter_and_n_examples(tmp_path):
    train_sft(_sft_config(tmp_path / "s", n_examples=64, filter_correct=True, batch_size=32, micro_batch_size=32))
    data = next(r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "data")
    assert data["n_examples"] == 64  # reference traces are all correct, so filtering keeps them


def _grpo_config(out: Path, model: Path, **kw) -> GRPOConfig:
    base = dict(
        model=str(model), out=str(out), device="cpu",
        # A fixed pool of 16 questions, all in every rollout batch: the reward is measured on
        # the same questions each step, so improvement is visible over a few dozen steps.
        data={**ARITH, "n_task_train": 16, "n_task_val": 16},
        n_grpo_steps=16, learning_rate=1e-3, rollout_batch_size=128, group_size=8, train_batch_size=128,
        gradient_accumulation_steps=4, sampling_max_tokens=40, n_eval_examples=16, eval_every=0,
        final_eval_full=False,
    )
    return load_config(GRPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def _train_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def _reward_rises(records: list[dict], k: int = 4) -> tuple[float, float]:
    per_step = {}
    for r in records:
        per_step[r["grpo_step"]] = r["train_reward_mean"]
    rewards = [per_step[s] for s in sorted(per_step)]
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


@pytest.mark.parametrize("loss_type", ["reinforce_with_baseline", "no_baseline"])
def test_grpo_on_policy_raises_training_reward(tmp_path, sft_model, loss_type):
    train_grpo(_grpo_config(tmp_path / loss_type, sft_model, loss_type=loss_type))
    records = _train_records(tmp_path / loss_type)
    first, last = _reward_rises(records)
    assert last > first + 0.15, (first, last)
    r = records[0]
    for key in ("loss", "grad_norm", "token_entropy", "lr", "train_reward_mean", "train_format_reward_mean",
                "train_answer_reward_mean", "train_response_length_mean", "train_truncated_fraction",
                "frac_groups_all_equal", "generator_policy_logprob_gap_mean", "generator_policy_logprob_gap_max",
                "rollout_seconds", "rollout_tokens_per_second", "train_seconds", "train_tokens_per_second",
                "wall_clock_train"):
        assert key in r, key
    assert r["generator_policy_logprob_gap_max"] < 1e-3  # fp32 engine on CPU samples from the policy exactly
    assert len(records) == 16  # one optimizer step per rollout batch (on-policy)


@pytest.mark.parametrize("loss_type", ["grpo_clip", "grpo_no_clip"])
def test_grpo_off_policy_two_epochs_raises_training_reward(tmp_path, sft_model, loss_type):
    train_grpo(_grpo_config(tmp_path / loss_type, sft_model, loss_type=loss_type, epochs_per_rollout_batch=2,
                            n_grpo_steps=12))
    records = _train_records(tmp_path / loss_type)
    assert len(records) == 24  # two optimizer steps (epochs) per rollout batch
    first, last = _reward_rises(records)
    assert last > first + 0.15, (first, last)
    epoch0 = [r for r in records if r["epoch"] == 0]
    epoch1 = [r for r in records if r["epoch"] == 1]
    assert all(abs(r["ratio_mean"] - 1) < 1e-6 for r in epoch0)  # old log-probs = the sampling policy
    assert any(abs(r["ratio_mean"] - 1) > 1e-4 for r in epoch1)
    if loss_type == "grpo_clip":
        assert all(r["clip_fraction"] == 0 for r in epoch0)
        assert any(r["clip_fraction"] > 0 for r in epoch1)
    else:
        assert "clip_fraction" not in epoch1[0]


def test_grpo_clip_and_no_clip_differ_and_on_policy_ratio_is_one(tmp_path, sft_model):
    outs = {}
    for loss_type in ("grpo_clip", "grpo_no_clip"):
        train_grpo(_grpo_config(tmp_path / loss_type, sft_model, loss_type=loss_type, epochs_per_rollout_batch=2,
                                n_grpo_steps=3, cliprange=0.05))
        outs[loss_type] = _train_records(tmp_path / loss_type)
    # same seed, same first rollouts: the first epoch's update is identical ...
    assert outs["grpo_clip"][0]["loss"] == pytest.approx(outs["grpo_no_clip"][0]["loss"], abs=1e-6)
    # ... the second epoch's is not (ratios leave the clip range)
    assert outs["grpo_clip"][1]["loss"] != pytest.approx(outs["grpo_no_clip"][1]["loss"], abs=1e-6)
    train_grpo(_grpo_config(tmp_path / "on", sft_model, loss_type="grpo_clip", n_grpo_steps=2))
    for r in _train_records(tmp_path / "on"):
        assert abs(r["ratio_mean"] - 1) < 1e-6 and r["clip_fraction"] == 0


@pytest.mark.parametrize("generator_device", ["same", "cpu"])
def test_both_layouts_sync_weights(tmp_path, sft_model, generator_device, monkeypatch):
    from transformers import AutoModelForCausalLM

    import cs336_alignment.recipes.grpo as grpo
    from cs336_alignment.logprobs import get_response_log_probs

    loaded, real = [], grpo.load_policy_and_generator
    monkeypatch.setattr(grpo, "load_policy_and_generator", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    fixed = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])  # any token sequence: (1, 8)

    def log_probs(model):  # (7,) log p of each next token of the fixed sequence
        with torch.no_grad():
            return get_response_log_probs(model, fixed[:, :-1], fixed[:, 1:])["log_probs"][0]

    def generator_log_probs():
        policy, _, _, generator = loaded[0]
        assert generator.model is not policy  # the generator holds its own copy of the weights
        return log_probs(generator.model)

    real_steps, before = grpo.RunLoop.steps, []

    def steps_spy(self, *a, **kw):  # the generator before any update
        before.append(generator_log_probs())
        yield from real_steps(self, *a, **kw)

    monkeypatch.setattr(grpo.RunLoop, "steps", steps_spy)
    out = tmp_path / generator_device
    train_grpo(_grpo_config(out, sft_model, n_grpo_steps=2, generator_device=generator_device))
    after, policy_after = generator_log_probs(), log_probs(loaded[0][0])
    assert torch.allclose(after, policy_after, atol=1e-5)  # synced: the generator scores as the trained policy
    assert not torch.allclose(after, before[0], atol=1e-4)  # and the training moved it
    log = (out / "log.txt").read_text()
    assert ("colocated" if generator_device == "same" else "separate") in log
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(sft_model)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


def test_grpo_config_checks_fail_at_start_with_clear_messages():
    with pytest.raises(ConfigError, match=r"train_batch_size \(256\) must be divisible by gradient_accumulation_steps \(100\)"):
        load_config(GRPOConfig, None, ["gradient_accumulation_steps=100"])
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(250\) must be divisible by group_size \(8\)"):
        load_config(GRPOConfig, None, ["rollout_batch_size=250", "train_batch_size=250", "gradient_accumulation_steps=125"])
    with pytest.raises(ConfigError, match=r"train_batch_size \(4\) must be >= group_size \(8\)"):
        load_config(GRPOConfig, None, ["train_batch_size=4", "gradient_accumulation_steps=2"])
    cfg = load_config(GRPOConfig)
    assert (cfg.n_grpo_steps, cfg.learning_rate, cfg.rollout_batch_size, cfg.group_size, cfg.train_batch_size,
            cfg.gradient_accumulation_steps, cfg.micro_train_batch_size, cfg.cliprange, cfg.betas) == (
        200, 1e-5, 256, 8, 256, 128, 2, 0.2, (0.9, 0.95))
    assert not cfg.off_policy
    sized = load_config(GRPOConfig, None, ["micro_batch_size=8"])  # the memory knob; accumulation derived
    assert sized.gradient_accumulation_steps == 32 and sized.micro_train_batch_size == 8
    with pytest.raises(ConfigError, match=r"micro_batch_size \(7\) must divide train_batch_size \(256\)"):
        load_config(GRPOConfig, None, ["micro_batch_size=7"])
    with pytest.raises(ConfigError, match="implies gradient_accumulation_steps=64, but gradient_accumulation_steps=8"):
        load_config(GRPOConfig, None, ["micro_batch_size=4", "gradient_accumulation_steps=8"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be >= 1, got 0"):
        load_config(GRPOConfig, None, ["gradient_accumulation_steps=0"])
    assert load_config(GRPOConfig, None, ["train_batch_size=128", "gradient_accumulation_steps=64"]).off_policy


def test_on_policy_gradient_equals_explicit_formula(tiny_model, tiny_tokenizer):
    """Micro-batched reinforce_with_baseline through pack_rollouts = (1/N) sum_i -A_i grad mean_t log pi."""
    from cs336_alignment import get_response_log_probs, grpo_microbatch_train_step
    from cs336_alignment.rollouts import Rollout, pack_rollouts

    enc = lambda s: tiny_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    def rollout(group, question, response, advantage):
        r_ids = enc(response)
        return Rollout(group, question, enc(question), response, r_ids, "x", "stop", [0.0] * len(r_ids), advantage=advantage)

    rollouts = [
        rollout(0, "What is 1 + 1?", " 2 </answer>", 0.8),
        rollout(0, "What is 1 + 1?", " 3", -0.8),
        rollout(1, "Hi", " hello there", 1.5),
        rollout(1, "Hi", " bye", -0.3),
    ]
    tiny_model.zero_grad(set_to_none=True)
    for i in (0, 2):
        mb = pack_rollouts(rollouts[i : i + 2], tiny_tokenizer.pad_token_id)
        lp = get_response_log_probs(tiny_model, mb.input_ids, mb.labels)["log_probs"]
        grpo_microbatch_train_step(lp, mb.response_mask, 2, "reinforce_with_baseline", advantages=mb.advantages)
    got = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    tiny_model.zero_grad(set_to_none=True)
    objective = 0.0
    for r in rollouts:
        ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
        lp = torch.log_softmax(tiny_model(ids).logits[0, :-1], -1)
        targets = ids[0, 1:]
        resp = lp[len(r.prompt_token_ids) - 1 :].gather(-1, targets[len(r.prompt_token_ids) - 1 :, None])
        objective = objective - r.advantage * resp.mean() / len(rollouts)
    objective.backward()
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_wandb_sink_uses_train_and_eval_step_axes(tmp_path, monkeypatch):
    """With wandb enabled, train/* go on the train_step axis and eval/* on eval_step (fake wandb module)."""
    import sys
    import types

    calls: dict[str, list] = {"init": [], "define_metric": [], "log": [], "finish": []}

    class FakeRun:
        def define_metric(self, name, step_metric=None):
            calls["define_metric"].append((name, step_metric))

        def log(self, data):
            calls["log"].append(data)

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from cs336_alignment.run_dir import MetricsSink, RunDir

    sink = MetricsSink(RunDir(tmp_path / "w", console=False), "proj", "run1", _grpo_config(tmp_path / "w", Path("m")))
    sink.log("train", 3, {"loss": 0.5, "split": "x", "flag": True})
    sink.log("eval", 10, {"accuracy": 0.25})
    sink.close()
    assert calls["init"][0]["project"] == "proj" and calls["init"][0]["config"]["learning_rate"] == 1e-3
    assert ("train/*", "train_step") in calls["define_metric"] and ("eval/*", "eval_step") in calls["define_metric"]
    assert calls["log"] == [{"train_step": 3, "train/loss": 0.5}, {"eval_step": 10, "eval/accuracy": 0.25}]
    assert calls["finish"] == [True]
    lines = read_jsonl(tmp_path / "w" / "metrics.jsonl")
    assert lines[0]["kind"] == "train" and lines[0]["train_step"] == 3 and lines[1]["eval_step"] == 10
