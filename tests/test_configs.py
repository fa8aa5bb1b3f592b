"""Every study config parses, validates, and runs one step under the smoke overlay on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from cs336_alignment.config import ConfigError, to_dict
from cs336_alignment.experiments import SMOKE_FIELDS, expand_sweep, load_study, run_study, run_sweep

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SWEEPS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("*.yaml"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "task_knobs":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def test_there_is_a_config_for_every_study():
    names = {p.stem for p in CONFIGS} | {p.stem for p in SWEEPS}
    for study in ("math_baseline", "sft", "sft_sizes", "sft_filtered", "ei", "ei_grid", "grpo", "grpo_lr",
                  "grpo_baselines", "grpo_length_norm", "grpo_std_norm", "grpo_off_policy_broad",
                  "grpo_off_policy_focused", "grpo_no_clip", "grpo_question_only", "leaderboard"):
        assert study in names, study


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_validates(path, monkeypatch):
    monkeypatch.delenv("CS336_MODEL", raising=False)
    study = load_study(path)
    assert study.config.model.endswith("Qwen2.5-Math-1.5B")
    monkeypatch.setenv("CS336_MODEL", "/models/mine")
    assert load_study(path).config.model == "/models/mine"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_expands_to_valid_distinct_runs(path):
    base, runs = expand_sweep(path)
    assert base.exists() and len(runs) >= 2
    outs = [load_study(base, r.overrides).config.out for r in runs]
    assert len(set(outs)) == len(outs)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_smoke_overlay_changes_only_sizes_devices_and_paths(path):
    full, smoke = load_study(path), load_study(path, smoke=True)
    a, b = _flat(to_dict(full.config)), _flat(to_dict(smoke.config))
    changed = {k for k in a if a[k] != b[k]}
    assert changed <= SMOKE_FIELDS, changed - SMOKE_FIELDS
    assert smoke.config.model == "tiny" and smoke.config.device == "cpu"
    if full.recipe == "grpo":  # on- vs off-policy and the optimizer steps per rollout batch survive
        assert smoke.config.off_policy == full.config.off_policy
        assert smoke.config.optimizer_steps_per_rollout_batch == full.config.optimizer_steps_per_rollout_batch


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_one_step_under_smoke(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CS336_RUNS", str(tmp_path))
    study = load_study(path, smoke=True)
    metrics = run_study(study)
    assert "accuracy" in metrics
    out = Path(study.config.out)
    assert str(out).startswith(str(tmp_path))
    assert (out / ("metrics.json" if study.recipe == "eval" else "final.json")).exists()


def test_sweep_skips_complete_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CS336_RUNS", str(tmp_path))
    lines: list[str] = []
    run_sweep(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "grpo_std_norm.yaml", smoke=True, echo=lines.append)
    assert sum("running" in x for x in lines) == 2
    lines.clear()
    run_sweep(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "grpo_std_norm.yaml", smoke=True, echo=lines.append)
    assert sum("complete, skipped" in x for x in lines) == 2


def test_a_sweep_skips_a_run_another_process_holds(tmp_path, monkeypatch):
    from cs336_alignment.run_dir import RunLock

    monkeypatch.setenv("CS336_RUNS", str(tmp_path))
    sweep = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "grpo_std_norm.yaml"
    lines: list[str] = []
    run_sweep(sweep, smoke=True, dry_run=True, echo=lines.append)
    held = lines[0].split("] ", 1)[1].split(": ", 1)[0]  # the first grid point's directory
    Path(held).mkdir(parents=True)
    lock = RunLock(held)  # another process (one per GPU) is running it
    try:
        lines.clear()
        run_sweep(sweep, smoke=True, echo=lines.append)
    finally:
        lock.release()
    skipped = [x for x in lines if ": skipped, " in x]
    assert len(skipped) == 1 and held in skipped[0] and "is in use by another process" in skipped[0]
    assert sum("running" in x for x in lines) == 2  # the held point was tried, refused, and the sweep went on


def test_bad_study_files_are_clear(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model: m\n")
    with pytest.raises(ConfigError, match="field 'recipe': missing"):
        load_study(p)
    p.write_text("recipe: ppo\n")
    with pytest.raises(ConfigError, match="unknown recipe 'ppo'"):
        load_study(p)
    p.write_text("recipe: grpo\nmodel: ${NO_SUCH_VARIABLE_HERE}\n")
    with pytest.raises(ConfigError, match="x.yaml:2: field 'model': environment variable NO_SUCH_VARIABLE_HERE is not set"):
        load_study(p)
    s = tmp_path / "s.yaml"
    s.write_text("base: x.yaml\nout: o\n")
    with pytest.raises(ConfigError, match="field 'grid': missing"):
        expand_sweep(s)


SNAPSHOT = Path(__file__).resolve().parent / "fixtures" / "config_snapshot.json"
# Fields added after the snapshot (tests/fixtures/config_snapshot.json, the configs as issue 24 found
# them): each must hold its documented off value in every config, so the handout's studies run as before.
NEW_FIELDS_OFF = {
    "cliprange_low": None,  # None: cliprange
    "cliprange_high": None,  # None: cliprange
    "overlong_filter": False,
    "eval_n_samples": 1,
    "preset": "handout",  # the handout's knobs: every field at its default
    "overlong_buffer": 0,  # no soft overlong penalty
    "overlong_penalty": 1.0,  # its size, when on
    "drop_all_equal_groups": False,
    "max_resample_rounds": 4,  # dynamic sampling's bound, when on
    "kl_coef": 0.0,  # no KL penalty
    "kl_estimator": "k3",  # its estimator, when on
    "log_kl": False,  # no reference loaded
    "reference_device": "same",
    "reference_dtype": "auto",
    "train_filter.min_pass": 0.0,  # every training question kept
    "train_filter.max_pass": 1.0,
    "curriculum": "none",
    "pass_rate_samples": 8,  # used only when a filter or curriculum is on
    "pass_rates": "",
}


PRESET_EXAMPLES = {"grpo_dapo.yaml": "dapo", "grpo_dr_grpo.yaml": "dr_grpo"}  # configs added with issue 24's presets


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in PRESET_EXAMPLES], ids=lambda p: p.stem)
def test_configs_resolve_as_in_the_snapshot_and_new_knobs_are_off(path, monkeypatch):
    import json

    for name in ("CS336_MODEL", "CS336_DATA", "CS336_RUNS"):
        monkeypatch.delenv(name, raising=False)
    snapshot = json.loads(SNAPSHOT.read_text())[path.name]
    study = load_study(path)
    now = json.loads(json.dumps(_flat(to_dict(study.config)), default=str))
    assert study.recipe == snapshot["recipe"]
    assert {k: now.get(k, "<missing>") for k in snapshot["fields"]} == snapshot["fields"]  # every existing key, same value
    added = {k: v for k, v in now.items() if k not in snapshot["fields"]}
    assert added == {k: NEW_FIELDS_OFF[k] for k in added}, "a new field is not in NEW_FIELDS_OFF or not off"


@pytest.mark.parametrize("name", sorted(PRESET_EXAMPLES))
def test_each_preset_has_an_example_config_that_resolves_to_it(name):
    from cs336_alignment.recipes.grpo import PRESETS

    study = load_study(Path(__file__).resolve().parents[1] / "configs" / name)
    preset = PRESET_EXAMPLES[name]
    assert study.recipe == "grpo" and study.config.preset == preset
    expanded = {k: getattr(study.config, k) for k in PRESETS[preset]}
    derived = {"overlong_buffer": study.config.sampling_max_tokens // 5}  # None in the preset: derived
    assert expanded == {k: derived.get(k, v) if v is None else v for k, v in PRESETS[preset].items()}
    assert set(PRESET_EXAMPLES.values()) | {"handout"} == set(PRESETS)  # every preset has its example (grpo.yaml: handout)
