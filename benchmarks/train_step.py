"""Training throughput of one policy-gradient step, full-logit path against chunked log-probs.

    python benchmarks/train_step.py                          # tiny model on CPU (defaults sized for it)
    python benchmarks/train_step.py --shape 1.5b --checkpointing --micro-batch 8 --seq-len 1024
    python benchmarks/train_step.py --shape 1.5b --checkpointing --micro-batch 16 --paths chunked,chunked_response_only
    python benchmarks/train_step.py --shape 1.5b --precision fp32-master-autocast --checkpointing

One step = per-token log-probs and entropy of a micro-batch (``get_response_log_probs``),
the REINFORCE-with-baseline loss with masked_mean (``grpo_microbatch_train_step``, which
calls backward), gradient clipping and an AdamW step. Paths, timed in the same run on the
same model and batch:

- ``plain``: the handout's path, ``model(input_ids).logits`` (all (B, T, V) logits in fp32);
- ``chunked``: ``chunk_size=C``, logits C rows at a time, recomputed in the backward;
- ``chunked_response_only``: the same with ``positions_mask`` = the response mask, so the
  prompt positions cost no logits.

Tokens/s counts every position of the micro-batch (B x T). The share of the matmul rate
counts 6 x parameters + 6 x layers x heads x head_dim x T (causal attention, forward and
backward) FLOPs per token, against a dense matmul measured in the same run (bf16 8192^3 on
GPU, fp32 on CPU). Checkpointing's recomputation is not counted. Results (with device,
versions and date) go to benchmarks/results/train_step_<device>_<shape>.json and are
printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from cs336_alignment.models import enable_gradient_checkpointing, resolve_device  # noqa: F401 (resolve_device: siblings)

PATHS = ("plain", "chunked", "chunked_response_only")
PRECISIONS = ("bf16", "fp32-master-autocast", "fp32")


# ---------------------------------------------------------------------------------------
# Shared with grpo_step.py
# ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: str, device: torch.device, param_dtype: torch.dtype, checkpointing: bool = False):
    """The tiny Qwen2 or the Qwen2.5-Math-1.5B shape (random weights) in train mode, and a tokenizer."""
    from transformers import AutoModelForCausalLM

    from cs336_alignment.tiny import build_tiny_model, build_tiny_tokenizer, qwen25_math_1p5b_config

    tokenizer = build_tiny_tokenizer()
    if shape == "tiny":
        model = build_tiny_model(tokenizer, seed=0)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(qwen25_math_1p5b_config(), dtype=param_dtype)
    model = model.to(device, param_dtype)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.config.use_cache = False
    return model.train(), tokenizer


def apply_liger(model: Any) -> None:
    """liger-kernel's fused RoPE / RMSNorm / SwiGLU on the model body: the recipes' ``use_liger_kernel``."""
    from cs336_alignment.models import MissingPackage, use_liger_kernel

    try:
        use_liger_kernel(model)
    except MissingPackage as e:
        raise SystemExit(f"--liger: {e}") from None


def precision_setup(precision: str, device: torch.device) -> tuple[torch.dtype, Any]:
    """(parameter dtype, autocast context factory) for a --precision choice."""
    if precision == "bf16":
        return torch.bfloat16, contextlib.nullcontext
    if precision == "fp32-master-autocast":
        return torch.float32, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.float32, contextlib.nullcontext


def matmul_peak_flops(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a dense size^3 matmul (2 size^3 FLOPs), best of ``repeats`` after a warm-up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def flops_per_token(model: Any, seq_len: int) -> dict[str, float]:
    """6 N + 6 L H d T: dense matmuls (tied embedding counted once) plus causal attention.

    Attention per token per layer: QK^T and AV are 2 x 2 H d t FLOPs at position t, t ~ T/2
    on average under the causal mask: 2 H d T forward, x 3 with the backward.
    """
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len
    return {"params": n_params, "dense": 6 * n_params, "attention": attention, "total": 6 * n_params + attention}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (GB); None on CPU (not measured)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def write_results(record: dict[str, Any], out: str, name: str, device: torch.device, shape: str) -> Path:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device.type}_{shape.replace('.', 'p')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def fmt_gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


# ---------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------


def make_batch(micro_batch: int, seq_len: int, prompt_len: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids; the last seq_len - prompt_len + 1 label positions are the response."""
    g = torch.Generator().manual_seed(0)
    full = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g)  # (B, T + 1)
    mask = torch.zeros(micro_batch, seq_len, dtype=torch.bool)  # (B, T)
    mask[:, prompt_len - 1 :] = True  # labels[t] = full[t + 1] is a response token from t = prompt_len - 1
    return {
        "input_ids": full[:, :-1].to(device),  # (B, T)
        "labels": full[:, 1:].to(device),  # (B, T)
        "response_mask": mask.to(device),  # (B, T)
        "advantages": torch.randn(micro_batch, 1, generator=g).to(device),  # (B, 1)
    }


