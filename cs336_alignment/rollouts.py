"""The contract between generation and training: typed rollout records and their tensors.

A ``Rollout`` is one sampled response with everything training needs: the exact prompt and
response token ids (never re-tokenised text), the generator's log-probs of those tokens,
the rewards, and the group-normalised advantage. ``pack_rollouts`` turns a list of them
into the padded tensors of one micro-batch; ``micro_batches`` cuts a whole rollout batch.
``sample_rollouts`` makes them with a generator, ``with_rewards`` scores them.

Glossary: b rollouts in a micro-batch, T positions after the one-token shift.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .advantages import score_responses
from .data import Example, format_prompts
from .distributed import ONE, DistContext, share
from .generation import GenerationResult, Generator, SamplingParams
from .models import free_cuda_cache
from .tokenization import pack_prompt_and_output_ids

__all__ = [
    "LocalRollouts",
    "MicroBatch",
    "Rollout",
    "RolloutBatch",
    "micro_batches",
    "pack_rollouts",
    "rollout_stats",
    "rollouts_from_results",
    "sample_rollouts",
    "with_rewards",
]


@dataclass
class Rollout:
    """One sampled response to one prompt of a rollout batch."""

    group: int  # index of its prompt within the rollout batch (rollouts of a group share it)
    prompt: str
    prompt_token_ids: list[int]
    response: str
    response_token_ids: list[int]  # exactly the sampled ids, EOS included when it ended the response
    ground_truth: Any
    finish_reason: str  # "stop" | "eos" | "length"
    generator_logprobs: list[float]  # the generator's log p of each response token (T=1)
    reward: float = 0.0
    format_reward: float = 0.0
    answer_reward: float = 0.0
    overlong_penalty: float = 0.0  # DAPO's soft overlong penalty (<= 0), already included in reward
    advantage: float = 0.0  # group-normalised reward, filled after scoring
    old_logprobs: torch.Tensor | None = None  # (L,) log pi_old of each response token (off-policy GRPO), on the device
    ref_logprobs: torch.Tensor | None = None  # (L,) log pi_ref of each response token (a KL to a reference), on the device

    @property
    def num_tokens(self) -> int:
        return len(self.response_token_ids)


@dataclass
class MicroBatch:
    """Padded tensors of b rollouts, ready for ``get_response_log_probs`` and the loss."""

    input_ids: torch.Tensor  # (b, T) int64
    labels: torch.Tensor  # (b, T) int64
    response_mask: torch.Tensor  # (b, T) bool
    advantages: torch.Tensor  # (b, 1) fp32
    raw_rewards: torch.Tensor  # (b, 1) fp32
    generator_logprobs: torch.Tensor  # (b, T) fp32, zero outside the response
    num_response_tokens: int = 0  # response tokens in the micro-batch (known on the host, no device sync)
    old_log_probs: torch.Tensor | None = None  # (b, T) fp32, set when the loss or logging needs them
    ref_log_probs: torch.Tensor | None = None  # (b, T) fp32, the reference policy's, when the run has one
    rollouts: list[Rollout] = dataclasses.field(default_factory=list)  # the b records packed here, in row order


@dataclass
class RolloutBatch:
    """One step's rollouts, as a rollout source hands them to training."""

    rollouts: list[Rollout]  # B * G records (this rank's share in a multi-process run), group by group
    seconds: float  # what getting them cost the trainer: sampling, or waiting for the generator process
    extra: dict[str, float] = dataclasses.field(default_factory=dict)  # logged with the step (async: staleness, ...)


