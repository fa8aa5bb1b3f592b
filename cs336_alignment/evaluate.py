"""Zero-shot evaluation and in-the-loop generation logging.

``evaluate`` generates with any :class:`~cs336_alignment.generation.Generator`, scores each
completion with a reward function, and writes

- ``generations.jsonl``: one line per completion: prompt, generation, ground truth, finish
  reason, token count, the reward dict (and mean token entropy when a policy is given);
- ``metrics.json``: counts and accuracies, the three format/answer categories, the share
  truncated at max_tokens, mean response lengths (all / correct / incorrect), entropy; with
  k >= 2 samples per prompt also ``n_samples`` (k), ``pass@1`` .. ``pass@k`` and ``maj@k``
  (:func:`sampling_metrics`).

``log_generations`` computes the same per-example records and summary for the handful of
prompts a training loop logs at each validation.

This is the evaluation core, below the recipes: they call ``evaluate`` in the loop to
validate. The ``eval`` command (its config, loading a model, writing the run directory) is
``recipes/eval.py``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .generation.types import GenerationResult, Generator, SamplingParams
from .logprobs import get_response_log_probs
from .rewards import grade_answer, is_correct, score_pairs
from .rewards.extract import last_boxed_content, r1_zero_answer
from .rewards.normalize import hendrycks_normalize
from .run_dir import atomic_write_text
from .tokenization import pack_prompt_and_output_ids, pad_token_id

__all__ = [
    "GenerationRecord",
    "RewardFn",
    "evaluate",
    "evaluation_metrics",
    "final_answer",
    "log_generations",
    "majority_vote",
    "pass_at_k",
    "response_entropies",
    "sampling_metrics",
    "score_results",
    "summarize",
    "write_evaluation",
]


RewardFn = Callable[[str, Any], dict[str, float]]


@dataclass
class GenerationRecord:
    """One scored completion."""

    prompt_index: int  # index of the prompt in the evaluated list
    sample_index: int  # which of the n samples of that prompt
    prompt: str
    generation: str
    ground_truth: Any
    finish_reason: str  # "stop" | "eos" | "length"
    num_tokens: int  # response length in tokens
    reward: dict[str, float]  # {"format_reward", "answer_reward", "reward", ...}
    mean_entropy: float | None = None  # mean next-token entropy over the response (nats)


def score_results(
    results: Sequence[GenerationResult],
    prompts: Sequence[str],
    ground_truths: Sequence[Any],
    reward_fn: RewardFn,
) -> list[GenerationRecord]:
    """Score every completion; one record per completion, grouped by prompt."""
    if not (len(results) == len(prompts) == len(ground_truths)):
        raise ValueError(
            f"got {len(results)} results, {len(prompts)} prompts and {len(ground_truths)} ground truths; they must match"
        )
    pairs = [(c.text, truth) for result, truth in zip(results, ground_truths) for c in result.completions]
    scores = iter(score_pairs(reward_fn, [text for text, _ in pairs], [truth for _, truth in pairs]))
    records = []
    for p, (result, prompt, truth) in enumerate(zip(results, prompts, ground_truths)):
        for s, c in enumerate(result.completions):
            reward = {k: float(v) for k, v in next(scores).items()}
            records.append(GenerationRecord(
                prompt_index=p, sample_index=s, prompt=prompt, generation=c.text, ground_truth=truth,
                finish_reason=c.finish_reason, num_tokens=c.num_tokens, reward=reward,
            ))
    return records


@torch.no_grad()
def response_entropies(
    policy: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    micro_batch_size: int = 8,
) -> list[float]:
    """Mean next-token entropy of ``policy`` over each response's tokens (forward passes, no grad)."""
    # Longest first keeps padding low within each micro-batch.
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(response_ids[i])))
    values: dict[int, float] = {}
    for start in range(0, len(order), micro_batch_size):
        idx = order[start : start + micro_batch_size]
        batch = pack_prompt_and_output_ids([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_id)
        device = next(policy.parameters()).device
        mask = batch["response_mask"].to(device)  # (b, T)
        scored = get_response_log_probs(
            policy, batch["input_ids"].to(device), batch["labels"].to(device), return_token_entropy=True,
            chunk_size=1024, positions_mask=mask,
        )
        ent = scored["token_entropy"]  # (b, T)
        per_seq = (ent * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (b,)
        for i, v in zip(idx, per_seq.tolist()):
            values[i] = v
    return [values[i] for i in range(len(prompt_ids))]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al.,
    2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374): the chance that at
    least one of k samples drawn without replacement from the n is correct,

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    (the product form avoids huge binomials). pass@1 = c / n, the mean accuracy of the samples
    (returned as exactly that quotient).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if k == 1:
        return c / n
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[Any], correct: Sequence[bool], equivalent: Callable[[Any, Any], bool]) -> bool:
    """maj@k for one question: whether the most common answer among its k samples is correct.

    Self-consistency (Wang et al., 2022, "Self-Consistency Improves Chain of Thought Reasoning in
    Language Models", arXiv:2203.11171): sample k reasoning paths, take the answer most of them
    reach. Over a set of questions q with samples y_{q,1..k} and answers a(y),

        maj@k = mean_q 1[ argmax_a |{j : a(y_{q,j}) ~ a}| is correct ]

    where ``~`` is ``equivalent``. Answers are grouped by it (e.g. the grader's equality, so
    "0.5" and "\\frac{1}{2}" vote together): each joins the first group whose first answer it
    equals. The largest group wins; a tie goes to the group whose first answer came earliest
    in ``answers`` (so with samples in their random sampling order, a random tie-break). The
    winner is correct when its first answer is (``correct[i]`` of that answer). None answers
    (nothing extracted) do not vote; with no votes the result is False.

    Args:
        answers: the k samples' answers, in sampling order; None for one that does not vote.
        correct: whether each sample was graded correct.
        equivalent: ``equivalent(representative, answer)``: whether ``answer`` votes with the
            group whose first answer is ``representative``.
    """
    groups: list[list[int]] = []  # indices of the answers in each group, the first one its representative
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if equivalent(answers[group[0]], answer):
                group.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return False
    winner = max(groups, key=len)  # max keeps the first of equal sizes
    return bool(correct[winner[0]])


