"""Asynchronous GRPO rollouts: a generator process samples ahead with deterministic staleness, the
off-policy correction, and what happens when either process dies.

One uninterrupted async run (module fixture) is the reference: a run whose generator process is
killed mid-run and then resumed must write the same metrics, which also shows that the staleness
rule makes runs reproduce whatever the timing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cs336_alignment.config import load_config
from cs336_alignment.generation.process import GeneratorDied
from cs336_alignment.recipes.grpo import GRPOConfig, train_grpo
from cs336_alignment.run_dir import read_jsonl

REPO = Path(__file__).resolve().parents[1]
REWARD = str(REPO / "tests" / "reward_helpers.py") + ":contains_one"
ARITH = {"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 64, "n_task_val": 8,
         "reward": REWARD, "reward_in_process": True}
CLOCKS = ("time", "wall_clock", "wall_clock_train")


def config(out: Path, **kw) -> GRPOConfig:
    """3 async GRPO steps of 4 questions x 4 responses, grpo_clip with the generator's log-probs as
    pi_old, a checkpoint every step; with dynamic sampling (its extra rounds graded and sampled in
    the generator process, with the batch's weights)."""
    base = dict(
        model="tiny", out=str(out), device="cpu", seed=3, n_grpo_steps=3, learning_rate=1e-3, data=ARITH,
        rollout_batch_size=16, group_size=4, train_batch_size=16, micro_batch_size=4, loss_type="grpo_clip",
        sampling_max_tokens=12, eval_every=0, n_eval_examples=4, final_eval_full=False, log_rollout_examples=0,
        async_rollouts=True, generator_device="cpu", control={"checkpoint_every": 1, "progress": False},
        drop_all_equal_groups=True, max_resample_rounds=2,
    )
    return load_config(GRPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCKS and "second" not in k} for r in read_jsonl(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run; its generator process gets the SIGINT and SIGTERM that Ctrl-C and SLURM
    send to a whole process group, after its first batch: it must ignore them (the run decides)."""
    import signal as signals

    from cs336_alignment.generation.process import GeneratorProcess

    out = tmp_path_factory.mktemp("async") / "g"
    push = GeneratorProcess.push_weights

    def push_then_signal(self, version, policy):
        push(self, version, policy)
        if version == 1:  # the child is up and has served batch 0
            for signum in (signals.SIGINT, signals.SIGTERM):
                os.kill(self.pid, signum)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GeneratorProcess, "push_weights", push_then_signal)
        train_grpo(config(out))  # a child that died of them would end the run with GeneratorDied
    return out


def test_each_batch_is_sampled_with_the_weights_of_the_step_before(reference):
    train = [r for r in read_jsonl(reference / "metrics.jsonl") if r["kind"] == "train"]
    # batch k with the weights after step max(0, k - 1): versions 0, 0, 1; staleness 0, 1, 1
    assert [(r["grpo_step"], r["weights_version"], r["staleness"]) for r in train] == [(0, 0, 0), (1, 0, 1), (2, 1, 1)]
    # dynamic sampling: the generator process sampled each batch's extra rounds with it, exactly those the trainer used
    assert any(r["resample_rounds"] for r in train) and all(r["rounds_ahead"] == r["resample_rounds"] for r in train)
    assert all(r["frac_groups_all_equal"] == r["groups_short"] / 4 for r in train)  # only top-ups are all-equal
    assert all(r["generation_seconds"] > 0 and r["rollout_seconds"] >= 0 for r in train)
    # batch 0 came from the starting weights, which the policy still has: mu = pi (both fp32 on the CPU)
    assert abs(train[0]["behaviour_kl"]) < 1e-6 and abs(train[0]["ratio_mean"] - 1) < 1e-5
    # after a step that moved the weights, the next batch (one step stale) is off the policy: pi / mu differs from 1
    moved = [k for k in range(2) if train[k]["grad_norm"] > 0]
    assert moved and all(train[k + 1]["behaviour_kl"] > 1e-4 for k in moved), [(r["grad_norm"], r["behaviour_kl"]) for r in train]


def test_a_killed_generator_stops_the_run_in_one_line_and_resume_reproduces(reference, tmp_path, monkeypatch):
    monkeypatch.setenv("CS336_ALIGNMENT_FAULT", "generator:2")  # the child SIGKILLs itself before sampling batch 2
    with pytest.raises(GeneratorDied) as e:
        train_grpo(config(tmp_path / "g"))
    assert str(e.value) == ("the generator process died (killed by signal 9) while sampling batch 2; the last checkpoint "
                            "is intact: continue with --resume")
    assert e.value.exit_code == 1 and _generator_child(os.getpid()) is None  # nothing left behind
    checkpoints = sorted(p.name for p in (tmp_path / "g" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000001"]  # step 2's checkpoint waits for batch 2, which never came
    saved = torch.load(tmp_path / "g" / "checkpoints" / "step_000001" / "trainer.pt", weights_only=True)["state"]
    assert list(saved["async_batches"]) == ["1"] and saved["async_batches"]["1"]["version"] == 0  # in flight, kept
    monkeypatch.delenv("CS336_ALIGNMENT_FAULT")
    train_grpo(config(tmp_path / "g", control={"resume": True, "checkpoint_every": 1, "progress": False}))
    assert comparable(tmp_path / "g" / "metrics.jsonl") == comparable(reference / "metrics.jsonl")


def _generator_child(pid: int) -> int | None:
    """The pid of ``pid``'s child that runs multiprocessing's spawn entry point, if any."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:  # a thread that ended meanwhile
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                return int(child)
    return None


def test_importance_weights_are_one_when_the_generator_is_the_policy(tiny_model, tiny_tokenizer):
    from cs336_alignment.data import generate_splits, load_template, make_task
    from cs336_alignment.generation import NativeEngine, SamplingParams
    from cs336_alignment.logprobs import get_response_log_probs
    from cs336_alignment.losses import truncated_importance_weights
    from cs336_alignment.rollouts import micro_batches, sample_rollouts

    questions, _ = generate_splits(make_task("arithmetic", digits=1), 4, 1, seed=0)
    engine = NativeEngine(tiny_model, tiny_tokenizer, device="cpu", dtype=torch.float32)  # a frozen fp32 copy
    rollouts = sample_rollouts(engine, tiny_model, questions, template=load_template("r1_zero"),
                               sampling=SamplingParams(n=4, max_tokens=16, seed=1))
    (mb,) = micro_batches(rollouts, train_batch_size=16, micro_batch_size=16, pad_id=0)
    with torch.no_grad():
        pi = get_response_log_probs(tiny_model, mb.input_ids, mb.labels, positions_mask=mb.response_mask)["log_probs"]
    w, truncated = truncated_importance_weights(pi, mb.generator_logprobs, cap=2.0)  # min(pi / mu, 2) per token
    assert (w[mb.response_mask] - 1).abs().max().item() <= 1e-5 and not truncated.any()
    assert mb.response_mask.sum() > 32


@pytest.mark.parametrize(("fields", "message"), [
    ({"generator_device": "same"}, "async_rollouts needs a generator of its own: set generator_device to its device"),
    ({"loss_type": "reinforce_with_baseline"}, "async_rollouts with loss_type=reinforce_with_baseline: the samples come "
                                               "from older weights"),
    ({"max_staleness": 0}, "max_staleness must be >= 1, got 0"),
    ({"tis_cap": 0.0}, "tis_cap must be a finite number > 0"),
    ({"backend": "vllm"}, "async_rollouts runs the native engine in its process; backend='vllm' is not supported"),
])
def test_async_settings_that_cannot_work_are_refused_in_one_line(tmp_path, fields, message):
    from cs336_alignment.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=message):
        config(tmp_path / "x", **fields)
    config(tmp_path / "x", loss_type="reinforce_with_baseline", tis_cap=2.0)  # with the correction: accepted


def test_async_rollouts_under_torchrun_are_refused_before_the_run(tmp_path, monkeypatch):
    from cs336_alignment.distributed import DistributedError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match=r"^async_rollouts runs in one process"):
        train_grpo(config(tmp_path / "g"))
    assert not (tmp_path / "g").exists()


