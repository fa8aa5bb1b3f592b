"""User rewards ('module:function', 'file.py:function') run in the grader worker pool, bounded in time."""

from __future__ import annotations

import os
import pickle
import signal
import textwrap
import time
from pathlib import Path

import pytest

from cs336_alignment import rewards
from cs336_alignment.rewards import SandboxedReward, get_pool, grader_failures, resolve_reward_fn
from cs336_alignment.rewards.sandbox import GraderPool

pytestmark = pytest.mark.timeout(60)

ZERO = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}

USER_REWARDS = textwrap.dedent("""
    import os
    import signal
    import time

    def exact(response, ground_truth):
        ok = float(response.strip() == str(ground_truth))
        return {"format_reward": 1.0, "answer_reward": ok, "reward": ok, "pid": os.getpid()}

    def typed(response, ground_truth):
        # A tuple ground truth must arrive as a tuple (it travels by pickle, not JSON).
        return {"reward": float(isinstance(ground_truth, tuple) and response in ground_truth)}

    def hang(response, ground_truth):
        time.sleep(10**9)

    def boom(response, ground_truth):
        raise RuntimeError(f"boom on {response}\\nsecond line")

    def not_a_dict(response, ground_truth):
        return [1.0]

    def no_reward(response, ground_truth):
        return {"score": 1.0}

    def die_by_sigint(response, ground_truth):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
""")


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user-reward") / "user_reward.py"
    path.write_text(USER_REWARDS)
    get_pool().warm_up(2)  # time bounds below then measure calls, not worker start-up
    return path


def test_file_reward_gives_the_in_process_values_from_another_process(reward_file) -> None:
    sandboxed = resolve_reward_fn(f"{reward_file}:exact")
    raw = resolve_reward_fn(f"{reward_file}:exact", in_process=True)
    assert isinstance(sandboxed, SandboxedReward) and not isinstance(raw, SandboxedReward)
    for response, truth in [("7", 7), ("8", 7), (" 1/2 ", "1/2"), ("\udcff", "x")]:
        mine, theirs = sandboxed(response, truth), raw(response, truth)
        assert mine.pop("pid") != os.getpid() and theirs.pop("pid") == os.getpid()
        assert mine == theirs
    assert sandboxed("7", 7)["reward"] == 1.0 and sandboxed("8", 7)["reward"] == 0.0
    assert resolve_reward_fn(f"{reward_file}:typed")("a", ("b", "a")) == {"reward": 1.0}


