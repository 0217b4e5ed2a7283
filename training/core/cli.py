"""The command line every training program shares: `--config NAME|PATH`, `--section.key=value` overrides, and a
`--help` generated from the run config's dataclasses (each key with its type, default and the comment beside
it in the source), so the help never drifts from what the loader accepts.

    cfg = parse_config(DiffusionRunConfig, argv, __doc__)   # --help prints and exits 0
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from typing import Any

from training.core.config import CONFIG_DIR, load_config, split_cli
from vqd.config import type_name

FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def parse_config(cls: type, argv: list[str] | None = None, doc: str | None = None):
    """The run config from the command line; `-h`/`--help` prints `config_help` and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, doc))
        raise SystemExit(0)
    path, overrides = split_cli(argv)
    return load_config(cls, path, overrides)


def config_help(cls: type, doc: str | None = None) -> str:
    """The program's docstring, then every section and key of `cls` with its type, default and comment."""
    program = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "program.py"
    lines = [f"usage: python {program} --config NAME_OR_PATH [--section.key=value ...]", ""]
    if doc:
        lines += [doc.strip(), ""]
    lines += [f"--config: a YAML file, or the name of one in {CONFIG_DIR} (`base: other.yaml` inherits one file).",
              "Every key below can be set in the YAML or overridden as --section.key=value (YAML syntax for lists "
              "and mappings).", ""]
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        value = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(hint):
            lines.append(f"{f.name}: a free-form mapping ({type_name(hint)}){_section_doc(cls, f.name)}")
            continue
        summary = (inspect.getdoc(hint) or "").split("\n")[0]
        lines.append(f"{f.name}:" + (f"  {summary}" if summary else ""))
        comments = field_comments(hint)
        hints = typing.get_type_hints(hint)
        for sub in dataclasses.fields(hint):
            if not sub.init:
                continue
            entry = f"  {f.name}.{sub.name}: {type_name(hints[sub.name])} = {_shown(getattr(value, sub.name))}"
            comment = comments.get(sub.name)
            lines.append(f"{entry:<60} {comment}" if comment else entry)
    return "\n".join(lines)


def field_comments(cls: type) -> dict[str, str]:
    """name -> the comment written beside the field in the dataclass's source (`steps: int = 1000  # ...`)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = FIELD_COMMENT.match(line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def _section_doc(cls: type, name: str) -> str:
    comment = field_comments(cls).get(name)
    return f"; {comment}" if comment else ""


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return type(value).__name__ + "(...)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
