"""Trackers (cs336_alignment/trackers.py): a tiny run logged to TensorBoard, trackio and wandb,
offline, and the values read back from what each wrote; a resume continues the same tracker
run and shows no step twice; an unknown tracker or a missing package is refused in one line
(exit 2) before anything is written."""

from __future__ import annotations

import glob
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from test_recipe_parts import LoopConfig
from typer.testing import CliRunner

from cs336_alignment.checkpoint import RunControl
from cs336_alignment.cli import app
from cs336_alignment.config import ConfigError
from cs336_alignment.recipes.loop import RunLoop
from cs336_alignment.run_dir import RunFiles, read_jsonl
from cs336_alignment.trackers import TRACKERS, check_trackers

GRPO = ["grpo", "model=tiny", "device=cpu", "data.train=task:arithmetic", "n_grpo_steps=1", "rollout_batch_size=4",
        "group_size=2", "train_batch_size=4", "micro_batch_size=2", "sampling_max_tokens=4", "n_eval_examples=2",
        "control.progress=false"]


class Crash(Exception):
    """Stands for a kill in the middle of a run."""


def _run(out: Path, *, total: int, session: int, resume: bool = False, crash_at_eval: int | None = None,
         **fields) -> list[dict]:
    """A tiny run through RunLoop: a Linear whose bias grows by 1 a step; train records every step,
    an eval record every 3 steps, checkpoints every 2. ``session`` is logged with every record, so
    what a resumed run wrote can be told from what the first one did. ``crash_at_eval``: stop in
    the validation of that step, after its record is logged and before its checkpoint."""
    cfg = LoopConfig(out=str(out), control=RunControl(checkpoint_every=2, progress=False, resume=resume), **fields)
    model = torch.nn.Linear(2, 1)
    try:
        with RunLoop(cfg, "TEST") as loop:

            def evaluate(step: int) -> None:
                loop.sink.log("eval", step, {"accuracy": step / 10, "session": session, "split": "subset"})
                if step == crash_at_eval:
                    raise Crash

            loop.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
            for step in loop.steps(total, eval_every=3, evaluate=evaluate):
                with torch.no_grad():
                    model.bias += 1.0
                loop.sink.log("train", step + 1, {"bias": model.bias.item(), "session": session, "flag": True})
                loop.end_of_step()
    except Crash:
        pass
    return read_jsonl(out / "metrics.jsonl")


