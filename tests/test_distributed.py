"""cs336_alignment.distributed: FSDP2 over two CPU processes matches one process; DCP checkpoints
reshard between world sizes 1 and 2; at world size 1 everything passes through.

One torchrun launch (``tests/distributed_worker.py``, two gloo ranks) does all the two-process
checks and reports them as JSON; the tests here assert on that report, and load the two-rank
checkpoint at world size 1 in this process.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cs336_alignment.distributed import (
    DistContext,
    DistributedError,
    all_reduce,
    barrier,
    close_distributed,
    full_weights,
    gather,
    init_distributed,
    load_sharded,
    padded_share,
    save_sharded,
    shard_policy,
    share,
)
from cs336_alignment.tiny import build_tiny_model

WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def one_process(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_one_process_passes_everything_through(one_process, tiny_model):
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.mesh, ctx.is_main) == (0, 1, 0, None, True)
    assert ctx.device == torch.device("cpu") and not dist.is_initialized()
    assert shard_policy(tiny_model, ctx) is tiny_model
    assert not any(type(p).__name__ == "DTensor" for p in tiny_model.parameters())
    assert all_reduce({"a": 2, "b": 0.5}, ctx) == {"a": 2.0, "b": 0.5}
    assert all_reduce({"a": 2}, ctx, op="sum") == {"a": 2.0}
    assert share(range(5), ctx) == [0, 1, 2, 3, 4] and gather([1, 2], ctx) == [1, 2]
    barrier(ctx)
    close_distributed(ctx)
    assert not dist.is_initialized()


def test_full_weights_of_a_plain_model_come_in_buckets_under_state_dict_names(tiny_model):
    reference = tiny_model.state_dict()
    weights_iter = full_weights(tiny_model, bucket_bytes=64 << 10)
    first = next(weights_iter)
    assert torch.is_grad_enabled()  # between buckets the caller's grad mode is its own
    buckets = [first, *weights_iter]
    names = [name for b in buckets for name, _ in b]
    assert names == list(reference) and len(buckets) > 1
    seen: set[int] = set()
    for b in buckets:  # at most 64 KiB of tensors not in an earlier bucket, or one larger tensor
        new = {t.data_ptr(): t.numel() * t.element_size() for _, t in b if t.data_ptr() not in seen}
        assert len(new) == 1 or sum(new.values()) <= 64 << 10
        seen |= set(new)
    weights = dict(pair for b in buckets for pair in b)
    assert all(torch.equal(weights[k], v) for k, v in reference.items())
    # the tied LM head is the embedding, gathered once
    assert weights["lm_head.weight"].data_ptr() == weights["model.embed_tokens.weight"].data_ptr()


def test_share_refuses_a_batch_that_does_not_split_evenly():
    with pytest.raises(DistributedError, match=r"^cannot split 5 items evenly over 2 processes; make the batch a multiple of 2$"):
        share(list(range(5)), DistContext(rank=1, world_size=2))
    assert share(list(range(6)), DistContext(rank=1, world_size=2)) == [3, 4, 5]
    assert DistributedError.exit_code == 2
    with pytest.raises(ValueError, match="'min'"):
        all_reduce({"a": 1.0}, DistContext(), op="min")


def test_padded_share_gives_every_rank_as_many_items():
    # 5 items over 2 ranks: ceil(5 / 2) = 3 each; rank 0 gets 0..2, rank 1 gets 3, 4 and a repeat of 4
    assert padded_share(list(range(5)), DistContext(rank=0, world_size=2)) == ([0, 1, 2], 3)
    assert padded_share(list(range(5)), DistContext(rank=1, world_size=2)) == ([3, 4, 4], 2)
    # 2 items over 3 ranks: one each, the third rank only a filler (the last item)
    assert padded_share(["a", "b"], DistContext(rank=2, world_size=3)) == (["b"], 0)
    assert padded_share([], DistContext(rank=0, world_size=2)) == ([], 0)
    assert padded_share([7, 8], DistContext()) == ([7, 8], 2)


def test_a_torch_too_old_for_fsdp2_is_refused_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch, "__version__", "2.7.1+cpu")
    with pytest.raises(DistributedError) as e:
        init_distributed("cpu")
    assert "torch 2.7.1+cpu is too old for FSDP2 on cpu (needs >= 2.8" in str(e.value) and "\n" not in str(e.value)
    assert not dist.is_initialized()


def _train_one_process(seed: int, steps: int):
    """A plain tiny model and AdamW after ``steps`` steps on the worker's batches."""
    w = _worker()
    model = build_tiny_model(seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=w.LR, weight_decay=0.01)
    for step in range(steps):
        ids, mask = w.batch(step, model.config.vocab_size)
        (w.nll_sum(model, ids, mask) / mask[:, 1:].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def test_sharded_checkpoints_refuse_to_run_code(tmp_path, one_process):
    from cs336_alignment.distributed import _safe_planner

    model, opt = _train_one_process(seed=0, steps=1)
    with pytest.raises(FileExistsError, match="not empty"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("stale")
        save_sharded(tmp_path / "full", model, opt)
    save_sharded(tmp_path / "ckpt", model, opt)
    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(pwned),)

    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match=r"mkdir is not allowed in a checkpoint's metadata"):
        load_sharded(tmp_path / "ckpt", model, opt)
    buffer = io.BytesIO()
    torch.save({"lr": Payload()}, buffer)
    with pytest.raises(pickle.UnpicklingError):
        _safe_planner().load_bytes(None, io.BytesIO(buffer.getvalue()))
    assert not pwned.exists()


