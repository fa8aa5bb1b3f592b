"""Typed configs: dataclasses loaded from YAML and overridden from the command line.

Each recipe has one config dataclass (the single source of its defaults, a comment on
every field, cross-field checks in ``__post_init__``). This module turns YAML files and
``key=value`` overrides into such a dataclass and back:

    cfg = load_config(GRPOConfig, "configs/grpo.yaml", ["learning_rate=3e-5", "data.prompt=question_only"])

Errors name the file, the line and the field: an unknown key (with the closest known
names), a value of the wrong type, or a failed cross-field check.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

__all__ = [
    "ConfigError",
    "apply_overrides",
    "commented_yaml",
    "dump_yaml",
    "expand_env",
    "field_comments",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be turned into the config dataclass."""

    exit_code = 2  # bad input


# ---------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------


def _yaml_lines(text: str, source: str = "<config>") -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping to its 1-based line number. A key given twice in one
    mapping (which YAML loaders silently resolve to the last) raises ConfigError naming both lines."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                line = key_node.start_mark.line + 1
                if path in lines:
                    raise ConfigError(
                        f"{source}:{line}: field '{'.'.join(path)}' given twice (first on line {lines[path]}); keep one"
                    )
                lines[path] = line
                walk(value_node, path)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a YAML mapping and the line of every key. Errors (unreadable, not UTF-8, invalid
    YAML, a key given twice, not a mapping) name the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a config file must hold a mapping of field: value, got {type(data).__name__}")
    return data, _yaml_lines(text, str(path))


# ---------------------------------------------------------------------------------------
# Overrides: "a.b=value" (value parsed as YAML, so 3e-5, true, null, [1, 2] work)
# ---------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Split ``"a.b=value"`` into (("a", "b"), parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. learning_rate=3e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r}: {e}") from e
    if isinstance(value, int) and not isinstance(value, bool) and str(value) != raw.strip():
        value = raw.strip()  # "007" stays text for string fields; integer fields still read it as 7
    return tuple(key.replace("-", "_").split(".")), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key=value`` override applied (nested via dots)."""
    out = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# ---------------------------------------------------------------------------------------
# dict -> dataclass with type checks
# ---------------------------------------------------------------------------------------


def _where(source: str | None, lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> str:
    src = source or "<config>"
    line = lines.get(path)
    field = ".".join(path)
    return f"{src}:{line}: field '{field}'" if line else f"{src}: field '{field}'"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the safe cases (int -> float, list -> tuple)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: fixed length, typed items
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, t, where) for v, t in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_WARNED: set[str] = set()  # the preset warnings given in this process (a config is often built more than once)


def from_dict(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    source: str | None = None,
    lines: Mapping[tuple[str, ...], int] | None = None,
    _prefix: tuple[str, ...] = (),
) -> T:
    """Build the dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Unknown keys and ill-typed values raise ConfigError naming source, line and field;
    so does a ValueError raised by the dataclass's own ``__post_init__`` checks.
    """
    lines = lines or {}
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    presets = getattr(cls, "PRESETS", None)
    if presets is not None and "preset" in data:  # a named set of fields, under the ones given explicitly
        name = data["preset"]
        if not isinstance(name, str) or name not in presets:
            raise ConfigError(f"{_where(source, lines, _prefix + ('preset',))}: unknown preset {name!r} "
                              f"(known: {', '.join(presets)})")
        overridden = [f"{k}={data[k]!r}" for k, v in presets[name].items() if k in data and data[k] != v and v is not None]
        message = (f"preset {name}: {', '.join(overridden)} given explicitly instead of the preset's "
                   f"value{'s' if len(overridden) > 1 else ''}")
        if overridden and message not in _WARNED:  # what a study file states wins: say so once, it may half apply the preset
            _WARNED.add(message)
            logging.getLogger("cs336_alignment").warning(message)
        data = {**presets[name], **data}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = _prefix + (str(key),)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_where(source, lines, path)}: unknown field{hint} (known: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{_where(source, lines, path)}: expected a mapping of {tp.__name__} fields")
            kwargs[key] = from_dict(tp, value, source=source, lines=lines, _prefix=path)
        else:
            kwargs[key] = _coerce(value, tp, _where(source, lines, path))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        named = re.match(r"(\w+) ", str(e))  # "learning_rate must be ...": point at that field's line
        line = lines.get(_prefix + (named.group(1),)) if named else None
        where = f"{source or '<config>'}:{line}" if line else source or "<config>"
        section = f" ({'.'.join(_prefix)})" if _prefix else ""
        raise ConfigError(f"{where}{section}: {e}") from e


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, source: str | None = None, lines: Mapping[tuple[str, ...], int] | None = None,
               _path: tuple[str, ...] = ()) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values with environment variables.

    Config files name machine-specific locations this way (``model: ${CS336_MODEL}``), so one
    file runs anywhere once the variables are set. An unset variable without a default is
    an error naming the file, line, field and variable.
    """
    if isinstance(data, dict):
        return {k: expand_env(v, source, lines, _path + (str(k),)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, source, lines, _path) for v in data]
    if not isinstance(data, str) or "${" not in data:
        return data

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            if m.group(2) is None:
                raise ConfigError(
                    f"{_where(source, lines or {}, _path)}: environment variable {m.group(1)} is not set "
                    f"(export {m.group(1)}=... or write ${{{m.group(1)}:-default}})"
                )
            value = m.group(2)
        return value

    return _ENV_VAR.sub(sub, data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), *,
                recipe: str | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, then by ``key=value`` overrides.

    ``${VAR}`` / ``${VAR:-default}`` in the file's strings are read from the environment. With
    ``recipe``, the file may be a study config: its ``recipe:`` key must name that recipe
    (ConfigError otherwise) and is then dropped.
    """
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = None
    if path is not None:
        data, lines = read_yaml(path)
        source = str(path)
        if recipe is not None and "recipe" in data:
            named = data.pop("recipe")
            if named != recipe:
                raise ConfigError(f"{path}:{lines.get(('recipe',), 1)}: field 'recipe': this is a {named} study config, "
                                  f"not {recipe}; run it with `python -m cs336_alignment run {path}`")
        data = expand_env(data, source, lines)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} + overrides" if source else "overrides"
    return from_dict(cls, data, source=source, lines=lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML, in field order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------
# Self-documentation: every field's default and comment, as commented YAML
# ---------------------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the dataclass's source (the field's documentation)."""
    comments: dict[str, str] = {}
    field_line = re.compile(r"^    (\w+)\s*:(?!\s*$)")  # "    name: type = default"
    comment = re.compile(r"#\s*(.+?)\s*$")
    current = None
    for line in inspect.getsource(cls).splitlines():
        m = field_line.match(line)
        if m:
            current = m.group(1)
        c = comment.search(line)
        if current and c and current not in comments:
            comments[current] = c.group(1)  # on the field's line, or on the line closing a wrapped one
        if line.strip().startswith("def ") or line.strip().startswith("@"):
            current = None
    return comments


def commented_yaml(cfg: Any, indent: int = 0) -> str:
    """The config as YAML with each field's comment beside it (``python -m cs336_alignment config``)."""
    comments = field_comments(type(cfg))
    pad = " " * indent
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        note = comments.get(f.name, "")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{'  # ' + note if note else ''}")
            lines.append(commented_yaml(value, indent + 2).rstrip("\n"))
            continue
        plain = to_dict(cfg)[f.name]
        text = yaml.safe_dump({f.name: plain}, default_flow_style=True, width=10_000).strip()[1:-1]
        lines.append(f"{pad}{text}{'  # ' + note if note else ''}")
    return "\n".join(lines) + "\n"
