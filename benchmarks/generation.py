"""Generation throughput: our native engine against transformers' own `generate`, same run.

    python benchmarks/generation.py                      # tiny model on CPU (defaults sized for it)
    python benchmarks/generation.py --shape 1.5b         # Qwen2.5-Math-1.5B shape, random weights (GPU)
    python benchmarks/generation.py --shape 1.5b --hf-static   # also transformers' static cache + compile

Every sequence gets a random prompt of --prompt-len tokens and exactly --new-tokens new tokens
(EOS ignored), sampled at temperature 1. Tokens/s counts new tokens only. Results (with device,
versions and date) go to benchmarks/results/generation_<device>_<shape>.json and are printed as
a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script train_step.py
from train_step import build_model, environment, resolve_device, sync, write_results  # noqa: E402


def bench_native(model, tokenizer, prompts, new_tokens: int, device, max_num_seqs: int, repeats: int) -> dict:
    from cs336_alignment.generation import NativeEngine, SamplingParams

    engine = NativeEngine(model, tokenizer, copy_weights=False, max_num_seqs=max_num_seqs)
    warm = SamplingParams(max_tokens=8, ignore_eos=True, seed=0)
    engine.generate(prompts[: min(8, len(prompts))], warm)
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=1)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        results = engine.generate(prompts, params)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]  # median
    n = sum(len(r.completions[0].token_ids) for r in results)
    assert n == len(prompts) * new_tokens
    return {"seconds": seconds, "new_tokens": n, "tokens_per_second": n / seconds, "ms_per_step": 1000 * seconds / new_tokens}


def bench_hf(model, prompts, new_tokens: int, device, repeats: int, static: bool = False) -> dict:
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=model.config.eos_token_id, attention_mask=torch.ones_like(ids),
    )
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        warm_start = time.perf_counter()
        model.generate(ids[: min(8, len(prompts))], **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8,
                                                       "attention_mask": torch.ones_like(ids[: min(8, len(prompts))])})
        if static:  # compile for the real shapes once, outside the timed run
            model.generate(ids, **kwargs)
        warm_seconds = time.perf_counter() - warm_start
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            sync(device)
            times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]  # median
    n = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"seconds": seconds, "new_tokens": n, "tokens_per_second": n / seconds,
            "ms_per_step": 1000 * seconds / new_tokens, "warmup_seconds": warm_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "1.5b"], default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default: 64 tiny, 256 1.5b)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 32 tiny, 128 1.5b)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens (default: 128 tiny, 512 1.5b)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported")
    ap.add_argument("--hf-static", action="store_true", help="also time transformers' static cache (+ auto compile)")
    ap.add_argument("--skip-hf", action="store_true", help="time only the native engine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.shape == "tiny"
    batch = args.batch or (64 if tiny else 256)
    prompt_len = args.prompt_len or (32 if tiny else 128)
    new_tokens = args.new_tokens or (128 if tiny else 512)
    model, tokenizer = build_model(args.shape, device, dtype)
    model.config.use_cache = True  # transformers' generate needs its KV cache (build_model turns it off for training)
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, len(tokenizer)) if tiny else model.config.vocab_size - 1000
    prompts = torch.randint(1, vocab, (batch, prompt_len), generator=g).tolist()

    results = {"native_engine": bench_native(model, tokenizer, prompts, new_tokens, device, batch, args.repeats)}
    if not args.skip_hf:
        results["transformers_generate_dynamic_cache"] = bench_hf(model, prompts, new_tokens, device, args.repeats)
        if args.hf_static:
            results["transformers_generate_static_cache_compiled"] = bench_hf(model, prompts, new_tokens, device, args.repeats, static=True)

    env = environment(device)
    record = {
        **env,
        "shape": "Qwen2.5-Math-1.5B (random weights)" if not tiny else "tiny Qwen2 (random weights)",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "results": results,
    }
    path = write_results(record, args.out, "generation", device, args.shape)

    print(f"{record['shape']} on {env['device']}, {record['dtype']}, batch {batch}, prompt {prompt_len}, {new_tokens} new tokens")
    print("| path | tokens/s | ms/step | seconds |\n| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_second']:,.0f} | {r['ms_per_step']:.2f} | {r['seconds']:.2f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
