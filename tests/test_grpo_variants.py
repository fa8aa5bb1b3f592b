"""The GRPO variants beyond the handout (issue 24), each off by default: a tiny CPU run per knob
showing its documented effect (the formulas are tested against hand-worked values in test_losses.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cs336_alignment.config import load_config
from cs336_alignment.recipes.grpo import GRPOConfig, train_grpo
from cs336_alignment.run_dir import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DATA = {"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 64, "n_task_val": 8,
        "reward": str(REPO / "tests" / "reward_helpers.py") + ":contains_e", "reward_in_process": True}


def config(out: Path, **kw) -> GRPOConfig:
    """One GRPO step of 4 questions x 4 responses trained for 2 epochs in train batches of 8:
    4 optimizer steps, the later ones off-policy (ratios away from 1)."""
    base = dict(model="tiny", out=str(out), device="cpu", seed=3, n_grpo_steps=1, learning_rate=3e-3, data=DATA,
                rollout_batch_size=16, group_size=4, train_batch_size=8, micro_batch_size=4, epochs_per_rollout_batch=2,
                loss_type="grpo_clip", sampling_max_tokens=12, eval_every=0, n_eval_examples=2, final_eval_full=False,
                log_rollout_examples=0, control={"progress": False})
    return load_config(GRPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def test_clip_higher_moves_the_upper_clipped_share_apart_from_the_lower(tmp_path):
    train_grpo(config(tmp_path / "sym", cliprange_low=0.01, cliprange_high=0.01))
    train_grpo(config(tmp_path / "higher", cliprange_low=0.01, cliprange_high=1e9))  # no upper bound
    sym = [r for r in read_jsonl(tmp_path / "sym" / "metrics.jsonl") if r["kind"] == "train"]
    higher = [r for r in read_jsonl(tmp_path / "higher" / "metrics.jsonl") if r["kind"] == "train"]
    # until the first clipped token the two runs are the same run; at that step only the upper share differs
    first = next(i for i, r in enumerate(sym) if r["clip_fraction"] > 0)
    assert [r["loss"] for r in sym[:first]] == [r["loss"] for r in higher[:first]]
    assert sym[first]["clip_fraction_high"] > 0 and higher[first]["clip_fraction_high"] == 0
    assert higher[first]["clip_fraction_low"] == sym[first]["clip_fraction_low"]
    assert sym[first]["clip_fraction"] == sym[first]["clip_fraction_high"] + sym[first]["clip_fraction_low"]
    default = config(tmp_path / "d")  # off by default: both bounds are cliprange, and nothing new is logged
    assert (default.clip_low, default.clip_high, default.asymmetric_clip) == (0.2, 0.2, False)


def test_overlong_filter_gives_a_response_cut_at_the_length_limit_no_gradient(tiny_model, tmp_path):
    import dataclasses

    import torch

    from cs336_alignment.recipes.grpo import accumulate_gradients
    from cs336_alignment.rollouts import Rollout, pack_rollouts

    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(group=0, prompt="p", prompt_token_ids=torch.randint(3, 60, (5,), generator=g).tolist(), response="r",
                        response_token_ids=torch.randint(3, 60, (6,), generator=g).tolist(), ground_truth=None,
                        finish_reason=reason, generator_logprobs=[-1.0] * 6, advantage=a)
                for reason, a in (("eos", 1.0), ("length", -1.0))]

    def gradient(batch_rollouts, **fields):
        tiny_model.zero_grad()
        cfg = config(tmp_path / "x", loss_type="reinforce_with_baseline", gradient_accumulation_steps=None, **fields)
        accumulate_gradients(tiny_model, [pack_rollouts(batch_rollouts, pad_id=0)], cfg, tokens=12, gap=None)
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    filtered = gradient(rollouts, overlong_filter=True)
    # the same as if the truncated response had advantage 0: its tokens weigh nothing (the batch mean still counts it)
    silenced = gradient([rollouts[0], dataclasses.replace(rollouts[1], advantage=0.0)])
    assert torch.allclose(filtered, silenced, atol=1e-8)
    assert not torch.allclose(filtered, gradient(rollouts), atol=1e-6)  # off by default: it does weigh


def _train(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path / "metrics.jsonl") if r["kind"] == "train"]


def test_a_kl_penalty_keeps_the_policy_nearer_the_reference(tmp_path, plain):
    train_grpo(config(tmp_path / "free", log_kl=True))  # the KL logged, not in the loss
    train_grpo(config(tmp_path / "kl", kl_coef=0.5))
    free, kl = _train(tmp_path / "free"), _train(tmp_path / "kl")
    assert free[0]["ref_kl"] == kl[0]["ref_kl"] == 0.0  # the reference is the starting policy
    assert 0 < kl[-1]["ref_kl"] < free[-1]["ref_kl"]  # the penalty pulls the policy back towards it
    assert "ref_kl" not in plain  # off by default: no reference, nothing logged


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    """The train record of a one-epoch run with every knob off, which the knobs' runs compare with."""
    out = tmp_path_factory.mktemp("plain")
    train_grpo(config(out, epochs_per_rollout_batch=1))
    return _train(out)[0]


