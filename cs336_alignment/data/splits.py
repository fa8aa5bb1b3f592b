"""Deterministic train / validation splits and seeded validation subsets.

Membership is decided by a seeded hash of each example's question (:func:`example_key`), not by
position, so it is the same across runs, machines and Python versions, does not depend on the
input order, and identical questions always land on the same side of a split (no leakage from
duplicated problems). Each returned list keeps the input order.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from .examples import Example

__all__ = [
    "example_id",
    "example_key",
    "split_examples",
    "validation_subset",
]


def example_key(example: Example) -> str:
    """The identity used for splitting: the question text (the prompt when it has no question)."""
    return example.question or (example.prompt or "")


def example_id(example: Example) -> str:
    """A short stable id (12 hex chars of SHA-256 of :func:`example_key`) for logs and tables."""
    return hashlib.sha256(example_key(example).encode("utf-8")).hexdigest()[:12]


def _rank(examples: Sequence[Example], seed: int) -> list[int]:
    """Indices of ``examples`` sorted by (seeded hash of key, key); equal keys are adjacent."""

    def sort_key(i: int) -> tuple[bytes, str, int]:
        key = example_key(examples[i])
        digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
        return (digest, key, i)

    return sorted(range(len(examples)), key=sort_key)


def split_examples(
    examples: Sequence[Example],
    *,
    val_fraction: float | None = None,
    n_val: int | None = None,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Split into ``(train, val)`` deterministically from ``seed``.

    Give exactly one of ``val_fraction`` (``0 <= f <= 1``; ``n_val = round(f * len)``) or
    ``n_val``. The validation side gets the ``n_val`` examples with the smallest seeded hash;
    if the cut falls inside a group of identical questions, the whole group goes to validation,
    so ``len(val)`` can exceed ``n_val`` only when questions repeat.
    """
    if (val_fraction is None) == (n_val is None):
        raise ValueError("give exactly one of val_fraction or n_val")
    n = len(examples)
    if val_fraction is not None:
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        n_val = round(val_fraction * n)
    assert n_val is not None
    if not 0 <= n_val <= n:
        raise ValueError(f"n_val must be in [0, {n}], got {n_val}")
    ranked = _rank(examples, seed)
    cut = n_val
    while 0 < cut < n and example_key(examples[ranked[cut]]) == example_key(examples[ranked[cut - 1]]):
        cut += 1
    val_idx = set(ranked[:cut])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def validation_subset(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """A fixed subset of ``n`` examples (all of them if ``n >= len``), identical across runs.

    Chosen by seeded hash like :func:`split_examples`, so every run of a sweep that passes the
    same file and seed evaluates on exactly the same problems, whatever the input order.
    Returned in input order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chosen = set(_rank(examples, seed)[:n])
    return [ex for i, ex in enumerate(examples) if i in chosen]