def path_options(path: str, chunk_size: int, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword options of get_response_log_probs for a path."""
    if path == "plain":
        return {}
    if path == "chunked":
        return {"chunk_size": chunk_size}
    return {"chunk_size": chunk_size, "positions_mask": batch["response_mask"]}


def train_step(model: Any, optimizer: Any, batch: dict[str, torch.Tensor], options: dict[str, Any], autocast) -> float:
    """One policy-gradient step on one micro-batch; returns the mean response-token entropy."""
    from cs336_alignment.logprobs import get_response_log_probs
    from cs336_alignment.losses import grpo_microbatch_train_step

    with autocast():
        out = get_response_log_probs(model, batch["input_ids"], batch["labels"], True, **options)
    grpo_microbatch_train_step(
        out["log_probs"], batch["response_mask"], 1, "reinforce_with_baseline", advantages=batch["advantages"]
    )
    mask = batch["response_mask"]
    entropy = ((out["token_entropy"].detach() * mask).sum() / mask.sum()).item()  # logged, as the recipes do
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return entropy


def bench_path(model, batch, path: str, chunk_size: int, autocast, device, steps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s (median step) and peak memory of ``steps`` timed steps after ``warmup``."""
    from cs336_alignment.recipes.common import make_optimizer

    options = path_options(path, chunk_size, batch)
    optimizer = make_optimizer(model, 1e-6, 0.0, (0.9, 0.95))
    reset_peak_memory(device)
    try:
        for _ in range(warmup):
            train_step(model, optimizer, batch, options, autocast)
        times = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            entropy = train_step(model, optimizer, batch, options, autocast)
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        del optimizer
        reset_peak_memory(device)
        return {"error": "out of memory"}
    seconds = sorted(times)[len(times) // 2]  # median
    tokens = batch["input_ids"].numel()
    del optimizer
    return {
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds,
        "peak_memory_gb": peak_memory_gb(device),
        "mean_entropy": entropy,
        "options": {k: (v if isinstance(v, int) else "response_mask") for k, v in options.items()},
    }


def agreement(model, batch, chunk_size: int, autocast, rows: int = 2) -> dict[str, float]:
    """Largest |plain - chunked| of log-probs and entropy on a few rows, same weights, no grad."""
    from cs336_alignment.logprobs import get_response_log_probs

    ids, labels = batch["input_ids"][:rows], batch["labels"][:rows]
    with torch.no_grad(), autocast():
        a = get_response_log_probs(model, ids, labels, True)
        b = get_response_log_probs(model, ids, labels, True, chunk_size=chunk_size)
    return {f"max_abs_diff_{k}": (a[k] - b[k]).abs().max().item() for k in a}


def logits_bytes_at_once(path: str, batch: dict[str, torch.Tensor], chunk_size: int, vocab: int) -> int:
    """Computed, not measured: bytes of one fp32 copy of the largest block of logits a path holds."""
    rows = batch["input_ids"].numel()
    if path == "chunked_response_only":
        rows = int(batch["response_mask"].sum())
    return 4 * vocab * (rows if path == "plain" else min(rows, chunk_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "1.5b"], default="tiny")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="positions per sequence (default: 256 tiny, 1024 1.5b)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt positions (default: seq-len / 5, as 128 of 640)")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per logit chunk (default: 256 tiny, 1024 1.5b)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the decoder layers")
    ap.add_argument("--precision", choices=PRECISIONS, default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path; the median is reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    ap.add_argument("--liger", action="store_true", help="liger-kernel's fused RoPE / RMSNorm / SwiGLU (if installed)")
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak rate (default: 8192 GPU, 1024 CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.shape == "tiny"
    micro_batch = args.micro_batch or 8
    seq_len = args.seq_len or (256 if tiny else 1024)
    prompt_len = args.prompt_len or max(1, seq_len // 5)
    chunk_size = args.chunk_size or (256 if tiny else 1024)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        raise SystemExit(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    if not 1 <= prompt_len <= seq_len:
        raise SystemExit("--prompt-len must be between 1 and --seq-len")

    param_dtype, autocast = precision_setup(precision, device)
    model, _ = build_model(args.shape, device, param_dtype, args.checkpointing)
    if args.liger:
        apply_liger(model)
    vocab = model.config.vocab_size
    batch = make_batch(micro_batch, seq_len, prompt_len, vocab, device)
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak_flops(device, peak_size, peak_dtype)
    flops = flops_per_token(model, seq_len)

    results: dict[str, Any] = {}
    for path in paths:
        r = bench_path(model, batch, path, chunk_size, autocast, device, args.steps, args.warmup)
        if "error" not in r:
            r["matmul_rate_fraction"] = r["tokens_per_second"] * flops["total"] / peak
        r["fp32_logits_bytes_at_once_computed"] = logits_bytes_at_once(path, batch, chunk_size, vocab)
        results[path] = r

    record = {
        **environment(device),
        "shape": "Qwen2.5-Math-1.5B (random weights)" if not tiny else "tiny Qwen2 (random weights)",
        "precision": precision,
        "checkpointing": args.checkpointing,
        "liger": args.liger,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "prompt_len": prompt_len,
        "chunk_size": chunk_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "flops_per_token": flops,
        "matmul_peak": {"dtype": str(peak_dtype).removeprefix("torch."), "size": peak_size, "tflops": peak / 1e12},
        "agreement_plain_vs_chunked": agreement(model, batch, chunk_size, autocast),
        "results": results,
    }
    path = write_results(record, args.out, "train_step", device, args.shape)

    print(
        f"{record['shape']} on {record['device']}, {precision}, micro-batch {micro_batch} x {seq_len} "
        f"(prompt {prompt_len}), chunk {chunk_size}, checkpointing {'on' if args.checkpointing else 'off'}; "
        f"matmul peak {peak / 1e12:.2f} TFLOP/s ({record['matmul_peak']['dtype']} {peak_size}^3)"
    )
    print("| path | tokens/s | share of matmul rate | s/step | peak memory (GB) | fp32 logits at once (MB, computed) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        logits_mb = r["fp32_logits_bytes_at_once_computed"] / 1e6
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | {logits_mb:,.1f} |")
            continue
        print(
            f"| {name} | {r['tokens_per_second']:,.0f} | {100 * r['matmul_rate_fraction']:.1f}% | "
            f"{r['seconds_per_step']:.3f} | {fmt_gb(r['peak_memory_gb'])} | {logits_mb:,.1f} |"
        )
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in record["agreement_plain_vs_chunked"].items())
    print(f"plain vs chunked on the same weights: {diffs}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
