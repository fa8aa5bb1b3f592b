"""pass@k and majority voting (maj@k) over several samples per question: ``summarize`` (hand-worked
values), the ``eval`` command with ``--n-samples``, in-loop validation's eval record, the report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cs336_alignment.evaluate import GenerationRecord, evaluate, final_answer, summarize
from cs336_alignment.generation import Completion, GenerationResult, SamplingParams

SAMPLED = ("n_samples", "pass@", "maj@")  # the keys several samples per question add


def rec(p: int, s: int, answer: str | None, correct: bool, *, text: str | None = None) -> GenerationRecord:
    """Sample ``s`` of question ``p``: an R1-Zero response whose answer is ``answer`` (``text`` replaces the
    whole response), graded ``correct`` (the reward decides; the answer only matters for voting)."""
    generation = text if text is not None else f" thinking </think> <answer> {answer} </answer>"
    ok = float(correct)
    return GenerationRecord(
        prompt_index=p, sample_index=s, prompt=f"q{p}", generation=generation, ground_truth="?", finish_reason="stop",
        num_tokens=10, reward={"format_reward": 1.0, "answer_reward": ok, "reward": ok},
    )


def question(p: int, samples: list[tuple[str | None, bool]]) -> list[GenerationRecord]:
    return [rec(p, s, answer, ok) for s, (answer, ok) in enumerate(samples)]


def maj(records: list[GenerationRecord]) -> float:
    metrics = summarize(records)
    return metrics[f"maj@{metrics['n_samples']}"]


# --------------------------------------------------------------------------------------------
# summarize by hand


def test_pass_at_k_and_maj_at_k_by_hand():
    records = [
        # question 0: correct, wrong 41, wrong 7, correct -> n = 4, c = 2
        *question(0, [("5", True), ("41", False), ("7", False), ("5", True)]),
        # question 1: wrong 3 three times, then correct -> n = 4, c = 1
        *question(1, [("3", False), ("3", False), ("3", False), ("9", True)]),
    ]
    m = summarize(records)
    assert m["n_samples"] == 4
    # pass@1 = mean(2/4, 1/4) = 0.375 = 3 correct / 8 samples = answer_accuracy, to the last bit
    assert m["pass@1"] == 0.375 and m["pass@1"] == m["answer_accuracy"]
    # pass@2: q0 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6; q1 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; mean 2/3
    assert m["pass@2"] == pytest.approx(2 / 3, abs=1e-12)
    # pass@3: q0 1 - C(2,3)/C(4,3) = 1 - 0 = 1; q1 1 - C(3,3)/C(4,3) = 1 - 1/4 = 3/4; mean 7/8
    assert m["pass@3"] == pytest.approx(0.875, abs=1e-12)
    # pass@4: one of all 4 samples is correct in both questions
    assert m["pass@4"] == 1.0
    # maj@4: q0 correct 2 votes vs 41 (1) and 7 (1): right; q1 "3" 3 votes vs correct 1: wrong -> 1/2
    assert m["maj@4"] == 0.5
    assert [k for k in m if k.startswith(SAMPLED)] == ["n_samples", "pass@1", "pass@2", "pass@3", "pass@4", "maj@4"]


def test_equivalent_wrong_answers_vote_together_and_outvote_a_single_correct_one():
    # truth 2: one correct sample first; "0.5" and "\frac{1}{2}" are one wrong answer with 2 votes,
    # "7" has 1: maj@4 = 0. Were 0.5 and \frac{1}{2} apart, the 1-1-1-1 tie would go to the first (correct).
    records = question(0, [("2", True), ("0.5", False), ("\\frac{1}{2}", False), ("7", False)])
    assert maj(records) == 0.0
    # a boxed answer inside the answer tags votes with its box content: \boxed{0.5} joins 1/2
    records = question(0, [("2", True), ("\\boxed{0.5}", False), ("1/2", False)])
    assert maj(records) == 0.0
    # answers only the grader finds equal (their normalised strings differ) merge too: 5.0 and 5 (2 votes) beat 1
    records = question(0, [("2", True), ("5.0", False), ("5", False)])
    assert maj(records) == 0.0
    # ... while distinct wrong answers do not: 2 correct votes beat 3 and 4 (1 vote each)
    assert maj(question(0, [("3", False), ("2", True), ("4", False), ("2", True)])) == 1.0


def test_unextractable_answers_do_not_vote():
    nothing = " I do not know"  # no <answer> tags, no \boxed{}
    empty = " hmm </think> <answer>  </answer>"  # formatted, but an empty answer
    records = [rec(0, 0, None, False, text=nothing), rec(0, 1, None, False, text=nothing),
               rec(0, 2, None, False, text=empty), rec(0, 3, "2", True)]
    # 3 wrong samples with no answer, 1 correct: the correct one is the only vote -> maj@4 = 1
    assert maj(records) == 1.0
    # a question-only response votes with its last \boxed{}: two wrong "3" beat one correct -> 0
    boxed = " so the answer is \\boxed{3}."
    records = [rec(0, 0, None, False, text=boxed), rec(0, 1, None, False, text=boxed), rec(0, 2, "2", True)]
    assert maj(records) == 0.0
    assert (final_answer(nothing), final_answer(empty), final_answer(boxed)) == (None, None, "3")
    # no correct sample and no wrong vote: not correct
    assert maj([rec(0, 0, None, False, text=nothing), rec(0, 1, None, False, text=nothing)]) == 0.0


def test_a_tie_goes_to_the_answer_sampled_first():
    # 2 votes each: the group whose first vote has the lower sample_index wins
    assert maj(question(0, [("3", False), ("2", True), ("3", False), ("2", True)])) == 0.0
    assert maj(question(0, [("2", True), ("3", False), ("2", True), ("3", False)])) == 1.0
    # sampling order is sample_index, not the order of the records
    shuffled = question(0, [("2", True), ("3", False), ("2", True), ("3", False)])[::-1]
    assert maj(shuffled) == 1.0


def test_one_sample_per_question_adds_nothing_and_uneven_counts_use_the_fewest():
    single = [rec(0, 0, "2", True), rec(1, 0, "4", False)]
    m = summarize(single, max_tokens=16)
    assert list(m) == [  # metrics.json of n = 1, exactly as before
        "n_examples", "n_completions", "n_format_correct", "n_answer_correct", "format_accuracy", "answer_accuracy",
        "accuracy", "count_format1_answer1", "count_format1_answer0", "count_format0_answer0", "count_format0_answer1",
        "truncated_fraction", "mean_response_length", "mean_response_length_correct", "mean_response_length_incorrect",
        "mean_token_entropy", "max_tokens",
    ]
    # question 0 has 3 samples (1 correct), question 1 has 2 (both correct): k = 2
    uneven = [*question(0, [("3", False), ("2", True), ("3", False)]), *question(1, [("4", True), ("4", True)])]
    m = summarize(uneven)
    assert m["n_samples"] == 2 and "pass@3" not in m and "maj@3" not in m
    # pass@1 = mean(1/3, 2/2) = 2/3; pass@2: q0 1 - C(2,2)/C(3,2) = 2/3, q1 1 -> 5/6
    assert m["pass@1"] == pytest.approx(2 / 3) and m["pass@2"] == pytest.approx(5 / 6)
    # maj@2 over the first 2 samples: q0 (3, correct) tie -> "3" first -> wrong; q1 right -> 1/2
    assert m["maj@2"] == 0.5


# --------------------------------------------------------------------------------------------
# through evaluate, the eval command, in-loop validation, the report


class ScriptedGenerator:
    """n fixed completions per prompt."""

    tokenizer = None

    def __init__(self, texts: list[list[str]]):
        self.texts = texts

    def generate(self, prompts, sampling, progress=False):
        return [GenerationResult(p, [1], [Completion(t, [1, 2], "stop") for t in self.texts[i]]) for i, p in enumerate(prompts)]

    def load_weights(self, policy):
        pass


def exact_reward(response: str, ground_truth: str) -> dict[str, float]:
    ok = float(final_answer(response) == ground_truth)
    return {"format_reward": 1.0, "answer_reward": ok, "reward": ok}


def tagged(answer: str) -> str:
    return f" ok </think> <answer> {answer} </answer>"


def test_evaluate_writes_the_sampled_metrics(tmp_path):
    texts = [[tagged(a) for a in ("5", "6", "5")], [tagged(a) for a in ("1", "1", "2")]]
    metrics, _ = evaluate(ScriptedGenerator(texts), exact_reward, ["a", "b"], SamplingParams(n=3), ["5", "2"], tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    # q0: 2 of 3 correct, majority right; q1: 1 of 3, "1" has 2 votes -> pass@1 = (2/3 + 1/3) / 2 = 1/2
    assert on_disk["n_samples"] == 3 and on_disk["pass@1"] == 0.5 and on_disk["maj@3"] == 0.5
    assert on_disk["pass@3"] == 1.0 and on_disk == json.loads(json.dumps(metrics))


def test_eval_command_with_n_samples_end_to_end(tmp_path, monkeypatch):
    import cs336_alignment.recipes.eval as eval_module
    from cs336_alignment.cli import app

    def coin_reward(response: str, ground_truth: str) -> dict[str, float]:  # about a third right, fixed per text
        ok = float(sum(map(ord, response)) % 3 == 0)
        return {"format_reward": 1.0, "answer_reward": ok, "reward": ok}

    monkeypatch.setattr(eval_module, "reward_for", lambda *args, **kwargs: coin_reward)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", "task:arithmetic", "--limit", "3", "--out", str(out),
                                      "--max-tokens", "6", "--n-samples", "8", "--quiet", "entropy=false"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 24 and metrics["n_samples"] == 8 and metrics["sampling"]["n"] == 8
    assert [k for k in metrics if k.startswith(("pass@", "maj@"))] == [f"pass@{k}" for k in range(1, 9)] + ["maj@8"]
    accuracy = sum(g["reward"]["answer_reward"] > 0 for g in gens) / len(gens)  # the mean accuracy of the 8 samples
    assert 0 < accuracy < 1 and metrics["pass@1"] == pytest.approx(accuracy, abs=1e-12)
    passes = [metrics[f"pass@{k}"] for k in range(1, 9)]
    assert passes == sorted(passes)  # more samples, more chances
    solved = {g["prompt_index"] for g in gens if g["reward"]["answer_reward"] > 0}
    assert metrics["pass@8"] == pytest.approx(len(solved) / 3)  # pass@n: some sample of the question is right
    assert 0 <= metrics["maj@8"] <= metrics["pass@8"]
    for line in ("n_samples: 8", f"pass@1: {metrics['pass@1']:.4f}", f"pass@8: {metrics['pass@8']:.4f}",
                 f"maj@8: {metrics['maj@8']:.4f}"):
        assert line in result.output


def test_in_loop_validation_logs_the_sampled_metrics(tmp_path, monkeypatch):
    import torch
    from test_recipe_parts import LoopConfig

    import cs336_alignment.recipes.loop as loop_module
    from cs336_alignment.checkpoint import RunControl
    from cs336_alignment.data import Example
    from cs336_alignment.recipes.common import LoadedData

    def without_entropy(*args, policy=None, **kwargs):  # the scripted generator has no model to take entropies with
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop_module, "evaluate", without_entropy)
    examples = [Example(question="a", ground_truth="5"), Example(question="b", ground_truth="2")]
    data = LoadedData(train=examples, val=examples, template="{question}", reward_fn=exact_reward)
    texts = [[tagged(a) for a in ("5", "6", "5", "6")], [tagged(a) for a in ("1", "1", "2", "7")]]
    cfg = LoopConfig(out=str(tmp_path / "run"), control=RunControl(progress=False))
    with loop_module.RunLoop(cfg, "TEST") as loop:
        record = loop.validate(ScriptedGenerator(texts), torch.nn.Linear(1, 1), data=data, examples=examples,
                               sampling=SamplingParams(n=4), step=3, tag="full")
    # q0: 2 of 4 right, a 2-2 tie won by "5" (sampled first); q1: 1 of 4, "1" has 2 votes -> maj@4 = 1/2
    # pass@1 = 3/8; pass@2 = mean(1 - C(2,2)/C(4,2), 1 - C(3,2)/C(4,2)) = mean(5/6, 1/2) = 2/3
    assert record["n_samples"] == 4 and record["pass@1"] == 0.375 and record["maj@4"] == 0.5
    assert record["pass@2"] == pytest.approx(2 / 3)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (evals,) = [r for r in logged if r["kind"] == "eval"]
    assert {k: evals[k] for k in ("n_samples", "pass@1", "pass@2", "pass@3", "pass@4", "maj@4")} == {
        k: record[k] for k in ("n_samples", "pass@1", "pass@2", "pass@3", "pass@4", "maj@4")}
    assert "pass@1 0.3750, pass@4 1.0000, maj@4 0.5000" in (tmp_path / "run" / "log.txt").read_text()


def test_report_shows_pass_at_k_and_maj_at_k_only_when_present(tmp_path):
    from cs336_alignment.config import dump_yaml
    from cs336_alignment.evaluate import write_evaluation
    from cs336_alignment.recipes.eval import EvalConfig
    from cs336_alignment.recipes.sft import SFTConfig
    from cs336_alignment.report import ReportFigures, build_markdown, load_report_inputs
    from cs336_alignment.run_dir import RunDir, atomic_write_text

    def markdown(paths):
        runs, groups = load_report_inputs(paths)
        return build_markdown(runs, groups, ReportFigures(), tmp_path / "out")

    def eval_dir(name, records):  # as `eval` writes it
        atomic_write_text(tmp_path / name / "config.yaml", dump_yaml(EvalConfig(model="m", data="d", out=name)))
        write_evaluation(tmp_path / name, summarize(records), records)
        return tmp_path / name

    plain = eval_dir("plain", [rec(0, 0, "5", True), rec(1, 0, "3", False)])
    before = markdown([plain])
    assert "pass@" not in before and "maj@" not in before
    # 2 questions x 2 samples: pass@1 = 3/4, pass@2 = 1, maj@2: q0 right; q1 (wrong 3, right) tie -> "3" first -> 1/2
    sampled = eval_dir("sampled", [*question(0, [("5", True), ("5", True)]), *question(1, [("3", False), ("4", True)])])
    run = RunDir(tmp_path / "sft", console=False)  # a training run whose last validation sampled 8 per question
    run.save_config(SFTConfig(model="tiny", out=str(tmp_path / "sft")))
    run.log_metrics({"kind": "eval", "eval_step": 1, "accuracy": 0.1, "n_examples": 4, "n_samples": 8,
                     **{f"pass@{k}": k / 10 for k in range(1, 9)}, "maj@8": 0.25, "split": "final"})
    run.close()
    text = markdown([plain, sampled, tmp_path / "sft"])
    table = text.split("| Run | k | pass@1 | pass@k | maj@k |\n", 1)[1].split("\n\n", 1)[0]
    assert table.splitlines()[1:] == ["| sampled | 2 | 0.7500 | 1.0000 | 0.5000 |", "| sft | 8 | 0.1000 | 0.8000 | 0.2500 |"]
    plain_row = next(line for line in before.splitlines() if line.startswith("| plain | eval |"))
    assert plain_row in text  # the final-metrics row of a run without samples is as it was