def final_answer(response: str) -> str | None:
    """The final answer of a response, for majority voting: the R1-Zero answer (text inside the
    last ``<answer>...</answer>``, its ``\\boxed{}`` content if boxed), else the content of the
    response's last ``\\boxed{}`` (question-only responses); stripped, None when there is none."""
    _, answer = r1_zero_answer(response)
    if answer is None:
        answer = last_boxed_content(response)
    answer = answer.strip() if answer is not None else None
    return answer or None


class _Correct:
    """The single vote of every sample graded correct (they all equal the ground truth)."""

    def __repr__(self) -> str:
        return "<correct>"


_CORRECT = _Correct()


def _normalized(answer: str) -> str:
    """``hendrycks_normalize(answer)``, or ``answer`` itself should it fail: a metric never stops an evaluation."""
    try:
        return hendrycks_normalize(answer) or answer
    except Exception:  # noqa: BLE001 - an odd answer is still an answer, grouped by its raw text
        return answer


def _question_majority(samples: Sequence[GenerationRecord], graded: dict[tuple[str, str], bool]) -> bool:
    """maj@k of one question's samples (in sampling order) through :func:`majority_vote`.

    Votes: every correct sample votes for the one correct answer; a wrong one votes for its
    :func:`final_answer` after ``hendrycks_normalize`` (equal strings: one group), and two wrong
    groups merge when the grader says their first raw answers are equal (one taken as the
    truth; ``graded`` caches the verdicts); a wrong sample with no answer does not vote. The
    grader is only asked when the answer is open: some correct votes, and at least as many
    wrong ones.
    """
    correct = [is_correct(r.reward) for r in samples]
    raw: dict[str, str] = {}  # normalised answer -> its first raw answer
    keys: list[Any] = []
    for record, ok in zip(samples, correct):
        if ok:
            keys.append(_CORRECT)
            continue
        answer = final_answer(record.generation)
        key = _normalized(answer) if answer is not None else None
        if key is not None:
            raw.setdefault(key, answer)
        keys.append(key)
    n_correct, n_wrong = sum(correct), sum(k is not None and k is not _CORRECT for k in keys)
    if n_correct == 0 or n_correct > n_wrong:  # decided without merging wrong answers
        return n_correct > 0

    def equivalent(representative: Any, answer: Any) -> bool:
        if representative is _CORRECT or answer is _CORRECT:
            return representative is answer
        if representative == answer:
            return True
        pair = (raw[representative], raw[answer])
        if pair not in graded:
            graded[pair] = grade_answer(pair[1], pair[0]).correct  # time-bounded, never raises
        return graded[pair]

    return majority_vote(keys, correct, equivalent)


