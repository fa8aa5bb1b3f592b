"""Expert iteration; kill-and-resume; time budgets; NaN and full-disk failures."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cs336_alignment.checkpoint import Checkpointer, CheckpointError, NonFiniteError, parse_duration
from cs336_alignment.config import load_config
from cs336_alignment.recipes.ei import EIConfig, select_expert_responses, train_ei
from cs336_alignment.recipes.grpo import GRPOConfig, train_grpo
from cs336_alignment.rollouts import Rollout
from cs336_alignment.run_dir import RunFiles, read_jsonl

HELPERS = str(Path(__file__).parent / "reward_helpers.py")
TINY_DATA = {"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 32, "n_task_val": 8}


def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


# --------------------------------------------------------------------------- expert iteration


def _rollout(group: int, prompt_ids: list[int], response_ids: list[int], reward: float) -> Rollout:
    return Rollout(group=group, prompt=f"q{group}", prompt_token_ids=prompt_ids, response="r", response_token_ids=response_ids,
                   ground_truth="x", finish_reason="stop", generator_logprobs=[0.0] * len(response_ids), reward=reward)


def test_select_expert_responses_keeps_only_rewarded_and_dedupes():
    rollouts = [
        _rollout(0, [1, 2], [5, 6], 1.0), _rollout(0, [1, 2], [5, 6], 1.0), _rollout(0, [1, 2], [7], 0.0),
        _rollout(1, [3], [8], 0.0), _rollout(1, [3], [9], 1.0), _rollout(2, [4], [5, 6], 1.0),
    ]
    # the same response to another question is not a duplicate
    assert select_expert_responses(rollouts, dedupe=True) == [([1, 2], [5, 6]), ([3], [9]), ([4], [5, 6])]
    assert select_expert_responses(rollouts, dedupe=False) == [
        ([1, 2], [5, 6]), ([1, 2], [5, 6]), ([3], [9]), ([4], [5, 6])]


def test_ei_trains_on_exactly_the_rewarded_rollouts(tmp_path, monkeypatch):
    import cs336_alignment.recipes.ei as ei

    kept_per_step, trained_per_step = [], []
    real_select, real_step = ei.select_expert_responses, ei.sft_optimizer_step

    def spy_select(rollouts, dedupe):
        kept = real_select(rollouts, dedupe)
        # every kept response really earned reward 1 from the configured reward function
        texts = {tuple(r.response_token_ids): r.response for r in rollouts}
        for _, response in kept:
            assert "1" in texts[tuple(response)]
        kept_per_step.append(kept)
        trained_per_step.append([])
        return kept

    def spy_step(policy, optimizer, batch, *args, **kwargs):
        trained_per_step[-1].extend(batch)
        return real_step(policy, optimizer, batch, *args, **kwargs)

    monkeypatch.setattr(ei, "select_expert_responses", spy_select)
    monkeypatch.setattr(ei, "sft_optimizer_step", spy_step)
    cfg = load_config(EIConfig, None, _overrides(dict(
        model="tiny", out=str(tmp_path / "ei"), device="cpu", data={**TINY_DATA, "reward": f"{HELPERS}:contains_one"},
        n_ei_steps=2, batch_questions=8, rollouts_per_question=4, sampling_max_tokens=12, sft_epochs=2,
        batch_size=4, micro_batch_size=2, learning_rate=1e-3, n_eval_examples=4, final_eval_full=False,
    )))
    train_ei(cfg)
    assert len(kept_per_step) == 2 and any(kept_per_step)
    for kept, trained in zip(kept_per_step, trained_per_step):
        # two epochs over exactly the kept pairs
        assert sorted(map(repr, trained)) == sorted(map(repr, kept * 2))
    ei_records = [r for r in read_jsonl(tmp_path / "ei" / "metrics.jsonl") if r["kind"] == "ei"]
    assert [r["n_kept"] for r in ei_records] == [len(k) for k in kept_per_step]
    assert all(r["rollout_entropy"] > 0 and r["rollouts"] == 32 for r in ei_records)
    evals = [r for r in read_jsonl(tmp_path / "ei" / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 2  # after EI step 1, and the final one after step 2
    assert RunFiles(tmp_path / "ei").foreign() == []  # every file the run wrote is in its manifest


# --------------------------------------------------------------------------- kill and resume

TIMING = ("time", "seconds", "per_second", "wall_clock")


def _comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in read_jsonl(path)]


def _grpo_cli_args(out: Path) -> list[str]:
    return ["grpo"] + _overrides(dict(
        model="tiny", out=str(out), device="cpu", seed=3,
        data={**TINY_DATA, "reward": f"{HELPERS}:contains_one"},
        n_grpo_steps=6, rollout_batch_size=16, group_size=4, train_batch_size=16, gradient_accumulation_steps=2,
        learning_rate=1e-3, sampling_max_tokens=12, eval_every=2, n_eval_examples=4, final_eval_full=False,
    )) + ["control.checkpoint_every=2", "control.progress=false"]


def _run(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CS336_ALIGNMENT_FAULT", None)
    if fault:
        env["CS336_ALIGNMENT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cs336_alignment", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def grpo_clean(tmp_path_factory) -> Path:
    """An uninterrupted run of _grpo_cli_args: what every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("grpo") / "clean"
    clean = _run(_grpo_cli_args(out))
    assert clean.returncode == 0, clean.stderr[-3000:]
    return out


