"""``download``: hub rows -> our JSONL form, offline (the one fetching function is replaced)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from cs336_alignment import download
from cs336_alignment.data import load_examples
from cs336_alignment.download import DATASETS, MATH_SUBJECTS, DownloadError, download_main

GSM8K = {
    "train": [
        {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A farm earns $1,200 a week for 2 weeks.", "answer": "1,200 * 2 = 2,400\n#### 2,400"},
        {"question": "Broken row without a final answer.", "answer": "no marker here"},
    ],
    "test": [{"question": "What is 10 - 3?", "answer": "10 - 3 = 7\n#### 7"}],
}


def math_row(subject: str, i: int, boxed: str | None) -> dict:
    solution = f"Work for {subject} {i}. " + (f"So the answer is $\\boxed{{{boxed}}}$." if boxed is not None else "No box.")
    return {"problem": f"{subject} problem {i}", "level": f"Level {i % 5 + 1}", "type": subject.title(), "solution": solution}


class FakeHub:
    """Stands in for ``fetch_rows``: serves rows per (hub id, config, split) and records the calls."""

    def __init__(self, tables: dict[tuple[str, str | None, str], list[dict]]):
        self.tables = tables
        self.calls: list[tuple[str, str | None, str]] = []

    def __call__(self, hub_id: str, config: str | None, split: str):
        self.calls.append((hub_id, config, split))
        yield from self.tables[(hub_id, config, split)]


@pytest.fixture()
def hub(monkeypatch) -> FakeHub:
    tables: dict[tuple[str, str | None, str], list[dict]] = {}
    for split, rows in GSM8K.items():
        tables[("openai/gsm8k", "main", split)] = rows
    for split in ("train", "test"):
        for k, subject in enumerate(MATH_SUBJECTS):
            # The second algebra problem has no \boxed{} and must be skipped.
            rows = [math_row(subject, i, None if (subject == "algebra" and i == 1) else f"{k}{i}") for i in range(3)]
            tables[("EleutherAI/hendrycks_math", subject, split)] = rows
    tables[("HuggingFaceH4/MATH-500", None, "test")] = [
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "It is $\\boxed{1}$.", "answer": "1",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Simplify $\\sqrt{8}$.", "solution": "$\\boxed{2\\sqrt{2}}$", "answer": "2\\sqrt{2}",
         "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"},
    ]
    fake = FakeHub(tables)
    monkeypatch.setattr(download, "fetch_rows", fake)
    return fake


def test_gsm8k_writes_both_splits_in_gsm8k_form_and_skips_rows_without_final_answer(hub, tmp_path, capsys):
    paths = download_main("gsm8k", tmp_path / "data")
    assert paths == [tmp_path / "data" / "gsm8k" / "train.jsonl", tmp_path / "data" / "gsm8k" / "test.jsonl"]
    train = load_examples(paths[0])
    assert [ex.ground_truth for ex in train] == ["7", "2400"]  # thousands separator removed by our loader
    assert train[0].question.startswith("Tom has 3 apples")
    assert [ex.ground_truth for ex in load_examples(paths[1])] == ["7"]
    out = capsys.readouterr().out
    assert f"{paths[0]}: 2 examples" in out and "1 skipped" in out
    assert f"{paths[1]}: 1 examples" in out
    # the written lines are exactly the GSM8K fields (so the loader autodetects GSM8K)
    first = json.loads(paths[0].read_text().splitlines()[0])
    assert set(first) == {"question", "answer"} and first["answer"].endswith("#### 7")


def test_math_concatenates_all_subjects_and_takes_answer_from_last_boxed(hub, tmp_path, capsys):
    [path] = download_main("math", tmp_path, split="test")
    assert path == tmp_path / "validation.jsonl"  # MATH's test split is the handout's validation set
    assert [c for c in hub.calls] == [("EleutherAI/hendrycks_math", s, "test") for s in MATH_SUBJECTS]
    examples = load_examples(path)
    assert len(examples) == 3 * len(MATH_SUBJECTS) - 1  # one problem had no \boxed{}
    assert examples[0].question == "algebra problem 0" and examples[0].ground_truth == "00"
    assert examples[1].question == "algebra problem 2"  # problem 1 skipped
    assert examples[-1].question == "precalculus problem 2" and examples[-1].ground_truth == "62"
    assert examples[0].meta == {"level": "Level 1", "type": "Algebra"}
    assert examples[0].solution.startswith("Work for algebra 0")
    out = capsys.readouterr().out
    assert "1 skipped" in out and "(test; the handout's validation set)" in out


def test_math_answer_keeps_nested_braces_and_uses_the_last_box():
    row = {"problem": "p", "solution": "First $\\boxed{3}$, finally $\\boxed{\\frac{1}{2}}$.", "level": "Level 2", "type": "Algebra"}
    assert DATASETS["math"].convert(row)["answer"] == "\\frac{1}{2}"


def test_math500_keeps_its_fields_and_has_only_a_test_split(hub, tmp_path):
    [path] = download_main("MATH500", tmp_path)  # names are case-insensitive
    assert path == tmp_path / "math500" / "test.jsonl"
    examples = load_examples(path)
    assert [ex.ground_truth for ex in examples] == ["1", "2\\sqrt{2}"]
    assert examples[1].meta == {"subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"}
    with pytest.raises(DownloadError, match="math500 has no split 'train'; it has: test"):
        download_main("math500", tmp_path, split="train")


def test_limit_stops_early_without_fetching_later_configs(hub, tmp_path):
    [path] = download_main("math", tmp_path, split="train", limit=4)
    examples = load_examples(path)
    # algebra gives 2 usable rows (one skipped), counting_and_probability the next 2
    assert [ex.question for ex in examples] == [
        "algebra problem 0", "algebra problem 2", "counting_and_probability problem 0", "counting_and_probability problem 1",
    ]
    assert [c[1] for c in hub.calls] == ["algebra", "counting_and_probability"]
    with pytest.raises(DownloadError, match="limit must be >= 1"):
        download_main("gsm8k", tmp_path, limit=0)


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="unknown dataset 'mmlu'; choose one of: gsm8k, math, math500"):
        download_main("mmlu", tmp_path)


def test_rewrites_atomically_and_leaves_no_temporary_files(hub, tmp_path):
    target = tmp_path / "gsm8k" / "test.jsonl"
    target.parent.mkdir()
    target.write_text("stale\n")
    download_main("gsm8k", tmp_path, split="test", force=True)
    assert [ex.ground_truth for ex in load_examples(target)] == ["7"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["test.jsonl"]


def test_missing_datasets_library_gives_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DownloadError) as err:
        download.fetch_rows("openai/gsm8k", "main", "train")
    message = str(err.value)
    assert "\n" not in message and "pip install 'cs336-alignment[datasets]'" in message


def test_fetch_rows_asks_datasets_for_the_documented_hub_ids(monkeypatch, tmp_path):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "HuggingFaceH4/MATH-500":
            return [{"problem": "p", "answer": "1", "solution": "s", "subject": "Algebra", "level": 1, "unique_id": "u"}]
        if path == "openai/gsm8k":
            return [{"question": "q", "answer": "r\n#### 5"}]
        return [math_row(name, 0, "9")]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    download_main("gsm8k", tmp_path, split="train")
    download_main("math500", tmp_path)
    download_main("math", tmp_path, split="test", limit=1)
    assert calls == [
        ("openai/gsm8k", "main", "train"),
        ("HuggingFaceH4/MATH-500", None, "test"),
        ("EleutherAI/hendrycks_math", "algebra", "test"),
    ]
    assert load_examples(tmp_path / "validation.jsonl")[0].ground_truth == "9"


def test_hub_failures_become_one_line_errors(monkeypatch):
    def load_dataset(path, name=None, split=None):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\n(offline)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DownloadError, match=r"could not load openai/gsm8k \(main\), split train: ConnectionError") as err:
        list(download.fetch_rows("openai/gsm8k", "main", "train"))
    assert "\n" not in str(err.value) and "(offline)" in str(err.value)


def test_files_land_where_the_configs_read_them_and_nothing_collides(hub, tmp_path):
    written = {name: download_main(name, tmp_path) for name in DATASETS}
    assert {name: [str(p.relative_to(tmp_path)) for p in paths] for name, paths in written.items()} == {
        "gsm8k": ["gsm8k/train.jsonl", "gsm8k/test.jsonl"],
        "math": ["train.jsonl", "validation.jsonl"],
        "math500": ["math500/test.jsonl"],
    }
    assert all(p.stat().st_size > 0 for paths in written.values() for p in paths)
    # the paths the study configs read (with CS336_DATA=tmp_path) exist and hold MATH
    for config in ("grpo.yaml", "ei.yaml"):
        text = (Path(__file__).resolve().parents[1] / "configs" / config).read_text()
        for file in ("train.jsonl", "validation.jsonl"):
            assert "${CS336_DATA:-/data/a5-alignment/MATH}/" + file in text
            assert load_examples(tmp_path / file)[0].question == "algebra problem 0"


def test_existing_file_is_refused_without_force_before_anything_is_fetched(hub, tmp_path):
    target = tmp_path / "validation.jsonl"
    target.write_bytes(b"my own validation set\n")
    with pytest.raises(DownloadError) as err:
        download_main("math", tmp_path)  # train.jsonl does not exist, validation.jsonl does
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "--force" in message
    assert DownloadError.exit_code == 2
    assert target.read_bytes() == b"my own validation set\n"  # byte-identical
    assert not (tmp_path / "train.jsonl").exists() and hub.calls == []  # nothing fetched or written


def test_force_overwrites_an_existing_file(hub, tmp_path):
    target = tmp_path / "math500" / "test.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    [path] = download_main("math500", tmp_path, force=True)
    assert path == target and [ex.ground_truth for ex in load_examples(target)] == ["1", "2\\sqrt{2}"]


def test_prints_the_cs336_data_export_for_math_and_overrides_for_the_others(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    download_main("math", Path("data"))  # a relative --out is printed absolute
    out = capsys.readouterr().out
    assert f"wrote {Path('data') / 'train.jsonl'}: 20 examples" in out
    assert f"export CS336_DATA={(tmp_path / 'data').resolve()}" in out
    download_main("gsm8k", Path("data"))
    gsm8k_dir = (tmp_path / "data" / "gsm8k").resolve()
    assert f"data.train={gsm8k_dir / 'train.jsonl'} data.val={gsm8k_dir / 'test.jsonl'}" in capsys.readouterr().out
