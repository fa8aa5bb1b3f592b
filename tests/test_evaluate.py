"""evaluate / log_generations / the eval command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cs336_alignment.cli import app
from cs336_alignment.evaluate import evaluate, log_generations
from cs336_alignment.generation import Completion, GenerationResult, NativeEngine, SamplingParams
from cs336_alignment.run_dir import RunDir


def exact_reward(response: str, ground_truth: str) -> dict[str, float]:
    """Formatted = ends with '</answer>'; correct = the text between the tags equals the truth."""
    formatted = response.endswith("</answer>") and "<answer>" in response
    answer = response.split("<answer>")[-1].removesuffix("</answer>").strip() if formatted else None
    ok = formatted and answer == ground_truth
    return {"format_reward": float(formatted), "answer_reward": float(ok), "reward": float(ok)}


class ScriptedGenerator:
    """Returns fixed completions, so the metrics can be checked by hand."""

    tokenizer = None

    def __init__(self, scripted: list[list[tuple[str, int, str]]]):
        self.scripted = scripted

    def generate(self, prompts, sampling, progress=False):
        return [
            GenerationResult(p, [1, 2], [Completion(t, list(range(n)), r) for t, n, r in self.scripted[i]])
            for i, p in enumerate(prompts)
        ]

    def load_weights(self, policy):
        pass


SCRIPT = [
    [(" 2+3 </think> <answer> 5 </answer>", 10, "stop")],  # correct
    [(" hmm </think> <answer> 41 </answer>", 20, "stop")],  # formatted, wrong
    [(" rambling without tags", 60, "length")],  # unformatted, truncated
    [(" x </think> <answer> 7 </answer>", 40, "stop")],  # correct
]


def test_metrics_by_hand(tmp_path):
    gen = ScriptedGenerator(SCRIPT)
    metrics, records = evaluate(
        gen, exact_reward, ["p0", "p1", "p2", "p3"], SamplingParams(max_tokens=60), ["5", "40", "1", "7"], tmp_path
    )
    assert metrics["n_examples"] == 4 and metrics["n_format_correct"] == 3 and metrics["n_answer_correct"] == 2
    assert metrics["format_accuracy"] == 0.75 and metrics["answer_accuracy"] == 0.5 and metrics["accuracy"] == 0.5
    assert (metrics["count_format1_answer1"], metrics["count_format1_answer0"], metrics["count_format0_answer0"]) == (2, 1, 1)
    assert metrics["truncated_fraction"] == 0.25
    assert metrics["mean_response_length"] == 32.5  # (10 + 20 + 60 + 40) / 4
    assert metrics["mean_response_length_correct"] == 25  # (10 + 40) / 2
    assert metrics["mean_response_length_incorrect"] == 40  # (20 + 60) / 2: swapped or overall means fail
    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [x["reward"]["reward"] for x in lines] == [1.0, 0.0, 0.0, 1.0]
    assert lines[2]["finish_reason"] == "length" and lines[1]["ground_truth"] == "40" and lines[0]["prompt"] == "p0"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["accuracy"] == 0.5 and on_disk["count_format0_answer0"] == 1


def test_log_generations_reports_correct_and_incorrect_lengths_apart():
    _, summary = log_generations(ScriptedGenerator(SCRIPT), exact_reward, ["p0", "p1", "p2", "p3"], ["5", "40", "1", "7"],
                                 SamplingParams(max_tokens=60))
    assert (summary["mean_response_length"], summary["mean_response_length_correct"],
            summary["mean_response_length_incorrect"]) == (32.5, 25, 40)  # as in test_metrics_by_hand
    assert summary["accuracy"] == 0.5 and summary["format_accuracy"] == 0.75


def test_entropy_and_log_generations(tmp_path, tiny_model, tiny_tokenizer):
    engine = NativeEngine(tiny_model, tiny_tokenizer)
    run = RunDir(tmp_path / "run", console=False)
    records, summary = log_generations(
        engine, exact_reward, ["What is 1 + 1?", "Hi"], ["2", "3"],
        SamplingParams(max_tokens=12, seed=0, n=2), policy=tiny_model, run_dir=run, step=7,
    )
    assert len(records) == 4 and all(r.mean_entropy is not None and r.mean_entropy > 0 for r in records)
    assert summary["mean_response_length"] == pytest.approx(sum(r.num_tokens for r in records) / 4)
    logged = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and all(x["step"] == 7 for x in logged)
    run.close()
    assert "step 7 generations" in (tmp_path / "run" / "log.txt").read_text()


def test_eval_command_end_to_end_and_reproducible(tmp_path, tiny_model_dir):
    data = tmp_path / "val.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"problem": "What is 2 + 3?", "answer": "5"},
                {"problem": "What is 10 * 4?", "solution": "We get \\boxed{40}."},
                {"problem": "Compute 7 - 2.", "answer": "5"},
            ]
        )
        + "\n"
    )
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = CliRunner().invoke(
            app,
            ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--prompt", "r1_zero", "--out", str(out),
             "--limit", "2", "--seed", "3", "--max-tokens", "24"],
        )
        assert result.exit_code == 0, result.output
        assert "accuracy:" in result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n_examples"] == 2 and metrics["max_tokens"] == 24
        runs.append([json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()])
    assert [r["generation"] for r in runs[0]] == [r["generation"] for r in runs[1]]
    assert runs[0][1]["ground_truth"] == "40"
    assert runs[0][0]["prompt"].endswith("User: What is 2 + 3?\nAssistant: <think>")


def test_eval_command_reports_bad_config(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", "task:arithmetic", "n=0"])
    assert result.exit_code == 2 and "n must be >= 1" in result.output


def test_generation_benchmark_runs_on_cpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"
    out = subprocess.run(
        [sys.executable, str(script), "--batch", "4", "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1",
         "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "generation_cpu_tiny.json").read_text())
    assert record["results"]["native_engine"]["new_tokens"] == 32
    assert record["results"]["transformers_generate_dynamic_cache"]["new_tokens"] == 32
    assert record["torch"] and record["date"]


def test_pass_at_k_hand_values():
    from cs336_alignment.evaluate import pass_at_k

    # n = 4 samples, c = 1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    # n = 5, c = 2: pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7; none correct: 0; all correct: 1
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    # pass@1 from 8 samples is their mean accuracy, for every count of correct ones
    assert all(pass_at_k(8, c, 1) == pytest.approx(c / 8) for c in range(9))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote_groups_equivalent_answers():
    from cs336_alignment.evaluate import majority_vote

    def same(a, b):  # a stand-in for the grader's equality: 0.5 and 1/2 are one answer
        value = {"1/2": 0.5, "0.5": 0.5, "2": 2.0, "3": 3.0}
        return value[a] == value[b]

    # 0.5 and 1/2 vote together (2 votes) against 2 (1 vote) and 3 (1 vote): the majority is right
    assert majority_vote(["0.5", "2", "1/2", "3"], [True, False, True, False], same) is True
    # a tie (2 vs 2): the group seen first wins
    assert majority_vote(["2", "0.5", "2", "1/2"], [False, True, False, True], same) is False
    # answers nothing could be extracted from do not vote; no vote at all is wrong
    assert majority_vote([None, None, "1/2"], [False, False, True], same) is True
    assert majority_vote([None, None], [False, False], same) is False