class LocalRollouts:
    """Rollouts sampled in this process by ``generator``, each rank for its share of each step's
    questions (sampling streams keyed on the global question index). The synchronous counterpart
    of :class:`~cs336_alignment.async_rollouts.AsyncRollouts`, with the same methods.

    Args:
        generator: this process's engine; ``policy``: the model trained (eval mode while sampling).
        batch_of: (step, round) -> (the questions, their sampling parameters), the same on every rank.
        template: the prompt template; ``ctx``: this rank; ``colocated_device``: see :func:`sample_rollouts`.
    """

    def __init__(
        self,
        generator: Generator,
        policy: torch.nn.Module,
        *,
        batch_of: Callable[[int, int], tuple[Sequence[Example], SamplingParams]],
        template: str,
        ctx: DistContext = ONE,
        colocated_device: torch.device | None = None,
    ):
        self.generator, self.policy, self.batch_of, self.template = generator, policy, batch_of, template
        self.ctx, self.colocated_device = ctx, colocated_device

    def start(self, step: int, policy: torch.nn.Module, saved: dict[str, Any] | None = None) -> None:
        """Nothing to start: the generator already holds the policy's weights."""

    def sample_rollouts(self, step: int, round: int = 0) -> RolloutBatch:
        """Sample step ``step``'s batch (this rank's share of its questions) now; ``round`` > 0:
        that step's extra round of questions (dynamic sampling)."""
        questions, sampling = self.batch_of(step, round)
        mine = share(questions, self.ctx)  # all of them in one process
        sampling = dataclasses.replace(sampling, prompt_offset=self.ctx.rank * len(mine))
        t0 = time.perf_counter()
        rollouts = sample_rollouts(self.generator, self.policy, mine, template=self.template, sampling=sampling,
                                   colocated_device=self.colocated_device)
        return RolloutBatch(rollouts=rollouts, seconds=time.perf_counter() - t0)

    def load_weights(self, policy: torch.nn.Module, version: int) -> None:
        """The generator gets ``policy``'s new weights (gathered from every rank when sharded)."""
        self.generator.load_weights(policy)

    def state(self) -> dict[str, Any]:
        """Nothing in flight for a checkpoint to keep."""
        return {}

    def close(self) -> None:
        pass


def sample_rollouts(
    generator: Generator,
    policy: torch.nn.Module,
    questions: Sequence[Example],
    *,
    template: str,
    sampling: SamplingParams,
    colocated_device: torch.device | None = None,
) -> list[Rollout]:
    """Rollout phase: ``sampling.n`` responses to each question, as typed records, group by group
    (B * G rollouts; rollouts [g * G, (g + 1) * G) answer question g, their ``group`` is
    ``sampling.prompt_offset + g``: the question's index in the whole batch when it is split
    over ranks).

    With ``colocated_device`` (generator and policy share it), cached memory is handed from
    training to the KV cache before sampling and back after.
    """
    prompts = format_prompts(template, list(questions))
    if colocated_device is not None:
        free_cuda_cache(colocated_device)
    policy.eval()
    results = generator.generate(prompts, sampling)
    policy.train()
    if colocated_device is not None:
        free_cuda_cache(colocated_device)
    return rollouts_from_results(questions, prompts, results, first_group=sampling.prompt_offset)


def rollouts_from_results(
    questions: Sequence[Example], prompts: Sequence[str], results: Sequence[GenerationResult], *, first_group: int = 0
) -> list[Rollout]:
    """The rollout records of a generator's ``results`` for ``questions`` and their ``prompts``
    (one result per question, in order), group by group; question g's rollouts get
    ``group = first_group + g``."""
    return [
        Rollout(
            group=first_group + g, prompt=prompts[g], prompt_token_ids=res.prompt_token_ids, response=c.text,
            response_token_ids=c.token_ids, ground_truth=questions[g].ground_truth, finish_reason=c.finish_reason,
            generator_logprobs=c.logprobs,
        )
        for g, res in enumerate(results)
        for c in res.completions
    ]


def with_rewards(rollouts: Sequence[Rollout], reward_fn: Callable[[str, Any], dict[str, float]]) -> list[Rollout]:
    """The rollouts with ``reward``, ``format_reward`` and ``answer_reward`` from
    ``reward_fn(response, ground_truth)`` (new records; a missing format/answer reward is 0)."""
    scores = score_responses(reward_fn, [r.response for r in rollouts], [r.ground_truth for r in rollouts])
    return [
        dataclasses.replace(
            r, reward=float(s["reward"]), format_reward=float(s.get("format_reward", 0)),
            answer_reward=float(s.get("answer_reward", 0)),
        )
        for r, s in zip(rollouts, scores)
    ]


