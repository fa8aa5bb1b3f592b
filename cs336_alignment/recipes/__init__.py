"""Training recipes: one readable loop each (``sft``, ``grpo``; expert iteration builds on sft)."""