def test_grpo_kill_and_resume_reproduces_the_uninterrupted_metrics(tmp_path, grpo_clean):

    out = tmp_path / "killed"
    first = _run(_grpo_cli_args(out), fault="step:3")  # killed mid-training, after step 3, checkpoint 2 exists
    assert first.returncode == -9
    second = _run(_grpo_cli_args(out) + ["--resume"], fault="checkpoint:4")  # killed while writing checkpoint 4
    assert second.returncode == -9
    ckpts = Checkpointer(out).complete()
    assert [s for s, _ in ckpts] == [2]  # the torn write left the previous checkpoint usable
    assert list((out / "checkpoints").glob(".tmp_step_*"))  # the torn write itself is there, unused
    third = _run(_grpo_cli_args(out) + ["--resume"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in (out / "log.txt").read_text()

    want, got = _comparable(grpo_clean / "metrics.jsonl"), _comparable(out / "metrics.jsonl")
    assert len(want) == len(got) and want == got
    assert [s for s, _ in Checkpointer(out).complete()] == [4, 6]  # keep_last=2
    assert not list((out / "checkpoints").glob(".tmp_step_*"))  # stale partial writes cleaned up


def test_ctrl_c_finishes_the_step_checkpoints_it_and_prints_the_command_that_resumes(tmp_path, grpo_clean):
    out = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CS336_ALIGNMENT_FAULT", None)
    child = subprocess.Popen([sys.executable, "-m", "cs336_alignment", *_grpo_cli_args(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stderr:
            if "GRPO step 1/6" in line:  # step 1 is closing (validation, checkpoint) or step 2 running
                child.send_signal(signal.SIGINT)
                break
        rest = child.stderr.read()
        assert child.wait(timeout=120) == 130, rest[-3000:]
    finally:
        child.kill()
    last = rest.strip().splitlines()[-1]
    assert re.fullmatch(r"error: interrupted: stopped after GRPO step [1-5]/6, checkpoint \S+/step_00000[1-5]; "
                        r"continue with: python -m cs336_alignment grpo .* --resume", last), last
    assert "Traceback" not in rest and "Ctrl-C: stopping once the running GRPO step is done and checkpointed" in rest
    stopped_at = int(re.search(r"GRPO step (\d)/6, checkpoint", last).group(1))
    assert Checkpointer(out).latest().name == f"step_{stopped_at:06d}"  # the step it finished is checkpointed
    command = shlex.split(last.split("; continue with: ")[1])
    resumed = _run(command[3:])  # after "python -m cs336_alignment"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _comparable(out / "metrics.jsonl") == _comparable(grpo_clean / "metrics.jsonl")


def test_sft_kill_and_resume(tmp_path):
    def args(out):
        return ["sft"] + _overrides(dict(
            model="tiny", out=str(out), device="cpu", data=TINY_DATA, epochs=2, batch_size=8, micro_batch_size=4,
            learning_rate=1e-3, n_eval_examples=4, eval_max_tokens=8, eval_every=3,
        )) + ["control.checkpoint_every=2", "control.progress=false"]

    assert _run(args(tmp_path / "clean")).returncode == 0
    assert _run(args(tmp_path / "k"), fault="step:5").returncode == -9  # mid-epoch 2 (4 steps per epoch)
    done = _run(args(tmp_path / "k") + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _comparable(tmp_path / "clean" / "metrics.jsonl") == _comparable(tmp_path / "k" / "metrics.jsonl")
    assert RunFiles(tmp_path / "k").foreign() == []  # every file the run wrote is in its manifest


# --------------------------------------------------------------------------- budgets and failures


def test_parse_duration():
    assert parse_duration("4h") == 14400 and parse_duration("1h30m") == 5400 and parse_duration("45s") == 45
    assert parse_duration("90") == 90 and parse_duration("") is None
    with pytest.raises(ValueError, match="cannot read duration"):
        parse_duration("4 hours")


def _grpo_cfg(out: Path, **kw) -> GRPOConfig:
    base = dict(
        model="tiny", out=str(out), device="cpu",
        data={**TINY_DATA, "reward": f"{HELPERS}:nan_after_calls", "reward_in_process": True},  # counts calls here
        n_grpo_steps=5, rollout_batch_size=16, group_size=4, train_batch_size=16, gradient_accumulation_steps=2,
        learning_rate=1e-3, sampling_max_tokens=12, eval_every=0, n_eval_examples=4, final_eval_full=False,
    )
    kw.setdefault("control", {"progress": False, "checkpoint_every": 1})
    return load_config(GRPOConfig, None, _overrides({**base, **kw}))


@pytest.fixture()
def nan_reward():
    from cs336_alignment.rewards import resolve_reward_fn

    state = resolve_reward_fn(f"{HELPERS}:nan_after_calls", in_process=True).__globals__["CALLS"]  # shared state
    state.update(n=0, nan_after=None)
    yield state
    state.update(n=0, nan_after=None)


def test_time_budget_stops_checkpoints_and_validates(tmp_path, nan_reward):
    train_grpo(_grpo_cfg(tmp_path / "b", n_grpo_steps=50, control={"time_budget": "0.5s", "checkpoint_every": 0, "progress": False}))
    records = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    steps = {r["grpo_step"] for r in records if r["kind"] == "train"}
    assert 1 <= len(steps) < 50
    assert [s for s, _ in Checkpointer(tmp_path / "b").complete()] == [len(steps)]
    assert records[-1]["kind"] == "eval"
    assert "time budget 0.5s (train clock) reached" in (tmp_path / "b" / "log.txt").read_text()


def test_injected_nan_stops_with_a_clear_message_and_a_usable_checkpoint(tmp_path, nan_reward):
    nan_reward["nan_after"] = 16 * 2  # rewards of the first two GRPO steps are fine, the third is NaN
    with pytest.raises(NonFiniteError, match="loss is nan at step 3") as error:
        train_grpo(_grpo_cfg(tmp_path / "n"))
    assert error.value.exit_code == 1 and "\n" not in str(error.value)  # a failure mid-run: one line
    assert str(error.value).endswith(f"(last checkpoint: {tmp_path / 'n' / 'checkpoints' / 'step_000002'})")
    ckpt = Checkpointer(tmp_path / "n")
    assert [s for s, _ in ckpt.complete()] == [1, 2]
    model = torch.nn.Linear(1, 1)  # the checkpoint files load
    state = torch.load(ckpt.latest() / "trainer.pt", weights_only=False)
    assert state["state"]["step"] == 2
    weights = load_file(ckpt.latest() / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert str(error.value) in (tmp_path / "n" / "log.txt").read_text()
    del model
    # resuming with the reward fixed finishes the run from that checkpoint
    nan_reward.update(n=0, nan_after=None)
    train_grpo(_grpo_cfg(tmp_path / "n", control={"resume": True, "checkpoint_every": 1, "progress": False}))
    assert [s for s, _ in ckpt.complete()][-1] == 5


def test_skip_nonfinite_counts_skips(tmp_path, nan_reward):
    nan_reward["nan_after"] = 16 * 2
    train_grpo(_grpo_cfg(tmp_path / "s", control={"skip_nonfinite": True, "checkpoint_every": 1, "progress": False}))
    log = (tmp_path / "s" / "log.txt").read_text()
    assert "skipped an optimizer step of GRPO step 3 (1 skipped so far)" in log
    assert "skipped an optimizer step of GRPO step 5 (3 skipped so far)" in log
    train = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["grpo_step"] for r in train] == [0, 1]  # steps with NaN rewards took no optimizer step
    assert [s for s, _ in Checkpointer(tmp_path / "s").complete()][-1] == 5  # and the run went on to the end


@pytest.mark.parametrize("failure, why", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    # torch reports a full disk as a RuntimeError of its zip writer, not as an OSError
    (RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed\nmore detail"), "PytorchStreamWriter failed writing file data/0"),
])
def test_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure, why):
    import cs336_alignment.checkpoint as ck

    model = torch.nn.Linear(2, 2)
    saver = Checkpointer(tmp_path)
    saver.save(1, model, None, {"step": 1})
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and "rng" in obj:  # the trainer state, written last
            raise failure
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=rf"step 2 .*\({why}.*\); the previous checkpoint .*step_000001 is intact") as e:
        saver.save(2, model, None, {"step": 2})
    assert "\n" not in str(e.value)  # one line
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert [s for s, _ in saver.complete()] == [1]
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))  # no partial directory left
    fresh = torch.nn.Linear(2, 2)
    assert saver.load(saver.latest(), fresh, None) == {"step": 1}
    assert torch.equal(fresh.weight, model.weight)


def test_grader_timeouts_are_counted_as_wrong_and_logged(tmp_path, monkeypatch):
    """A reward that times out (here: the grader reports a timeout) scores 0 and is logged; the run goes on."""
    import cs336_alignment.rewards.grader as grader

    real = grader.grade_response

    def slow_first(response, ground_truth, **kw):
        result = real(response, ground_truth, **kw)
        with grader._stats_lock:
            grader._stats["timeouts"] += 1  # as the worker pool does when it kills an overrunning worker
        return result

    monkeypatch.setattr(grader, "grade_response", slow_first)
    import cs336_alignment.rewards as rewards

    monkeypatch.setattr(rewards, "grade_response", slow_first)
    cfg = _grpo_cfg(tmp_path / "g", n_grpo_steps=1, data={**TINY_DATA})
    train_grpo(cfg)
    train = [r for r in read_jsonl(tmp_path / "g" / "metrics.jsonl") if r["kind"] == "train"]
    assert train[0]["grader_timeouts"] == 16 and train[0]["grader_errors"] == 0
    assert "16 grader timeouts" in (tmp_path / "g" / "log.txt").read_text()


def test_killed_before_the_first_checkpoint_restarts_cleanly(tmp_path):
    """No checkpoint yet: --resume starts over, and the metrics of the killed attempt are not duplicated."""

    def args(out):
        return ["ei"] + _overrides(dict(
            model="tiny", out=str(out), device="cpu", data={**TINY_DATA, "reward": f"{HELPERS}:contains_one"},
            n_ei_steps=3, batch_questions=4, rollouts_per_question=4, sampling_max_tokens=12, batch_size=4,
            micro_batch_size=2, learning_rate=1e-3, n_eval_examples=4, final_eval_full=False,
        )) + ["control.checkpoint_every=2", "control.progress=false"]

    assert _run(args(tmp_path / "clean")).returncode == 0
    assert _run(args(tmp_path / "k"), fault="step:1").returncode == -9
    assert (tmp_path / "k" / "metrics.jsonl").stat().st_size > 0 and not Checkpointer(tmp_path / "k").complete()
    assert _run(args(tmp_path / "k") + ["--resume"], fault="step:3").returncode == -9  # again, after checkpoint 2
    done = _run(args(tmp_path / "k") + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _comparable(tmp_path / "clean" / "metrics.jsonl") == _comparable(tmp_path / "k" / "metrics.jsonl")


def test_fresh_run_refuses_a_directory_with_checkpoints_unless_overwrite(tmp_path, nan_reward):
    from cs336_alignment.checkpoint import RunDirectoryInUse

    train_grpo(_grpo_cfg(tmp_path / "r", n_grpo_steps=2))
    with pytest.raises(RunDirectoryInUse, match="pass --resume to continue it"):
        train_grpo(_grpo_cfg(tmp_path / "r", n_grpo_steps=3))
    assert [s for s, _ in Checkpointer(tmp_path / "r").complete()] == [1, 2]  # untouched
    train_grpo(_grpo_cfg(tmp_path / "r", n_grpo_steps=1, control={"overwrite": True, "checkpoint_every": 0, "progress": False}))
    assert [s for s, _ in Checkpointer(tmp_path / "r").complete()] == [1]  # the old run's step 2 is gone
    train = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["grpo_step"] for r in train] == [0]


def test_resuming_a_finished_or_out_of_budget_run_trains_no_more(tmp_path, nan_reward):
    from cs336_alignment.recipes.sft import SFTConfig, train_sft

    sft = load_config(SFTConfig, None, _overrides(dict(
        model="tiny", out=str(tmp_path / "s"), device="cpu", data=TINY_DATA, max_steps=2, batch_size=4,
        micro_batch_size=2, n_eval_examples=2, eval_max_tokens=4, control={"progress": False},
    )))
    train_sft(sft)
    before = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "train"]
    sft.control.resume = True
    train_sft(sft)
    after = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["train_step"] for r in after] == [r["train_step"] for r in before] == [1, 2]

    cfg = _grpo_cfg(tmp_path / "g", n_grpo_steps=50, control={"time_budget": "0.3s", "progress": False})
    train_grpo(cfg)
    steps = len([r for r in read_jsonl(tmp_path / "g" / "metrics.jsonl") if r["kind"] == "train"])
    cfg.control.resume = True
    train_grpo(cfg)
    assert len([r for r in read_jsonl(tmp_path / "g" / "metrics.jsonl") if r["kind"] == "train"]) == steps
    assert "time budget already spent" in (tmp_path / "g" / "log.txt").read_text()