def pack_rollouts(rollouts: Sequence[Rollout], pad_id: int, device: torch.device | str = "cpu") -> MicroBatch:
    """Right-pad a few rollouts into one micro-batch on ``device``."""
    packed = pack_prompt_and_output_ids(
        [r.prompt_token_ids for r in rollouts], [r.response_token_ids for r in rollouts], pad_id
    )
    mask = packed["response_mask"]  # (b, T)
    gen = torch.zeros(mask.shape, dtype=torch.float32)  # (b, T)
    # Response positions of a row are contiguous and in order, so row-major fill lines up.
    gen[mask] = torch.tensor([lp for r in rollouts for lp in r.generator_logprobs], dtype=torch.float32)
    old = _packed([r.old_logprobs for r in rollouts], mask, device)  # (b, T) or None
    return MicroBatch(
        input_ids=packed["input_ids"].to(device),
        labels=packed["labels"].to(device),
        response_mask=mask.to(device),
        advantages=torch.tensor([[r.advantage] for r in rollouts], dtype=torch.float32, device=device),  # (b, 1)
        raw_rewards=torch.tensor([[r.reward] for r in rollouts], dtype=torch.float32, device=device),  # (b, 1)
        generator_logprobs=gen.to(device),
        num_response_tokens=sum(r.num_tokens for r in rollouts),
        old_log_probs=old,
        ref_log_probs=_packed([r.ref_logprobs for r in rollouts], mask, device),  # (b, T) or None
        rollouts=list(rollouts),
    )


def _packed(per_rollout: Sequence[torch.Tensor | None], mask: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    """Per-rollout (L,) log-probs computed once (old, reference) laid out as (b, T) like
    ``mask``, 0 elsewhere; None unless every rollout has them (they are re-packed every epoch)."""
    if not per_rollout or any(lp is None for lp in per_rollout):
        return None
    packed = torch.zeros(mask.shape, dtype=torch.float32, device=device)  # (b, T)
    packed[mask.to(device)] = torch.cat([lp.float() for lp in per_rollout]).to(device)
    return packed


def micro_batches(
    rollouts: Sequence[Rollout],
    *,
    train_batch_size: int,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    length_grouping: bool = True,
) -> list[MicroBatch]:
    """Cut a rollout batch into train batches of ``train_batch_size`` rollouts (one optimizer
    step each), and each train batch into micro-batches of ``micro_batch_size``.

    With ``length_grouping`` each train batch is sorted by length (prompt + response) first:
    rollouts of similar length share a micro-batch, so there is less padding, and the step's
    gradient is the same (a sum over the same rollouts). Returns the micro-batches train batch
    by train batch.
    """
    batches = []
    for first in range(0, len(rollouts), train_batch_size):
        batch = list(rollouts[first : first + train_batch_size])
        if length_grouping:
            batch = sorted(batch, key=lambda r: len(r.prompt_token_ids) + r.num_tokens)
        for i in range(0, len(batch), micro_batch_size):
            batches.append(pack_rollouts(batch[i : i + micro_batch_size], pad_id, device))
    return batches


def rollout_stats(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Reward, length and truncation statistics of a rollout batch (floats, for logging)."""
    n = len(rollouts)
    lengths = [r.num_tokens for r in rollouts]
    correct = [r.num_tokens for r in rollouts if r.answer_reward > 0]
    incorrect = [r.num_tokens for r in rollouts if r.answer_reward <= 0]
    return {
        "reward_mean": _mean([r.reward for r in rollouts]),
        "format_reward_mean": _mean([r.format_reward for r in rollouts]),
        "answer_reward_mean": _mean([r.answer_reward for r in rollouts]),
        "response_length_mean": _mean(lengths),
        "response_length_correct": _mean(correct),
        "response_length_incorrect": _mean(incorrect),
        "truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / n,
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
