"""Rollouts sampled ahead of training by a generator process, with deterministic staleness.

While the policy trains on batch k, the generator process (:class:`~cs336_alignment.generation.process.GeneratorProcess`)
samples the next batches. Batch k is always sampled with the weights after step
``max(0, k - max_staleness)`` (version v = the weights after v GRPO steps): the generator waits for
that version if it is not there yet, so a run reproduces whatever the timing. The pipeline keeps
``max_staleness`` batches in flight: at step k it asks for batch k + s (whose version, k, was pushed
at the end of step k - 1) and waits for batch k.

    pipeline = AsyncRollouts(process, batch_of=questions_and_sampling, template=..., max_staleness=1, total=n)
    pipeline.start(step, policy, saved=...)        # push this step's weights, ask for the first batches
    for k in ...:
        batch = pipeline.sample_rollouts(k)         # a RolloutBatch: rollouts, seconds waited, staleness
        ...train...
        pipeline.load_weights(policy, version=k + 1)  # the new weights, version k + 1
    pipeline.state()                                # for a checkpoint: the batches in flight, waited for

A checkpoint holds the batches in flight (:meth:`AsyncRollouts.state`), so ``--resume`` trains on
exactly the batches the interrupted run would have: their weights versions are older than the
checkpoint's, and are not kept anywhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from .data import Example, format_prompts
from .generation.process import GeneratorProcess, Refill
from .generation.types import Completion, GenerationResult, SamplingParams
from .rollouts import RolloutBatch, rollouts_from_results

__all__ = [
    "AsyncRollouts",
]

logger = logging.getLogger(__name__)


class AsyncRollouts:
    """Rollout batches from a generator process, ``max_staleness`` steps ahead of training.

    Args:
        process: the generator process.
        batch_of: (step, round) -> (the questions, their sampling parameters); the same at every call.
        template: the prompt template.
        max_staleness: s >= 1; batch k is sampled with weights version max(0, k - s).
        total: the run's number of steps (no batch is asked for beyond it).
        resample_rounds: dynamic sampling's ``max_resample_rounds`` (0: none): each batch is asked
            for with its extra rounds (``batch_of(k, r)``, r = 1 .. resample_rounds), which the
            generator process samples as it needs them, with the batch's weights (a :class:`Refill`).
    """

    def __init__(
        self,
        process: GeneratorProcess,
        *,
        batch_of: Callable[..., tuple[Sequence[Example], SamplingParams]],
        template: str,
        max_staleness: int,
        total: int,
        resample_rounds: int = 0,
    ):
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1, got {max_staleness}")
        self.process = process
        self.batch_of = batch_of
        self.template = template
        self.max_staleness = max_staleness
        self.total = total
        self.resample_rounds = resample_rounds
        self._rounds: dict[tuple[int, int], list[GenerationResult]] = {}  # this step's extra rounds, sampled ahead
        self._asked: list[int | tuple[int, int]] = []  # batches (and extra rounds) asked for, not yet received, in order
        self._first = 0  # the step this session started at (start())
        self.restore_threads: int | None = None  # torch threads this process had before it shared the CPU with the child
        self._ready: dict[Any, tuple[list[GenerationResult], int, float]] = {}  # received: results, version, seconds

    def version_of(self, batch: int) -> int:
        """The weights version batch ``batch`` is sampled with: max(0, batch - max_staleness)."""
        return max(0, batch - self.max_staleness)

    def start(self, step: int, policy: torch.nn.Module, saved: dict[str, Any] | None = None) -> None:
        """Begin at ``step`` (steps done) with ``policy``'s weights as version ``step``; batches
        ``step .. step + s - 1`` come from ``saved`` (a checkpoint's :meth:`state`) when there,
        else are asked for with the first :meth:`sample_rollouts` (a run whose budget is already
        spent asks for none)."""
        self.process.push_weights(step, policy)
        self._first = step
        for batch, (results, version, seconds) in _load_batches(saved or {}).items():
            self._ready[batch] = (results, version, seconds)

    def sample_rollouts(self, step: int, round: int = 0) -> RolloutBatch:
        """Batch ``step``: first ask for every batch up to ``step + s`` not yet asked for (batch
        ``step + s`` takes version ``step``, pushed at the end of the previous step), then wait for
        this one. Its ``seconds`` are the wait (the generation not hidden behind training);
        ``extra`` holds its staleness (step - version), weights version and the generator's own seconds.

        ``round`` > 0: an extra round of step ``step``'s questions (dynamic sampling): the one the
        generator process sampled with the batch (``resample_rounds``), else sampled now with the
        trainer's current weights (version ``step``: staleness 0) while the trainer waits. Round
        0's ``extra`` counts the rounds sampled ahead (``rounds_ahead``); nothing of a round is in
        flight at a checkpoint."""
        if round:
            if (step, round) in self._rounds:  # sampled with the batch: its seconds are in the batch's
                questions, _ = self.batch_of(step, round)
                results = self._rounds.pop((step, round))
                return RolloutBatch(rollouts=rollouts_from_results(questions, format_prompts(self.template, list(questions)),
                                                                   results), seconds=0.0, extra={"generation_seconds": 0.0})
            return self._extra_round(step, round)
        for batch in range(step, min(step + self.max_staleness + 1, self.total)):
            if batch not in self._asked and batch not in self._ready:  # (a first step after a resume: from this
                self._ask(batch, version=max(self.version_of(batch), self._first))  # step's weights at the oldest)
        t0 = time.perf_counter()
        results, version, seconds = self._receive(step)
        waited = time.perf_counter() - t0
        questions, _ = self.batch_of(step)
        prompts = format_prompts(self.template, list(questions))
        size = len(questions)
        results, ahead = results[:size], results[size:]  # the batch, then its extra rounds
        self._rounds = {(step, 1 + i // size): ahead[i:i + size] for i in range(0, len(ahead), size)}
        rollouts = rollouts_from_results(questions, prompts, results)
        extra = {"staleness": step - version, "weights_version": version, "generation_seconds": seconds}
        if self.resample_rounds:
            extra["rounds_ahead"] = len(self._rounds)
        return RolloutBatch(rollouts=rollouts, seconds=waited, extra=extra)

    def _extra_round(self, step: int, round: int) -> RolloutBatch:
        questions, sampling = self.batch_of(step, round)
        prompts = format_prompts(self.template, list(questions))
        label = (step, round)  # requests are answered in order; this one after the batches already asked for
        t0 = time.perf_counter()
        self.process.request(label, prompts, sampling, version=step)
        self._asked.append(label)
        self._receive_into_ready(label)
        results, version, seconds = self._ready.pop(label)
        return RolloutBatch(rollouts=rollouts_from_results(questions, prompts, results), seconds=time.perf_counter() - t0,
                            extra={"generation_seconds": seconds})

    def load_weights(self, policy: torch.nn.Module, version: int) -> None:
        """Hand the generator process ``policy``'s weights after ``version`` steps (it applies them
        when a batch asks for that version)."""
        self.process.push_weights(version, policy)

    def state(self) -> dict[str, Any]:
        """The batches in flight, waited for, as plain values (what a checkpoint keeps)."""
        if self._asked:
            logger.info("checkpoint: waiting for %d rollout batch(es) in flight, which it keeps", len(self._asked))
        for batch in list(self._asked):
            self._receive_into_ready(batch)
        return {"async_batches": {str(batch): _dump(results, version, seconds)
                                  for batch, (results, version, seconds) in sorted(self._ready.items())}}

    def close(self) -> None:
        """Stop the generator process; give this process back the threads it lent it."""
        self.process.close()
        if self.restore_threads is not None:
            torch.set_num_threads(self.restore_threads)
            self.restore_threads = None

    def _ask(self, batch: int, version: int | None = None) -> None:
        questions, sampling = self.batch_of(batch)
        version = self.version_of(batch) if version is None else version
        refill = None
        if self.resample_rounds:  # dynamic sampling: the extra rounds go with the batch, sampled as the child needs them
            rounds = [self.batch_of(batch, r) for r in range(1, self.resample_rounds + 1)]
            refill = Refill(ground_truths=[q.ground_truth for q in questions], wanted=len(questions), rounds=[
                (format_prompts(self.template, list(qs)), [q.ground_truth for q in qs], s) for qs, s in rounds])
        self.process.request(batch, format_prompts(self.template, list(questions)), sampling, version=version, refill=refill)
        self._asked.append(batch)

    def _receive_into_ready(self, batch: int) -> None:
        while batch in self._asked:
            oldest = self._asked[0]
            self._ready[oldest] = self.process.result(oldest)
            self._asked.pop(0)

    def _receive(self, batch: int) -> tuple[list[GenerationResult], int, float]:
        if batch not in self._ready:
            if batch not in self._asked:
                self._ask(batch)
            self._receive_into_ready(batch)
        return self._ready.pop(batch)


def _dump(results: list[GenerationResult], version: int, seconds: float) -> dict[str, Any]:
    """A batch as plain lists, strings and numbers (loadable with ``torch.load(weights_only=True)``)."""
    return {"version": version, "seconds": seconds, "results": [
        {"prompt": r.prompt, "prompt_token_ids": list(r.prompt_token_ids), "completions": [asdict(c) for c in r.completions]}
        for r in results
    ]}


def _load_batches(saved: dict[str, Any]) -> dict[int, tuple[list[GenerationResult], int, float]]:
    batches = {}
    for batch, value in saved.get("async_batches", {}).items():
        results = [GenerationResult(prompt=r["prompt"], prompt_token_ids=list(r["prompt_token_ids"]),
                                    completions=[Completion(**c) for c in r["completions"]]) for r in value["results"]]
        batches[int(batch)] = (results, int(value["version"]), float(value["seconds"]))
    return batches
