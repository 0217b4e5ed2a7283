"""Typed configs from plain data: the one builder behind every config dataclass in the project.

Model configs (vqd.models, vqd.ar), the tokenizer's (vqd.vqvae), the training programs' run configs
(training.core.config) and the data pipeline's recipes (data_pipeline.recipe) are dataclasses built from YAML
through `from_dict`, and written back with `to_dict`. An unknown key or a value of the wrong type is a
ValueError that names the dotted key (`train.steps: expected int, got 'ten'`), so a typo never silently
falls back to a default.

    cfg = from_dict(VQDiffusionConfig, {"num_codes": 512, "grid": [8, 8], "size": "tiny"})
    to_dict(cfg)   # {'kind': 'vq-diffusion', 'num_codes': 512, 'grid': [8, 8], ...}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping (None = {}); errors name the dotted key under `where`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise ValueError(f"{_join(where, key)}: unknown key for {cls.__name__} (known: {', '.join(sorted(names))})")
    kwargs = {k: check_value(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own validation (__post_init__): say which section it is
        if not where:
            raise
        field_name = str(e).split(":", 1)[0]
        joined = _join(where, str(e)) if field_name in names else f"{where}: {e}"  # 'optim.schedule: ...'
        raise ValueError(joined) from e


def check_value(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to type `hint` (ints widen to float, lists to tuples, mappings to dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(value, option, key)
            except ValueError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message is the precise one
            raise errors[0]
        raise ValueError(f"{key}: expected {type_name(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, key)
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ValueError(f"{key}: expected {len(args)} items ({type_name(hint)}), got {value!r}")
                items = [check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
            else:
                items = [check_value(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            value_hint = args[1] if len(args) == 2 else Any
            return {k: check_value(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    else:
        return value
    raise ValueError(f"{key}: expected {type_name(hint)}, got {value!r}")


def to_dict(config: Any) -> Any:
    """Plain YAML/JSON data of a config: dataclasses become dicts (with `kind` first when the class has a
    KIND), tuples become lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        kind = getattr(config, "KIND", "")
        out: dict[str, Any] = {"kind": kind} if kind else {}
        for f in dataclasses.fields(config):
            out[f.name] = to_dict(getattr(config, f.name))
        return out
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def type_name(hint: Any) -> str:
    """'int', 'float | None', 'tuple[int, int]' ... for error messages."""
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
