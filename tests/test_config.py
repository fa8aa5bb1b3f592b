"""YAML + command-line configs into typed dataclasses, with errors that name file, line and field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from cs336_alignment.config import ConfigError, dump_yaml, load_config, parse_override


@dataclass
class Optim:
    lr: float = 1e-5  # learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas


@dataclass
class Demo:
    steps: int = 10  # optimizer steps
    batch_size: int = 8  # sequences per step
    micro_batch_size: int = 2  # sequences per forward/backward
    loss_type: Literal["a", "b"] = "a"  # which loss
    name: str | None = None  # run name
    use_std: bool = True  # divide by the group std
    optim: Optim = field(default_factory=Optim)  # optimizer settings

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by micro_batch_size ({self.micro_batch_size})"
            )


def test_defaults_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 20\noptim:\n  lr: 3e-5\n")
    cfg = load_config(Demo, p, ["optim.lr=1e-4", "loss_type=b", "name=run1", "use-std=false"])
    assert cfg.steps == 20 and cfg.optim.lr == 1e-4 and cfg.loss_type == "b"
    assert cfg.name == "run1" and cfg.use_std is False
    assert cfg.optim.betas == (0.9, 0.95) and cfg.batch_size == 8
    assert load_config(Demo).steps == 10


def test_yaml_reads_exponent_without_dot_as_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-5\n")  # YAML 1.1 reads this as a string
    assert load_config(Demo, p).optim.lr == 1e-5


def test_unknown_field_names_file_line_and_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 3\n\noptim:\n  lr: 1e-4\n  bettas: [0.9, 0.99]\n")
    with pytest.raises(ConfigError) as e:
        load_config(Demo, p)
    msg = str(e.value)
    assert f"{p}:5: field 'optim.bettas'" in msg and "did you mean 'betas'" in msg


def test_wrong_type_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: many\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: field 'steps': expected an integer, got 'many'"):
        load_config(Demo, p)
    with pytest.raises(ConfigError, match="is not one of 'a', 'b'"):
        load_config(Demo, None, ["loss_type=c"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(Demo, None, ["use_std=maybe"])


def test_cross_field_check_message(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size \(8\) must be divisible by micro_batch_size \(3\)"):
        load_config(Demo, None, ["micro_batch_size=3"])


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: 3\noptim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml:"):
        load_config(Demo, p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Demo, tmp_path / "missing.yaml")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Demo, p)


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (("a", "b"), [1, 2])
    assert parse_override("--x=null") == (("x",), None)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("novalue")


def test_dump_round_trips(tmp_path):
    cfg = load_config(Demo, None, ["steps=5", "optim.lr=2e-5"])
    p = tmp_path / "out.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(Demo, p) == cfg


def test_tuple_arity_and_number_like_strings():
    with pytest.raises(ConfigError, match=r"field 'optim.betas': expected 2 values, got 1"):
        load_config(Demo, None, ["optim.betas=[0.9]"])
    assert load_config(Demo, None, ["name=007"]).name == "007"  # not 7
    assert load_config(Demo, None, ["steps=007"]).steps == 7
    assert load_config(Demo, None, ["optim.lr=1e-4"]).optim.lr == 1e-4


def test_every_recipe_field_is_documented_and_the_commented_yaml_round_trips(tmp_path):
    import dataclasses

    from cs336_alignment.config import commented_yaml, field_comments
    from cs336_alignment.demo import DemoConfig
    from cs336_alignment.experiments import RECIPES, recipe_classes

    classes = [recipe_classes(r)[0] for r in RECIPES] + [DemoConfig]
    seen = set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no comment"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                classes.append(type(default))
    for recipe in RECIPES:
        cls = recipe_classes(recipe)[0]
        cfg = load_config(cls, None, ["seed=7"])
        p = tmp_path / f"{recipe}.yaml"
        p.write_text(commented_yaml(cfg))
        assert load_config(cls, p) == cfg
