"""Synchronous vs asynchronous GRPO on the CPU demo: seconds per step, from what the runs logged.

    python benchmarks/async_grpo.py                                   # the demo's sizes, 20 GRPO steps each
    python benchmarks/async_grpo.py --repeats 3 --out benchmarks/results/async_grpo_cpu.txt
    python benchmarks/async_grpo.py --quick --repeats 3 --out benchmarks/results/async_grpo_cpu.txt --append
    python benchmarks/async_grpo.py --sft-run runs/demo/sft           # start both from an existing demo SFT run

Both runs are the demo's GRPO phase (``cs336_alignment.demo``) from the same SFT-warmed model, with
the same questions, seeds and number of steps, on the same cores:

- sync: ``python -m cs336_alignment demo``'s GRPO: one process with ``--threads`` torch threads
  (default 2) samples a batch, then trains on it;
- async: ``demo --async``'s: the trainer and a generator process share the same ``--threads``
  half and half (1 + 1 by default); the generator samples batch k with the weights after k - 1
  steps while the trainer trains on batch k - 1.

Each figure is read from the run's metrics.jsonl: seconds per step = the training clock
(``wall_clock_train``: validation and logging excluded) from the end of step 0 to the end of
the last step, over the steps in between; step 0 (which in async mode also waits for the
generator process to start and for the first batch, nothing hidden yet) is shown apart. Per
step also: the trainer's wait for the batch (``rollout_seconds``), the generator's own sampling
time (async ``generation_seconds``; sync: the same as the wait), the train phase, and the
staleness. With ``--repeats N`` the two runs alternate N times and the medians are reported.
The SFT warm-up runs first (the demo's, inside the first sync run) unless ``--sft-run`` names one.

On CPU both processes share the machine's cores with whatever else runs on it: the figures
are noisy, and say nothing about GPUs (``benchmarks/gpu_check.py``'s grpo_async_2gpu section).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling results_file.py
from results_file import write_results  # noqa: E402

from cs336_alignment.console import set_quiet
from cs336_alignment.demo import ASYNC_GRPO, DemoConfig, run_demo

HEADER = ("# Synchronous vs asynchronous GRPO on the CPU demo: benchmarks/async_grpo.py\n"
          "# seconds/step = the training clock (wall_clock_train in metrics.jsonl) over steps 1..N-1; step 0 apart.\n"
          "# On {cores} shared CPU cores (and whatever else runs on them) the figures are noisy, run to run.\n"
          "# GPU figures are not measured: benchmarks/gpu_check.py's grpo_async_2gpu section needs two GPUs.\n")


def step_figures(run_dir: Path) -> dict[str, float]:
    """The per-step figures of one GRPO run, from its train records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["grpo_step"]: r for r in records if r["kind"] == "train"}  # the last record of each step
    steps = [train[k] for k in sorted(train)]
    if len(steps) < 2:
        raise SystemExit(f"{run_dir}: {len(steps)} GRPO step(s) logged; --steps must be at least 2")
    later = steps[1:]

    def mean(key: str) -> float:
        return statistics.mean(r.get(key, r["rollout_seconds"]) for r in later)  # sync: generation = the wait

    return {
        "seconds_per_step": (steps[-1]["wall_clock_train"] - steps[0]["wall_clock_train"]) / len(later),
        "first_step_seconds": steps[0]["wall_clock_train"],
        "wait_seconds": mean("rollout_seconds"),
        "generation_seconds": mean("generation_seconds"),
        "train_seconds": mean("train_seconds"),
        "mean_staleness": statistics.mean(r.get("staleness", 0) for r in steps),
        "max_staleness": max(r.get("staleness", 0) for r in steps),
        "steps": len(steps),
    }


