"""Every GPU figure of the project from one command, section by section.

    bash benchmarks/gpu_check.sh                      # all sections, Qwen2.5-Math-1.5B shape, first GPU
    bash benchmarks/gpu_check.sh --only numerics train
    bash benchmarks/gpu_check.sh --dry-run            # the same code on CPU at tiny shapes, in seconds

Sections (each at the Qwen2.5-Math-1.5B shape with random weights, bf16 where the recipes use
it, nothing downloaded; the tokenizer is the offline tiny one, the vocabulary the real model's):

  numerics   bf16-autocast vs fp32 log-probs and entropy on one batch; the native engine's
             sampled-token log-probs vs the fp32 policy's
  generate   native engine vs transformers ``generate`` (batch 256, 128-token prompts, 512 new
             tokens, fixed lengths); the native engine at the GRPO rollout shape (256 rollouts,
             up to 1024 tokens, stop at </answer>)
  train      policy-gradient train step: tokens/s, share of a bf16 matmul rate measured in the
             same run, peak memory; plain vs chunked log-probs, with and without checkpointing
  grpo_step  one GRPO step at the handout's defaults, seconds and peak memory per phase
             (generate, rollouts, old log-probs, train, sync), colocated
  grpo_step_2gpu  the same with the generator on a second GPU ("skipped: needs 2 GPUs" otherwise)
  grpo_async_2gpu  GRPO steps with the generator on a second GPU, synchronous (an engine in this
             process) vs asynchronous (a generator process sampling the next batch with the
             previous weights, max_staleness 1, as ``async_rollouts``): seconds per step after a
             warm-up step, the trainer's wait, the generator's sampling ("skipped: needs 2 GPUs"
             otherwise; its code runs on CPU with ``grpo_sync_vs_async(ctx, torch.device("cpu"))``)
  fsdp_ws1   world size 1 through the FSDP2 path (a one-process nccl group; gloo on CPU): a sharded
             copy of the policy against the plain one, two training steps on the same batches (full
             logits, then chunked log-probs; max |diff| of loss, gradients, parameters), and one
             ``full_weights`` pass timed

The JSON result (device, driver/CUDA, versions, date, every setting and figure) is rewritten
after every section, so a run cut short keeps every figure measured so far; the table at the
end is Markdown. Adding a section: write ``def my_section(ctx: Context) -> Figures`` and
decorate it with ``@section("name", "what it measures", gpus=1)``; it runs in registration
order, gets the sizes of ``ctx.sizes`` (full and dry-run) and returns rows of
(figure, value, unit). Methods: benchmarks/TRAINING.md ("The GPU check").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
import generation as generation_bench  # noqa: E402
import grpo_step as grpo_step_bench  # noqa: E402
import train_step as train_step_bench  # noqa: E402

from cs336_alignment.distributed import DistContext, full_weights, shard_policy  # noqa: E402
from cs336_alignment.generation import NativeEngine, SamplingParams  # noqa: E402
from cs336_alignment.generation.process import GeneratorProcess  # noqa: E402
from cs336_alignment.logprobs import get_response_log_probs  # noqa: E402
from cs336_alignment.losses import grpo_microbatch_train_step  # noqa: E402
from cs336_alignment.models import resolve_device  # noqa: E402
from cs336_alignment.recipes.common import make_optimizer  # noqa: E402
from cs336_alignment.tokenization import pack_prompt_and_output_ids  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Sizes of every section: the real run (Qwen2.5-Math-1.5B shape on one H100/H200, chosen so that
# each section stays under 2 minutes and all of them under 5) and the dry run (tiny model, CPU).
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "shape": "1.5b", "numerics_batch": 4, "numerics_seq_len": 512, "numerics_prompt_len": 128,
        "engine_samples": 64, "engine_new_tokens": 64,
        "gen_batch": 256, "gen_prompt_len": 128, "gen_new_tokens": 512, "gen_repeats": 1,
        "rollout_prompts": 32, "rollout_group": 8, "rollout_max_tokens": 1024,
        "train_micro_batch": 2, "train_seq_len": 1024, "train_prompt_len": 128, "train_chunk_size": 1024,
        "train_steps": 3, "train_warmup": 1, "peak_size": 8192,
        "grpo_prompts": 32, "grpo_group": 8, "grpo_prompt_len": 128, "grpo_new_tokens": 512, "grpo_micro_batch": 2,
        "async_prompts": 16, "async_steps": 2,  # grpo_async_2gpu: half the handout's batch, 1 + 2 steps a mode
        "fsdp_steps": 2,
    },
    "dry_run": {
        "shape": "tiny", "numerics_batch": 2, "numerics_seq_len": 24, "numerics_prompt_len": 8,
        "engine_samples": 4, "engine_new_tokens": 8,
        "gen_batch": 4, "gen_prompt_len": 8, "gen_new_tokens": 8, "gen_repeats": 1,
        "rollout_prompts": 2, "rollout_group": 2, "rollout_max_tokens": 8,
        "train_micro_batch": 2, "train_seq_len": 24, "train_prompt_len": 8, "train_chunk_size": 16,
        "train_steps": 1, "train_warmup": 1, "peak_size": 128,
        "grpo_prompts": 1, "grpo_group": 2, "grpo_prompt_len": 8, "grpo_new_tokens": 4, "grpo_micro_batch": 2,
        "async_prompts": 1, "async_steps": 2,
        "fsdp_steps": 2,
    },
}

Figures = list[tuple[str, Any, str]]  # (figure, value, unit) rows of a section


@dataclass
class Context:
    """What every section gets: the device, the sizes, and the models built so far (reused)."""

    device: torch.device
    sizes: dict[str, Any]
    dry_run: bool
    cache: dict[str, Any] = field(default_factory=dict)

    def model(self, dtype: torch.dtype, checkpointing: bool = False) -> tuple[Any, Any]:
        """The policy at the section's shape (random weights, seed 0) and the tokenizer; one at a time."""
        key = (str(dtype), checkpointing)
        if self.cache.get("key") != key:
            self.cache.clear()
            free_memory(self.device)
            model, tokenizer = train_step_bench.build_model(self.sizes["shape"], self.device, dtype, checkpointing)
            self.cache.update(key=key, model=model, tokenizer=tokenizer)
        return self.cache["model"], self.cache["tokenizer"]

    def prompts(self, n: int, length: int) -> list[list[int]]:
        """``n`` random prompts of ``length`` real token ids (seeded); call after :meth:`model`."""
        tiny = self.sizes["shape"] == "tiny"
        vocab = len(self.cache["tokenizer"]) if tiny else self.cache["model"].config.vocab_size - 1000  # real ids
        g = torch.Generator().manual_seed(0)
        return torch.randint(1, vocab, (n, length), generator=g).tolist()