def test_dynamic_sampling_keeps_only_groups_with_signal(tmp_path, plain):
    assert plain["frac_groups_all_equal"] > 0 and "resample_rounds" not in plain
    train_grpo(config(tmp_path / "dyn", epochs_per_rollout_batch=1, drop_all_equal_groups=True))
    dyn = _train(tmp_path / "dyn")[0]
    assert dyn["frac_groups_all_equal"] == 0.0 and dyn["groups_short"] == 0  # the trained batch: every group informative
    assert dyn["resample_rounds"] >= 1 and dyn["groups_dropped"] >= 1


def test_dynamic_sampling_rounds_and_top_up(tmp_path):
    from cs336_alignment.recipes.grpo import dynamic_sampling
    from cs336_alignment.rollouts import Rollout

    def batch(rewards, tag):  # groups of 2, laid out group by group
        return [Rollout(group=i // 2, prompt=tag, prompt_token_ids=[1], response=f"{tag}{i}", response_token_ids=[2],
                        ground_truth=None, finish_reason="eos", generator_logprobs=[0.0], reward=r)
                for i, r in enumerate(rewards)]

    cfg = config(tmp_path, rollout_batch_size=4, group_size=2, train_batch_size=4, micro_batch_size=2)  # B = 2 groups
    rounds = {1: batch([0.0, 0.0, 1.0, 0.0], "b")}
    # round 0: group a0 (1, 1) all equal -> dropped; a1 (0, 1) kept. Round 1: b0 (0, 0) dropped; b1 (1, 0) kept: full
    kept, stats = dynamic_sampling(batch([1.0, 1.0, 0.0, 1.0], "a"), cfg, more=rounds.__getitem__)
    assert [r.response for r in kept] == ["a2", "a3", "b2", "b3"] and [r.group for r in kept] == [0, 0, 1, 1]
    assert stats == {"resample_rounds": 1, "groups_dropped": 2, "groups_short": 0}
    # no extra round allowed: the batch is topped up with the first dropped group, and says so
    cfg.max_resample_rounds = 0
    kept, stats = dynamic_sampling(batch([1.0, 1.0, 0.0, 1.0], "a"), cfg, more=rounds.__getitem__)
    assert [r.response for r in kept] == ["a2", "a3", "a0", "a1"]
    assert stats == {"resample_rounds": 0, "groups_dropped": 0, "groups_short": 1}
    # the decision reads the reward before the overlong penalty: two wrong answers of different lengths carry no signal
    import dataclasses

    penalised = batch([0.0, -0.5, 0.0, 1.0], "c")  # group c0: both wrong, the second one -0.5 for its length
    penalised[1] = dataclasses.replace(penalised[1], overlong_penalty=-0.5)
    kept, stats = dynamic_sampling(penalised, cfg, more=rounds.__getitem__)
    assert [r.response for r in kept] == ["c2", "c3", "c0", "c1"] and stats["groups_short"] == 1


def test_the_soft_overlong_penalty_lowers_the_reward_of_long_responses(tmp_path, plain):
    train_grpo(config(tmp_path / "long", epochs_per_rollout_batch=1, overlong_buffer=6))
    long = _train(tmp_path / "long")[0]
    # the same rollouts (same seed, same first step): the reward falls by exactly the logged mean penalty
    assert long["overlong_penalty_mean"] < 0
    assert long["train_reward_mean"] == pytest.approx(plain["train_reward_mean"] + long["overlong_penalty_mean"])
    assert long["train_answer_reward_mean"] == plain["train_answer_reward_mean"]