def sampling_metrics(records: Sequence[GenerationRecord]) -> dict[str, Any]:
    """pass@k and maj@k of records with several samples per prompt; {} with one.

    With k = the fewest samples any prompt has (k >= 2), returns ``n_samples`` (k),
    ``pass@1`` .. ``pass@k`` and ``maj@k``:

    - ``pass@k'`` = mean over questions of :func:`pass_at_k` (n_q, c_q, k'), the unbiased
      estimator of Chen et al. (2021, arXiv:2107.03374) from the question's n_q samples of
      which c_q are correct (answer_reward > 0, as for ``answer_accuracy``); pass@1 is the mean
      of c_q / n_q, so ``answer_accuracy`` when every question has k samples.
    - ``maj@k`` = share of questions whose majority answer over their first k samples (by
      ``sample_index``) is correct (:func:`majority_vote`, self-consistency of Wang et al.,
      2022, arXiv:2203.11171). Votes: all correct samples vote together; wrong ones vote for
      their :func:`final_answer`, grouped by equal ``hendrycks_normalize`` strings, then
      groups merged when the grader says their representatives are equal; wrong samples with
      no extractable answer do not vote. Ties: the group whose first vote came earliest (the
      lower ``sample_index``) wins, e.g. samples (wrong "3", correct, wrong "3", correct) count
      as not correct and (correct, wrong "3", correct, wrong "3") as correct.
    """
    by_prompt: dict[int, list[GenerationRecord]] = {}
    for r in records:
        by_prompt.setdefault(r.prompt_index, []).append(r)
    if not by_prompt:
        return {}
    k = min(len(samples) for samples in by_prompt.values())
    if k < 2:
        return {}
    questions = [sorted(samples, key=lambda r: r.sample_index) for samples in by_prompt.values()]
    counts = [(len(samples), sum(is_correct(r.reward) for r in samples)) for samples in questions]
    metrics: dict[str, Any] = {"n_samples": k}
    for j in range(1, k + 1):
        metrics[f"pass@{j}"] = sum(pass_at_k(n, c, j) for n, c in counts) / len(counts)
    if len({n for n, _ in counts}) == 1:  # the same n everywhere: pass@1 is answer_accuracy, to the last bit
        metrics["pass@1"] = sum(c for _, c in counts) / sum(n for n, _ in counts)
    graded: dict[tuple[str, str], bool] = {}
    metrics[f"maj@{k}"] = sum(_question_majority(samples[:k], graded) for samples in questions) / len(questions)
    return metrics


def summarize(records: Sequence[GenerationRecord], max_tokens: int | None = None) -> dict[str, Any]:
    """Counts and means over scored completions (the metrics.json of an evaluation).

    Categories: format 1 & answer 1 (correct), format 1 & answer 0 (formatted but wrong),
    format 0 & answer 0 (unformatted); format 0 & answer 1 cannot happen with our graders
    but is counted if a custom reward produces it. With k >= 2 samples per prompt, the
    :func:`sampling_metrics` (``n_samples``, ``pass@1`` .. ``pass@k``, ``maj@k``) follow.
    """
    n = len(records)
    fmt = [r.reward.get("format_reward", 0.0) for r in records]
    ans = [r.reward.get("answer_reward", r.reward.get("reward", 0.0)) for r in records]
    rew = [r.reward.get("reward", 0.0) for r in records]
    correct = [r.num_tokens for r, a in zip(records, ans) if a > 0]
    incorrect = [r.num_tokens for r, a in zip(records, ans) if a <= 0]
    entropies = [r.mean_entropy for r in records if r.mean_entropy is not None]
    truncated = [r for r in records if r.finish_reason == "length"]
    metrics: dict[str, Any] = {
        "n_examples": len({r.prompt_index for r in records}),
        "n_completions": n,
        "n_format_correct": int(sum(f > 0 for f in fmt)),
        "n_answer_correct": int(sum(a > 0 for a in ans)),
        "format_accuracy": sum(f > 0 for f in fmt) / n if n else None,
        "answer_accuracy": sum(a > 0 for a in ans) / n if n else None,
        "accuracy": _mean(rew),
        "count_format1_answer1": int(sum(f > 0 and a > 0 for f, a in zip(fmt, ans))),
        "count_format1_answer0": int(sum(f > 0 and a <= 0 for f, a in zip(fmt, ans))),
        "count_format0_answer0": int(sum(f <= 0 and a <= 0 for f, a in zip(fmt, ans))),
        "count_format0_answer1": int(sum(f <= 0 and a > 0 for f, a in zip(fmt, ans))),
        "truncated_fraction": len(truncated) / n if n else None,
        "mean_response_length": _mean([r.num_tokens for r in records]),
        "mean_response_length_correct": _mean(correct),
        "mean_response_length_incorrect": _mean(incorrect),
        "mean_token_entropy": _mean(entropies),
    }
    if max_tokens is not None:
        metrics["max_tokens"] = max_tokens
    metrics.update(sampling_metrics(records))
    return metrics


