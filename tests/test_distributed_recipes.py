"""The recipes run data-parallel under torchrun (2 CPU processes, gloo) and compute what one process does.

Three torchrun launches: ``tests/recipes_worker.py`` running GRPO, SFT, expert iteration and a
rollout batch at two ranks; the same worker killing a rank in the middle of a GRPO run's step-3
checkpoint; and the CLI's smoke run exactly as the README starts it. The one-process references
run here, in this process, with the same configs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cs336_alignment.distributed import DistributedError
from cs336_alignment.run_dir import read_jsonl

WORKER = Path(__file__).with_name("recipes_worker.py")
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMING = ("time", "wall_clock", "seconds", "wall_clock_train")  # keys, and key endings, that hold clock readings


def _worker():
    spec = importlib.util.spec_from_file_location("recipes_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _worker()


def launch(out: Path, mode: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and k != "CS336_ALIGNMENT_FAULT"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), str(out), mode],
        env={**clean, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture()
def one_process(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks")
    result = launch(out, "train")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one_rank_grpo(tmp_path_factory) -> tuple[Path, list]:
    """The uninterrupted one-process GRPO run and its gradients (the reference of two tests)."""
    for name in TORCHRUN_ENV:
        os.environ.pop(name, None)
    out = tmp_path_factory.mktemp("one-rank") / "grpo"
    with worker.GradientCapture() as capture:
        worker.train_grpo(worker.grpo_config(out))
    return out, capture.steps


def _is_timing(key: str) -> bool:
    return key in TIMING or key.endswith(("_seconds", "_per_second"))


def assert_same_records(got: list[dict], want: list[dict], tol: float = 1e-5) -> None:
    """Record by record: the same kinds, steps and keys; every value that is no clock reading
    equal: a loss within 1e-5, other numbers within ``tol`` or a relative 1e-6 (float32 sums in
    another order) over the first 3 steps, a relative 1e-5 later (the rounding differences of
    the first steps move the weights a little: see :func:`assert_same_gradients`)."""
    assert [(r["kind"], _step(r)) for r in got] == [(r["kind"], _step(r)) for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g["kind"], _step(g), set(g) ^ set(w))
        for key in w:
            if _is_timing(key):
                continue
            if key == "loss":  # the acceptance's measure: |loss difference| <= 1e-5
                assert abs(g[key] - w[key]) <= 1e-5, (w["kind"], _step(w), g[key], w[key])
            elif isinstance(w[key], float) and isinstance(g[key], float):
                rel = 1e-6 if _step(w) <= 3 else 1e-5
                assert math.isclose(g[key], w[key], rel_tol=rel, abs_tol=tol) or (math.isnan(g[key]) and math.isnan(w[key])), \
                    (w["kind"], _step(w), key, g[key], w[key])
            else:
                assert g[key] == w[key], (w["kind"], _step(w), key, g[key], w[key])


def _step(record: dict) -> int:
    return record[f"{record['kind']}_step"]  # "train_step", "eval_step", ...


def assert_same_gradients(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> None:
    """Every optimizer step's gradient, before clipping: within 1e-6 over the first 3 steps; later,
    within 1e-4 (AdamW moves an element by about lr whatever the size of its gradient, so rounding
    differences in the first steps become small weight differences, and then gradient differences)."""
    assert len(got) == len(want) and len(want) >= 3
    diffs = [max((g - w).abs().max().item() for g, w in zip(gs, ws)) for gs, ws in zip(got, want)]
    assert max(diffs[:3]) <= 1e-6 and max(diffs) <= 1e-4, diffs
    assert all(len(gs) == len(ws) for gs, ws in zip(got, want))
    assert any(w.abs().max() > 1e-3 for ws in want for w in ws)  # the steps had a learning signal


def assert_same_parameters(got_dir: Path, want_dir: Path, steps: int) -> None:
    """Final fp32 weights: within 1e-6 for 99.9% of elements, within 2 x lr x steps everywhere
    (AdamW's update is about lr per element whatever the gradient's scale, so a rounding-level
    gradient difference can move an element by up to ~lr)."""
    from safetensors.torch import load_file

    got, want = load_file(str(got_dir / "model.safetensors")), load_file(str(want_dir / "model.safetensors"))
    assert got.keys() == want.keys()
    diffs = torch.cat([(got[k] - want[k]).abs().flatten() for k in want])
    assert (diffs <= 1e-6).double().mean().item() >= 0.999
    assert diffs.max().item() <= 2 * worker.LR * steps


def test_grpo_at_two_ranks_matches_one_process(two_ranks, one_rank_grpo, one_process):
    reference, reference_grads = one_rank_grpo
    got = read_jsonl(two_ranks / "grpo" / "metrics.jsonl")
    want = read_jsonl(reference / "metrics.jsonl")
    assert_same_records(got, want)
    train = [r for r in want if r["kind"] == "train"]
    assert len(train) == 12 and {r["grpo_step"] for r in train} == {0, 1, 2}  # 3 GRPO steps x 2 epochs x 2 steps
    assert any(r["train_reward_mean"] > 0 for r in train) and any(r["loss"] != 0 for r in train)
    # dynamic sampling: the only all-equal groups trained are the top-ups after the last round (4 groups per batch)
    assert all(r["frac_groups_all_equal"] == r["groups_short"] / 4 for r in train) and any(r["groups_dropped"] for r in train)
    assert any(r["ref_kl"] > 0 for r in train)  # the KL to the reference, computed by each rank for its share
    # the curriculum's pass rates: each rank scored its share, keyed on the global question index: the same file
    assert (two_ranks / "grpo" / "pass_rates.jsonl").read_text() == (reference / "pass_rates.jsonl").read_text()
    assert [r["eval_step"] for r in want if r["kind"] == "eval"] == [2, 3]  # 5 questions: 3 on rank 0, 2 + a repeat on rank 1
    grads = torch.load(two_ranks / "grads_grpo.pt", weights_only=True)
    assert_same_gradients(grads, reference_grads)
    assert_same_parameters(two_ranks / "grpo" / "model", reference / "model", steps=len(reference_grads))
    # rank 0 alone wrote the run's files; its checkpoints are DCP shards with every rank's RNG
    log = (two_ranks / "grpo" / "log.txt").read_text()
    assert "2 processes (torchrun), gloo on cpu" in log and "[rank 1]" not in log
    latest = two_ranks / "grpo" / "checkpoints" / "step_000003"
    assert sorted(p.name for p in (latest / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert len(torch.load(latest / "trainer.pt", weights_only=True)["rngs"]) == 2


def test_sft_at_two_ranks_matches_one_process(two_ranks, tmp_path, one_process):
    with worker.GradientCapture() as capture:
        worker.train_sft(worker.sft_config(tmp_path / "sft"))
    got = read_jsonl(two_ranks / "sft" / "metrics.jsonl")
    want = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert_same_records(got, want)
    assert [r["train_step"] for r in want if r["kind"] == "train"] == [1, 2, 3]
    assert [r["tokens"] for r in want if r["kind"] == "train"][-1] < [r["tokens"] for r in want if r["kind"] == "train"][0]
    assert_same_gradients(torch.load(two_ranks / "grads_sft.pt", weights_only=True), capture.steps)
    assert_same_parameters(two_ranks / "sft" / "model", tmp_path / "sft" / "model", steps=3)


def test_expert_iteration_at_two_ranks_matches_one_process(two_ranks, tmp_path, one_process):
    with worker.GradientCapture() as capture:
        worker.train_ei(worker.ei_config(tmp_path / "ei"))
    want = read_jsonl(tmp_path / "ei" / "metrics.jsonl")
    assert_same_records(read_jsonl(two_ranks / "ei" / "metrics.jsonl"), want)
    steps = [r for r in want if r["kind"] == "ei"]
    assert len(steps) == 2 and all(r["n_kept"] > 0 and r["rollout_entropy"] > 0 for r in steps)
    assert_same_gradients(torch.load(two_ranks / "grads_ei.pt", weights_only=True), capture.steps)


def test_the_smoke_run_under_torchrun_writes_the_one_process_records(tmp_path, monkeypatch, one_process):
    from typer.testing import CliRunner

    from cs336_alignment.cli import app

    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and k != "CS336_ALIGNMENT_FAULT"}
    launched = subprocess.run(  # torchrun --nproc-per-node 2 -m cs336_alignment run configs/grpo.yaml --smoke
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cs336_alignment",
         "run", str(worker.REPO / "configs" / "grpo.yaml"), "--smoke"],
        env={**clean, "OMP_NUM_THREADS": "1", "CS336_RUNS": str(tmp_path / "two")}, capture_output=True, text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    monkeypatch.setenv("CS336_RUNS", str(tmp_path / "one"))
    result = CliRunner().invoke(app, ["run", str(worker.REPO / "configs" / "grpo.yaml"), "--smoke"])
    assert result.exit_code == 0, result.output
    got = read_jsonl(tmp_path / "two" / "smoke" / "grpo" / "metrics.jsonl")
    assert_same_records(got, read_jsonl(tmp_path / "one" / "smoke" / "grpo" / "metrics.jsonl"))
    assert {r["kind"] for r in got} == {"train", "eval"}
    assert (tmp_path / "two" / "smoke" / "grpo" / "final.json").exists()  # rank 0 saved the gathered model and finished
    assert (tmp_path / "two" / "smoke" / "grpo" / "model" / "model.safetensors").exists()


def test_rollout_token_ids_do_not_depend_on_the_world_size(two_ranks, one_process):
    got = json.loads((two_ranks / "rollouts.json").read_text())
    want = worker.rollout_token_ids()
    assert got == want
    assert [ids[0] for ids in want] == [g for g in range(6) for _ in range(3)]  # global group indices, in order
    assert len({tuple(ids[1:]) for ids in want}) > 1


def test_a_killed_rank_stops_every_rank_and_one_process_resumes_exactly(tmp_path, one_rank_grpo, one_process):
    reference, _ = one_rank_grpo
    began = time.monotonic()
    result = launch(tmp_path, "kill", CS336_ALIGNMENT_FAULT="checkpoint:3@1")  # rank 1 dies inside step 3's save
    assert result.returncode != 0 and time.monotonic() - began < 120
    assert "exitcode  : -9" in result.stderr  # SIGKILL: rank 1; torchrun then stops rank 0
    checkpoints = tmp_path / "grpo" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000001", "step_000002"]
    assert list(checkpoints.glob(".tmp_step_000003_*"))  # the half-written one, never renamed into place
    from cs336_alignment.checkpoint import verify

    assert verify(checkpoints / "step_000002") is None
    final = worker.train_grpo(worker.grpo_config(tmp_path / "grpo", control={"resume": True, "checkpoint_every": 1,
                                                                             "progress": False}))
    assert_same_records(read_jsonl(tmp_path / "grpo" / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl"))
    want = json.loads((reference / "final.json").read_text())
    assert_same_records([{"kind": "final", "final_step": 3, **final}], [{"kind": "final", "final_step": 3, **want}])
    assert not list(checkpoints.glob(".tmp_step_*"))  # pruned by the resumed run's first checkpoint


def test_batches_that_do_not_split_over_the_ranks_are_refused_before_the_run(tmp_path, monkeypatch):
    from cs336_alignment.recipes.grpo import check_data_parallel
    from cs336_alignment.recipes.sft import train_sft

    cfg = worker.grpo_config(tmp_path / "g")  # 4 questions per step, 4 micro-batches per optimizer step
    check_data_parallel(cfg, 2)
    check_data_parallel(cfg, 4)
    with pytest.raises(DistributedError, match=r"^rollout_batch_size / group_size = 4 questions per step do not split over "
                                               r"3 processes; gradient_accumulation_steps = 4 .* over 3 processes"):
        check_data_parallel(cfg, 3)
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it: refused before any process group or directory
    with pytest.raises(DistributedError, match=r"^batch_size / micro_batch_size = 6 micro-batches per optimizer step "
                                               r"do not split over 4 processes"):
        train_sft(worker.sft_config(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_under_torchrun_a_batch_that_does_not_split_is_one_line_and_exit_2(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cs336_alignment.cli import app

    monkeypatch.setenv("CS336_RUNS", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "3")  # the smoke run's 4 questions and 8 micro-batches per step split over 1, 2, 4
    result = CliRunner().invoke(app, ["run", str(worker.REPO / "configs" / "grpo.yaml"), "--smoke"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "questions per step do not split over 3 processes" in lines[0], result.output
    assert not any(tmp_path.iterdir())  # refused before the run directory exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match=r"^field 'generator_device': 'cpu' with 2 processes; each rank generates"):
        worker.train_grpo(worker.grpo_config(tmp_path / "g", generator_device="cpu"))
    assert not (tmp_path / "g").exists()


def test_sigterm_finishes_the_step_checkpoints_it_and_exits_143(tmp_path, monkeypatch, one_process):
    # torchrun passes a SIGTERM on to every rank (and SLURM sends one at preemption): the step ends and is checkpointed
    import signal as signals

    from cs336_alignment.recipes import loop

    def term_after_step_1(point: str, step: int) -> None:  # end_of_step's fault point, after the step's log line
        if (point, step) == ("step", 1):
            os.kill(os.getpid(), signals.SIGTERM)

    monkeypatch.setattr(loop, "fault_point", term_after_step_1)
    previous = signals.getsignal(signals.SIGTERM)
    with pytest.raises(loop.Interrupted, match=r"^interrupted: stopped after GRPO step 1/3, checkpoint \S+step_000001$") as e:
        worker.train_grpo(worker.grpo_config(tmp_path / "g"))
    assert e.value.exit_code == 143 and e.value.checkpoint.name == "step_000001"
    assert signals.getsignal(signals.SIGTERM) == previous  # the run's handler is gone with the run
    assert "SIGTERM: stopping once the running GRPO step is done and checkpointed" in (tmp_path / "g" / "log.txt").read_text()