def run_once(cfg: DemoConfig, threads: int) -> dict[str, Any]:
    """One demo run with ``threads`` torch threads (async: the trainer and the generator process halve them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = run_demo(cfg)
    finally:
        torch.set_num_threads(before)
    return {**step_figures(Path(cfg.out) / "grpo"), "val_reward_after_grpo": summary["val_reward_after_grpo"],
            "val_reward_after_sft": summary["val_reward_after_sft"]}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def table(sync: dict[str, Any], asyn: dict[str, Any]) -> list[str]:
    rows = [
        ("seconds / step (steps 1..N-1, training clock)", "seconds_per_step", ".3f"),
        ("step 0 seconds (async: generator start-up, first batch)", "first_step_seconds", ".2f"),
        ("trainer's wait for the batch / step (rollout_seconds)", "wait_seconds", ".3f"),
        ("generator's sampling / step (generation_seconds)", "generation_seconds", ".3f"),
        ("train phase / step (train_seconds)", "train_seconds", ".3f"),
        ("mean / max staleness (steps)", None, ""),
        ("validation reward after GRPO (200 questions; after SFT {sft:.3f})", "val_reward_after_grpo", ".3f"),
    ]
    lines = ["| figure | sync | async |", "| --- | ---: | ---: |"]
    for what, key, fmt in rows:
        if key is None:
            cells = [f"{r['mean_staleness']:.2f} / {r['max_staleness']:.0f}" for r in (sync, asyn)]
        else:
            cells = [format(r[key], fmt) for r in (sync, asyn)]
        lines.append(f"| {what.format(sft=sync['val_reward_after_sft'])} | {cells[0]} | {cells[1]} |")
    lines.append(f"| **sync / async seconds per step** | **{sync['seconds_per_step'] / asyn['seconds_per_step']:.2f}x** | |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--steps", type=int, default=20, help="GRPO steps of each run (default: 20)")
    ap.add_argument("--quick", action="store_true", help="the test suite's demo size (64 wide, 2 layers) instead of the demo's")
    ap.add_argument("--sft-run", default="", help="a finished demo SFT run to start from (default: run the demo's SFT first)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of each run (default: 2); async: half for the trainer, half for the generator")
    ap.add_argument("--repeats", type=int, default=1, help="alternate sync and async runs this many times; medians (default: 1)")
    ap.add_argument("--work", default="", help="where the runs go (default: a temporary folder, removed after)")
    ap.add_argument("--out", default=None, help="write the table to this text file")
    ap.add_argument("--append", action="store_true", help="with --out: add to the file instead of replacing it")
    args = ap.parse_args(argv)
    set_quiet(True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="async_grpo_"))
    base = DemoConfig.quick("") if args.quick else DemoConfig()
    base = dataclasses.replace(base, grpo_steps=args.steps, eval_every=0, progress=False, sft_run=args.sft_run)
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    try:
        for i in range(args.repeats):
            for mode in ("sync", "async"):
                cfg = dataclasses.replace(base, out=str(work / f"{mode}{i}"), async_rollouts=mode == "async")
                print(f"{mode} run {i + 1}/{args.repeats}{'' if cfg.sft_run else ' (with the SFT warm-up)'} ...", flush=True)
                runs[mode].append(run_once(cfg, args.threads))
                print(f"  {runs[mode][-1]['seconds_per_step']:.3f} s/step", flush=True)
                if not base.sft_run:  # every later run starts from this SFT model
                    base = dataclasses.replace(base, sft_run=str(work / f"{mode}{i}" / "sft"))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    sync, asyn = median_of(runs["sync"]), median_of(runs["async"])
    size = f"{base.hidden_size} wide, {base.num_layers} layers"
    child = max(1, args.threads // 2)  # as recipes.grpo.start_async_rollouts splits them
    lines = [
        f"## {'quick' if args.quick else 'default'} demo, {args.steps} GRPO steps: python benchmarks/async_grpo.py "
        f"{shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip(),
        f"date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); torch threads: sync "
        f"{args.threads} (one process), async {max(1, args.threads - child)} (trainer) + {child} (generator process)",
        f"run: the demo's GRPO phase ({size}, {base.questions_per_step} questions x {base.group_size} responses, "
        f"<= {base.max_tokens} tokens, reinforce_with_baseline) from the same SFT model; async: "
        f"max_staleness {ASYNC_GRPO['max_staleness']}, tis_cap {ASYNC_GRPO['tis_cap']}; "
        f"{'median of ' + str(args.repeats) + ' alternating runs each' if args.repeats > 1 else 'one run each'}",
        "",
        *table(sync, asyn),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        write_results(args.out, text, header=HEADER.format(cores=os.cpu_count()), append=args.append)
    return {"sync": sync, "async": asyn, "runs": runs}


if __name__ == "__main__":
    main()