def evaluate(
    generator: Generator,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    sampling: SamplingParams,
    ground_truths: Sequence[Any],
    out_dir: str | Path | None = None,
    *,
    policy: Any | None = None,
    progress: bool = True,
    extra_metrics: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[GenerationRecord]]:
    """Generate for every prompt, score, and (with ``out_dir``) write generations.jsonl and metrics.json.

    In the spirit of the handout's ``evaluate_vllm``: ``generator`` is any backend
    (native engine or vLLM), ``reward_fn(response, ground_truth) -> dict``. When ``policy``
    (a transformers model) is given, each response's mean token entropy is computed by a
    forward pass of the policy over the generated ids.

    Returns (metrics, records).
    """
    if len(prompts) != len(ground_truths):
        raise ValueError(f"got {len(prompts)} prompts but {len(ground_truths)} ground truths")
    t0 = time.perf_counter()
    results = generator.generate(list(prompts), sampling, progress=progress)
    gen_s = time.perf_counter() - t0
    records = score_results(results, prompts, ground_truths=ground_truths, reward_fn=reward_fn)
    score_s = time.perf_counter() - t0 - gen_s
    if policy is not None:
        pairs = [(res.prompt_token_ids, c.token_ids) for res in results for c in res.completions]
        ents = response_entropies(
            policy, [p for p, _ in pairs], [r for _, r in pairs], pad_id=pad_token_id(generator.tokenizer)
        )
        for rec, e in zip(records, ents):
            rec.mean_entropy = e
    metrics = evaluation_metrics(records, sampling, generation_seconds=gen_s, scoring_seconds=score_s)
    if extra_metrics:
        metrics.update(extra_metrics)
    if out_dir is not None:
        write_evaluation(out_dir, metrics, records)
    return metrics, records


def evaluation_metrics(
    records: Sequence[GenerationRecord], sampling: SamplingParams, *, generation_seconds: float, scoring_seconds: float
) -> dict[str, Any]:
    """metrics.json of an evaluation: :func:`summarize` of ``records``, the seconds spent
    generating and scoring, the tokens generated and their rate, and the sampling parameters."""
    metrics = summarize(records, sampling.max_tokens)
    n_tokens = sum(r.num_tokens for r in records)
    metrics.update(
        {
            "generation_seconds": generation_seconds,
            "scoring_seconds": scoring_seconds,
            "generated_tokens": n_tokens,
            "generation_tokens_per_second": n_tokens / generation_seconds if generation_seconds > 0 else None,
            "sampling": asdict(sampling),
        }
    )
    return metrics


def write_evaluation(out_dir: str | Path, metrics: dict[str, Any], records: Sequence[GenerationRecord]) -> None:
    """Write generations.jsonl and metrics.json (each atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(asdict(r), ensure_ascii=False) for r in records]
    atomic_write_text(out / "generations.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")


def log_generations(
    generator: Generator,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    ground_truths: Sequence[Any],
    sampling: SamplingParams,
    *,
    policy: Any | None = None,
    run_dir: Any | None = None,
    step: int | None = None,
) -> tuple[list[GenerationRecord], dict[str, Any]]:
    """The handout's in-the-loop logging for a few prompts.

    Per example: prompt, response, ground truth, reward dict and (with ``policy``) mean
    token entropy; overall: mean response length for all, correct and incorrect responses.
    With ``run_dir`` (a :class:`~cs336_alignment.run_dir.RunDir`), records are appended to
    ``<run>/generations.jsonl`` tagged with ``step`` and a summary line goes to the log.
    """
    metrics, records = evaluate(
        generator, reward_fn, prompts, sampling=sampling, ground_truths=ground_truths, policy=policy, progress=False
    )
    summary = {
        k: metrics[k]
        for k in ("accuracy", "format_accuracy", "mean_response_length", "mean_response_length_correct",
                  "mean_response_length_incorrect", "mean_token_entropy")
    }
    if run_dir is not None:
        run_dir.files.record("generations.jsonl")
        with open(Path(run_dir.path) / "generations.jsonl", "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"step": step, **asdict(r)}, ensure_ascii=False) + "\n")
        run_dir.logger.info(
            "step %s generations: %s",
            step,
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()),
        )
    return records, summary