@dataclass
class Section:
    name: str
    description: str
    run: Callable[[Context], Figures]
    gpus: int = 1  # GPUs it needs (skipped with a reason when fewer are present)


SECTIONS: dict[str, Section] = {}


def section(name: str, description: str, gpus: int = 1) -> Callable[[Callable[[Context], Figures]], Callable]:
    """Register a section (run in registration order)."""

    def register(fn: Callable[[Context], Figures]) -> Callable[[Context], Figures]:
        SECTIONS[name] = Section(name, description, fn, gpus)
        return fn

    return register


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


@section("numerics", "bf16 autocast vs fp32 log-probs and entropy; engine vs policy sampled-token log-probs")
def numerics(ctx: Context) -> Figures:
    s = ctx.sizes
    policy, tokenizer = ctx.model(torch.float32)
    policy.eval()
    batch = train_step_bench.make_batch(s["numerics_batch"], s["numerics_seq_len"], s["numerics_prompt_len"],
                                        policy.config.vocab_size, ctx.device)
    mask = batch["response_mask"]  # (B, T)
    with torch.no_grad():
        fp32 = get_response_log_probs(policy, batch["input_ids"], batch["labels"], True)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):  # CPU autocast too: the same path in the dry run
            bf16 = get_response_log_probs(policy, batch["input_ids"], batch["labels"], True)
    rows: Figures = []
    for key, name in (("log_probs", "log-prob"), ("token_entropy", "entropy")):
        diff = (bf16[key].float() - fp32[key]).abs()[mask]  # (response positions,)
        rows += [(f"bf16 autocast vs fp32 {name}: max |diff|", diff.max().item(), "nats"),
                 (f"bf16 autocast vs fp32 {name}: mean |diff|", diff.mean().item(), "nats")]
    # the engine samples from its own bf16 copy (fp32 on CPU); score its tokens with the fp32 policy
    engine = NativeEngine(policy, tokenizer, max_num_seqs=s["engine_samples"])
    prompts = ctx.prompts(s["engine_samples"], s["numerics_prompt_len"])
    results = engine.generate(prompts, SamplingParams(max_tokens=s["engine_new_tokens"], ignore_eos=True, seed=0))
    packed = pack_prompt_and_output_ids([r.prompt_token_ids for r in results],
                                        [r.completions[0].token_ids for r in results], tokenizer.eos_token_id)
    gen = torch.zeros(packed["response_mask"].shape)  # (B, T)
    gen[packed["response_mask"]] = torch.tensor([lp for r in results for lp in r.completions[0].logprobs])
    with torch.no_grad():
        scored = get_response_log_probs(policy, packed["input_ids"].to(ctx.device), packed["labels"].to(ctx.device))
    gap = (scored["log_probs"].cpu() - gen).abs()[packed["response_mask"]]  # (response tokens,)
    del engine
    policy.train()
    return rows + [("engine vs fp32 policy sampled-token log-prob: max |diff|", gap.max().item(), "nats"),
                   ("engine vs fp32 policy sampled-token log-prob: mean |diff|", gap.mean().item(), "nats")]


