"""Tensors taken out of a released checkpoint by name, with errors that name the file and the part.

A converter reads each source file into a `Source`, takes every tensor it maps by name, and ends with
`Source.finish()`: a tensor it did not take is an error (a checkpoint of another architecture must not load
partly), as is a missing name. `check_shapes` then compares the converted tensors with the shapes the vqd
model expects and names, for a mismatch, the source tensor it came from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from vqd.errors import UserError


class ReleasedFormatError(UserError):
    """A released checkpoint that cannot be read as one: the message names the file and the part."""


class Source:
    """The tensors of one file (or of one prefix of it), taken by name; every take is recorded."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str, part: str, prefix: str = ""):
        self.tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.where, self.part, self.prefix = where, part, prefix
        self.taken: set[str] = set()
        self.origin: dict[str, str] = {}  # converted name -> "file: source name", for shape errors

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, alternatives: Iterable[str] = ()) -> torch.Tensor:
        """The tensor named `key` (or the first present of `alternatives`, older names of the same tensor)."""
        for name in (key, *alternatives):
            if name in self.tensors:
                self.taken.add(name)
                return self.tensors[name]
        raise ReleasedFormatError(f"{self.where}: the {self.part} has no tensor {self.prefix + key!r}")

    def cat(self, keys: Iterable[str]) -> torch.Tensor:
        """The tensors named `keys` stacked along dim 0 (q, k, v into one projection): their other dims must agree."""
        keys = list(keys)
        parts = [self.take(k) for k in keys]
        for key, part in zip(keys[1:], parts[1:]):
            if part.shape[1:] != parts[0].shape[1:]:
                raise ReleasedFormatError(f"{self.where}: {self.prefix + key} has shape {tuple(part.shape)} where "
                                          f"{self.prefix + keys[0]} has {tuple(parts[0].shape)}")
        return torch.cat(parts)

    def put(self, out: dict[str, torch.Tensor], name: str, key: str, alternatives: Iterable[str] = ()) -> None:
        """out[name] = take(key), remembering where it came from."""
        out[name] = self.take(key, alternatives)
        self.origin[name] = f"{self.where}: {self.prefix + key}"

    def ignore(self, pattern: str) -> None:
        """Mark every tensor whose name matches the regex `pattern` as read (state the converter does not need)."""
        self.taken.update(k for k in self.tensors if re.fullmatch(pattern, k))

    def finish(self) -> None:
        """Raise if any tensor of the source was left over: it belongs to a part vqd would silently drop."""
        left = sorted(set(self.tensors) - self.taken)
        if left:
            shown = ", ".join(repr(self.prefix + k) for k in left[:4])
            shown += f" ... ({len(left) - 4} more)" if len(left) > 4 else ""
            raise ReleasedFormatError(f"{self.where}: the {self.part} holds tensors this converter does not know "
                                      f"({shown}): not the released VQ-Diffusion architecture")


def check_shapes(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], origin: Mapping[str, str],
                 part: str) -> None:
    """Raise naming the source tensor of the first converted tensor whose shape differs from the model's."""
    for name, want in expected.items():
        got = tensors.get(name)
        if got is None:
            raise ReleasedFormatError(f"{part}: nothing provides the model's tensor {name!r}")
        if tuple(got.shape) != tuple(want):
            raise ReleasedFormatError(f"{origin.get(name, part)}: shape {tuple(got.shape)}, but the {part} its config "
                                      f"describes needs {tuple(want)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ReleasedFormatError(f"{part}: converted tensors {extra[:4]} have no place in the model")


def read_weights(path: Path, part: str) -> dict[str, torch.Tensor]:
    """A .safetensors file, a torch .bin (weights_only) or a sharded index (.index.json) -> {name: tensor}."""
    if not path.is_file():
        raise ReleasedFormatError(f"{path}: missing (the {part}'s weights)")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            out.update(read_weights(path.parent / shard, part))
        return out
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, or a pickle that holds more than tensors
        raise ReleasedFormatError(f"{path}: cannot be read as the {part}'s weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleasedFormatError(f"{path}: does not hold a dict of tensors (the {part}'s weights)")
    return state


def read_json(path: Path, part: str) -> dict:
    """A component's config.json; a missing or unreadable file is an error naming it."""
    if not path.is_file():
        raise ReleasedFormatError(f"{path}: missing (the {part}'s config)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReleasedFormatError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ReleasedFormatError(f"{path}: expected a JSON object")
    return data


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Plain contiguous CPU copies (safetensors refuses shared storage), written beside and renamed over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