class FakeProcess:
    """Stands in for the generator process: records pushes and requests, answers in order."""

    def __init__(self) -> None:
        self.pushed: list[int] = []
        self.requests: list[tuple[int, int]] = []  # (batch, version)
        self.closed = False

    def push_weights(self, version, policy) -> None:
        self.pushed.append(version)

    def request(self, batch, prompts, sampling, *, version, refill=None) -> None:
        assert version <= self.pushed[-1], "asked for a version not pushed yet: the child would wait forever"
        self.requests.append((batch, version))
        self.refills = getattr(self, "refills", {}) | {batch: refill}

    def result(self, batch):
        from cs336_alignment.generation import Completion, GenerationResult

        asked = dict(self.requests)
        done = [GenerationResult(prompt="p", prompt_token_ids=[1], completions=[Completion("x", [2], "eos", [-0.5])])]
        refill = self.refills.get(batch)
        if refill is not None:  # as a child whose first extra round filled the batch: that round's results follow
            done += [GenerationResult(prompt=p, prompt_token_ids=[1], completions=[Completion("y", [3], "eos", [-0.5])])
                     for p in refill.rounds[0][0]]
        return done, asked[batch], 0.25

    def close(self) -> None:
        self.closed = True


def _pipeline(process, s, total, resample_rounds=0):
    from cs336_alignment.async_rollouts import AsyncRollouts
    from cs336_alignment.data import Example
    from cs336_alignment.generation import SamplingParams

    return AsyncRollouts(process, batch_of=lambda k, r=0: ([Example(question=f"q{k}.{r}", ground_truth="1")], SamplingParams()),
                         template="{question}", max_staleness=s, total=total, resample_rounds=resample_rounds)


