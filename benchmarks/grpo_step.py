"""One GRPO step, phase by phase: our path against transformers' plain path, same run.

    python benchmarks/grpo_step.py                  # tiny model on CPU, reduced sizes (well under a minute)
    python benchmarks/grpo_step.py --shape 1.5b     # the handout's defaults: 32 prompts x 8, 128 + 512 tokens
    python benchmarks/grpo_step.py --shape 1.5b --checkpointing --skip-hf

A step at the handout's defaults: 256 rollouts (32 prompts x 8 samples) of 128-token
prompts, responses fixed at 512 tokens (EOS ignored), random weights; rewards are a
stand-in (the parity of the response length) because timing does not depend on them. The
phases, built from the library's primitives as the GRPO recipe runs them:

  generate   sample every rollout
  rollouts   Rollout records, group-normalised advantages, pack_rollouts into micro-batches
  old lp     log-probs of the sampling policy (needed only off-policy or for grpo_clip;
             the recipe skips it on-policy, timed here anyway)
  train      micro-batch 2 x gradient accumulation 128: per-token log-probs and entropy,
             reinforce_with_baseline + masked_mean (backward), clip, one AdamW step
  sync       load the new weights into the generator

Systems, timed in the same run on the same policy:

- ``ours``: the native engine (its own bf16 weights on GPU) and chunked log-probs over the
  response positions only (``chunk_size`` + ``positions_mask``);
- ``transformers``: ``policy.generate`` (dynamic cache) and the full-logit path.

The policy keeps fp32 master weights under bf16 autocast on GPU, as the recipes do (or
bf16 weights with --precision bf16); fp32 on CPU. Peak memory is per phase (GPU only).
Results go to benchmarks/results/grpo_step_<device>_<shape>.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script train_step.py
from train_step import (  # noqa: E402
    build_model,
    environment,
    fmt_gb,
    peak_memory_gb,
    precision_setup,
    reset_peak_memory,
    resolve_device,
    sync,
    write_results,
)

from cs336_alignment.advantages import compute_group_normalized_rewards  # noqa: E402
from cs336_alignment.generation import NativeEngine, SamplingParams  # noqa: E402
from cs336_alignment.logprobs import get_response_log_probs  # noqa: E402
from cs336_alignment.losses import grpo_microbatch_train_step  # noqa: E402
from cs336_alignment.recipes.common import make_optimizer  # noqa: E402
from cs336_alignment.rollouts import MicroBatch, Rollout, pack_rollouts  # noqa: E402

PHASES = ("generate", "rollouts", "old_log_probs", "train", "sync")


def stand_in_reward(response: str, ground_truth: Any) -> dict[str, float]:
    """1 for an even-length response text, else 0: gives groups mixed rewards, costs nothing."""
    r = float(len(response) % 2 == 0)
    return {"reward": r, "format_reward": r, "answer_reward": r}


class Phases:
    """Wall-clock seconds and peak device memory of each named phase."""

    def __init__(self, device: torch.device):
        self.device, self.records = device, {}

    def run(self, name: str, fn, *args, **kwargs):
        reset_peak_memory(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(self.device)
        self.records[name] = {"seconds": time.perf_counter() - t0, "peak_memory_gb": peak_memory_gb(self.device)}
        return out


# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------


def generate_native(engine: NativeEngine, prompts: list[list[int]], group: int, new_tokens: int, seed: int):
    """(prompt ids, response ids, response text, generator log-probs) per rollout, group by group."""
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, n=group, seed=seed)
    results = engine.generate(prompts, params)
    return [(res.prompt_token_ids, c.token_ids, c.text, c.logprobs) for res in results for c in res.completions]


def generate_hf(policy, tokenizer, prompts: list[list[int]], group: int, new_tokens: int, autocast):
    """The same with ``policy.generate`` (sampling at T=1, fixed length); no generator log-probs."""
    device = next(policy.parameters()).device
    ids = torch.tensor(prompts, device=device).repeat_interleave(group, dim=0)  # (P * G, prompt_len)
    policy.eval()
    with torch.inference_mode(), autocast():
        out = policy.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id,
        )  # (P * G, prompt_len + new_tokens)
    policy.train()
    responses = out[:, ids.shape[1] :].tolist()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [(p, r, t, [0.0] * len(r)) for p, r, t in zip(ids.tolist(), responses, texts)]


def make_micro_batches(samples, group: int, micro_batch: int, pad_id: int, device) -> list[MicroBatch]:
    """Rollout records with group-normalised advantages, packed into micro-batches."""
    rollouts = [
        Rollout(group=i // group, prompt="", prompt_token_ids=list(p), response=text, response_token_ids=list(r),
                ground_truth=None, finish_reason="length", generator_logprobs=list(lp))
        for i, (p, r, text, lp) in enumerate(samples)
    ]
    advantages, raw, _ = compute_group_normalized_rewards(
        stand_in_reward, [r.response for r in rollouts], [None] * len(rollouts), group, 1e-6, True
    )
    for r, a, rew in zip(rollouts, advantages.tolist(), raw.tolist()):
        r.advantage, r.reward = a, rew
    return [pack_rollouts(rollouts[i : i + micro_batch], pad_id, device) for i in range(0, len(rollouts), micro_batch)]


def old_log_probs(policy, micro_batches: list[MicroBatch], options: dict[str, Any], autocast) -> None:
    with torch.inference_mode(), autocast():
        for mb in micro_batches:
            mb.old_log_probs = get_response_log_probs(
                policy, mb.input_ids, mb.labels, **_masked(options, mb)
            )["log_probs"].float()  # (b, T)


def train(policy, optimizer, micro_batches: list[MicroBatch], options: dict[str, Any], autocast) -> dict[str, float]:
    """One optimizer step over all micro-batches (gradient accumulation = their number)."""
    gas = len(micro_batches)
    loss_sum, entropy_sum, tokens = 0.0, 0.0, 0
    for mb in micro_batches:
        with autocast():
            out = get_response_log_probs(policy, mb.input_ids, mb.labels, True, **_masked(options, mb))
        loss, _ = grpo_microbatch_train_step(
            out["log_probs"], mb.response_mask, gas, "reinforce_with_baseline", advantages=mb.advantages,
            length_normalization="masked_mean",
        )
        loss_sum += loss.item()
        entropy_sum += (out["token_entropy"].detach() * mb.response_mask).sum().item()
        tokens += mb.num_response_tokens
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "entropy": entropy_sum / max(tokens, 1), "grad_norm": grad_norm}


def _masked(options: dict[str, Any], mb: MicroBatch) -> dict[str, Any]:
    """Log-prob options for a micro-batch: the response mask as positions_mask when asked."""
    if options.get("positions_mask") == "response":
        return {**options, "positions_mask": mb.response_mask}
    return options


# ---------------------------------------------------------------------------------------
# One system's GRPO step
# ---------------------------------------------------------------------------------------


def grpo_step(system: str, policy, tokenizer, engine, prompts, args, autocast, device) -> dict[str, Any]:
    options = {"chunk_size": args.chunk_size, "positions_mask": "response"} if system == "ours" else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = make_optimizer(policy, 1e-6, 0.0, (0.9, 0.95))

    def generate(batch_prompts, new_tokens, seed):
        if system == "ours":
            return generate_native(engine, batch_prompts, args.group_size, new_tokens, seed)
        return generate_hf(policy, tokenizer, batch_prompts, args.group_size, new_tokens, autocast)

    # ------------------------------------------------------------------ warm-up (untimed, small)
    warm = make_micro_batches(generate(prompts[:1], 4, 0), args.group_size, args.micro_batch, pad_id, device)
    train(policy, optimizer, warm[:1], options, autocast)

    phases = Phases(device)
    # ------------------------------------------------------------------ generate
    samples = phases.run("generate", generate, prompts, args.new_tokens, 1)
    # ------------------------------------------------------------------ rollouts, advantages, micro-batches
    micro_batches = phases.run("rollouts", make_micro_batches, samples, args.group_size, args.micro_batch, pad_id, device)
    # ------------------------------------------------------------------ old log-probs
    phases.run("old_log_probs", old_log_probs, policy, micro_batches, options, autocast)
    # ------------------------------------------------------------------ train: one optimizer step
    metrics = phases.run("train", train, policy, optimizer, micro_batches, options, autocast)
    # ------------------------------------------------------------------ sync weights into the generator
    phases.run("sync", engine.load_weights if system == "ours" else (lambda _: None), policy)
    del optimizer

    new_tokens = sum(len(s[1]) for s in samples)
    positions = sum(mb.input_ids.numel() for mb in micro_batches)
    rec = phases.records
    rec["generate"]["new_tokens_per_second"] = new_tokens / rec["generate"]["seconds"]
    for name in ("old_log_probs", "train"):
        rec[name]["positions_per_second"] = positions / rec[name]["seconds"]
    return {
        "phases": rec,
        "total_seconds": sum(r["seconds"] for r in rec.values()),
        "new_tokens": new_tokens,
        "train_positions": positions,
        "micro_batches": len(micro_batches),
        "log_prob_options": options,
        "metrics": metrics,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "1.5b"], default="tiny")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default: 2 tiny, 32 1.5b)")
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 32 tiny, 128 1.5b)")
    ap.add_argument("--new-tokens", type=int, default=None, help="response tokens (default: 32 tiny, 512 1.5b)")
    ap.add_argument("--micro-batch", type=int, default=2, help="rollouts per micro-batch (handout: 2)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="rows per logit chunk on our path")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the policy")
    ap.add_argument("--precision", choices=["fp32-master-autocast", "bf16"], default="fp32-master-autocast",
                    help="policy weights (fp32 on CPU whatever this says)")
    ap.add_argument("--skip-hf", action="store_true", help="time only our path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.shape == "tiny"
    args.prompts = args.prompts or (2 if tiny else 32)
    args.prompt_len = args.prompt_len or (32 if tiny else 128)
    args.new_tokens = args.new_tokens or (32 if tiny else 512)
    precision = args.precision if device.type == "cuda" else "fp32"
    rollouts = args.prompts * args.group_size
    if rollouts % args.micro_batch:
        raise SystemExit(f"{rollouts} rollouts do not split into micro-batches of {args.micro_batch}")

    torch.manual_seed(0)  # transformers' sampling draws from the global generator
    param_dtype, autocast = precision_setup(precision, device)
    policy, tokenizer = build_model(args.shape, device, param_dtype, args.checkpointing)
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer) if tiny else policy.config.vocab_size - 1000  # real (non-padding) token ids
    prompts = torch.randint(1, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    engine = NativeEngine(policy, tokenizer, max_num_seqs=rollouts, kv_cache_memory_fraction=0.3)

    results = {"ours": grpo_step("ours", policy, tokenizer, engine, prompts, args, autocast, device)}
    if not args.skip_hf:
        results["transformers"] = grpo_step("transformers", policy, tokenizer, engine, prompts, args, autocast, device)

    record = {
        **environment(device),
        "shape": "Qwen2.5-Math-1.5B (random weights)" if not tiny else "tiny Qwen2 (random weights)",
        "precision": precision,
        "checkpointing": args.checkpointing,
        "prompts": args.prompts,
        "group_size": args.group_size,
        "rollouts": rollouts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "micro_batch": args.micro_batch,
        "gradient_accumulation_steps": rollouts // args.micro_batch,
        "chunk_size": args.chunk_size,
        "loss": "reinforce_with_baseline, masked_mean",
        "results": results,
    }
    path = write_results(record, args.out, "grpo_step", device, args.shape)

    print(
        f"{record['shape']} on {record['device']}, {precision}, {rollouts} rollouts ({args.prompts} x {args.group_size}), "
        f"prompt {args.prompt_len} + {args.new_tokens} new tokens, micro-batch {args.micro_batch} x "
        f"{record['gradient_accumulation_steps']} accumulation, checkpointing {'on' if args.checkpointing else 'off'}"
    )
    print("| system | " + " | ".join(f"{p} s (peak GB)" for p in PHASES) + " | total s | generate tok/s | train pos/s |")
    print("| --- | " + " | ".join("---:" for _ in PHASES) + " | ---: | ---: | ---: |")
    for name, r in results.items():
        ph = r["phases"]
        cells = " | ".join(f"{ph[p]['seconds']:.3f} ({fmt_gb(ph[p]['peak_memory_gb'])})" for p in PHASES)
        print(
            f"| {name} | {cells} | {r['total_seconds']:.3f} | {ph['generate']['new_tokens_per_second']:,.0f} | "
            f"{ph['train']['positions_per_second']:,.0f} |"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