def test_gspo_clips_a_whole_response(tiny_model, tmp_path):
    import dataclasses

    import torch

    from cs336_alignment.recipes.grpo import accumulate_gradients
    from cs336_alignment.rollouts import Rollout, pack_rollouts

    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(group=0, prompt="p", prompt_token_ids=torch.randint(3, 60, (5,), generator=g).tolist(), response="r",
                        response_token_ids=torch.randint(3, 60, (6,), generator=g).tolist(), ground_truth=None,
                        finish_reason="eos", generator_logprobs=[-1.0] * 6, advantage=a) for a in (1.0, -1.0)]
    with torch.no_grad():
        from cs336_alignment.logprobs import get_response_log_probs

        mb = pack_rollouts(rollouts, pad_id=0)
        now = get_response_log_probs(tiny_model, mb.input_ids, mb.labels)["log_probs"]  # (2, T)
    for row, r in enumerate(rollouts):
        r.old_logprobs = now[row][mb.response_mask[row]].clone()  # (6,) pi_old = pi: every ratio 1
    # response 0: pi_old lowered by 1.0 on one token only: that token's ratio is e = 2.72 (a token-level clip would
    # drop just it), its sequence ratio exp(1 / 6) = 1.18 > 1 + 0.1 with A > 0: GSPO drops the whole response
    rollouts[0].old_logprobs[2] -= 1.0

    def gradient(batch_rollouts, loss_type="gspo"):
        tiny_model.zero_grad()
        cfg = config(tmp_path / "x", loss_type=loss_type, cliprange=0.1, gradient_accumulation_steps=None)
        accumulate_gradients(tiny_model, [pack_rollouts(batch_rollouts, pad_id=0)], cfg, tokens=12, gap=None)
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    clipped = gradient(rollouts)
    silenced = gradient([dataclasses.replace(rollouts[0], advantage=0.0), rollouts[1]])
    assert torch.allclose(clipped, silenced, atol=1e-8)  # response 0 gives no gradient at all
    token_level = gradient(rollouts, loss_type="grpo_clip")  # the token clip keeps its 5 other tokens' gradient
    assert not torch.allclose(token_level, silenced, atol=1e-6)


