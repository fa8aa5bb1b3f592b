"""The handout's evaluation protocol in every recipe (issue 18, points 3, 4, 5 and 7): curves start
at step 0, SFT's final number is on the full validation set, evaluation samples without
min_tokens (rollouts keep the handout's 4), and validation data is never silently substituted."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import pytest
import torch

from cs336_alignment.config import ConfigError, load_config
from cs336_alignment.generation import NativeEngine, SamplingParams
from cs336_alignment.recipes import ei, grpo, sft
from cs336_alignment.recipes.common import DataConfig, load_data
from cs336_alignment.recipes.eval import EvalConfig
from cs336_alignment.run_dir import read_jsonl

TASK = {"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 16, "n_task_val": 6}
SFT_JSONL = Path(__file__).parent / "fixtures" / "data" / "sft.jsonl"


def _cfg(cls, out: Path, **fields):
    return load_config(cls, None, [f"{k}={json.dumps(v)}" for k, v in {"model": "tiny", "out": str(out), "device": "cpu",
                                                                          **fields}.items()])


@pytest.fixture()
def sampling_calls(monkeypatch) -> list[SamplingParams]:
    """Every SamplingParams the native engine is asked to generate with."""
    calls, real = [], NativeEngine.generate

    def spy(self, prompts, sampling, *args, **kwargs):
        calls.append(sampling)
        return real(self, prompts, sampling, *args, **kwargs)

    monkeypatch.setattr(NativeEngine, "generate", spy)
    return calls


def test_the_handouts_evaluation_sampling_has_no_min_tokens():
    handout = SamplingParams.r1_zero()
    assert (handout.temperature, handout.top_p, handout.max_tokens, handout.min_tokens) == (1.0, 1.0, 1024, 0)
    assert handout.stop == ("</answer>",) and handout.include_stop_str_in_output
    assert EvalConfig().sampling().min_tokens == 0


def test_grpo_validates_from_step_0_without_min_tokens_and_rolls_out_with_4(tmp_path, sampling_calls):
    cfg = _cfg(grpo.GRPOConfig, tmp_path / "g", data=TASK, n_grpo_steps=1, rollout_batch_size=4, group_size=2,
               train_batch_size=4, micro_batch_size=2, sampling_max_tokens=6, n_eval_examples=3, eval_at_start=True,
               control={"progress": False})
    grpo.train_grpo(cfg)
    rollouts = [s for s in sampling_calls if s.n == 2]
    evaluations = [s for s in sampling_calls if s.n == 1]
    assert [s.min_tokens for s in rollouts] == [4] and [s.min_tokens for s in evaluations] == [0, 0]
    evals = [r for r in read_jsonl(tmp_path / "g" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [(r["eval_step"], r["split"], r["n_examples"]) for r in evals] == [(0, "subset", 3), (1, "full", 6)]


def test_sft_and_ei_validate_the_starting_policy_and_sft_ends_on_the_full_set(tmp_path, sampling_calls, monkeypatch):
    import cs336_alignment.recipes.common as common

    generators, real = [], common.load_generator
    monkeypatch.setattr(common, "load_generator", lambda backend, *a, **kw: generators.append((backend, kw["device"]))
                        or real(backend, *a, **kw))
    sft.train_sft(_cfg(sft.SFTConfig, tmp_path / "s", data={"train": str(SFT_JSONL), "val": str(SFT_JSONL)},
                       max_steps=1, batch_size=4, micro_batch_size=4, n_eval_examples=2, eval_max_tokens=4,
                       eval_at_start=True, generator_device="cpu", control={"progress": False}))
    assert [(b, str(d)) for b, d in generators] == [("native", "cpu")]  # SFT validates through the configured generator
    evals = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "eval"]
    n_val = sum(1 for line in SFT_JSONL.read_text().splitlines() if line.strip())
    assert [(r["eval_step"], r["split"], r["n_examples"]) for r in evals] == [(0, "subset", 2), (1, "full", n_val)]
    assert {s.min_tokens for s in sampling_calls} == {0}  # SFT only evaluates
    ei.train_ei(_cfg(ei.EIConfig, tmp_path / "e", data=TASK, n_ei_steps=1, batch_questions=2, rollouts_per_question=2,
                     sampling_max_tokens=6, batch_size=2, micro_batch_size=2, n_eval_examples=2, eval_at_start=True,
                     final_eval_full=False, log_entropy=False, control={"progress": False}))
    evals = [r for r in read_jsonl(tmp_path / "e" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["eval_step"] for r in evals] == [0, 1]


def test_missing_validation_data_is_refused_unless_train_is_asked_for():
    with pytest.raises(ConfigError, match=r"field 'data.val': empty; .* or write data.val=train"):
        load_data(DataConfig(train=str(SFT_JSONL)), seed=0)
    data = load_data(DataConfig(train=str(SFT_JSONL), val="train"), seed=0)
    assert data.val == data.train and data.val
    assert load_data(DataConfig(**{**TASK, "task_knobs": {"digits": 1}}), seed=0).val  # a task's own split


def test_every_recipe_draws_its_validation_subset_independently_of_file_order(tmp_path):
    for module in (sft, ei, grpo):  # the one shared, seeded, order-free draw
        assert "validation_subset(data.val, cfg.n_eval_examples, cfg.eval_seed)" in inspect.getsource(module)
    lines = [line for line in SFT_JSONL.read_text().splitlines() if line.strip()]
    shuffled = tmp_path / "shuffled.jsonl"
    random.Random(0).shuffle(lines)
    shuffled.write_text("\n".join(lines) + "\n")
    prompts = []
    for name, val in (("a", SFT_JSONL), ("b", shuffled)):
        sft.train_sft(_cfg(sft.SFTConfig, tmp_path / name, data={"train": str(SFT_JSONL), "val": str(val)}, max_steps=1,
                           batch_size=4, micro_batch_size=4, n_eval_examples=3, eval_max_tokens=2, eval_at_start=True,
                           final_eval_full=False, control={"progress": False}))
        (step0,) = (tmp_path / name / "eval").glob("subset_step00000")
        prompts.append(sorted(json.loads(line)["prompt"] for line in (step0 / "generations.jsonl").read_text().splitlines()))
    assert prompts[0] == prompts[1] and len(prompts[0]) == 3


def _slow_validation_run(out: Path, budget_clock: str, total: int = 8) -> list[int]:
    """Steps that take no time, validations that take 0.15 s each: what each budget clock counts."""
    import time

    import torch
    from test_recipe_parts import LoopConfig

    from cs336_alignment.checkpoint import RunControl
    from cs336_alignment.recipes.loop import RunLoop

    validated = []
    cfg = LoopConfig(out=str(out), control=RunControl(time_budget="0.4s", budget_clock=budget_clock, progress=False))
    with RunLoop(cfg, "TEST") as loop:
        model = torch.nn.Linear(1, 1)
        loop.attach(model, None)
        for step in loop.steps(total, eval_every=1, evaluate=lambda s: (validated.append(s), time.sleep(0.15))):
            loop.sink.log("train", step + 1, {"x": 1.0})
            loop.end_of_step()
    return validated


def test_a_wall_clock_budget_counts_validation_and_every_record_carries_the_wall_clock(tmp_path):
    assert _slow_validation_run(tmp_path / "train", "train") == [1, 2, 3, 4, 5, 6, 7]  # validation is not training
    validated = _slow_validation_run(tmp_path / "wall", "wall")
    assert 1 <= len(validated) <= 3  # 0.4 s of wall clock holds about 2 validations of 0.15 s
    records = read_jsonl(tmp_path / "wall" / "metrics.jsonl")
    clocks = [r["wall_clock"] for r in records]
    assert clocks == sorted(clocks) and clocks[-1] >= 0.3
    assert "time budget 0.4s (wall clock) reached after" in (tmp_path / "wall" / "log.txt").read_text()


def test_backend_auto_falls_back_to_native_in_one_logged_line(tmp_path, tiny_model, tiny_tokenizer):
    import torch
    from test_recipe_parts import LoopConfig

    from cs336_alignment.checkpoint import RunControl
    from cs336_alignment.generation import load_generator
    from cs336_alignment.recipes.loop import RunLoop

    with RunLoop(LoopConfig(out=str(tmp_path / "run"), control=RunControl(progress=False)), "TEST"):
        engine = load_generator("auto", tiny_model, tiny_tokenizer, model_path="tiny", device=torch.device("cpu"), seed=0)
    assert isinstance(engine, NativeEngine)
    (line,) = [x for x in (tmp_path / "run" / "log.txt").read_text().splitlines() if "backend auto" in x]
    assert "vLLM cannot run here (not on CUDA), generating with the native engine" in line
    assert "not leaderboard-conformant" in line


def test_a_wall_clock_budget_keeps_time_for_the_final_validation(tmp_path, monkeypatch):
    import time

    import torch
    from test_recipe_parts import LoopConfig

    import cs336_alignment.recipes.loop as loop_module
    from cs336_alignment.checkpoint import RunControl
    from cs336_alignment.data import Example
    from cs336_alignment.recipes.common import LoadedData

    def slow_evaluate(generator, reward_fn, prompts, **kwargs):  # 0.04 s per example, like a real pace
        time.sleep(0.04 * len(prompts))
        metrics = {k: 0.5 for k in loop_module.EVAL_KEYS} | {"n_examples": len(prompts)}
        return metrics, []

    monkeypatch.setattr(loop_module, "evaluate", slow_evaluate)
    examples = [Example(question=f"{i} + 1", ground_truth=str(i + 1)) for i in range(15)]
    data = LoadedData(train=examples, val=examples, template="{question}", reward_fn=lambda r, g: {"reward": 0.0})
    cfg = LoopConfig(out=str(tmp_path / "run"), control=RunControl(time_budget="1.2s", budget_clock="wall", progress=False))
    policy = torch.nn.Linear(1, 1)
    with loop_module.RunLoop(cfg, "TEST") as loop:
        loop.attach(policy, None)

        def validate(step, chosen):
            return loop.validate(None, policy, data=data, examples=chosen, sampling=SamplingParams(), step=step, tag="t")

        validate(0, examples[:5])  # at the start: 0.2 s, and the pace (0.04 s per example)
        for step in loop.steps(100, final_examples=15):  # the final validation will take 0.6 s
            time.sleep(0.05)
            loop.end_of_step()
        steps_done = loop.state.step
        validate(steps_done, examples)
        end = loop.wall_clock()
    # 1.2 s - 0.2 s (first validation) - 0.6 s (kept for the final one) = 0.4 s of steps of 0.05 s
    assert 3 <= steps_done <= 9, steps_done
    assert end <= 1.2 + 0.25, end  # the final validation ends within the budget (plus scheduling slack)


def test_the_leaderboard_config_follows_the_handouts_rules():
    from cs336_alignment.experiments import load_study

    cfg = load_study(Path(__file__).resolve().parents[1] / "configs" / "leaderboard.yaml", []).config
    assert (cfg.control.time_budget, cfg.control.budget_clock) == ("4h", "wall")  # 4 hours of wall clock
    assert cfg.backend == "auto"  # vLLM where it runs, else native with a warning
    assert cfg.final_eval_full and cfg.data.prompt == "r1_zero" and cfg.eval_at_start
    assert (cfg.sampling_max_tokens, cfg.data.reward) == (1024, "")  # evaluation: T=1, 1024 tokens, r1_zero's reward


def test_sft_and_ei_default_to_the_handouts_loss_and_ei_keeps_every_correct_output(tmp_path):
    assert sft.SFTConfig().normalize == "constant" and ei.EIConfig().normalize == "constant"
    assert ei.EIConfig().dedupe_correct is False  # the handout's Algorithm drops only wrong outputs
    sft.train_sft(_cfg(sft.SFTConfig, tmp_path / "s", data={"train": str(SFT_JSONL), "val": "train"}, max_steps=1,
                       batch_size=4, micro_batch_size=4, n_eval_examples=1, eval_max_tokens=2, final_eval_full=False,
                       control={"progress": False}))
    (record,) = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "data"]
    assert record["loss_normalization"] == "constant"  # the run records which reduction ran
    assert "loss per sequence: summed NLL / normalize_constant" in (tmp_path / "s" / "log.txt").read_text()


def test_filtered_sft_drops_the_wrong_traces(tmp_path):
    from cs336_alignment.data import load_examples

    lines = [{"prompt": ex.prompt, "response": ex.response, "ground_truth": ex.ground_truth} for ex in load_examples(SFT_JSONL)]
    wrong = [{**ex, "ground_truth": str(ex["ground_truth"]) + "1"} for ex in lines[:3]]  # their traces' answers are wrong
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in lines + wrong))
    sft.train_sft(_cfg(sft.SFTConfig, tmp_path / "s", data={"train": str(data), "val": "train"}, filter_correct=True,
                       max_steps=1, batch_size=2, micro_batch_size=2, n_eval_examples=1, eval_max_tokens=2,
                       final_eval_full=False, control={"progress": False}))
    (record,) = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "data"]
    assert (record["n_available"], record["n_examples"]) == (len(lines) + 3, len(lines))  # the 3 wrong ones dropped


def test_off_policy_epochs_reshuffle_the_rollout_batch_and_keep_each_rollouts_old_log_probs(tmp_path, monkeypatch):
    seen = []  # per optimizer step: (rollout ids in row order, {id: old log-probs})
    real = grpo.accumulate_gradients

    def spy(policy, step_batches, cfg, **kw):
        rows = [(id(r), mb.old_log_probs[i][mb.response_mask[i]].clone()) for mb in step_batches
                for i, r in enumerate(mb.rollouts)]
        seen.append(rows)
        return real(policy, step_batches, cfg, **kw)

    monkeypatch.setattr(grpo, "accumulate_gradients", spy)
    grpo.train_grpo(_cfg(grpo.GRPOConfig, tmp_path / "g", data=TASK, n_grpo_steps=1, rollout_batch_size=8, group_size=2,
                         train_batch_size=4, micro_batch_size=2, epochs_per_rollout_batch=2, loss_type="grpo_clip",
                         sampling_max_tokens=6, n_eval_examples=2, final_eval_full=False, length_grouping=False,
                         control={"progress": False}))
    assert len(seen) == 4  # 2 epochs x 2 train batches of 4
    first, second = [r for step in seen[:2] for r in step], [r for step in seen[2:] for r in step]
    assert sorted(i for i, _ in first) == sorted(i for i, _ in second)  # the same 8 rollouts in each epoch
    assert [i for i, _ in first] != [i for i, _ in second]  # in a new order
    old = dict(first)
    assert all(torch.equal(old[i], lp) for i, lp in second)  # each keeps the log-probs of the sampling policy


def test_the_handouts_sft_jsonl_loads_and_filtered_sft_takes_answers_from_train_jsonl(tmp_path):
    from cs336_alignment.data import load_examples

    traces = load_examples(SFT_JSONL)
    folder = tmp_path / "MATH"
    folder.mkdir()
    lines = [{"prompt": ex.prompt, "response": ex.response} for ex in traces]  # the handout's format: no answer
    lines.append({"prompt": traces[0].prompt.replace(traces[0].question, "What is 100 + 1?"), "response": " 101 </think>"})
    (folder / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    loaded = load_examples(folder / "sft.jsonl")  # questions as read from the prompts
    answers = [{"problem": ex.question, "answer": str(trace.ground_truth)} for ex, trace in zip(loaded, traces)]
    answers[1]["answer"] += "1"  # this trace's answer is now wrong: filtered out
    (folder / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in answers))
    assert all(ex.ground_truth is None for ex in loaded)
    cfg = _cfg(sft.SFTConfig, tmp_path / "s", data={"train": str(folder / "sft.jsonl"), "val": str(folder / "train.jsonl")},
               filter_correct=True, max_steps=1, batch_size=2, micro_batch_size=2, n_eval_examples=1, eval_max_tokens=2,
               final_eval_full=False, control={"progress": False})
    sft.train_sft(cfg)
    (record,) = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "data"]
    assert (record["n_available"], record["n_examples"]) == (len(traces), len(traces) - 1)
    (warning,) = [x for x in (tmp_path / "s" / "log.txt").read_text().splitlines() if "filter_correct: 1 traces" in x]
    assert "have no ground_truth and their question is not in" in warning and "answers=" in warning
    (folder / "train.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"field 'answers': no such file .*train.jsonl; filter_correct needs"):
        sft.train_sft(_cfg(sft.SFTConfig, tmp_path / "t", data={"train": str(folder / "sft.jsonl"), "val": "train"},
                           filter_correct=True))
    assert not (tmp_path / "t").exists()