def test_two_processes_match_one_and_checkpoints_reshard(tmp_path, one_process):
    w = _worker()
    # a world-size-1 checkpoint for the worker to load at world size 2
    model, opt = _train_one_process(seed=2, steps=2)
    save_sharded(tmp_path / "ckpt1", model, opt)
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": w.optimizer_state(model, opt)},
               tmp_path / "ckpt1.expected.pt")
    assert sorted(p.name for p in (tmp_path / "ckpt1").iterdir()) == [".metadata", "__0_0.distcp"]
    # and as a one-process run writes it (a model folder and optimizer.pt), for the run's loader at two ranks
    from cs336_alignment.checkpoint import Checkpointer
    from cs336_alignment.tiny import build_tiny_tokenizer

    Checkpointer(tmp_path / "plain_run").save(2, model, opt, {"step": 2}, tokenizer=build_tiny_tokenizer())

    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(tmp_path), str(tmp_path / "ckpt1")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    reports = [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in range(2)]

    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["world_size"], rep["is_main"], rep["mesh"], rep["device"]) == (r, 2, r == 0, ["cpu", 2], "cpu")
        # collectives
        assert rep["mean"] == {"b": 5.0, "a": 1.5} and list(rep["mean"]) == ["b", "a"]
        assert rep["sum"] == {"a": 3.0, "b": 10.0}
        assert rep["max"] == {"a": 3.0, "b": 1.0}  # a: max(3 - 0, 3 - 1); b: max(0, 1)
        assert rep["padded_share"] == [[0, 1, 2], 3] if r == 0 else [[3, 4, 4], 2]
        assert rep["on_main"] == "from rank 0"  # rank 0's result, on both ranks
        # rank 0's user error: the original there, the same line and exit code on rank 1
        assert rep["on_main_error"] == ["ConfigError" if r == 0 else "RankError", "field 'x': bad", 2]
        assert rep["share"] == [[0, 1, 2], [3, 4, 5]][r]
        assert rep["gather"] == ["r0-0", "r0-1", "r0-2", "r1-3", "r1-4", "r1-5"]
        # sharded: every parameter a DTensor, each rank holding about half
        assert rep["dtensor_params"] == 1.0 and rep["local_numel"] < 0.6 * rep["full_numel"]
        assert rep["dtensor_params_after_no_grad_forward"] == 1.0  # an optimizer made after validation sees the shards
        # full weights of the sharded model = the plain model's, and load into a plain copy exactly
        assert rep["weights_names_match"] and rep["weights_max_diff"] == 0.0 and rep["buckets"] > 1
        assert all(n == 1 or size <= 64 << 10 for n, size in rep["bucket_new"])
        assert rep["plain_before_max_diff"] > 0.1 and rep["plain_after_max_diff"] == 0.0
        assert rep["vllm_names"] and rep["vllm_max_diff"] == 0.0  # a rank's vLLM engine gets the gathered weights
        # training matches one process
        for s in rep["steps"]:
            assert s["global_tokens"] == s["tokens"] > 0
            assert abs(s["loss"] - s["ref_loss"]) <= 1e-5, s
            assert s["grad_max_diff"] <= 1e-6 and s["clipped_grad_max_diff"] <= 1e-6, s
            assert s["ref_grad_norm"] > w.MAX_NORM and abs(s["grad_norm"] - s["ref_grad_norm"]) <= 1e-5 * s["ref_grad_norm"], s
        assert rep["param_max_moved"] > 1e-3  # training moved the weights
        assert rep["param_frac_within_1e-6"] >= 0.999 and rep["param_max_diff"] <= 2 * w.LR * w.STEPS, rep
        # the world-size-1 checkpoint loaded at world size 2
        assert rep["ws1_before_max_diff"] > 0.1
        assert rep["ws1_model_max_diff"] == 0.0 and rep["ws1_optimizer_max_diff"] == 0.0 and rep["ws1_lr"] == w.LR
        assert rep["ws1_local_numel"] == rep["local_numel"]
        # saved before a first step: DCP would have taken a zero-lr step to fill the optimizer; it is left out instead
        assert rep["unstepped_state_after_save"] == 0 and rep["unstepped_load_kept_optimizer"] == 0.0
        # a one-process run's checkpoint (model folder, optimizer.pt) resumed at two ranks: each keeps its slices
        assert rep["plain_model_max_diff"] == 0.0 and rep["plain_optimizer_max_diff"] == 0.0
        assert rep["plain_state"] == {"step": 2} and rep["plain_lr"] == w.LR
    assert sum(rep["local_numel"] for rep in reports) >= reports[0]["full_numel"]

    # the world-size-2 checkpoint: plain files, loaded here at world size 1
    ckpt2 = tmp_path / "ckpt2"
    assert sorted(p.name for p in ckpt2.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert all(p.is_file() and not p.is_symlink() for p in ckpt2.iterdir())
    want = torch.load(tmp_path / "expected_2.pt", weights_only=True)
    model = build_tiny_model(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    assert w.max_diff(model.state_dict(), want["model"]) > 0.1
    load_sharded(ckpt2, model, opt)
    assert w.max_diff(model.state_dict(), want["model"]) == 0.0
    got = w.optimizer_state(model, opt)
    assert w.optimizer_max_diff(got, want["optimizer"]) == 0.0
    assert got["group"] == want["optimizer"]["group"] and got["group"]["lr"] == w.LR
    assert all(s["step"].item() == w.STEPS for s in got["state"].values())

    # the run's checkpoint writer at two ranks: atomic, with a manifest of every shard; resumed at one rank
    from cs336_alignment.checkpoint import Checkpointer, verify

    latest = Checkpointer(tmp_path / "run").latest()
    assert latest.name == f"step_{w.STEPS:06d}" and verify(latest) is None
    manifest = set(json.loads((latest / "manifest.json").read_text()))
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "trainer.pt", "model/config.json"} <= manifest
    model = build_tiny_model(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    assert Checkpointer(tmp_path / "run").load(latest, model, opt) == {"step": w.STEPS}
    assert w.max_diff(model.state_dict(), want["model"]) == 0.0
    assert w.optimizer_max_diff(w.optimizer_state(model, opt), want["optimizer"]) == 0.0