def test_module_reward_is_sandboxed_and_found_on_the_parents_path(reward_file, tmp_path, monkeypatch) -> None:
    (tmp_path / "user_reward_module.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))  # on the parent's path only, as a script directory would be
    sandboxed = resolve_reward_fn("user_reward_module:exact")
    raw = resolve_reward_fn("user_reward_module:exact", in_process=True)
    assert sandboxed == SandboxedReward("user_reward_module:exact", import_root=str(tmp_path))
    with grader_failures() as failures:
        mine, theirs = sandboxed("3", "3"), raw("3", "3")
    assert failures.errors == 0
    assert mine.pop("pid") != os.getpid() and theirs.pop("pid") == os.getpid()
    assert mine == theirs == {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}


def test_relative_file_path_is_made_absolute(reward_file, monkeypatch) -> None:
    monkeypatch.chdir(reward_file.parent)
    sandboxed = resolve_reward_fn("user_reward.py:exact")
    assert sandboxed.spec == f"{reward_file.resolve()}:exact"
    monkeypatch.chdir("/")
    assert sandboxed("5", "5")["reward"] == 1.0


def test_in_process_returns_the_function_itself(reward_file) -> None:
    raw = resolve_reward_fn(f"{reward_file}:exact", in_process=True)
    assert raw.__name__ == "exact" and raw.__module__.startswith("_cs336_reward_")
    assert raw("1", "1")["pid"] == os.getpid()
    assert resolve_reward_fn("r1_zero") is rewards.r1_zero_reward_fn  # built-ins are never wrapped
    assert resolve_reward_fn("cs336_alignment.rewards.countdown:countdown_reward_fn").__name__ == "countdown_reward_fn"


def test_a_hanging_reward_scores_wrong_within_the_bound_and_counts_as_a_timeout(reward_file) -> None:
    hang = resolve_reward_fn(f"{reward_file}:hang", timeout=1.0)
    killed = get_pool().killed_workers
    with grader_failures() as failures:
        start = time.monotonic()
        assert hang("x", "x") == ZERO
        elapsed = time.monotonic() - start
    assert elapsed < 2.5, elapsed
    assert (failures.timeouts, failures.errors) == (1, 0)
    assert get_pool().killed_workers == killed + 1
    assert resolve_reward_fn(f"{reward_file}:exact")("2", "2")["reward"] == 1.0  # the pool carries on


@pytest.mark.parametrize("name", ["boom", "not_a_dict", "no_reward"])
def test_a_failing_reward_scores_wrong_and_counts_as_an_error(reward_file, name, caplog) -> None:
    with grader_failures() as failures:
        assert resolve_reward_fn(f"{reward_file}:{name}")(f"x-{name}", "x") == ZERO
    assert (failures.timeouts, failures.errors) == (0, 1)
    if name == "boom":
        messages = [r.getMessage() for r in caplog.records if r.name == "cs336_alignment.rewards"]
        assert any("RuntimeError: boom on x-boom" in m and "second line" not in m for m in messages), messages


def test_resolution_errors_surface_in_the_parent(reward_file, tmp_path) -> None:
    broken = tmp_path / "broken_reward.py"
    broken.write_text("raise ImportError('missing dependency')\n")
    cases = {
        f"{reward_file}:missing": "has no callable 'missing'",
        f"{broken}:fn": "importing .* failed: missing dependency",
        f"{tmp_path}/absent.py:fn": "no file",
        "no_such_user_module:fn": "importing 'no_such_user_module' failed",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=f"cannot resolve reward function .*{message}"):
            resolve_reward_fn(spec)
    with pytest.raises(ValueError, match="timeout"):
        resolve_reward_fn(f"{reward_file}:exact", timeout=0)


def test_sandboxed_reward_pickles(reward_file) -> None:
    sandboxed = resolve_reward_fn(f"{reward_file}:exact", timeout=2.0)
    copy = pickle.loads(pickle.dumps(sandboxed))
    assert copy == sandboxed and copy.timeout == 2.0
    assert copy("4", "4")["reward"] == 1.0


def _without_pid(reward: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in reward.items() if k != "pid"}


def test_score_batch_matches_single_calls(reward_file) -> None:
    sandboxed = resolve_reward_fn(f"{reward_file}:exact")
    responses = [str(i % 7) for i in range(150)]  # three chunks of at most 64
    truths = [str(i % 5) for i in range(150)]
    batch = [_without_pid(d) for d in sandboxed.score_batch(responses, truths)]
    assert batch == [_without_pid(sandboxed(r, t)) for r, t in zip(responses, truths)]
    assert sum(d["reward"] for d in batch) == sum(r == t for r, t in zip(responses, truths)) > 0
    with grader_failures() as failures:
        assert resolve_reward_fn(f"{reward_file}:boom").score_batch(["a", "b"], ["a", "b"]) == [ZERO, ZERO]
    assert failures.errors == 2


def test_workers_ignore_sigint_and_a_worker_killed_by_it_is_an_error(reward_file, monkeypatch) -> None:
    pool = GraderPool(max_workers=1)
    monkeypatch.setattr(rewards, "get_pool", lambda: pool)
    try:
        pool.warm_up(1)
        exact = resolve_reward_fn(f"{reward_file}:exact")
        pid = int(exact("1", "1")["pid"])
        assert os.getpgid(pid) != os.getpgrp()  # Ctrl-C in a terminal does not reach it at all
        os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        assert int(exact("1", "1")["pid"]) == pid and pool.killed_workers == 0  # same worker, still serving
        (outcome,) = pool.run([{"answer": "x^2", "truths": ["x*x"], "mode": "default"}], task_timeout=5.0)
        assert outcome.status == "ok" and outcome.value is True  # and still grading
        # A worker that does die of SIGINT costs its call (an error), not the caller.
        with grader_failures() as failures:
            assert resolve_reward_fn(f"{reward_file}:die_by_sigint")("x", "x") == ZERO
        assert failures.errors == 1
        assert int(exact("1", "1")["pid"]) != pid
    finally:
        pool.shutdown()



def test_a_run_logs_its_rewards_timeouts_and_errors(reward_file, tmp_path) -> None:
    from test_recipe_parts import LoopConfig

    from cs336_alignment.checkpoint import RunControl
    from cs336_alignment.recipes.loop import RunLoop
    from cs336_alignment.rewards import score_pairs

    with RunLoop(LoopConfig(out=str(tmp_path / "run"), control=RunControl(progress=False)), "TEST") as loop:
        start = time.monotonic()
        with loop.grading():
            scores = score_pairs(resolve_reward_fn(f"{reward_file}:hang", timeout=1.0), ["a", "b"], ["a", "b"])
        elapsed = time.monotonic() - start
        with loop.grading():
            score_pairs(resolve_reward_fn(f"{reward_file}:boom"), ["in-a-run"], ["x"])
    assert scores == [ZERO, ZERO] and elapsed < 3.5, elapsed  # both bounded, in parallel workers
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "TEST step 1: 2 grader timeouts, 0 grader errors (scored as wrong)" in log
    assert "TEST step 1: 0 grader timeouts, 1 grader errors (scored as wrong)" in log
    assert "RuntimeError: boom on in-a-run" in log  # the reward's own message, in the run's log
