"""Task data: the ``Example`` record, JSONL loaders, prompt templates, built-in tasks, splits.

Quick reference::

    from cs336_alignment.data import load_examples, load_template, format_prompt, encode_prompt
    examples = load_examples("validation.jsonl")           # MATH / GSM8K / sft.jsonl, autodetected
    template = load_template("r1_zero")                     # or a path to a .prompt file
    prompt = format_prompt(template, examples[0])
    ids = encode_prompt(tokenizer, prompt)                  # no BOS, no chat template

    task = make_task("countdown")                           # or "arithmetic"
    train, val = generate_splits(task, n_train=1000, n_val=100, seed=0)
    task.reward_fn(response, val[0].ground_truth)

    check_lengths(examples, template=template, tokenizer=tokenizer, max_tokens=4096, with_response=False)

Bad input (a missing or non-UTF-8 file, a malformed line, a bad template, an example too long
for the model) raises :class:`DataError` (or its subclasses :class:`TemplateError`,
:class:`DataFileNotFoundError`): a one-line ``UserError`` naming file and line, exit code 2.
"""

from .arithmetic import ArithmeticTask, arithmetic_response, arithmetic_reward_fn, arithmetic_trace, generate_arithmetic
from .countdown import CountdownTask, generate_countdown, render_expression
from .examples import Example, GroundTruth
from .lengths import MAX_CHARS_PER_TOKEN, check_lengths
from .loaders import (
    DataError,
    DataFileNotFoundError,
    LoadReport,
    LoadResult,
    detect_kind,
    gsm8k_final_answer,
    last_boxed,
    load_dataset,
    load_examples,
    load_gsm8k,
    load_math,
    load_sft,
    question_from_prompt,
)
from .splits import example_id, example_key, split_examples, validation_subset
from .tasks import TASKS, Task, generate_splits, make_task
from .templates import TEMPLATE_NAMES, TemplateError, encode_prompt, format_prompt, format_prompts, load_template, template_path

__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "DataError",
    "DataFileNotFoundError",
    "Example",
    "GroundTruth",
    "LoadReport",
    "LoadResult",
    "MAX_CHARS_PER_TOKEN",
    "TASKS",
    "TEMPLATE_NAMES",
    "Task",
    "TemplateError",
    "arithmetic_response",
    "arithmetic_reward_fn",
    "arithmetic_trace",
    "check_lengths",
    "detect_kind",
    "encode_prompt",
    "example_id",
    "example_key",
    "format_prompt",
    "format_prompts",
    "generate_arithmetic",
    "generate_countdown",
    "generate_splits",
    "gsm8k_final_answer",
    "last_boxed",
    "load_dataset",
    "load_examples",
    "load_gsm8k",
    "load_math",
    "load_sft",
    "load_template",
    "make_task",
    "question_from_prompt",
    "render_expression",
    "split_examples",
    "template_path",
    "validation_subset",
]
