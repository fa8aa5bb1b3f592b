"""One rank of tests/test_distributed.py's two-process run (launched by torchrun; not a test module).

Usage: ``torchrun --nproc-per-node 2 tests/distributed_worker.py OUT WS1_CHECKPOINT``. Each rank
checks ``cs336_alignment.distributed`` against a single-process reference computed here on the
same global batch, and writes what it measured to ``OUT/report_<rank>.json`` (the test asserts):

1. collectives: ``all_reduce`` (mean, sum), ``share``, ``gather``, ``barrier``;
2. the sharded fresh model: ``full_weights`` against the plain model's state dict, and loaded
   into a plain copy of another model;
3. three AdamW steps, each over a global batch of 8 sequences in micro-batches of 2 (4 micro-batches
   in one process, 2 per rank here), the loss a token mean over the global batch, gradients
   clipped to norm 1: loss, gradient (before and after clipping), gradient norm and parameters
   against the reference;
4. ``save_sharded`` of the trained model into ``OUT/ckpt2`` (rank 0 also saves the full state it
   expects to load back, to ``OUT/expected_2.pt``);
5. ``load_sharded`` of the test's world-size-1 checkpoint ``WS1_CHECKPOINT`` into a fresh sharded
   model and optimizer, against ``WS1_CHECKPOINT.expected.pt`` (written by the test);
6. the same state as a one-process run's checkpoint (``OUT/plain_run``: model folder and
   optimizer.pt) through ``Checkpointer.load`` into a fresh sharded model and optimizer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cs336_alignment.config import ConfigError
from cs336_alignment.distributed import (
    all_reduce,
    barrier,
    close_distributed,
    full_weights,
    gather,
    init_distributed,
    load_sharded,
    on_main,
    padded_share,
    save_sharded,
    shard_policy,
    share,
)
from cs336_alignment.errors import UserError
from cs336_alignment.tiny import build_tiny_model, build_tiny_tokenizer

LR, STEPS, BATCH, MICRO, SEQ, MAX_NORM = 1e-3, 3, 8, 2, 16, 1.0


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered, or a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's state by parameter name, gathered ({name: {"exp_avg", "exp_avg_sq", "step"}}), and
    the hyperparameters of its one group."""
    state = {name: {k: full(v).detach().clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return {"state": state, "group": group}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute elementwise difference over the tensors of two dicts with the same keys."""
    assert list(a) == list(b), (list(a)[:3], list(b)[:3])
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def optimizer_max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert list(a["state"]) == list(b["state"]) and all(a["state"][k].keys() == b["state"][k].keys() for k in a["state"])
    return max(max_diff(a["state"][k], b["state"][k]) for k in a["state"])


def batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: token ids (BATCH, SEQ) and a response mask of varying length."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    start = torch.randint(2, 8, (BATCH, 1), generator=g)
    end = torch.randint(9, SEQ + 1, (BATCH, 1), generator=g)
    pos = torch.arange(SEQ)[None]
    return ids, ((pos >= start) & (pos < end)).float()


def nll_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the masked next tokens."""
    logp = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(logp * mask[:, 1:]).sum()


def main() -> None:
    out, ws1_checkpoint = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    began, seconds = time.perf_counter(), {}
    ctx = init_distributed("cpu", timeout_s=120)
    report: dict[str, Any] = {"rank": ctx.rank, "world_size": ctx.world_size, "is_main": ctx.is_main,
                              "mesh": [ctx.mesh.device_type, ctx.mesh.size()], "device": str(ctx.device)}

    # 1. collectives
    report["mean"] = all_reduce({"b": 10.0 * ctx.rank, "a": ctx.rank + 1.0}, ctx)
    report["sum"] = all_reduce({"a": ctx.rank + 1.0, "b": 10.0 * ctx.rank}, ctx, op="sum")
    report["max"] = all_reduce({"a": 3.0 - ctx.rank, "b": float(ctx.rank)}, ctx, op="max")
    report["padded_share"] = padded_share(list(range(5)), ctx)
    report["on_main"] = on_main(lambda: f"from rank {ctx.rank}", ctx)
    try:
        on_main(lambda: (_ for _ in ()).throw(ConfigError("field 'x': bad")), ctx)
    except UserError as e:
        report["on_main_error"] = [type(e).__name__, str(e), e.exit_code]
    report["share"] = share(list(range(6)), ctx)
    report["gather"] = gather([f"r{ctx.rank}-{i}" for i in report["share"]], ctx)
    barrier(ctx)

    seconds["init+collectives"] = time.perf_counter() - began

    # 2. the sharded fresh model and its full weights
    tokenizer = build_tiny_tokenizer()
    ref = build_tiny_model(tokenizer, seed=0).train()
    model = shard_policy(build_tiny_model(tokenizer, seed=0).train(), ctx)
    params = list(model.parameters())
    report["dtensor_params"] = sum(type(p).__name__ == "DTensor" for p in params) / len(params)
    with torch.no_grad():  # a forward without a backward (validation) leaves every parameter a shard again
        model(torch.arange(8)[None])
    report["dtensor_params_after_no_grad_forward"] = sum(type(p).__name__ == "DTensor" for p in model.parameters()) / len(params)
    report["local_numel"] = sum(p.to_local().numel() for p in params)
    report["full_numel"] = sum(p.numel() for p in ref.parameters())
    reference = {k: v.clone() for k, v in ref.state_dict().items()}
    buckets = list(full_weights(model, bucket_bytes=64 << 10))
    weights = {name: t.clone() for b in buckets for name, t in b}
    report["buckets"] = len(buckets)
    seen: set[int] = set()
    report["bucket_new"] = []  # per bucket: (tensors, bytes) not in an earlier bucket (a tied weight is gathered once)
    for b in buckets:
        new = {t.data_ptr(): t.numel() * t.element_size() for _, t in b if t.data_ptr() not in seen}
        report["bucket_new"].append([len(new), sum(new.values())])
        seen |= set(new)
    report["weights_names_match"] = list(weights) == list(reference)
    report["weights_max_diff"] = max_diff(weights, reference)
    plain = build_tiny_model(tokenizer, seed=1)  # other weights, as a per-rank generator's model would have
    report["plain_before_max_diff"] = max_diff(plain.state_dict(), reference)
    own = plain.state_dict()
    with torch.no_grad():
        for b in full_weights(model):
            for name, t in b:
                own[name].copy_(t)
    report["plain_after_max_diff"] = max_diff(plain.state_dict(), reference)
    from cs336_alignment.generation.vllm_backend import (
        policy_weights,  # what each rank's vLLM engine is sent
    )

    sent = dict(policy_weights(model, dtype=torch.float32))
    report["vllm_names"] = sorted(sent) == sorted(k for k in reference if k != "lm_head.weight")  # tied: embedding only
    report["vllm_max_diff"] = max_diff(sent, {k: reference[k] for k in sent})

    seconds["models+full_weights"] = time.perf_counter() - began

    # 3. three AdamW steps, sharded vs one process
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    steps = []
    for step in range(STEPS):
        ids, mask = batch(step, len(tokenizer))
        tokens = mask[:, 1:].sum()
        ref_loss = 0.0
        for i in range(0, BATCH, MICRO):
            loss = nll_sum(ref, ids[i:i + MICRO], mask[i:i + MICRO]) / tokens
            loss.backward()
            ref_loss += loss.item()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item()
        ref_clipped = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

        my_ids, my_mask = torch.stack(share(ids, ctx)), torch.stack(share(mask, ctx))
        global_tokens = all_reduce({"tokens": my_mask[:, 1:].sum().item()}, ctx, op="sum")["tokens"]
        my_loss = 0.0
        for i in range(0, len(my_ids), MICRO):
            loss = nll_sum(model, my_ids[i:i + MICRO], my_mask[i:i + MICRO]) / global_tokens
            loss.backward()  # shard_policy makes FSDP sum the gradients over ranks
            my_loss += loss.item()
        grads = {n: full(p.grad) for n, p in model.named_parameters()}
        norm = full(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)).item()
        clipped = {n: full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({
            "ref_loss": ref_loss, "loss": all_reduce({"loss": my_loss}, ctx, op="sum")["loss"],
            "global_tokens": global_tokens, "tokens": tokens.item(),
            "grad_max_diff": max_diff(grads, ref_grads), "ref_grad_norm": ref_norm, "grad_norm": norm,
            "clipped_grad_max_diff": max_diff(clipped, ref_clipped),
        })
    report["steps"] = steps
    trained = {name: t.clone() for b in full_weights(model) for name, t in b}
    diffs = torch.cat([(trained[k] - v).abs().flatten() for k, v in ref.state_dict().items()])
    report["param_max_diff"] = diffs.max().item()
    report["param_frac_within_1e-6"] = (diffs <= 1e-6).double().mean().item()
    report["param_max_moved"] = max_diff(trained, reference)  # how far training moved the weights
    report["lr"], report["steps_taken"] = LR, STEPS

    seconds["training"] = time.perf_counter() - began

    # 4. save at two ranks (the test loads it at one)
    expected = {"model": trained, "optimizer": optimizer_state(model, opt)}
    if ctx.is_main:
        torch.save(expected, out / "expected_2.pt")
    save_sharded(out / "ckpt2", model, opt)
    barrier(ctx)
    # the same state through the run's checkpoint writer (atomic directory, manifest, marker)
    from cs336_alignment.checkpoint import Checkpointer

    Checkpointer(out / "run").save(STEPS, model, opt, {"step": STEPS}, tokenizer=tokenizer, ctx=ctx)

    seconds["save"] = time.perf_counter() - began

    # 5. load the test's one-process checkpoint at two ranks
    fresh = shard_policy(build_tiny_model(tokenizer, seed=3).train(), ctx)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    want = torch.load(Path(f"{ws1_checkpoint}.expected.pt"), weights_only=True)
    report["ws1_before_max_diff"] = max_diff({n: t for b in full_weights(fresh) for n, t in b}, want["model"])
    load_sharded(ws1_checkpoint, fresh, fresh_opt)
    report["ws1_model_max_diff"] = max_diff({n: t.clone() for b in full_weights(fresh) for n, t in b}, want["model"])
    got = optimizer_state(fresh, fresh_opt)
    report["ws1_optimizer_max_diff"] = optimizer_max_diff(got, want["optimizer"])
    report["ws1_lr"] = got["group"]["lr"]
    report["ws1_local_numel"] = sum(p.to_local().numel() for p in fresh.parameters())

    # 5b. a checkpoint taken before the optimizer's first step (an EI step that kept nothing) leaves it untouched
    unstepped = shard_policy(build_tiny_model(tokenizer, seed=5).train(), ctx)
    unstepped_opt = torch.optim.AdamW(unstepped.parameters(), lr=0.5)
    save_sharded(out / "ckpt_unstepped", unstepped, unstepped_opt)
    report["unstepped_state_after_save"] = len(unstepped_opt.state)
    load_sharded(out / "ckpt_unstepped", fresh, fresh_opt)  # a stepped optimizer keeps its own state: nothing to load
    report["unstepped_load_kept_optimizer"] = optimizer_max_diff(optimizer_state(fresh, fresh_opt), want["optimizer"])

    # 6. the same one-process state as a run's checkpoint writer wrote it (model folder, optimizer.pt), via the run's loader
    plain = shard_policy(build_tiny_model(tokenizer, seed=4).train(), ctx)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.5)
    report["plain_state"] = Checkpointer(out / "plain_run").load(out / "plain_run" / "checkpoints" / "step_000002", plain,
                                                                 plain_opt, ctx=ctx)
    report["plain_model_max_diff"] = max_diff({n: t.clone() for b in full_weights(plain) for n, t in b}, want["model"])
    got = optimizer_state(plain, plain_opt)
    report["plain_optimizer_max_diff"] = optimizer_max_diff(got, want["optimizer"])
    report["plain_lr"] = got["group"]["lr"]

    seconds["load"] = time.perf_counter() - began
    report["seconds_since_init"] = seconds
    (out / f"report_{ctx.rank}.json").write_text(json.dumps(report, indent=1))
    close_distributed(ctx)


if __name__ == "__main__":
    main()