def _series(records: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in the records of ``kind``, in the order written."""
    return [(r[f"{kind}_step"], pytest.approx(r[key])) for r in records if r["kind"] == kind]


def _tensorboard(run: Path, kind: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar as TensorBoard shows it (orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / kind))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture
def trackio_at(monkeypatch):
    """Point trackio at a directory (TRACKIO_DIR, read when trackio is imported: an already
    imported trackio is pointed there too), offline: no Space, no server, no Hub user lookup."""
    trackio = pytest.importorskip("trackio", reason="trackio is not installed (pip install -e '.[trackers]')")
    for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID"):
        monkeypatch.delenv(var, raising=False)
    if hasattr(trackio, "run") and hasattr(trackio.run, "_get_default_namespace"):
        monkeypatch.setattr(trackio.run, "_get_default_namespace", lambda: "tester")

    def point(directory: Path):
        monkeypatch.setenv("TRACKIO_DIR", str(directory))
        for name, module in list(sys.modules.items()):
            if name == "trackio" or name.startswith("trackio."):
                for attr, value in (("TRACKIO_DIR", directory), ("MEDIA_DIR", directory / "media"),
                                    ("ARTIFACTS_DIR", directory / "artifacts")):
                    if isinstance(getattr(module, attr, None), Path):
                        monkeypatch.setattr(module, attr, value)
        return trackio

    return point


def _trackio_logs(trackio, project: str, run: Path) -> list[dict]:
    name = (run / "trackio_run.txt").read_text().split()[0]
    return trackio.SQLiteStorage.get_logs(project, name)


def _trackio_series(logs: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    return sorted((row["step"], row[f"{kind}/{key}"]) for row in logs if f"{kind}/{key}" in row)


# --------------------------------------------------------------------------- logged and read back


def test_tensorboard_and_trackio_hold_what_metrics_jsonl_holds(tmp_path, trackio_at):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[trackers]')")
    run = tmp_path / "run"
    trackio = trackio_at(run / "trackio-db")  # inside the run directory: then the run's manifest must own it
    records = _run(run, total=4, session=1, trackers=["tensorboard", "trackio"], run_name="tiny")
    bias, accuracy = _series(records, "train", "bias"), _series(records, "eval", "accuracy")
    assert [s for s, _ in bias] == [1, 2, 3, 4] and [s for s, _ in accuracy] == [3]

    assert _tensorboard(run, "train", "train/bias") == bias  # train/<key> at global_step=train_step
    assert _tensorboard(run, "eval", "eval/accuracy") == accuracy  # eval/<key> at eval_step

    logs = _trackio_logs(trackio, "cs336_alignment", run)  # the default project
    assert (run / "trackio_run.txt").read_text().split()[0] == "tiny"  # run_name names the run
    assert _trackio_series(logs, "train", "bias") == bias and _trackio_series(logs, "eval", "accuracy") == accuracy
    assert all(row["train_step"] == row["step"] for row in logs if "train/bias" in row)
    assert not any("train/flag" in row or "eval/split" in row for row in logs)  # numbers only

    files = RunFiles(run)
    assert {"tensorboard/", "trackio_run.txt", "trackio-db/"} <= files.recorded()
    assert files.foreign() == []  # everything the trackers wrote in the run directory is the run's


def test_a_resume_continues_the_tracker_runs_without_showing_a_step_twice(tmp_path, trackio_at):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[trackers]')")
    trackio = trackio_at(tmp_path / "trackio")
    run, fields = tmp_path / "run", {"trackers": ["tensorboard", "trackio"], "wandb_project": ""}
    # the first session logs train 1-6 and eval 3 and 6, then dies before checkpointing step 6
    _run(run, total=7, session=1, crash_at_eval=6, **fields)
    assert _tensorboard(run, "eval", "eval/session") == [(3, 1), (6, 1)]
    name = (run / "trackio_run.txt").read_text().split()[0]
    # the second one resumes from the checkpoint of step 4 and logs train 5-7 and eval 6 again
    records = _run(run, total=7, session=2, resume=True, **fields)
    expected_train = [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2)]
    assert _series(records, "train", "session") == expected_train  # metrics.jsonl: cut back, then continued

    assert _tensorboard(run, "train", "train/session") == expected_train  # each step once, the resumed run's after 4
    assert _tensorboard(run, "eval", "eval/session") == [(3, 1), (6, 2)]
    assert [s for s, _ in _tensorboard(run, "train", "train/bias")] == [1, 2, 3, 4, 5, 6, 7]

    assert (run / "trackio_run.txt").read_text().split()[0] == name  # the same trackio run, continued
    assert [r["name"] for r in trackio.SQLiteStorage.get_run_records("cs336_alignment")] == [name]
    logs = _trackio_logs(trackio, "cs336_alignment", run)
    assert _trackio_series(logs, "train", "session") == expected_train
    assert _trackio_series(logs, "eval", "session") == [(3, 1), (6, 2)]


def test_wandb_project_names_the_trackio_project_and_a_resume_keeps_the_wandb_id(tmp_path, monkeypatch, trackio_at):
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}
    fake = types.ModuleType("wandb")  # a stand-in: this checks the wiring, not wandb

    class FakeRun:
        def define_metric(self, name, step_metric=None):
            pass

        def log(self, data):
            calls["log"].append(data)

        def finish(self):
            calls["finish"].append(True)

    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trackio = trackio_at(tmp_path / "trackio")
    run = tmp_path / "run"
    _run(run, total=2, session=1, wandb_project="proj-x", trackers=["trackio"])
    _run(run, total=4, session=2, resume=True, wandb_project="proj-x", trackers=["trackio"])
    first, second = calls["init"]
    assert first["project"] == second["project"] == "proj-x" and first["id"] == second["id"] and second["resume"] == "allow"
    assert calls["finish"] == [True, True]
    assert [d["train_step"] for d in calls["log"] if "train_step" in d] == [1, 2, 3, 4]
    assert _trackio_series(_trackio_logs(trackio, "proj-x", run), "train", "session") == [(1, 1), (2, 1), (3, 2), (4, 2)]


def _wandb_history(run_file: str) -> list[dict[str, str]]:
    """The history rows of an offline wandb run file (run-<id>.wandb: a LevelDB-style log of
    protobuf records in 32 KiB blocks, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunk, rows = Path(run_file).read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length, kind) == (0, 0):  # a block's padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_values_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]'); a stand-in checks its wiring")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    run, sessions = tmp_path / "run", []

    def session_file() -> str:  # each session's offline folder is moved aside (two in one second share a name)
        (folder,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*"))
        sessions.append(Path(folder).rename(tmp_path / f"session{len(sessions) + 1}"))
        (file,) = glob.glob(str(sessions[-1] / "run-*.wandb"))
        return file

    records = _run(run, total=2, session=1, trackers=["wandb"])
    files = [session_file()]
    _run(run, total=3, session=2, resume=True, trackers=["wandb"])
    files.append(session_file())
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert all(f.endswith(f"run-{run_id}.wandb") for f in files)  # one run id, two sessions
    first = [r for r in _wandb_history(files[0]) if "train/bias" in r]
    assert [(int(r["train_step"]), float(r["train/bias"])) for r in first] == _series(records, "train", "bias")
    second = [r for r in _wandb_history(files[1]) if "train/session" in r]
    assert [(int(r["train_step"]), float(r["train/session"])) for r in second] == [(3, 2)]


# --------------------------------------------------------------------------- refused before anything is written


def test_check_trackers_refuses_unknown_repeated_and_missing(monkeypatch):
    assert TRACKERS == ("jsonl", "wandb", "trackio", "tensorboard")
    check_trackers(["jsonl", "tensorboard", "trackio"], installed=False)
    with pytest.raises(ConfigError, match=r"^field 'trackers': unknown tracker 'mlflow'; choose from jsonl, wandb"):
        check_trackers(["mlflow"], installed=False)
    with pytest.raises(ConfigError, match=r"^field 'trackers': 'trackio' given twice"):
        check_trackers(["trackio", "jsonl", "trackio"], installed=False)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    check_trackers(["tensorboard"], installed=False)  # the config's own check imports nothing
    with pytest.raises(ConfigError, match=r"^field 'trackers': 'tensorboard' needs the tensorboard package.*pip install"):
        check_trackers(["tensorboard"])
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"^field 'wandb_project': 'p' needs wandb"):
        check_trackers([], wandb_project="p")


@pytest.mark.parametrize("args, culprit", [
    (["trackers=[jsonl, mlflow]"], "field 'trackers': unknown tracker 'mlflow'"),
    (["trackers=[tensorboard, tensorboard]"], "field 'trackers': 'tensorboard' given twice"),
    (["trackers=[trackio]"], "field 'trackers': 'trackio' needs the trackio package, which is not installed: pip install trac"),
], ids=["unknown", "twice", "not installed"])
def test_a_bad_tracker_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, culprit):
    monkeypatch.setitem(sys.modules, "trackio", None)  # as if not installed, whatever this machine has
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, GRPO + args + [f"out={tmp_path / 'run'}"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.output
    assert sorted(tmp_path.rglob("*")) == before  # no run directory


def test_run_loop_refuses_a_missing_tracker_package_before_the_run_directory_exists(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match="'tensorboard' needs the tensorboard package") as e:
        RunLoop(LoopConfig(out=str(tmp_path / "run"), trackers=["tensorboard"]), "TEST")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_resume_never_touches_another_run_that_took_the_same_trackio_name(tmp_path, trackio_at):
    trackio = trackio_at(tmp_path / "trackio")
    fields = {"trackers": ["trackio"], "wandb_project": "", "run_name": "same"}
    _run(tmp_path / "a", total=7, session=1, crash_at_eval=6, **fields)  # run A: train 1-6, dies before checkpoint 6
    _run(tmp_path / "b", total=4, session=1, **fields)  # run B, same name: trackio resumes by name, so B now owns it
    b_name, b_id = (tmp_path / "b" / "trackio_run.txt").read_text().split()
    before = _trackio_series(_trackio_logs(trackio, "cs336_alignment", tmp_path / "b"), "train", "session")
    _run(tmp_path / "a", total=7, session=2, resume=True, **fields)  # A resumes: must not cut or extend B's run
    a_name, a_id = (tmp_path / "a" / "trackio_run.txt").read_text().split()
    assert a_id != b_id and a_name.startswith("same-")  # A went on in a run of its own
    assert _trackio_series(_trackio_logs(trackio, "cs336_alignment", tmp_path / "b"), "train", "session") == before
