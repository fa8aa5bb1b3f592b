"""Hard time bound: adversarial answers return in time from any thread or process."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from cs336_alignment.rewards import grade_batch, grade_response, grading_stats, r1_zero_reward_fn, reset_grading_stats
from cs336_alignment.rewards.sandbox import GraderPool, get_pool

BOUND_S = 2.0  # shorter than the 5 s default to keep the suite fast
SLACK_S = 0.5  # scheduling noise on a loaded 2-core machine


def _matrix(n: int) -> str:
    rows = " \\\\ ".join(" & ".join(str((i * n + j) % 10) for j in range(n)) for i in range(n))
    return "\\begin{pmatrix}" + rows + "\\end{pmatrix}"


ADVERSARIAL: dict[str, str] = {
    "100k characters": "1+" * 50_000,
    "nested frac 5000 deep": "\\frac{" * 5000 + "1" + "}{2}" * 5000,
    "tower 9^9^9^9": "9^9^9^9",
    "huge factorial": "(9999999!)/2",
    "unbalanced braces": "{" * 20_000 + "\\frac{1}{" + "}" * 3,
    "NUL bytes": "\x00" * 1000 + "1/2" + "\x00",
    "200x200 matrix": _matrix(200),
}


def _response(answer: str) -> str:
    return f"thinking </think> <answer>{answer}</answer>"


def _grade_all(bound: float) -> list[tuple[str, float, str]]:
    timings = []
    for name, answer in ADVERSARIAL.items():
        start = time.monotonic()
        result = grade_response(_response(answer), "\\frac{1}{2}", timeout=bound)
        timings.append((name, time.monotonic() - start, result.status))
        assert result.formatted
    return timings


def _check(timings: list[tuple[str, float, str]], bound: float) -> None:
    for name, elapsed, status in timings:
        assert elapsed < bound + SLACK_S, f"{name}: {elapsed:.2f}s ({status})"
        assert status in ("ok", "timeout"), f"{name}: {status}"


@pytest.mark.timeout(60)
def test_adversarial_answers_return_in_time_from_main_thread() -> None:
    get_pool().warm_up(2)
    reset_grading_stats()
    timings = _grade_all(BOUND_S)
    _check(timings, BOUND_S)
    statuses = dict((name, status) for name, _, status in timings)
    assert statuses["huge factorial"] == "timeout"  # sympy really does hang on this one
    assert grading_stats()["timeouts"] >= 1


@pytest.mark.timeout(60)
def test_adversarial_answers_return_in_time_from_other_threads() -> None:
    results: list[list[tuple[str, float, str]]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(_grade_all(BOUND_S))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert not errors and len(results) == 2
    for timings in results:
        _check(timings, BOUND_S)


def _daemon_child(queue: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        queue.put(("ok", _grade_all(BOUND_S)))
    except BaseException as exc:  # noqa: BLE001 - sent to the parent
        queue.put(("error", repr(exc)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_adversarial_answers_return_in_time_from_daemonic_worker(method: str) -> None:
    get_pool().warm_up(1)  # a forked child must not reuse (or kill) the parent's workers
    parent_workers = get_pool().size
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_daemon_child, args=(queue,), daemon=True)
    child.start()
    kind, payload = queue.get(timeout=45)
    child.join(10)
    assert kind == "ok", payload
    _check(payload, BOUND_S)
    assert get_pool().size == parent_workers
    assert grade_response(_response("x^2+2x+1"), "(x+1)^2").correct  # parent's pool still works


@pytest.mark.timeout(30)
def test_default_time_limit_is_five_seconds_and_worker_is_replaced() -> None:
    pool = get_pool()
    pool.warm_up(1)
    killed_before = pool.killed_workers
    start = time.monotonic()
    reward = r1_zero_reward_fn(_response("(9999999!)/2"), "\\frac{1}{2}")
    elapsed = time.monotonic() - start
    assert reward == {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
    assert 4.0 < elapsed < 5.0 + SLACK_S
    assert pool.killed_workers == killed_before + 1
    # The pool replaces the killed worker and keeps grading correctly.
    assert grade_response(_response("x^2+2x+1"), "(x+1)^2").correct


@pytest.mark.timeout(60)
def test_batch_loses_only_the_overrunning_item() -> None:
    answers = ["x^2+2x+1", "(9999999!)/2", "x^2+1", "2x+2", "\\frac{" * 5000, "1/2"]
    truths = ["(x+1)^2", "\\frac{1}{2}", "(x+1)^2", "2(x+1)", "1", "\\frac{1}{2}"]
    result = grade_batch([_response(a) for a in answers], truths, timeout=BOUND_S, chunk_size=len(answers))
    assert [r.correct for r in result.results] == [True, False, False, True, False, True]
    assert [r.status for r in result.results][1] == "timeout"
    assert result.counts["timeouts"] == 1 and result.counts["errors"] == 0


@pytest.mark.timeout(30)
def test_worker_crash_is_an_error_not_an_exception() -> None:
    pool = GraderPool(max_workers=1)
    try:
        pool.warm_up(1)
        (worker,) = list(pool._all)
        os.kill(worker.proc.pid, 9)
        worker.proc.wait(5)
        outcome = pool.run([{"answer": "x^2", "truths": ["x*x"], "mode": "default"}], task_timeout=BOUND_S)
        # The dead idle worker is detected and replaced before use.
        assert outcome[0].status == "ok" and outcome[0].value is True
        bad = pool.run([{"answer": 1, "truths": None}], task_timeout=BOUND_S)
        assert bad[0].status == "error"
    finally:
        pool.shutdown()
    assert pool.size == 0


@pytest.mark.timeout(30)
def test_pool_is_safe_under_concurrent_callers() -> None:
    pool = GraderPool(max_workers=2)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        task = {"answer": f"x^2+{2 * i}x+{i * i}", "truths": [f"(x+{i})^2"], "mode": "default"}
        (outcome,) = pool.run([task], task_timeout=10.0)
        with lock:
            outcomes.append(outcome.status == "ok" and outcome.value is True)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(25)
        assert outcomes == [True] * 8
        assert pool.size <= 2
    finally:
        pool.shutdown()


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


@pytest.mark.gpu
@pytest.mark.timeout(90)
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_time_bound_holds_after_cuda_initialisation() -> None:
    """Workers are started with fork+exec, so an initialised CUDA context is no problem."""
    import torch

    torch.ones(1, device="cuda").sum().item()
    shutdown_first = get_pool()
    shutdown_first.shutdown()  # start fresh workers from the CUDA-initialised process
    _check(_grade_all(BOUND_S), BOUND_S)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_daemon_child, args=(queue,), daemon=True)
    child.start()
    kind, payload = queue.get(timeout=60)
    child.join(10)
    assert kind == "ok", payload
    _check(payload, BOUND_S)
