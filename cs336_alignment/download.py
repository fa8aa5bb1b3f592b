"""Download public math datasets from the Hugging Face hub into our local JSONL form.

``python -m cs336_alignment download NAME --out DIR [--split S] [--limit N]`` writes
``DIR/<name>_<split>.jsonl`` (atomically: a reader sees the old file or the complete new one)
and prints how many examples each file holds. Every file loads with
:func:`cs336_alignment.data.load_examples`.

=========  ======================================  ===========  ==============================
name       hub dataset                             splits       written fields
=========  ======================================  ===========  ==============================
gsm8k      ``openai/gsm8k`` (config ``main``)      train, test  question, answer ("... #### N")
math       ``EleutherAI/hendrycks_math``           train, test  problem, answer, solution,
           (the seven subject configs, in order,                level, type
           concatenated)
math500    ``HuggingFaceH4/MATH-500``              test         problem, answer, solution,
                                                                subject, level, unique_id
=========  ======================================  ===========  ==============================

For ``math`` the answer is the content of the solution's last ``\\boxed{...}``
(:func:`cs336_alignment.data.last_boxed`); a problem without one is skipped and counted.
A GSM8K row whose answer does not end in ``#### N`` is skipped and counted the same way.

The ``datasets`` library is an optional extra (``pip install 'cs336-alignment[datasets]'``)
and is imported only by :func:`fetch_rows`, the one function that touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import gsm8k_final_answer, last_boxed
from .errors import UserError
from .run_dir import atomic_write_text

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "DownloadError",
    "MATH_SUBJECTS",
    "SplitResult",
    "convert_rows",
    "download_main",
    "download_split",
    "fetch_rows",
]

#: Subject configurations of the MATH mirror, in the order they are concatenated.
MATH_SUBJECTS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


class DownloadError(UserError, RuntimeError):
    """A download that cannot proceed (unknown name or split, missing ``datasets`` library)."""

    exit_code = 2  # bad input


Row = dict[str, Any]


def _convert_gsm8k(row: Row) -> Row | None:
    """GSM8K rows are already in our form; ``None`` when the answer lacks ``#### N``."""
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or gsm8k_final_answer(answer) is None:
        return None
    return {"question": question, "answer": answer}


def _convert_math(row: Row) -> Row | None:
    """A hendrycks MATH row with the answer taken from the solution's last ``\\boxed{}``."""
    problem, solution = row.get("problem"), row.get("solution")
    if not isinstance(problem, str) or not isinstance(solution, str):
        return None
    answer = last_boxed(solution)
    if answer is None or not answer.strip():
        return None
    out: Row = {"problem": problem, "answer": answer.strip(), "solution": solution}
    for key in ("level", "type"):
        if key in row:
            out[key] = row[key]
    return out


def _convert_math500(row: Row) -> Row | None:
    """MATH-500 rows carry their answer already; fields are kept in a fixed order."""
    problem, answer = row.get("problem"), row.get("answer")
    if not isinstance(problem, str) or answer is None or not str(answer).strip():
        return None
    out: Row = {"problem": problem, "answer": str(answer)}
    for key in ("solution", "subject", "level", "unique_id"):
        if key in row:
            out[key] = row[key]
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives on the hub and how its rows become our JSONL records.

    Attributes:
        name: our name (``gsm8k``, ``math``, ``math500``); output files are ``<name>_<split>.jsonl``.
        hub_id: the hub repository passed to ``datasets.load_dataset``.
        configs: hub configurations read and concatenated, in order (``None``: the default one).
        splits: the splits that exist.
        convert: hub row -> our record, or ``None`` to skip a row that has no usable answer.
    """

    name: str
    hub_id: str
    configs: tuple[str | None, ...]
    splits: tuple[str, ...]
    convert: Callable[[Row], Row | None]


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("gsm8k", "openai/gsm8k", ("main",), ("train", "test"), _convert_gsm8k),
    "math": DatasetSpec("math", "EleutherAI/hendrycks_math", MATH_SUBJECTS, ("train", "test"), _convert_math),
    "math500": DatasetSpec("math500", "HuggingFaceH4/MATH-500", (None,), ("test",), _convert_math500),
}


def fetch_rows(hub_id: str, config: str | None, split: str) -> Iterable[Row]:
    """Rows of one split of one hub dataset configuration, as dicts (needs ``datasets`` and network).

    This is the only function that downloads; tests replace it with in-memory rows.
    """
    try:
        import datasets
    except ImportError:
        raise DownloadError(
            "download needs the 'datasets' library: pip install 'cs336-alignment[datasets]'"
        ) from None
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # network, hub or cache problems: one line that names the dataset
        where = f"{hub_id}" + (f" ({config})" if config else "") + f", split {split}"
        detail = " ".join(str(e).split())
        raise DownloadError(f"could not load {where}: {type(e).__name__}: {detail}") from e


@dataclass
class SplitResult:
    """What one split's download wrote."""

    path: Path
    n_written: int
    n_skipped: int


def convert_rows(spec: DatasetSpec, split: str, limit: int | None = None) -> tuple[list[Row], int]:
    """Converted records of one split (all configs concatenated, at most ``limit``) and the skip count."""
    records: list[Row] = []
    skipped = 0
    for config in spec.configs:
        for row in fetch_rows(spec.hub_id, config, split):
            record = spec.convert(dict(row))
            if record is None:
                skipped += 1
                continue
            records.append(record)
            if limit is not None and len(records) >= limit:
                return records, skipped
    return records, skipped


def download_split(spec: DatasetSpec, split: str, out_dir: Path, limit: int | None = None) -> SplitResult:
    """Fetch, convert and atomically write ``out_dir/<name>_<split>.jsonl``."""
    records, skipped = convert_rows(spec, split, limit)
    path = Path(out_dir) / f"{spec.name}_{split}.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return SplitResult(path=path, n_written=len(records), n_skipped=skipped)


def download_main(name: str, out_dir: Path, split: str | None = None, limit: int | None = None) -> list[Path]:
    """Download a public dataset into ``out_dir/<name>_<split>.jsonl``; returns the files written.

    Args:
        name: ``gsm8k``, ``math`` or ``math500`` (case-insensitive).
        out_dir: directory for the JSONL files (created if missing).
        split: one split (e.g. ``train``); ``None`` downloads every split the dataset has.
        limit: keep only the first ``limit`` examples of each split (``None``: all).

    Prints one line per file: its path, the number of examples, and how many rows were skipped.

    Raises:
        DownloadError: unknown name or split, bad limit, or the ``datasets`` library is missing.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[key]
    if split is not None and split not in spec.splits:
        raise DownloadError(f"{spec.name} has no split {split!r}; it has: {', '.join(spec.splits)}")
    if limit is not None and limit < 1:
        raise DownloadError(f"limit must be >= 1, got {limit}")
    written: list[Path] = []
    for s in (split,) if split is not None else spec.splits:
        result = download_split(spec, s, Path(out_dir), limit)
        note = f", {result.n_skipped} skipped (no usable answer)" if result.n_skipped else ""
        print(f"wrote {result.path}: {result.n_written} examples from {spec.hub_id} ({s}){note}")
        written.append(result.path)
    return written


