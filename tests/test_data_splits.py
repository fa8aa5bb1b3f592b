"""Deterministic train / validation splits and the shared validation subset."""

from __future__ import annotations

import random

import pytest

from cs336_alignment.data import (
    ArithmeticTask,
    Example,
    example_id,
    generate_splits,
    make_task,
    split_examples,
    validation_subset,
)


def _examples(n: int) -> list[Example]:
    return [Example(question=f"question {i}", ground_truth=str(i), source="t", line=i + 1) for i in range(n)]


def test_split_sizes_disjoint_and_complete():
    exs = _examples(100)
    train, val = split_examples(exs, val_fraction=0.2, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert {e.question for e in train}.isdisjoint({e.question for e in val})
    assert sorted(e.line for e in train + val) == list(range(1, 101))
    # each side keeps input order
    assert [e.line for e in val] == sorted(e.line for e in val)


def test_split_is_deterministic_and_seed_dependent():
    exs = _examples(200)
    a = split_examples(exs, n_val=30, seed=1)
    b = split_examples(exs, n_val=30, seed=1)
    c = split_examples(exs, n_val=30, seed=2)
    assert a == b
    assert {e.question for e in a[1]} != {e.question for e in c[1]}


def test_split_membership_independent_of_input_order():
    exs = _examples(150)
    shuffled = exs[:]
    random.Random(7).shuffle(shuffled)
    _, val1 = split_examples(exs, n_val=25, seed=3)
    _, val2 = split_examples(shuffled, n_val=25, seed=3)
    assert {e.question for e in val1} == {e.question for e in val2}


def test_duplicate_questions_never_straddle():
    base = _examples(40)
    exs = base + [Example(question=e.question, ground_truth=e.ground_truth, line=999) for e in base]
    for n_val in range(0, 80, 7):
        train, val = split_examples(exs, n_val=n_val, seed=0)
        assert {e.question for e in train}.isdisjoint({e.question for e in val})
        assert n_val <= len(val) <= n_val + 1


def test_split_argument_checks():
    exs = _examples(10)
    with pytest.raises(ValueError):
        split_examples(exs, seed=0)
    with pytest.raises(ValueError):
        split_examples(exs, val_fraction=0.1, n_val=1)
    with pytest.raises(ValueError):
        split_examples(exs, n_val=11)
    with pytest.raises(ValueError):
        split_examples(exs, val_fraction=1.5)
    assert split_examples(exs, n_val=0)[1] == []
    assert split_examples(exs, val_fraction=1.0)[0] == []


def test_validation_subset_fixed_across_runs_and_orders():
    exs = _examples(500)
    sub = validation_subset(exs, 50, seed=0)
    assert len(sub) == 50
    assert sub == validation_subset(list(exs), 50, seed=0)
    assert [e.line for e in sub] == sorted(e.line for e in sub)
    rev = validation_subset(exs[::-1], 50, seed=0)
    assert {e.question for e in rev} == {e.question for e in sub}
    # a bigger subset contains the smaller one (same ranking)
    assert {e.question for e in sub} <= {e.question for e in validation_subset(exs, 80, seed=0)}
    assert {e.question for e in sub} != {e.question for e in validation_subset(exs, 50, seed=1)}
    assert validation_subset(exs[:10], 50) == exs[:10]
    with pytest.raises(ValueError):
        validation_subset(exs, -1)


def test_example_id_is_stable():
    ex = Example(question="What is 1 + 1?", ground_truth="2")
    # pinned: the id must not change between runs or Python versions
    assert example_id(ex) == "72f8917549de"  # sha256 of the question
    assert example_id(Example(question="What is 1 + 1?", ground_truth="9")) == example_id(ex)
    assert len(example_id(ex)) == 12 and example_id(ex) != example_id(Example(question="x", ground_truth="2"))


def test_generate_splits_for_builtin_task():
    task = make_task("arithmetic", digits=2, operations=["+", "-"])
    assert isinstance(task, ArithmeticTask) and task.operations == ("+", "-")
    train, val = generate_splits(task, n_train=90, n_val=10, seed=5)
    assert len(train) + len(val) == 100 and len(val) >= 10
    assert {e.question for e in train}.isdisjoint({e.question for e in val})
    assert (train, val) == generate_splits(task, n_train=90, n_val=10, seed=5)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sudoku")
