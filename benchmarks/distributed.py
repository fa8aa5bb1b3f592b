"""Data parallelism on PyTorch's own engine (torchrun + FSDP2): weight-gather time and training throughput per rank.

    python benchmarks/distributed.py                                       # one process, tiny model
    torchrun --nproc-per-node 2 benchmarks/distributed.py --device cpu     # two gloo ranks on CPU
    torchrun --nproc-per-node 8 benchmarks/distributed.py --model $CS336_MODEL --micro-batch 2 --seq-len 1024 \\
        --out benchmarks/results/distributed_cuda.txt --append             # eight GPUs, real model

Every rank builds the fp32 policy (``load_policy``, as the recipes do), shards it (``shard_policy``:
FSDP2 per decoder layer, then the root; nothing at world size 1), builds AdamW over the shards and
a native engine with its own plain copy of the weights (bf16 on CUDA, fp32 on CPU). Then, timed on
every rank and reported by rank 0:

- weight gather: one ``full_weights(policy)`` pass consumed and dropped (the all-gathers alone),
  and one ``engine.load_weights(policy)`` (the same pass copied into the engine's copy: what a
  recipe does after each optimizer step), each ``--gather-repeats`` times after one warm-up,
  all ranks starting together; mean and max over repeats and ranks, and the bytes of one full
  model (each rank receives (N - 1) / N of them);
- training: ``--steps`` steps after ``--warmup`` on random tokens, each forward + backward (the
  recipes' chunked log-probs and REINFORCE-with-baseline loss), gradient clipping and an AdamW step on a
  micro-batch of ``--micro-batch`` x ``--seq-len`` tokens per rank (so the global batch grows with
  the world size); tokens/s per rank over the timed steps, and the aggregate (all ranks' tokens
  over the slowest rank's time).

Rank 0 prints a short table; ``--out FILE`` writes it as text (``--append`` adds it to FILE). On
CPU the ranks share the machine's cores: throughput there says little about GPU scaling.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts train_step.py, results_file.py
from results_file import write_results  # noqa: E402
from train_step import sync, train_step  # noqa: E402

from cs336_alignment.distributed import (  # noqa: E402
    DistContext,
    barrier,
    close_distributed,
    full_weights,
    gather,
    init_distributed,
    shard_policy,
)
from cs336_alignment.models import autocast, load_policy  # noqa: E402

HEADER = ("# Data parallelism on PyTorch's own engine (torchrun + FSDP2): benchmarks/distributed.py\n"
          "# weight gather = full_weights over all ranks (what each rank's native engine loads after a step);\n"
          "# training = forward + backward + clip + AdamW through shard_policy, on random tokens.\n")
CPU_NOTE = ("# On CPU every rank shares this machine's {cores} cores with the others and with whatever else runs on it:\n"
            "# the tokens/s figures are noisy (run to run, and between ranks) and say nothing about GPU scaling.\n")


def random_batch(micro_batch: int, seq_len: int, vocab: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (B, T) and their one-shifted labels; the last 4/5 of positions are the response."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g)  # (B, T + 1)
    mask = torch.zeros(micro_batch, seq_len, dtype=torch.bool)  # (B, T)
    mask[:, max(0, seq_len // 5 - 1):] = True
    return {"input_ids": full[:, :-1].to(device), "labels": full[:, 1:].to(device), "response_mask": mask.to(device),
            "advantages": torch.randn(micro_batch, 1, generator=g).to(device)}  # (B, 1)


def timed_collective(fn, ctx: DistContext, repeats: int) -> list[float]:
    """Seconds of ``fn()`` on this rank, ``repeats`` times after one warm-up, every rank starting together."""
    fn()
    times = []
    for _ in range(repeats):
        barrier(ctx)
        sync(ctx.device)
        t0 = time.perf_counter()
        fn()
        sync(ctx.device)
        times.append(time.perf_counter() - t0)
    return times


def gather_only(policy: torch.nn.Module) -> int:
    """One full_weights pass (default buckets, as the engine's), every bucket dropped; returns the
    bytes of the distinct tensors gathered."""
    seen: dict[int, int] = {}
    for bucket in full_weights(policy):
        for _, tensor in bucket:
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def launcher(ctx: DistContext) -> str:
    """The command that ran this, as typed (torchrun's own flags reduced to the process count)."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    script = "benchmarks/distributed.py"
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun
        nnodes = ctx.world_size // int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = f"--nnodes {nnodes} " if nnodes > 1 else ""
        return f"torchrun {nodes}--nproc-per-node {os.environ['LOCAL_WORLD_SIZE']} {script} {args}".rstrip()
    return f"python {script} {args}".rstrip()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (the offline tiny model) or a model folder (default: tiny)")
    ap.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available; cuda:<LOCAL_RANK> per rank)")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step (default: 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="positions per sequence (default: 128 tiny, 1024 otherwise)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (default: 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default: 2)")
    ap.add_argument("--gather-repeats", type=int, default=3, help="timed weight-gather passes of each kind (default: 3)")
    ap.add_argument("--chunk-size", type=int, default=1024,
                    help="log-probs in chunks of this many positions, as the recipes' logprob_chunk_size (default: 1024); "
                         "0: the full-logits path")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the decoder layers")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per rank (default: 1 under torchrun on CPU, else torch's)")
    ap.add_argument("--out", default=None, help="write the table to this text file (rank 0)")
    ap.add_argument("--append", action="store_true", help="with --out: add to the file instead of replacing it")
    args = ap.parse_args()

    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.threads or (torchrun and cpu):
        torch.set_num_threads(args.threads or 1)
    ctx = init_distributed(args.device, timeout_s=600)
    device = ctx.device
    seq_len = args.seq_len or (128 if args.model == "tiny" else 1024)

    policy, tokenizer = load_policy(args.model, device, seed=0, gradient_checkpointing=args.checkpointing)
    policy.config.use_cache = False
    n_params = sum(p.numel() for p in policy.parameters())
    policy = shard_policy(policy, ctx)
    from cs336_alignment.generation import NativeEngine
    from cs336_alignment.recipes.common import make_optimizer

    optimizer = make_optimizer(policy, 1e-6, 0.0, (0.9, 0.95))
    engine = NativeEngine(policy, tokenizer, max_num_seqs=1)  # its own plain copy (a collective on a sharded policy)

    # (a) weight gather
    gathered = gather_only(policy)
    gather_s = timed_collective(functools.partial(gather_only, policy), ctx, args.gather_repeats)
    load_s = timed_collective(functools.partial(engine.load_weights, policy), ctx, args.gather_repeats)
    del engine

    # (b) training throughput
    batch = random_batch(args.micro_batch, seq_len, policy.config.vocab_size, seed=1000 + ctx.rank, device=device)
    options = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    context = lambda: autocast(device)  # noqa: E731 - bf16 autocast on GPU, nothing on CPU (as the recipes)
    for _ in range(args.warmup):
        train_step(policy, optimizer, batch, options, context)
    step_s = []
    barrier(ctx)
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(policy, optimizer, batch, options, context)
        sync(device)
        step_s.append(time.perf_counter() - t0)
    tokens = args.micro_batch * seq_len
    mine = {"rank": ctx.rank, "gather_s": gather_s, "load_s": load_s, "step_s": step_s,
            "tokens_per_s": tokens * len(step_s) / sum(step_s), "median_step_s": statistics.median(step_s)}
    ranks = gather([mine], ctx)
    close_distributed(ctx)
    if not ctx.is_main:
        return

    def mean_max(key: str) -> tuple[float, float]:
        values = [t for r in ranks for t in r[key]]
        return statistics.mean(values), max(values)

    slowest = max(sum(r["step_s"]) for r in ranks)
    aggregate = tokens * args.steps * ctx.world_size / slowest
    threads = torch.get_num_threads()
    backend = ("nccl" if device.type == "cuda" else "gloo") if ctx.world_size > 1 else "none (one process)"
    model_name = "tiny Qwen2 (random weights)" if args.model == "tiny" else args.model
    lines = [
        f"## world size {ctx.world_size}: {launcher(ctx)}",
        f"date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"device: {device_name(device)}, {device.type}{f', {threads} thread(s) per rank' if device.type == 'cpu' else ''}; "
        f"world size {ctx.world_size}; process group: {backend}",
        f"model: {model_name}, {n_params:,} parameters, fp32 master weights "
        f"({'sharded with FSDP2' if ctx.world_size > 1 else 'unsharded: shard_policy does nothing at world size 1'}); "
        f"engine copy in {'bfloat16' if device.type == 'cuda' else 'float32'}",
        f"training: micro-batch {args.micro_batch} x {seq_len} tokens per rank per step "
        f"({args.micro_batch * ctx.world_size} sequences a step over all ranks), "
        f"{f'chunked ({args.chunk_size} positions)' if args.chunk_size else 'full-logits'} log-probs, "
        f"checkpointing {'on' if args.checkpointing else 'off'}, {args.steps} timed steps after {args.warmup}",
    ]
    if device.type == "cpu":
        lines.append(f"note: the {ctx.world_size} rank(s) share this machine's {os.cpu_count()} CPU cores (and whatever else "
                     "runs on it): tokens/s is noisy, and shows that the path runs, not how it scales on GPUs")
    lines += [
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| full model gathered per pass (fp32) | {gathered / 1e6:,.2f} MB |",
    ]
    for key, what in (("gather_s", "full_weights pass (gather only)"),
                      ("load_s", "engine.load_weights (gather + copy into the engine)")):
        mean, worst = mean_max(key)
        lines.append(f"| {what}: mean / max over {args.gather_repeats} repeats x {ctx.world_size} rank(s) "
                     f"| {mean:.4f} / {worst:.4f} s |")
    for r in ranks:
        lines.append(f"| rank {r['rank']}: training tokens/s (median step {r['median_step_s'] * 1000:.1f} ms) "
                     f"| {r['tokens_per_s']:,.0f} |")
    lines.append(f"| all {ctx.world_size} rank(s): training tokens/s (all tokens / slowest rank's time) | {aggregate:,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        write_results(args.out, text, header=HEADER + (CPU_NOTE.format(cores=os.cpu_count()) if device.type == "cpu" else ""),
                      append=args.append)


if __name__ == "__main__":
    main()