def test_the_extra_rounds_go_with_the_batch_and_come_back_with_it():
    process = FakeProcess()
    pipeline = _pipeline(process, 1, total=4, resample_rounds=2)
    pipeline.start(0, policy=None)
    first = pipeline.sample_rollouts(0)
    refill = process.refills[0]  # batch 0 asked for with its 2 extra rounds, for the child to sample as it needs them
    assert [prompts for prompts, _, _ in refill.rounds] == [["q0.1"], ["q0.2"]] and refill.wanted == 1
    assert [r.prompt for r in first.rollouts] == ["q0.0"] and first.extra["rounds_ahead"] == 1
    asked = list(process.requests)
    ahead = pipeline.sample_rollouts(0, 1)  # sampled with the batch: nothing asked, nothing waited for
    assert process.requests == asked and ahead.seconds == 0.0 and [r.response for r in ahead.rollouts] == ["y"]
    late = pipeline.sample_rollouts(0, 2)  # a round the child did not sample: asked for now, with the current weights
    assert process.requests[-1] == ((0, 2), 0) and [r.prompt for r in late.rollouts] == ["q0.2"]


def test_an_extra_round_is_sampled_with_the_current_weights_and_never_left_in_flight():
    process = FakeProcess()
    pipeline = _pipeline(process, 1, total=4)
    pipeline.start(0, policy=None)
    pipeline.sample_rollouts(0)
    pipeline.load_weights(None, version=1)
    pipeline.sample_rollouts(1)  # asks for batch 2 (version 1), waits for batch 1 (version 0)
    extra = pipeline.sample_rollouts(1, 1)  # step 1's first extra round: the trainer's weights now, version 1
    assert process.requests[-1] == ((1, 1), 1) and extra.extra == {"generation_seconds": 0.25}
    assert [r.prompt for r in extra.rollouts] == ["q1.1"]
    assert sorted(pipeline.state()["async_batches"]) == ["2"]  # batch 2 in flight and kept; the round is not


@pytest.mark.parametrize("s", [1, 2])
def test_batch_k_is_asked_for_with_version_k_minus_the_staleness_and_resume_keeps_the_rule(s):
    fresh = FakeProcess()
    pipeline = _pipeline(fresh, s, total=6)
    pipeline.start(0, policy=None)
    assert fresh.requests == []  # asked lazily: a resumed run whose budget is spent asks for nothing
    staleness = []
    for k in range(3):
        batch = pipeline.sample_rollouts(k)
        staleness.append(batch.extra["staleness"])
        pipeline.load_weights(None, version=k + 1)
    # batch k with version max(0, k - s); asked s batches ahead
    assert fresh.requests == [(k, max(0, k - s)) for k in range(3 + s)]
    assert staleness == [min(k, s) for k in range(3)] and max(staleness) <= s
    saved = pipeline.state()  # the checkpoint after step 3: batches 3 .. 3 + s - 1 in flight, kept
    assert sorted(saved["async_batches"]) == [str(b) for b in range(3, 3 + s)]
    assert torch.load(_roundtrip(saved), weights_only=True) == saved  # plain values: loadable without unpickling code
    resumed = FakeProcess()
    again = _pipeline(resumed, s, total=6)
    again.start(3, policy=None, saved=saved)
    for k in range(3, 6):
        again.sample_rollouts(k)
        again.load_weights(None, version=k + 1)
    # kept batches are not asked for again; the rest with the same versions as in an uninterrupted run
    assert resumed.requests == [(k, max(0, k - s)) for k in range(3 + s, 6)]
    assert resumed.pushed[0] == 3
    again.close()
    assert resumed.closed


