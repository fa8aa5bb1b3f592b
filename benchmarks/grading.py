"""Benchmark: grade 10,000 R1-Zero responses with the batch API.

The responses pair ground truths from the hand-written grading corpus
(``tests/fixtures/grading/default_cases.jsonl``: fractions, radicals, tuples, matrices,
units, expressions needing sympy, ...) and GSM8K-style integer answers with answers
written in other forms, about half of them correct. Worker-pool start-up is timed
separately from grading. Writes ``benchmarks/results/grading.{json,md}``.

Usage: ``python benchmarks/grading.py [--n 10000] [--workers 2] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "fixtures" / "grading" / "default_cases.jsonl"


def build_corpus(n: int, seed: int = 0) -> tuple[list[str], list[object], list[bool]]:
    """``n`` (response, ground truth, expected-correct) triples, about half correct."""
    rng = random.Random(seed)
    fixture = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    fixture = [c for c in fixture if c["fn"] == "r1_zero" and c["expected"][0] == 1]
    right = [c for c in fixture if c["expected"][1] == 1]
    wrong = [c for c in fixture if c["expected"][1] == 0]
    responses: list[str] = []
    truths: list[object] = []
    expected: list[bool] = []
    for i in range(n):
        correct = i % 2 == 0
        if rng.random() < 0.5:  # a hand-written case (many need sympy)
            case = rng.choice(right if correct else wrong)
            responses.append(case["response"])
            truths.append(case["ground_truth"])
        else:  # a GSM8K-style integer answer, in one of several written forms
            value = rng.randint(0, 20000)
            given = value if correct else value + rng.choice([-10, -1, 1, 2, 100])
            form = rng.choice(["{:d}", "{:,d}", "\\${:,d}", "{:d}.00", "\\boxed{{{:d}}}", "x = {:d}", "{:d} \\text{{ dollars}}"])
            reasoning = f"We add the parts: {value // 2} + {value - value // 2} = {value}. "
            responses.append(f"{reasoning}</think> <answer>{form.format(given)}</answer>")
            truths.append(str(value) if rng.random() < 0.8 else value)
        expected.append(correct)
    return responses, truths, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    import cs336_alignment.rewards.sandbox as sandbox
    from cs336_alignment.rewards import grade_batch, grade_response
    from cs336_alignment.rewards.sandbox import GraderPool

    responses, truths, expected = build_corpus(args.n)

    pool = GraderPool(max_workers=args.workers)
    sandbox._pool = pool  # use a pool of exactly --workers workers
    start = time.perf_counter()
    ready = pool.warm_up(args.workers)
    startup_s = time.perf_counter() - start

    start = time.perf_counter()
    batch = grade_batch(responses, truths, timeout=args.timeout)
    batch_s = time.perf_counter() - start
    mismatches = sum(r.correct != e for r, e in zip(batch.results, expected))

    # Per-call latency of the single-response API.
    inline = "x </think> <answer>1,000</answer>"
    sympy = "x </think> <answer>x^2+2x+1</answer>"
    reps = 200
    start = time.perf_counter()
    for _ in range(reps):
        grade_response(inline, "1000")
    inline_ms = (time.perf_counter() - start) / reps * 1e3
    start = time.perf_counter()
    for _ in range(reps):
        grade_response(sympy, "(x+1)^2")
    worker_ms = (time.perf_counter() - start) / reps * 1e3
    pool.shutdown()

    report = {
        "items": args.n,
        "workers": ready,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "pool_startup_s": round(startup_s, 3),
        "batch_seconds": round(batch_s, 3),
        "items_per_second": round(args.n / batch_s, 1),
        "correct_fraction": round(batch.accuracy, 4),
        "verdicts_differing_from_expected": mismatches,
        "counts": batch.counts,
        "single_call_inline_ms": round(inline_ms, 3),
        "single_call_worker_ms": round(worker_ms, 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grading.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        "# Grading benchmark",
        "",
        f"{args.n:,} R1-Zero responses (hand-written corpus ground truths and GSM8K-style integers, "
        f"about half correct), `grade_batch` with {ready} worker processes on {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| worker pool start-up | {startup_s:.2f} s |",
        f"| grading {args.n:,} responses (start-up excluded) | {batch_s:.2f} s |",
        f"| throughput | {args.n / batch_s:,.0f} responses/s |",
        f"| graded by workers (sympy) | {batch.counts['worker_items']:,} |",
        f"| correct fraction | {batch.accuracy:.3f} |",
        f"| timeouts / errors | {batch.counts['timeouts']} / {batch.counts['errors']} |",
        f"| verdicts differing from the corpus labels | {mismatches} |",
        f"| single call, decided in-process | {inline_ms:.3f} ms |",
        f"| single call, sympy in a worker | {worker_ms:.3f} ms |",
        "",
        "Reproduce: `python benchmarks/grading.py`.",
        "",
    ]
    (args.out / "grading.md").write_text("\n".join(md))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
