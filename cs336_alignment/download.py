"""Download public math datasets from the Hugging Face hub into our local JSONL form.

``python -m cs336_alignment download NAME --out DIR [--split S] [--limit N] [--force]`` writes
the files below (atomically: a reader sees the old file or the complete new one), prints how many
examples each file holds, and prints the ``CS336_DATA=...`` export (or the ``data.*`` overrides)
that points the study configs at them. Every file loads with
:func:`cs336_alignment.data.load_examples`.

The layout is the one the configs read (``${CS336_DATA}/train.jsonl``, ``.../validation.jsonl``):

=========  =====================================================================
name       files written under ``DIR``
=========  =====================================================================
math       ``train.jsonl`` (train split), ``validation.jsonl`` (the 5,000-problem
           test split, which the handout uses as its validation set)
gsm8k      ``gsm8k/train.jsonl``, ``gsm8k/test.jsonl``
math500    ``math500/test.jsonl``
=========  =====================================================================

``sft.jsonl`` (the SFT reasoning traces) is course material and cannot be downloaded. An existing
file is never overwritten without ``force``: the download is refused, naming the file, before
anything is fetched or written.

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
import shlex
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
    "data_hint",
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
    """A download that cannot proceed (unknown name or split, missing ``datasets`` library,
    an existing file without ``force``)."""

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
        name: our name (``gsm8k``, ``math``, ``math500``).
        hub_id: the hub repository passed to ``datasets.load_dataset``.
        configs: hub configurations read and concatenated, in order (``None``: the default one).
        splits: the splits that exist.
        convert: hub row -> our record, or ``None`` to skip a row that has no usable answer.
        files: output path of each split, relative to the ``--out`` directory.
    """

    name: str
    hub_id: str
    configs: tuple[str | None, ...]
    splits: tuple[str, ...]
    convert: Callable[[Row], Row | None]
    files: dict[str, str]

    def output_path(self, split: str, out_dir: Path) -> Path:
        """Where ``split`` is written under ``out_dir``."""
        return Path(out_dir) / self.files[split]


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec(
        name="gsm8k",
        hub_id="openai/gsm8k",
        configs=("main",),
        splits=("train", "test"),
        convert=_convert_gsm8k,
        files={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    ),
    # MATH goes where the study configs read it. Its 5,000-problem test split is the handout's
    # validation set, hence validation.jsonl.
    "math": DatasetSpec(
        name="math",
        hub_id="EleutherAI/hendrycks_math",
        configs=MATH_SUBJECTS,
        splits=("train", "test"),
        convert=_convert_math,
        files={"train": "train.jsonl", "test": "validation.jsonl"},
    ),
    "math500": DatasetSpec(
        name="math500",
        hub_id="HuggingFaceH4/MATH-500",
        configs=(None,),
        splits=("test",),
        convert=_convert_math500,
        files={"test": "math500/test.jsonl"},
    ),
}

#: What a split is to the configs, when it is not what its hub name says.
_SPLIT_ROLES: dict[tuple[str, str], str] = {("math", "test"): "the handout's validation set"}


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
    """Fetch, convert and atomically write ``split`` to :meth:`DatasetSpec.output_path`."""
    records, skipped = convert_rows(spec, split, limit)
    path = spec.output_path(split, out_dir)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return SplitResult(path=path, n_written=len(records), n_skipped=skipped)


def data_hint(spec: DatasetSpec, paths: list[Path], out_dir: Path) -> str:
    """The line that points the study configs at the files just written.

    For ``math`` (written in the configs' layout) it is the ``CS336_DATA`` export; for the others,
    the ``data.train`` / ``data.val`` overrides that name the files.
    """
    if spec.name == "math":
        where = shlex.quote(str(Path(out_dir).resolve()))
        return f"point the configs at it: export CS336_DATA={where}  (sft.jsonl is course material: copy it there)"
    roles = {"train": "data.train", "test": "data.val"}
    overrides = [f"{roles[p.stem]}={shlex.quote(str(p.resolve()))}" for p in paths if p.stem in roles]
    return f"point a config at it with the overrides: {' '.join(overrides)}"


def download_main(
    name: str,
    out_dir: Path,
    split: str | None = None,
    limit: int | None = None,
    force: bool = False,
) -> list[Path]:
    """Download a public dataset into ``out_dir`` (layout in the module docstring); returns the files written.

    Args:
        name: ``gsm8k``, ``math`` or ``math500`` (case-insensitive).
        out_dir: directory for the JSONL files (created if missing).
        split: one split (e.g. ``train``); ``None`` downloads every split the dataset has.
        limit: keep only the first ``limit`` examples of each split (``None``: all).
        force: overwrite files that already exist.

    Prints one line per file (its path, the number of examples, how many rows were skipped), then
    the ``CS336_DATA`` export or the overrides that point the configs at the files.

    Raises:
        DownloadError: unknown name or split, bad limit, a file that exists without ``force``
            (raised before anything is fetched or written), or the ``datasets`` library is missing.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[key]
    if split is not None and split not in spec.splits:
        raise DownloadError(f"{spec.name} has no split {split!r}; it has: {', '.join(spec.splits)}")
    if limit is not None and limit < 1:
        raise DownloadError(f"limit must be >= 1, got {limit}")
    splits = (split,) if split is not None else spec.splits
    if not force:
        for s in splits:
            target = spec.output_path(s, Path(out_dir))
            if target.exists():
                raise DownloadError(f"{target} already exists; pass --force to overwrite it")
    written: list[Path] = []
    for s in splits:
        result = download_split(spec, s, Path(out_dir), limit)
        role = f"; {_SPLIT_ROLES[(spec.name, s)]}" if (spec.name, s) in _SPLIT_ROLES else ""
        note = f", {result.n_skipped} skipped (no usable answer)" if result.n_skipped else ""
        print(f"wrote {result.path}: {result.n_written} examples from {spec.hub_id} ({s}{role}){note}")
        written.append(result.path)
    print(data_hint(spec, written, Path(out_dir)))
    return written
