"""The recipes' parts, one at a time: the run loop's cadence, its resume state, the typed step
statistics, the derived accumulation, group normalisation and the clipped optimizer step."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from cs336_alignment.advantages import frac_groups_all_equal, group_normalize
from cs336_alignment.checkpoint import Checkpointer, NonFiniteError, RunControl
from cs336_alignment.config import ConfigError, load_config
from cs336_alignment.losses import grpo_microbatch_train_step
from cs336_alignment.recipes.common import clip_and_step
from cs336_alignment.recipes.grpo import GRPOConfig, StepStats
from cs336_alignment.recipes.loop import RunLoop, RunState
from cs336_alignment.rollouts import Rollout, micro_batches
from cs336_alignment.run_dir import read_jsonl

# --------------------------------------------------------------------------- the run loop


@dataclass
class LoopConfig:
    model: str = "tiny"
    out: str = ""
    seed: int = 0
    device: str = "cpu"
    control: RunControl = field(default_factory=lambda: RunControl(checkpoint_every=2, progress=False))
    wandb_project: str = ""
    run_name: str = ""
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])
    attn_implementation: str = "sdpa"
    use_liger_kernel: bool = False
    export_dtype: str = "auto"


def _run_loop(cfg: LoopConfig, total: int, eval_every: int) -> tuple[RunLoop, list[int], torch.nn.Linear]:
    model = torch.nn.Linear(2, 1)
    evaluated = []
    with RunLoop(cfg, "TEST") as loop:
        loop.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for step in loop.steps(total, eval_every=eval_every, evaluate=evaluated.append):
            with torch.no_grad():
                model.bias += 1.0  # the "training" of step `step`
            loop.sink.log("train", step + 1, {"bias": model.bias.item()})
            loop.end_of_step(f"bias {model.bias.item()}")
    return loop, evaluated, model


def test_end_of_step_owns_the_eval_and_checkpoint_cadence(tmp_path):
    loop, evaluated, model = _run_loop(LoopConfig(out=str(tmp_path / "r")), total=7, eval_every=3)
    assert evaluated == [3, 6]  # every 3 steps, never after the last (the recipe validates at the end)
    assert [s for s, _ in Checkpointer(tmp_path / "r").complete()] == [6, 7]  # every 2 and the last; keep_last=2
    biases = [r["bias"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")]
    assert loop.state.step == 7 and biases == pytest.approx([biases[0] + k for k in range(7)])
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "TEST step 7/7: bias" in log


def test_resume_restores_weights_counters_and_metrics(tmp_path):
    out = str(tmp_path / "r")
    _run_loop(LoopConfig(out=out), total=4, eval_every=0)  # checkpoints at 2 and 4
    finished_bias = read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]["bias"]
    # a longer run resumed from step 4 continues the same weights and metrics stream
    loop, _, model = _run_loop(LoopConfig(out=out, control=RunControl(resume=True, checkpoint_every=2, progress=False)),
                               total=6, eval_every=0)
    records = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["train_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["bias"] == pytest.approx(finished_bias + 1)
    assert loop.state.step == 6


def test_time_budget_stops_after_the_step_that_spends_it_and_checkpoints(tmp_path):
    cfg = LoopConfig(out=str(tmp_path / "r"), control=RunControl(time_budget="0.000001", progress=False))
    loop, evaluated, _ = _run_loop(cfg, total=5, eval_every=1)
    assert loop.state.step == 1 and evaluated == []  # out of time: no validation, straight to the checkpoint
    assert [s for s, _ in Checkpointer(tmp_path / "r").complete()] == [1]
    assert "time budget 0.000001 (train clock) reached after 1 TEST steps" in (tmp_path / "r" / "log.txt").read_text()


def test_a_step_body_without_end_of_step_is_an_error(tmp_path):
    with RunLoop(LoopConfig(out=str(tmp_path / "r")), "TEST") as loop:
        loop.attach(torch.nn.Linear(1, 1), None)
        with pytest.raises(RuntimeError, match="ended without loop.end_of_step"):
            for _ in loop.steps(3):
                pass


def test_run_state_reads_the_earlier_checkpoint_layout():
    # GRPO and EI checkpoints written before RunState said "next_step"; SFT's said "step"
    grpo = RunState.from_saved({"next_step": 3, "optimizer_step": 5, "train_clock": 1.5, "skipped_steps": 1,
                                "metrics_bytes": 10})
    assert grpo == RunState(step=3, optimizer_step=5, train_clock=1.5, skipped_steps=1, metrics_bytes=10)
    sft = RunState.from_saved({"step": 4, "train_clock": 2.0, "skipped_steps": 0, "metrics_bytes": 7})
    assert (sft.step, sft.optimizer_step, sft.metrics_bytes) == (4, 0, 7)


# --------------------------------------------------------------------------- GRPO's parts


def test_gradient_accumulation_steps_is_derived_not_a_sentinel():
    assert load_config(GRPOConfig).gradient_accumulation_steps == 128  # the handout's default
    assert load_config(GRPOConfig, None, ["micro_batch_size=8"]).gradient_accumulation_steps == 32  # 256 / 8
    assert load_config(GRPOConfig, None, ["micro_batch_size=2", "gradient_accumulation_steps=128"]).micro_train_batch_size == 2
    # 128 given explicitly is not "unset": with micro-batches of 4 (64 steps) it is a contradiction
    with pytest.raises(ConfigError, match="implies gradient_accumulation_steps=64, but gradient_accumulation_steps=128"):
        load_config(GRPOConfig, None, ["micro_batch_size=4", "gradient_accumulation_steps=128"])
    assert GRPOConfig().gradient_accumulation_steps == 128  # derived in __post_init__, not only by the loader


def test_group_normalize_hand_worked():
    raw = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # groups of 3: [1, 0, 0] and [1, 1, 1]
    # group 1: mean 1/3, centred [2/3, -1/3, -1/3]; std = sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert group_normalize(raw, group_size=3, advantage_eps=0.0, normalize_by_std=False).tolist() == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    assert group_normalize(raw, group_size=3, advantage_eps=1e-6, normalize_by_std=True).tolist() == pytest.approx(
        [2 / 3 / s, -1 / 3 / s, -1 / 3 / s, 0, 0, 0], rel=1e-5)
    assert frac_groups_all_equal(raw, 3) == 0.5  # the second group is all 1
    with pytest.raises(ValueError, match="whole number of groups"):
        group_normalize(raw, group_size=4, advantage_eps=0.0, normalize_by_std=False)


def test_grpo_step_metadata_carries_token_sums():
    # two sequences, response masks [1, 1, 0] and [1, 0, 0]; ratio = exp(new - old)
    new = torch.tensor([[0.0, 0.5, 9.0], [-0.5, 9.0, 9.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([[1.0], [-1.0]])
    _, meta = grpo_microbatch_train_step(new, mask, 1, "grpo_clip", advantages=adv, old_log_probs=old, cliprange=0.2)
    # ratios on the response: 1, e^0.5 = 1.6487 (A > 0: clipped to 1.2, taken), e^-0.5 = 0.6065 (A < 0: clipped to 0.8, taken)
    assert meta["ratio_sum"].item() == pytest.approx(1 + math.exp(0.5) + math.exp(-0.5), rel=1e-6)
    assert meta["clipped_tokens"].item() == 2.0
    assert meta["clip_fraction"].item() == pytest.approx(2 / 3)
    assert meta["ratio_mean"].item() == pytest.approx(meta["ratio_sum"].item() / 3)


def test_step_stats_record_is_token_weighted():
    stats = StepStats(epoch=1, tokens=10, loss=0.25, grad_norm=2.0, entropy_sum=5.0, clipped_tokens=3.0, ratio_sum=10.5,
                      lr=1e-5)
    assert stats.record("grpo_clip") == {"epoch": 1, "loss": 0.25, "grad_norm": 2.0, "token_entropy": 0.5, "lr": 1e-5,
                                         "ratio_mean": 1.05, "clip_fraction": 0.3}
    assert set(stats.record("grpo_no_clip")) == {"epoch", "loss", "grad_norm", "token_entropy", "lr", "ratio_mean"}
    assert set(stats.record("reinforce_with_baseline")) == {"epoch", "loss", "grad_norm", "token_entropy", "lr"}


def _rollout(prompt_len: int, response_len: int, group: int = 0) -> Rollout:
    return Rollout(group=group, prompt="p", prompt_token_ids=[1] * prompt_len, response="r",
                   response_token_ids=[2] * response_len, ground_truth="x", finish_reason="stop",
                   generator_logprobs=[0.0] * response_len)


def test_micro_batches_cut_train_batches_and_group_lengths_within_each():
    rollouts = [_rollout(2, n) for n in (5, 1, 4, 2)] + [_rollout(2, n) for n in (7, 3, 6, 8)]
    batches = micro_batches(rollouts, train_batch_size=4, micro_batch_size=2, pad_id=0)
    # train batch 1 sorted by length: 1, 2 | 4, 5; train batch 2: 3, 6 | 7, 8 (never mixed across train batches)
    assert [mb.num_response_tokens for mb in batches] == [3, 9, 9, 15]
    unsorted = micro_batches(rollouts, train_batch_size=4, micro_batch_size=2, pad_id=0, length_grouping=False)
    assert [mb.num_response_tokens for mb in unsorted] == [6, 6, 10, 14]


def test_clip_and_step_steps_or_hands_the_error_over():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.weight.detach().clone()
    model(torch.ones(1, 2)).sum().backward()  # d/dw = [1, 1], norm sqrt(3) with the bias
    norm = clip_and_step(model, optimizer, max_grad_norm=10.0, loss=1.0, step=1, on_nonfinite=pytest.fail)
    assert norm == pytest.approx(math.sqrt(3)) and torch.allclose(model.weight, before - 1.0)
    assert model.weight.grad is None  # zeroed after the step
    seen = []
    model(torch.ones(1, 2)).sum().backward()
    after_first = model.weight.detach().clone()
    assert clip_and_step(model, optimizer, max_grad_norm=10.0, loss=float("nan"), step=2, on_nonfinite=seen.append) is None
    assert isinstance(seen[0], NonFiniteError) and "loss is nan at step 2" in str(seen[0])
    assert torch.equal(model.weight, after_first) and model.weight.grad is None  # no step, gradients dropped


# --------------------------------------------------------------------------- resume keeps one truth about the config


def _field_names(cls: type, prefix: str = "") -> set[str]:
    import dataclasses

    names = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            names |= _field_names(type(default), f"{prefix}{f.name}.")
        else:
            names.add(f"{prefix}{f.name}")
    return names


def test_every_training_config_field_says_how_it_may_change_on_resume():
    from cs336_alignment.recipes.ei import EIConfig
    from cs336_alignment.recipes.loop import FIXED_FIELDS, FREE_FIELDS, STEP_COUNT_FIELDS
    from cs336_alignment.recipes.sft import SFTConfig

    assert not (FREE_FIELDS & FIXED_FIELDS) and not (STEP_COUNT_FIELDS & (FREE_FIELDS | FIXED_FIELDS))
    for cls in (SFTConfig, EIConfig, GRPOConfig):
        unclassified = _field_names(cls) - FREE_FIELDS - FIXED_FIELDS - STEP_COUNT_FIELDS
        assert not unclassified, f"{cls.__name__}: classify {sorted(unclassified)} in recipes/loop.py"


def test_more_steps_need_a_constant_learning_rate():
    from cs336_alignment.config import to_dict
    from cs336_alignment.recipes.loop import resume_config_changes
    from cs336_alignment.recipes.sft import SFTConfig

    saved = to_dict(load_config(SFTConfig, None, ["model=tiny", "epochs=1"]))
    accepted, refused = resume_config_changes(saved, load_config(SFTConfig, None, ["model=tiny", "epochs=2", "eval_every=5"]))
    assert [(c.field, c.old, c.new) for c in accepted] == [("epochs", 1, 2), ("eval_every", 0, 5)] and refused == []
    saved = to_dict(load_config(SFTConfig, None, ["model=tiny", "schedule=cosine"]))  # the LR depends on the total
    _, refused = resume_config_changes(saved, load_config(SFTConfig, None, ["model=tiny", "schedule=cosine", "epochs=2"]))
    assert [c.field for c in refused] == ["epochs"]


def test_resume_refuses_a_changed_learning_rate_unless_allowed_and_then_records_it(tmp_path):
    from cs336_alignment.recipes.grpo import train_grpo

    out = tmp_path / "run"

    def cfg(**kw):
        fields = dict(model="tiny", out=str(out), device="cpu", data={"train": "task:arithmetic", "n_task_train": 16,
                      "n_task_val": 4}, n_grpo_steps=2, rollout_batch_size=4, group_size=2, train_batch_size=4,
                      micro_batch_size=2, sampling_max_tokens=4, n_eval_examples=2, eval_every=0, final_eval_full=False,
                      learning_rate=1e-3)
        fields.update(kw)
        return load_config(GRPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in fields.items()])

    control = {"checkpoint_every": 1, "progress": False}
    train_grpo(cfg(control=control))
    config_yaml = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"--resume with a changed config: learning_rate 0\.001 -> 0\.002; .*"
                                          r"control\.allow_config_change=true") as e:
        train_grpo(cfg(learning_rate=2e-3, control={**control, "resume": True}))
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert not (out / "resumes.jsonl").exists()
    # more steps at a constant learning rate, and a changed one once allowed: both go on and are recorded
    train_grpo(cfg(n_grpo_steps=3, learning_rate=2e-3, control={**control, "resume": True, "allow_config_change": True}))
    changes = [(r["field"], r["old"], r["new"], r["from_step"]) for r in read_jsonl(out / "resumes.jsonl")]
    assert changes == [("control.allow_config_change", False, True, 2), ("learning_rate", 0.001, 0.002, 2),
                       ("n_grpo_steps", 2, 3, 2)]
    assert (out / "config.yaml").read_text() == config_yaml  # still what produced step 1
    assert [r["train_step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]
    # a later resume compares with the config as changed so far: only what changes now is recorded
    train_grpo(cfg(n_grpo_steps=4, learning_rate=2e-3, control={**control, "resume": True, "allow_config_change": True}))
    changes = [(r["field"], r["old"], r["new"], r["from_step"]) for r in read_jsonl(out / "resumes.jsonl")]
    assert changes[3:] == [("n_grpo_steps", 3, 4, 3)]