def test_presets_expand_under_explicit_fields_and_the_run_shows_what_ran(tmp_path):
    import yaml

    from cs336_alignment.config import ConfigError, dump_yaml
    from cs336_alignment.recipes.grpo import PRESETS

    handout = config(tmp_path / "h", preset="handout")
    assert dump_yaml(handout) == dump_yaml(config(tmp_path / "h"))  # the handout preset is the defaults
    dapo = config(tmp_path / "d", preset="dapo", cliprange_high=0.3)  # an explicit field wins over the preset
    assert (dapo.clip_low, dapo.clip_high, dapo.drop_all_equal_groups, dapo.length_normalization) == (0.2, 0.3, True,
                                                                                                      "token_mean")
    assert PRESETS["dapo"]["overlong_buffer"] is None  # derived: a fifth of sampling_max_tokens (12 here)
    assert (dapo.overlong_buffer, dapo.overlong_penalty) == (12 // 5, 1.0)
    dr = config(tmp_path / "dr", preset="dr_grpo")
    assert (dr.use_std_normalization, dr.length_normalization) == (False, "masked_normalize")
    resolved = yaml.safe_load(dump_yaml(dapo))  # config.yaml of the run: the preset and every expanded value
    assert resolved["preset"] == "dapo" and resolved["cliprange_high"] == 0.3 and resolved["drop_all_equal_groups"] is True
    assert resolved["overlong_buffer"] == 2  # the derived value, so a resumed run reads what ran
    study = tmp_path / "study.yaml"
    study.write_text("model: tiny\npreset: dappo\n")
    with pytest.raises(ConfigError, match=r"study.yaml:2: field 'preset': unknown preset 'dappo'"):
        load_config(GRPOConfig, study)
    study.write_text("model: tiny\npreset: [dapo]\n")  # not a name: one line too, no traceback
    with pytest.raises(ConfigError, match=r"study.yaml:2: field 'preset': unknown preset \['dapo'\]"):
        load_config(GRPOConfig, study)
    # a study file's explicit fields win: the preset's values they replace are named in a warning, and a preset all of
    # whose fields are replaced (or one never expanded: GRPOConfig(...) itself) is refused
    study.write_text("model: tiny\npreset: dr_grpo\nuse_std_normalization: true\n")
    with pytest.raises(ConfigError, match=r"preset 'dr_grpo' changes none of its fields"):
        load_config(GRPOConfig, study, ["length_normalization=masked_mean"])
    with pytest.raises(ValueError, match=r"preset 'dapo' changes none of its fields"):
        GRPOConfig(preset="dapo")


def test_a_preset_warns_about_the_fields_a_study_file_keeps(tmp_path, caplog, monkeypatch):
    from cs336_alignment import config as config_module

    monkeypatch.setattr(config_module, "_WARNED", set())  # each warning is given once per process
    study = tmp_path / "study.yaml"
    study.write_text("model: tiny\npreset: dr_grpo\nuse_std_normalization: true\n")
    with caplog.at_level("WARNING", logger="cs336_alignment"):
        cfg = load_config(GRPOConfig, study)
    assert (cfg.use_std_normalization, cfg.length_normalization) == (True, "masked_normalize")
    assert "preset dr_grpo: use_std_normalization=True given explicitly instead of the preset's value" in caplog.text
    caplog.clear()
    load_config(GRPOConfig, study)
    assert "preset dr_grpo" not in caplog.text  # once per process: a config built again (smoke, resume) says it once


def test_knobs_that_cannot_work_are_refused_in_one_line(tmp_path):
    from cs336_alignment.config import ConfigError

    for fields, message in (
        ({"reference_device": "bogus", "kl_coef": 0.1}, "reference_device must be"),
        ({"device": "same"}, "device must be \"auto\" or a torch device"),  # "same" is the generator's and reference's
        ({"drop_all_equal_groups": True, "group_size": 1, "use_std_normalization": False}, "needs group_size >= 2"),
        ({"kl_coef": -0.1}, "kl_coef must be a finite number >= 0"),
        ({"overlong_buffer": 12}, r"overlong_buffer must be in \[0, sampling_max_tokens = 12\)"),
        ({"train_filter": {"min_pass": 0.8, "max_pass": 0.2}}, "train_filter needs 0 <= min_pass <= max_pass <= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            config(tmp_path / "x", **fields)


def test_a_given_pass_rate_file_that_does_not_match_is_refused_before_the_run(tmp_path):
    from cs336_alignment.difficulty import PassRateFileError

    given = tmp_path / "rates.jsonl"
    given.write_text('{"format": "pass_rates", "version": 1, "questions": 1, "n": 8}\n'
                     '{"index": 0, "question_sha": "000000000000", "n": 8, "correct": 2, "pass_rate": 0.25}\n')
    with pytest.raises(PassRateFileError, match="rates.jsonl"):
        train_grpo(config(tmp_path / "run", curriculum="easy_first", pass_rates=str(given)))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_a_run_begun_before_a_field_existed_resumes_with_its_default(tmp_path):
    from cs336_alignment.config import to_dict
    from cs336_alignment.recipes.loop import resume_config_changes

    cfg = config(tmp_path / "x")
    saved = to_dict(cfg)
    del saved["kl_coef"], saved["train_filter"]  # as a config.yaml written before issue 24
    assert resume_config_changes(saved, cfg) == ([], [])
    accepted, refused = resume_config_changes(saved, config(tmp_path / "x", kl_coef=0.1))  # not its default: a change
    assert [c.field for c in refused] == ["kl_coef"]


def test_training_questions_filtered_and_ordered_by_pass_rate(tmp_path, monkeypatch):
    from cs336_alignment import difficulty
    from cs336_alignment.data import load_examples  # noqa: F401  (the task's questions come from the recipe's loader)
    from cs336_alignment.recipes import grpo
    from cs336_alignment.recipes.common import load_data

    seen = []  # the questions each call of batch_of hands the rollout phase
    build = grpo.question_batches

    def spy(cfg, pool, ordered=None):
        batch_of = build(cfg, pool, ordered)

        def recorded(step, round=0):
            questions, sampling = batch_of(step, round)
            seen.append((step, round, [q.question for q in questions]))
            return questions, sampling
        return recorded

    monkeypatch.setattr(grpo, "question_batches", spy)
    knobs = dict(epochs_per_rollout_batch=1, n_grpo_steps=2, pass_rate_samples=4, curriculum="easy_first",
                 train_filter={"min_pass": 0.25, "max_pass": 0.75})
    cfg = config(tmp_path / "run", **knobs)
    train_grpo(cfg)
    train = load_data(cfg.data, cfg.seed).train
    rates = difficulty.read_pass_rates(tmp_path / "run" / "pass_rates.jsonl", train, template=load_data(cfg.data, 0).template)
    kept = [(q, r) for q, r in zip(train, rates) if 0.25 <= r <= 0.75]
    assert 0 < len(kept) < len(train)  # the filter dropped the never- and always-solved questions
    order = difficulty.curriculum_order([q for q, _ in kept], [r for _, r in kept], seed=cfg.seed)
    assert [s[2] for s in seen] == [[q.question for q in order[:4]], [q.question for q in order[4:8]]]  # easiest first
    # a run given that file reads it: nothing is scored again
    monkeypatch.setattr(grpo, "score_pass_rates", lambda *a, **k: pytest.fail("scored again"))
    seen.clear()
    train_grpo(config(tmp_path / "again", pass_rates=str(tmp_path / "run" / "pass_rates.jsonl"), **knobs))
    assert [s[2] for s in seen][0] == [q.question for q in order[:4]]
    assert not (tmp_path / "again" / "pass_rates.jsonl").exists()