def _roundtrip(value):
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def test_the_correction_weighs_tokens_and_the_bypass_takes_mu_as_the_old_policy(tiny_model):
    from cs336_alignment.recipes.grpo import accumulate_gradients
    from cs336_alignment.rollouts import Rollout, pack_rollouts

    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(group=0, prompt="p", prompt_token_ids=torch.randint(3, 60, (5,), generator=g).tolist(), response="r",
                        response_token_ids=torch.randint(3, 60, (6,), generator=g).tolist(), ground_truth=None,
                        finish_reason="eos", generator_logprobs=[-1.0] * 6, advantage=a) for a in (1.0, -1.0)]
    mb = pack_rollouts(rollouts, pad_id=0)

    def run(**fields):
        tiny_model.zero_grad()
        sums = accumulate_gradients(tiny_model, [mb], config(Path("/tmp/unused"), gradient_accumulation_steps=None,
                                                             **fields), tokens=12, gap=None)
        return sums, torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    plain, grad_plain = run(async_rollouts=False, generator_device="same")
    # mu = e^-1 per token while the tiny model's pi is about 1/vocab: pi_old / mu < 1, so a cap of 1e9 truncates nothing
    loose, grad_loose = run(async_rollouts=False, generator_device="same", tis_cap=1e9)
    tight, grad_tight = run(async_rollouts=False, generator_device="same", tis_cap=1e-12)  # below every pi_old / mu
    assert loose["truncated_tokens"] == 0 and tight["truncated_tokens"] == 12
    assert 0 < loose["weight_sum"] / 12 < 1  # w = pi_old / mu, applied
    assert not torch.allclose(grad_loose, grad_plain)
    assert torch.allclose(grad_tight / 1e-12, grad_plain, rtol=1e-4, atol=1e-7)  # w = C on every token: C x the gradient
    bypass, _ = run()  # async grpo_clip without tis_cap: pi_old = mu, so the ratio is pi / mu, far from 1
    assert abs(bypass["ratio_sum"] / 12 - 1) > 0.5 and abs(plain["ratio_sum"] / 12 - 1) < 1e-6
    assert bypass["behaviour_kl_sum"] > 0 and plain["behaviour_kl_sum"] == 0  # logged with a correction only


def test_the_generator_process_is_born_ignoring_stop_signals_and_leaves_when_its_parent_does(monkeypatch):
    import signal as signals

    from cs336_alignment.generation import process

    with process._stop_signals_ignored():  # what a child started inside inherits through exec
        assert signals.getsignal(signals.SIGINT) == signals.SIG_IGN == signals.getsignal(signals.SIGTERM)
    assert signals.getsignal(signals.SIGINT) is not signals.SIG_IGN  # the run's own handling is back
    exits = []
    monkeypatch.setattr(process.os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setattr(process.os, "getppid", lambda: 1)  # reparented: the parent died, even by SIGKILL
    import queue as queues

    with pytest.raises(SystemExit):
        process._get(queues.Queue(), parent=12345)  # an idle child notices within a second
    with pytest.raises(SystemExit):
        process._die_with_parent(12345)  # a child whose parent is already gone when it starts
    assert exits == [0, 0]


@pytest.mark.parametrize("rewards, sampled", [
    ([[1, 0], [0, 1]], 0),  # both groups differ after the batch: no extra round
    ([[1, 1], [0, 1], [1, 0], [0, 0]], 1),  # one informative group in the batch, one in round 1: full, round 2 not sampled
    ([[0, 0], [1, 1], [0, 0], [1, 1], [0, 0], [0, 0]], 2),  # never full: every round sampled
])
def test_the_generator_process_samples_extra_rounds_until_the_batch_is_full(rewards, sampled):
    from cs336_alignment.generation import Completion, GenerationResult, SamplingParams
    from cs336_alignment.generation.process import Refill, _refilled

    groups = iter(rewards)  # each prompt's group: the rewards of its 2 responses, in the order they are sampled

    class Engine:
        calls = 0

        def generate(self, prompts, sampling):
            self.calls += 1
            return [GenerationResult(prompt=p, prompt_token_ids=[1], completions=[
                Completion(text=str(r), token_ids=[2], finish_reason="eos", logprobs=[0.0]) for r in next(groups)])
                for p in prompts]

    engine = Engine()
    first = engine.generate(["a", "b"], None)
    rounds = [([f"r{i}a", f"r{i}b"], ["t", "t"], SamplingParams()) for i in (1, 2)]
    extra = _refilled(engine, first, Refill(ground_truths=["t", "t"], rounds=rounds, wanted=2),
                      lambda text, truth: {"reward": float(text)})
    assert engine.calls == 1 + sampled and [r.prompt for r in extra] == [p for prompts, _, _ in rounds[:sampled] for p in prompts]
