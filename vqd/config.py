"""Typed configs from plain data: the one builder behind every config dataclass in the project.

Model configs (vqd.models, vqd.ar), the tokenizer's (vqd.vqvae), the training programs' run configs
(training.core.config) and the data pipeline's recipes (data_pipeline.recipe) are dataclasses built from YAML
through `from_dict`, and written back with `to_dict`. An unknown key or a value of the wrong type is a
ValueError that names the dotted key (`train.steps: expected int, got 'ten'`), so a typo never silently
falls back to a default.

    cfg = from_dict(VQDiffusionConfig, {"num_codes": 512, "grid": [8, 8], "size": "tiny"})
    to_dict(cfg)   # {'kind': 'vq-diffusion', 'num_codes': 512, 'grid': [8, 8], ...}

The YAML side is here too, shared by run configs and recipes: a file named by path or by bare name in the
program's config folder, `base: other.yaml` inheritance, and `--section.key=value` overrides parsed to the
field's type. A YAML syntax error names the file, line and column.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from vqd.errors import UserError


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping (None = {}); errors name the dotted key under `where`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise UserError(f"{_join(where, key)}: unknown key for {cls.__name__} (known: {', '.join(sorted(names))})")
    kwargs = {k: check_value(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own validation (__post_init__): say which section it is
        if not where:
            raise
        field_name = str(e).split(":", 1)[0]
        joined = _join(where, str(e)) if field_name in names else f"{where}: {e}"  # 'optim.schedule: ...'
        raise UserError(joined) from e


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
        raise UserError(f"{key}: expected {type_name(hint)}, got {value!r}")
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
                    raise UserError(f"{key}: expected {len(args)} items ({type_name(hint)}), got {value!r}")
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
    raise UserError(f"{key}: expected {type_name(hint)}, got {value!r}")


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


# ---- YAML files and command-line overrides ----


def find_config(name: str | Path, search: Sequence[Path] = (), what: str = "config file") -> Path:
    """A config by path, else by bare name (`base_cc`, `base_cc.yaml`) in the `search` folders, in order."""
    path = Path(name)
    if path.is_file():
        return path
    names = [path.name] if path.suffix in (".yaml", ".yml") else [f"{path.name}.yaml", path.name]
    if path.parent == Path("."):  # a bare name: look in the program's config folders
        for folder in search:
            for candidate in names:
                if (Path(folder) / candidate).is_file():
                    return Path(folder) / candidate
    known = sorted({f.name for folder in search for f in Path(folder).glob("*.yaml")})
    where = f"; the ones in {', '.join(str(f) for f in search)}: {', '.join(known)}" if search else ""
    raise UserError(f"{what} {str(name)!r} does not exist (give a path, or a name{where})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{at}: YAML syntax error: {problem}; fix the file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def read_yaml_with_base(path: str | Path, search: Sequence[Path] = (), _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping; `base: other.yaml` (beside the file, else in the `search` folders) merges underneath."""
    path = Path(path).resolve()
    if path in _seen:
        raise UserError(f"config base cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: 'base' must be a file name (one file), got {base!r}")
    beside = path.parent / base
    base_path = beside if beside.is_file() else find_config(base, search, what=f"{path}: base")
    return deep_merge(read_yaml_with_base(base_path, search, _seen + (path,)), data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested mappings merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """d['a']['b']['c'] = value for key 'a.b.c', creating the mappings on the way."""
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """['--train.steps=10', '--optim.lr', '1e-4'] -> {'train.steps': '10', 'optim.lr': '1e-4'}."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"override {arg!r} must look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value, i = arg[2:], argv[i + 1], i + 1
        else:
            raise UserError(f"override {arg!r} has no value")
        out[key] = value
        i += 1
    return out


def parse_value(text: str, tp: Any, key: str) -> Any:
    """A command-line string to the field type: int, float, bool, str, None, tuples/lists/dicts (YAML syntax)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null", "~"):
            return None
        return parse_value(text, args[0], key)
    if tp is str:
        return text
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}: expected a bool (true/false), got {text!r}")
    if tp in (int, float):
        try:
            return tp(text) if tp is float else int(text)
        except ValueError:
            raise UserError(f"--{key}: expected {tp.__name__}, got {text!r}") from None
    return check_value(yaml.safe_load(text), tp, key)