@section("generate", "native engine vs transformers generate; the native engine at the GRPO rollout shape")
def generate(ctx: Context) -> Figures:
    s = ctx.sizes
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    model, tokenizer = ctx.model(dtype)
    model.config.use_cache = True  # transformers' generate needs its KV cache (build_model turns it off)
    model.eval()
    prompts = ctx.prompts(s["gen_batch"], s["gen_prompt_len"])
    native = generation_bench.bench_native(model, tokenizer, prompts, s["gen_new_tokens"], ctx.device, s["gen_batch"],
                                           s["gen_repeats"])
    hf = generation_bench.bench_hf(model, prompts, s["gen_new_tokens"], ctx.device, s["gen_repeats"])
    # the GRPO rollout shape: 32 prompts x 8 samples, stop at </answer>, at most 1024 tokens
    engine = NativeEngine(model, tokenizer, copy_weights=False, max_num_seqs=s["rollout_prompts"] * s["rollout_group"])
    rollout_prompts = ctx.prompts(s["rollout_prompts"], s["gen_prompt_len"])
    params = SamplingParams.r1_zero(max_tokens=s["rollout_max_tokens"], min_tokens=4, n=s["rollout_group"], seed=2)  # rollouts
    t0 = time.perf_counter()
    results = engine.generate(rollout_prompts, params)
    free_memory(ctx.device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    model.config.use_cache = False
    model.train()
    return [
        (f"native engine, batch {s['gen_batch']} x {s['gen_new_tokens']} new tokens", native["tokens_per_second"], "tokens/s"),
        ("transformers generate (dynamic cache), same batch", hf["tokens_per_second"], "tokens/s"),
        ("native engine / transformers", native["tokens_per_second"] / hf["tokens_per_second"], "x"),
        (f"native engine, GRPO rollouts ({s['rollout_prompts']} x {s['rollout_group']}, <= {s['rollout_max_tokens']} "
         "tokens, stop strings)", tokens / seconds, "tokens/s"),
        ("GRPO rollout batch", seconds, "s"),
    ]


@section("train", "policy-gradient train step: tokens/s, share of the matmul rate, peak memory")
def train(ctx: Context) -> Figures:
    s = ctx.sizes
    precision = "fp32-master-autocast" if ctx.device.type == "cuda" else "fp32"
    param_dtype, autocast = train_step_bench.precision_setup(precision, ctx.device)
    peak_dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    peak = train_step_bench.matmul_peak_flops(ctx.device, s["peak_size"], peak_dtype)
    rows: Figures = [(f"dense matmul rate ({str(peak_dtype).removeprefix('torch.')} {s['peak_size']}^3)", peak / 1e12,
                      "TFLOP/s")]
    for checkpointing in (False, True):
        model, _ = ctx.model(param_dtype, checkpointing)
        batch = train_step_bench.make_batch(s["train_micro_batch"], s["train_seq_len"], s["train_prompt_len"],
                                            model.config.vocab_size, ctx.device)
        flops = train_step_bench.flops_per_token(model, s["train_seq_len"])
        for path in ("plain", "chunked"):
            r = train_step_bench.bench_path(model, batch, path, s["train_chunk_size"], autocast, ctx.device,
                                            s["train_steps"], s["train_warmup"])
            what = f"{path} log-probs, checkpointing {'on' if checkpointing else 'off'}"
            if "error" in r:
                rows.append((f"{what}: tokens/s", r["error"], ""))
                continue
            rows += [(f"{what}: tokens/s", r["tokens_per_second"], "tokens/s"),
                     (f"{what}: share of the matmul rate", 100 * r["tokens_per_second"] * flops["total"] / peak, "%"),
                     (f"{what}: peak memory", r["peak_memory_gb"], "GB")]
    return rows


def _grpo_step(ctx: Context, generator_device: torch.device) -> Figures:
    s = ctx.sizes
    precision = "fp32-master-autocast" if ctx.device.type == "cuda" else "fp32"
    param_dtype, autocast = train_step_bench.precision_setup(precision, ctx.device)
    policy, tokenizer = ctx.model(param_dtype)
    prompts = ctx.prompts(s["grpo_prompts"], s["grpo_prompt_len"])
    rollouts = s["grpo_prompts"] * s["grpo_group"]
    engine = NativeEngine(policy, tokenizer, device=generator_device, max_num_seqs=rollouts, kv_cache_memory_fraction=0.3)
    args = argparse.Namespace(group_size=s["grpo_group"], new_tokens=s["grpo_new_tokens"], micro_batch=s["grpo_micro_batch"],
                              chunk_size=s["train_chunk_size"])
    r = grpo_step_bench.grpo_step("ours", policy, tokenizer, engine, prompts, args, autocast, ctx.device)
    del engine
    free_memory(generator_device)
    rows: Figures = []
    for phase in grpo_step_bench.PHASES:
        rows += [(f"{phase}: seconds", r["phases"][phase]["seconds"], "s"),
                 (f"{phase}: peak memory", r["phases"][phase]["peak_memory_gb"], "GB")]
    shape = f"{rollouts} x ({s['grpo_prompt_len']} + {s['grpo_new_tokens']})"
    return rows + [("GRPO step total", r["total_seconds"], "s"), ("rollouts x (prompt + response) tokens", shape, "")]


@section("grpo_step", "one GRPO step at the handout's defaults, per phase, generator colocated")
def grpo_step(ctx: Context) -> Figures:
    return _grpo_step(ctx, ctx.device)


@section("grpo_step_2gpu", "one GRPO step with the generator on a second GPU", gpus=2)
def grpo_step_2gpu(ctx: Context) -> Figures:
    return _grpo_step(ctx, torch.device("cuda", (ctx.device.index or 0) + 1))


@section("grpo_async_2gpu", "GRPO steps, generator on a second GPU: synchronous vs asynchronous (max_staleness 1)", gpus=2)
def grpo_async_2gpu(ctx: Context) -> Figures:
    return grpo_sync_vs_async(ctx, torch.device("cuda", (ctx.device.index or 0) + 1))


def grpo_sync_vs_async(ctx: Context, generator_device: torch.device) -> Figures:
    """``async_steps`` GRPO steps after one warm-up step, each mode on the same policy: sync samples
    with an engine on ``generator_device`` in this process, then trains, then loads the new
    weights into it; async asks a generator process on ``generator_device`` for batch k + 1
    (weights version k, pushed at the end of step k - 1), waits for batch k, trains, pushes
    version k + 1: the recipes' ``async_rollouts`` schedule (GeneratorProcess, as AsyncRollouts
    drives it). Step time = wall clock from the start of a step to its end, both devices synced."""
    s = ctx.sizes
    precision = "fp32-master-autocast" if ctx.device.type == "cuda" else "fp32"
    param_dtype, autocast = train_step_bench.precision_setup(precision, ctx.device)
    policy, tokenizer = ctx.model(param_dtype)
    group, new_tokens, rollouts = s["grpo_group"], s["grpo_new_tokens"], s["async_prompts"] * s["grpo_group"]
    prompts = ctx.prompts(s["async_prompts"], s["grpo_prompt_len"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"chunk_size": s["train_chunk_size"], "positions_mask": "response"}
    optimizer = make_optimizer(policy, 1e-6, 0.0, (0.9, 0.95))
    total = 1 + s["async_steps"]  # a warm-up step, then the timed ones

    def params(step: int) -> SamplingParams:  # fixed lengths: the same work in both modes
        return SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, n=group, seed=step)

    def train_on(results: list[Any]) -> None:
        samples = [(r.prompt_token_ids, c.token_ids, c.text, c.logprobs) for r in results for c in r.completions]
        batches = grpo_step_bench.make_micro_batches(samples, group, s["grpo_micro_batch"], pad_id, ctx.device)
        grpo_step_bench.train(policy, optimizer, batches, options, autocast)

    def synced() -> float:
        for device in {ctx.device, generator_device}:
            train_step_bench.sync(device)
        return time.perf_counter()

    sync_s: list[float] = []
    engine = NativeEngine(policy, tokenizer, device=generator_device, max_num_seqs=rollouts, kv_cache_memory_fraction=0.3)
    for step in range(total):
        t0 = synced()
        train_on(engine.generate(prompts, params(step)))
        engine.load_weights(policy)
        sync_s.append(synced() - t0)
    del engine
    free_memory(generator_device)
    async_s, waits, generation, pushes = [], [], [], []
    threads = 1 if generator_device.type == "cpu" else None  # the dry run: one CPU thread for the child
    with GeneratorProcess(policy.config, tokenizer, device=generator_device, max_num_seqs=rollouts,
                          kv_cache_memory_fraction=0.3, max_pending_weights=2, threads=threads) as process:
        process.push_weights(0, policy)
        process.request(0, prompts, params(0), version=0)
        for step in range(total):
            t0 = synced()
            if step + 1 < total:
                process.request(step + 1, prompts, params(step + 1), version=step)  # one step stale
            results, version, seconds = process.result(step)
            t1 = time.perf_counter()
            train_on(results)
            t2 = synced()
            process.push_weights(step + 1, policy)
            async_s.append(synced() - t0)
            waits.append(t1 - t0)
            generation.append(seconds)
            pushes.append(time.perf_counter() - t2)
            assert version == max(0, step - 1), (step, version)
    optimizer.state.clear()  # AdamW's moments, freed before the next section
    free_memory(ctx.device)

    def per_step(values: list[float]) -> float:
        return sum(values[1:]) / (total - 1)  # the warm-up step left out

    shape = f"{rollouts} x ({s['grpo_prompt_len']} + {new_tokens})"
    return [
        (f"sync step, engine on {generator_device} in this process (mean of {total - 1} after 1)", per_step(sync_s), "s"),
        (f"async step, generator process on {generator_device}, max_staleness 1 (mean of {total - 1} after 1)",
         per_step(async_s), "s"),
        ("sync / async step time", per_step(sync_s) / per_step(async_s), "x"),
        ("async: trainer's wait for the batch, per step", per_step(waits), "s"),
        ("async: generator's sampling, per step", per_step(generation), "s"),
        ("async: weights push (CPU copy to the process), per step", per_step(pushes), "s"),
        ("async: warm-up step (process start-up, first batch unhidden)", async_s[0], "s"),
        ("rollouts x (prompt + response) tokens", shape, ""),
    ]


PG_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


@contextlib.contextmanager
def one_process_group(device: torch.device) -> Iterator[Any]:
    """A process group of this process alone (nccl on CUDA, gloo on CPU) and its 1-D "dp" mesh, for
    the ``with`` block only: torchrun's variables are set inside it and restored after, and the group
    is destroyed even when the block fails. Refuses to run beside an existing process group."""
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; run the GPU check without torchrun")
    from torch.distributed.device_mesh import init_device_mesh

    saved = {name: os.environ.get(name) for name in PG_ENV}
    with socket.socket() as s:  # a free port (another process could take it before us: unlikely)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    try:
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=0, world_size=1, timeout=timedelta(seconds=300), device_id=device)
        else:
            dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=300))
        yield init_device_mesh(device.type, (1,), mesh_dim_names=("dp",))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over the tensors of two dicts with the same keys (DTensors gathered)."""
    assert list(a) == list(b), (list(a)[:3], list(b)[:3])
    full = [(x.full_tensor() if hasattr(x, "full_tensor") else x, y.full_tensor() if hasattr(y, "full_tensor") else y)
            for x, y in ((a[k], b[k]) for k in a)]
    return max((x.double() - y.double()).abs().max().item() for x, y in full)


@section("fsdp_ws1", "world size 1 through FSDP2: sharded vs plain policy (loss, gradients, parameters); full_weights time")
def fsdp_ws1(ctx: Context) -> Figures:
    device = ctx.device if ctx.device.type != "cuda" or ctx.device.index is not None else \
        torch.device("cuda", torch.cuda.current_device())
    precision = "fp32-master-autocast" if device.type == "cuda" else "fp32"
    param_dtype, autocast = train_step_bench.precision_setup(precision, device)
    plain, _ = ctx.model(param_dtype)
    plain.train().zero_grad(set_to_none=True)
    try:
        return _fsdp_ws1(ctx, plain, device, autocast)
    finally:
        ctx.cache.clear()  # the cached policy is trained here: a later section builds a fresh one
        free_memory(device)


def _fsdp_ws1(ctx: Context, plain: Any, device: torch.device, autocast: Callable) -> Figures:
    s = ctx.sizes
    rows: Figures = []
    with one_process_group(device) as mesh:
        dist_ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device, mesh=mesh)
        sharded = shard_policy(copy.deepcopy(plain), dist_ctx)
        n_dtensor = sum(type(p).__name__ == "DTensor" for p in sharded.parameters())
        rows.append(("parameters sharded (DTensor) / all", f"{n_dtensor} / {len(list(sharded.parameters()))}", ""))
        optimizers = [make_optimizer(m, 1e-4, 0.0, (0.9, 0.95)) for m in (plain, sharded)]
        worst = {"loss": 0.0, "gradient": 0.0, "gradient norm": 0.0, "parameter": 0.0}
        for step in range(s["fsdp_steps"]):
            batch = train_step_bench.make_batch(s["train_micro_batch"], s["train_seq_len"], s["train_prompt_len"],
                                                plain.config.vocab_size, device)
            batch["advantages"] = batch["advantages"] + step  # a different loss each step
            losses, norms = [], []
            options = {"chunk_size": s["train_chunk_size"]} if step % 2 else {}  # full logits, then the recipes' chunks
            for model in (plain, sharded):
                with autocast():
                    out = get_response_log_probs(model, batch["input_ids"], batch["labels"], **options)
                loss, _ = grpo_microbatch_train_step(out["log_probs"], batch["response_mask"], 1, "reinforce_with_baseline",
                                                     advantages=batch["advantages"])
                losses.append(loss.item())
            grads = [{n: p.grad for n, p in m.named_parameters()} for m in (plain, sharded)]
            worst["gradient"] = max(worst["gradient"], _max_diff(*grads))
            worst["loss"] = max(worst["loss"], abs(losses[0] - losses[1]))
            for model, optimizer in zip((plain, sharded), optimizers):
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            worst["gradient norm"] = max(worst["gradient norm"], abs(norms[0] - norms[1]))
            worst["parameter"] = max(worst["parameter"], _max_diff(*(dict(m.named_parameters()) for m in (plain, sharded))))
        for name, value in worst.items():
            rows.append((f"sharded vs plain, {s['fsdp_steps']} steps: {name} max |diff|", value, ""))
        # one full_weights pass (what the generator loads after every step), after a warm-up pass
        list(full_weights(sharded))
        train_step_bench.sync(device)
        t0 = time.perf_counter()
        weights = {name: t for bucket in full_weights(sharded) for name, t in bucket}
        train_step_bench.sync(device)
        seconds = time.perf_counter() - t0
        size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in weights.values()}.values())
        rows += [("full_weights pass (one rank: all-gather of 1)", seconds, "s"),
                 ("full_weights bytes per pass", size / 1e6, "MB"),
                 ("full_weights vs plain state_dict: max |diff|", _max_diff(weights, plain.state_dict()), "")]
        del weights, sharded, optimizers
    return rows


# ---------------------------------------------------------------------------------------
# Running, recording, printing
# ---------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver/CUDA, versions and date of this run."""
    env = train_step_bench.environment(device)
    env["cuda"] = torch.version.cuda
    env["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env["driver"] = None
    if device.type == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return env


def run(names: Sequence[str], *, dry_run: bool, out: Path, device: torch.device) -> dict[str, Any]:
    """Run the named sections in registration order; the JSON at ``out`` is rewritten after each."""
    sizes = SIZES["dry_run" if dry_run else "full"]
    ctx = Context(device=device, sizes=sizes, dry_run=dry_run)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    record: dict[str, Any] = {**environment(device), "dry_run": dry_run, "sizes": sizes, "sections": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for name in [n for n in SECTIONS if n in names]:
        sec = SECTIONS[name]
        if sec.gpus > 1 and gpus < sec.gpus:
            result: dict[str, Any] = {"status": f"skipped: needs {sec.gpus} GPUs", "figures": []}
        else:
            t0 = time.perf_counter()
            try:
                figures = sec.run(ctx)
                result = {"status": "ok", "figures": [list(f) for f in figures]}
            except Exception as e:  # one failing section leaves the others' figures (and says why)
                traceback.print_exc()
                result = {"status": f"failed: {type(e).__name__}: {e}", "figures": []}
            result["seconds"] = time.perf_counter() - t0
        record["sections"][name] = {"description": sec.description, **result}
        record["total_seconds"] = time.perf_counter() - t_start
        out.write_text(json.dumps(record, indent=2, default=str) + "\n")  # after every section
        print(f"[{name}] {result['status']}" + (f" ({result['seconds']:.1f} s)" if "seconds" in result else ""), flush=True)
    return record


def format_value(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def table(record: dict[str, Any]) -> str:
    """One screen of Markdown: section, figure, value."""
    lines = [f"GPU check on {record['device']} (torch {record['torch']}, CUDA {record['cuda']}, driver {record['driver']}), "
             f"{record['date']}{', DRY RUN (tiny model, CPU)' if record['dry_run'] else ''}",
             "", "| section | figure | value |", "| --- | --- | ---: |"]
    for name, sec in record["sections"].items():
        if sec["status"] != "ok":
            lines.append(f"| {name} | {sec['status']} | |")
        for figure, value, unit in sec["figures"]:
            lines.append(f"| {name} | {figure} | {format_value(value)} {unit if value is not None else ''} |".rstrip())
    lines.append(f"\ntotal {record.get('total_seconds', 0):.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), default=None, metavar="SECTION",
                    help=f"run only these sections ({', '.join(SECTIONS)})")
    ap.add_argument("--dry-run", action="store_true", help="the same code on CPU at tiny shapes (seconds)")
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/gpu_check_<device>.json)")
    ap.add_argument("--device", default=None, help="default: cuda:0 (cpu with --dry-run)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device or ("cpu" if args.dry_run else "cuda:0"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run to check the script on CPU")
    default_name = f"gpu_check_{'dry_run' if args.dry_run else device.type}.json"
    out = Path(args.out) if args.out else RESULTS / default_name
    torch.manual_seed(0)
    record = run(args.only or list(SECTIONS), dry_run=args.dry_run, out=out, device=device)
    print(table(record))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
