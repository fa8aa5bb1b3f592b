"""The recipes: one short loop each, above the ground floor and below the faces.

- ``sft``, ``ei``, ``grpo``: supervised fine-tuning, expert iteration, GRPO; each a config
  dataclass and a ``train_*`` function whose loop names its phases as calls.
- ``loop``: ``RunLoop``, the run plumbing all three share (resume, training clock and time
  budget, progress, validation and checkpoint cadence, fault points, the final model).
- ``common``: data, seeds, the optimizer and its schedule, one clipped optimizer step.
- ``eval``: the ``eval`` command (zero-shot evaluation of a model directory).
"""
