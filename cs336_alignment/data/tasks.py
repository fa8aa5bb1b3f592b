"""Built-in generated tasks by name, for configs and the CLI.

A task is an object with ``name``, ``template_name`` (the prompt template its responses are
written for), ``generate(n, seed) -> list[Example]`` and ``reward_fn(response, ground_truth)``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from .arithmetic import ArithmeticTask
from .countdown import CountdownTask
from .examples import Example
from .splits import split_examples

__all__ = [
    "Task",
    "generate_splits",
    "make_task",
]


class Task(Protocol):
    """What the recipes need from a generated task."""

    name: str
    template_name: str

    def generate(self, n: int, seed: int) -> list[Example]: ...

    def reward_fn(self, response: str, ground_truth: Any) -> dict[str, float]: ...


TASKS: dict[str, Callable[..., Task]] = {
    "countdown": CountdownTask,
    "arithmetic": ArithmeticTask,
}


def make_task(name: str, **knobs: Any) -> Task:
    """Instantiate a built-in task by name with its knobs (e.g. ``make_task("arithmetic", digits=3)``).

    List-valued knobs from YAML/JSON (``operations``, ranges) are converted to tuples.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
    return TASKS[name](**knobs)


def generate_splits(task: Task, n_train: int, n_val: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Generate ``n_train + n_val`` examples from ``seed`` and split them with
    :func:`~cs336_alignment.data.splits.split_examples` (identical questions never straddle)."""
    examples = task.generate(n_train + n_val, seed)
    return split_examples(examples, n_val=n_val, seed=seed)
