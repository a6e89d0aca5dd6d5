"""The configuration machinery: plain data (YAML, dotted overrides) -> validated dataclasses.

Every component owns its `Config` dataclass (validated in `__post_init__` with
`data_tools.errors.check`); this module only knows how to fill them: type coercion against the
annotations, unknown keys, dotted overrides and one-line errors naming the field, the value and what
is allowed. `pretrain.config` assembles the sections.

    cfg = build(TrainConfig, {"steps": 10}, "train")
    apply_override(tree, "optimizer.lr=1e-4")        # YAML-typed: x=[a, b] is a list, x=null is None

A string that reads as a number is accepted for a float field because PyYAML reads `1e-4` as a string.
A section whose keys are not fixed fields (`objectives`: one key per registered term) builds itself
with a `from_tree(value, build)` class method and writes itself back with `as_tree()`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from data_tools.errors import ConfigError, UserError, check


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists/strings where YAML is loose."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, field)
            except ConfigError:
                continue
        raise ConfigError(field, value, _type_name(tp))
    if origin is Literal:
        check(field, value, value in args, " | ".join(repr(a) for a in args))
        return value
    if hasattr(tp, "from_tree"):
        return tp.from_tree(value, build)
    if dataclasses.is_dataclass(tp):
        check(field, value, isinstance(value, dict), f"a mapping of {tp.__name__} fields")
        return build(tp, value, field)
    if tp is bool:
        check(field, value, isinstance(value, bool), "true or false")
        return value
    if tp is int:
        check(field, value, isinstance(value, int) and not isinstance(value, bool), "an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        check(field, value, isinstance(value, (int, float)) and not isinstance(value, bool), "a number")
        return float(value)
    if tp is str:
        check(field, value, isinstance(value, str), "a string")
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, str) and origin is list:
            value = [value]  # `data.paths=/x` means one path
        check(field, value, isinstance(value, (list, tuple)), f"a list ({_type_name(tp)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            check(field, value, len(value) == len(args), f"{len(args)} values ({_type_name(tp)})")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        check(field, value, isinstance(value, dict), f"a mapping ({_type_name(tp)})")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, field): _coerce(v, val_tp, f"{field}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        check(field, value, isinstance(value, tp), _type_name(tp))
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping: unknown keys and wrong types are ConfigErrors.

    A `preset` key is passed to `cls.preset(name, **rest)` where the class offers one (ModelConfig).
    A ConfigError raised by the class's own validation gets the dotted prefix added to its field.
    """
    values = dict(values)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    preset = values.pop("preset", None) if hasattr(cls, "preset") else None
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            allowed = ", ".join(sorted(fields)) + (", preset" if hasattr(cls, "preset") else "")
            raise ConfigError(name, value, f"one of the keys {allowed}")
        kwargs[key] = _coerce(value, hints[key], name)
    try:
        if preset is not None:
            check(f"{prefix}.preset", preset, isinstance(preset, str), "a preset name")
            return cls.preset(preset, **kwargs)
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and not err.field.startswith(prefix + ".") and err.field != prefix:
            raise ConfigError(f"{prefix}.{err.field}", err.value, err.allowed) from None
        raise
    except TypeError as err:  # a required field is missing
        raise ConfigError(prefix or cls.__name__, values, f"all required fields of {cls.__name__} ({err})") from None
    except ValueError as err:  # an owner's validation that is not a ConfigError
        raise ConfigError(prefix or cls.__name__, values, str(err)) from None


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON data of a config (tuples become lists)."""
    if hasattr(obj, "as_tree"):
        return to_dict(obj.as_tree())
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"config file {path}: cannot be read ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value read as YAML) to a nested dict in place."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected dotted.field=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise UserError(f"override {override!r}: expected dotted.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif isinstance(child, bool):  # `objectives.itm: false` shorthand, now given a sub-field
            child = node[key] = {"enabled": child}
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), child, "a section (it has no sub-fields)")
        node = child
    node[keys[-1]] = value
