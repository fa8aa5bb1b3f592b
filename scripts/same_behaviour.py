"""Check that a change is behaviour-preserving: run the demo at two commits and compare what it wrote.

    .venv/bin/python scripts/same_behaviour.py --base <commit> [--head <commit>] [--quick] \
        [--removed KEY ...] [--threads N]

Each commit is checked out into a temporary git worktree (HEAD: the working tree as it is, when
``--head`` is not given) and runs ``python -m cs336_alignment demo`` with this interpreter, the
same thread count and the worktree first on the import path. Then, for each run of the demo
(``sft/``, ``grpo/``):

- ``metrics.jsonl``: the same records in the same order, with the same values, timing fields aside
  (keys containing time, seconds, per_second or wall_clock). Keys a record gained or lost are
  differences, except the keys named with ``--removed`` (metrics deliberately dropped by the change
  under test), which are listed but accepted.
- ``model/``: every file byte for byte (weights, config, tokenizer).

Exit status 0 when everything matches, 1 otherwise; the report goes to stdout.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("time", "seconds", "per_second", "wall_clock")
RUNS = ("sft", "grpo")


def run_demo(tree: Path, out: Path, quick: bool, threads: int) -> float:
    """Run the demo from source tree ``tree`` into ``out``; returns wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("CS336_ALIGNMENT_FAULT", None)
    args = [sys.executable, "-m", "cs336_alignment", "demo", "--out", str(out), "progress=false"]
    if quick:
        args.append("--quick")
    check = subprocess.run(
        [sys.executable, "-c", "import cs336_alignment, sys; sys.stdout.write(cs336_alignment.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    )
    if not Path(check.stdout).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: python imports cs336_alignment from {check.stdout}, not from this tree")
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo failed in {tree}:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING)}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare_metrics(base: Path, head: Path, removed: set[str]) -> tuple[list[str], set[str]]:
    """(differences, removed keys seen) between two metrics.jsonl files."""
    a, b = read_records(base), read_records(head)
    problems, seen_removed = [], set()
    if len(a) != len(b):
        problems.append(f"{len(a)} records at base, {len(b)} at head")
    for i, (ra, rb) in enumerate(zip(map(comparable, a), map(comparable, b)), start=1):
        gone = set(ra) - set(rb)
        seen_removed |= gone & removed
        for key in sorted(gone - removed):
            problems.append(f"record {i} ({ra.get('kind')}): key {key!r} missing at head")
        for key in sorted(set(rb) - set(ra)):
            problems.append(f"record {i} ({rb.get('kind')}): new key {key!r} at head")
        for key in sorted(set(ra) & set(rb)):
            if ra[key] != rb[key]:
                problems.append(f"record {i} ({ra.get('kind')}): {key} = {ra[key]!r} at base, {rb[key]!r} at head")
    return problems, seen_removed


def compare_dirs(base: Path, head: Path) -> list[str]:
    names = sorted({p.relative_to(base) for p in base.rglob("*") if p.is_file()}
                   | {p.relative_to(head) for p in head.rglob("*") if p.is_file()})
    problems = []
    for name in names:
        fa, fb = base / name, head / name
        if not fa.exists() or not fb.exists():
            problems.append(f"{name}: only at {'head' if fb.exists() else 'base'}")
        elif not filecmp.cmp(fa, fb, shallow=False):
            problems.append(f"{name}: bytes differ")
    return problems


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit],
                   check=True, capture_output=True, text=True)
    return where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit before the change")
    parser.add_argument("--head", default=None, help="the commit after it (default: the working tree)")
    parser.add_argument("--quick", action="store_true", help="the demo's reduced size (the test suite's)")
    parser.add_argument("--removed", nargs="*", default=[], help="metric keys the change drops on purpose")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads for both runs")
    args = parser.parse_args()
    removed = set(args.removed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or kill: still remove the worktrees

    with tempfile.TemporaryDirectory(prefix="same-behaviour-") as tmp:
        tmp = Path(tmp)
        trees = {"base": worktree(args.base, tmp / "base-tree")}
        trees["head"] = worktree(args.head, tmp / "head-tree") if args.head else ROOT
        try:
            seconds = {side: run_demo(tree, tmp / side, args.quick, args.threads) for side, tree in trees.items()}
        finally:
            for side, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        head_name = args.head or "working tree"
        print(f"demo{' --quick' if args.quick else ''}: base {args.base} ({seconds['base']:.0f} s), "
              f"head {head_name} ({seconds['head']:.0f} s), {args.threads} threads")
        failures, seen_removed = [], set()
        for run in RUNS:
            problems, gone = compare_metrics(tmp / "base" / run / "metrics.jsonl", tmp / "head" / run / "metrics.jsonl",
                                             removed)
            seen_removed |= gone
            n = len(read_records(tmp / "base" / run / "metrics.jsonl"))
            print(f"  {run}/metrics.jsonl: {n} records, " + ("identical (timing fields aside)" if not problems else
                                                           f"{len(problems)} differences"))
            failures += [f"{run}/metrics.jsonl: {p}" for p in problems]
            problems = compare_dirs(tmp / "base" / run / "model", tmp / "head" / run / "model")
            files = sorted(p.name for p in (tmp / "base" / run / "model").iterdir())
            print(f"  {run}/model: {', '.join(files)}: " + ("byte for byte identical" if not problems else
                                                            f"{len(problems)} differences"))
            failures += [f"{run}/model: {p}" for p in problems]
        summaries = [json.loads((tmp / side / "summary.json").read_text()) for side in ("base", "head")]
        for key in ("val_reward_after_sft", "val_reward_after_grpo"):
            print(f"  {key}: {summaries[0][key]} at base, {summaries[1][key]} at head")
            if summaries[0][key] != summaries[1][key]:
                failures.append(f"summary.json: {key} differs")
        if removed:
            print(f"  metrics dropped on purpose: {', '.join(sorted(removed))} "
                  f"(seen at base: {', '.join(sorted(seen_removed)) or 'none'})")
        for line in failures[:50]:
            print("  DIFF " + line)
        print("SAME BEHAVIOUR" if not failures else f"DIFFERENT: {len(failures)} differences")
        return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
