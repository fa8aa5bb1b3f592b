"""One rank of tests/test_distributed_recipes.py's two-process runs (launched by torchrun; not a test module).

Usage: ``torchrun --nproc-per-node 2 tests/recipes_worker.py OUT MODE``.

MODE "train" runs, in one process group, what the test compares with one process:

1. GRPO (:func:`grpo_config`: off-policy, two epochs per rollout batch, grpo_clip, token_mean,
   validation splitting 5 questions unevenly), SFT (:func:`sft_config`: a last batch of 3
   micro-batches, 2 on one rank and 1 plus a zero-weight repeat on the other) and expert
   iteration (:func:`ei_config`), each in ``OUT/<recipe>``, with the full gradient that every
   optimizer step applies captured before clipping (rank 0 saves them to ``OUT/grads_<recipe>.pt``);
2. rollouts of :func:`rollout_token_ids` (rank 0 saves them to ``OUT/rollouts.json``).

MODE "kill": the GRPO run of :func:`grpo_config` in ``OUT/grpo``; the test sets
CS336_ALIGNMENT_FAULT so that one rank dies mid-run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from cs336_alignment.config import load_config
from cs336_alignment.distributed import ONE, DistContext, close_distributed, gather, init_distributed, share
from cs336_alignment.recipes.ei import EIConfig, train_ei
from cs336_alignment.recipes.grpo import GRPOConfig, train_grpo
from cs336_alignment.recipes.sft import SFTConfig, train_sft

REPO = Path(__file__).resolve().parents[1]
REWARD = str(REPO / "tests" / "reward_helpers.py") + ":contains_one"  # reward 1 for a response with a "1" in it
REWARD_E = str(REPO / "tests" / "reward_helpers.py") + ":contains_e"  # reward 1 for a response with an "e" in it
ARITH = {"train": "task:arithmetic", "task_knobs": {"digits": 1}, "n_task_train": 64, "n_task_val": 8}
LR = 1e-3
GRPO_STEPS = 3


def grpo_config(out: Path, **kw: Any) -> GRPOConfig:
    """3 GRPO steps of 4 questions x 4 responses, each rollout batch trained for 2 epochs in train
    batches of 8 (micro-batches of 2): 12 optimizer steps; a checkpoint after the last step (the
    kill test asks for one every step: the metrics do not depend on it). With dynamic sampling
    (each rank its share of every extra round; the decision the same on every rank), a KL
    penalty (each rank the reference log-probs of its share of the micro-batches) and an
    easy-first curriculum (each rank scores its share of the 63 questions, the last one padded; rank 0
    writes the file)."""
    base = dict(
        model="tiny", out=str(out), device="cpu", seed=3, n_grpo_steps=GRPO_STEPS, learning_rate=LR,
        data={**ARITH, "n_task_train": 63, "reward": REWARD, "reward_in_process": True}, rollout_batch_size=16, group_size=4,
        train_batch_size=8, micro_batch_size=2, epochs_per_rollout_batch=2, loss_type="grpo_clip",
        length_normalization="token_mean", sampling_max_tokens=12, eval_every=2, n_eval_examples=5, final_eval_full=False,
        log_rollout_examples=0, control={"checkpoint_every": 0, "progress": False}, drop_all_equal_groups=True,
        kl_coef=0.01, curriculum="easy_first", pass_rate_samples=2,
    )
    return load_config(GRPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def sft_config(out: Path, **kw: Any) -> SFTConfig:
    """3 SFT steps over 15 examples in batches of 6 (micro-batches of 1): 6, 6, then 3 micro-batches;
    the loss a mean over the batch's response tokens (gradients of order 1, so that 1e-6 is rounding)."""
    base = dict(
        model="tiny", out=str(out), device="cpu", seed=5, data=ARITH, learning_rate=LR, epochs=1, n_examples=15,
        batch_size=6, micro_batch_size=1, normalize="batch_tokens", n_eval_examples=5, eval_max_tokens=8, final_eval_full=False,
        control={"checkpoint_every": 2, "progress": False},
    )
    return load_config(SFTConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def ei_config(out: Path, **kw: Any) -> EIConfig:
    """2 EI steps of 6 questions x 3 rollouts (rewarded when they hold an "e"), the kept ones in
    batches of 4 (micro-batches of 1), a fresh optimizer each step (so checkpoints hold no
    optimizer); rollout entropies split 18 = 9 + 9 over two ranks."""
    base = dict(
        model="tiny", out=str(out), device="cpu", seed=7, data={**ARITH, "reward": REWARD_E, "reward_in_process": True},
        n_ei_steps=2, batch_questions=6, rollouts_per_question=3, sampling_max_tokens=12, learning_rate=LR, batch_size=4,
        micro_batch_size=1, normalize="batch_tokens", fresh_optimizer=True, n_eval_examples=5, final_eval_full=False,
        control={"progress": False},
    )
    return load_config(EIConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


class GradientCapture:
    """Records the full gradient of every parameter before each optimizer step clips it
    (``clip_grad_norm_``; gathered from the shards on a sharded model: every rank clips together)."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []
        self._original = torch.nn.utils.clip_grad_norm_

    def __enter__(self) -> GradientCapture:
        capture, original = self, self._original

        def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            parameters = list(parameters)
            grads = [p.grad for p in parameters if p.grad is not None]
            capture.steps.append([(g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone() for g in grads])
            return original(parameters, *args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = clip
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.nn.utils.clip_grad_norm_ = self._original


def rollout_token_ids(ctx: DistContext = ONE) -> list[list[int]]:
    """(global group, response token ids) of 6 questions x 3 samples from the tiny model, each rank
    sampling its share of the questions with its own engine, gathered in order."""
    import dataclasses

    from cs336_alignment.data import generate_splits, make_task
    from cs336_alignment.data.templates import load_template
    from cs336_alignment.generation import NativeEngine, SamplingParams
    from cs336_alignment.rollouts import sample_rollouts
    from cs336_alignment.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    engine = NativeEngine(model, tokenizer, device="cpu")
    questions, _ = generate_splits(make_task("arithmetic", digits=1), 6, 1, seed=0)
    mine = share(questions, ctx)
    sampling = dataclasses.replace(SamplingParams.r1_zero(n=3, max_tokens=12, seed=11), prompt_offset=ctx.rank * len(mine))
    rollouts = sample_rollouts(engine, model, mine, template=load_template("r1_zero"), sampling=sampling)
    return gather([[r.group, *r.response_token_ids] for r in rollouts], ctx)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=120)  # joined once: both recipes run in this group
    if mode == "kill":
        train_grpo(grpo_config(out / "grpo", control={"checkpoint_every": 1, "progress": False}))
        return
    for name, config, train in (("grpo", grpo_config, train_grpo), ("sft", sft_config, train_sft), ("ei", ei_config, train_ei)):
        with GradientCapture() as capture:
            train(config(out / name))
        if ctx.is_main:
            torch.save(capture.steps, out / f"grads_{name}.pt")
    ids = rollout_token_ids(ctx)
    if ctx.is_main:
        (out / "rollouts.json").write_text(json.dumps(ids))
    close_distributed(ctx)


if __name__ == "__main__":
    main()
