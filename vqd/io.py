"""Files on disk: a trained model is a folder, `config.yaml` (what to build) + `model.safetensors` (the weights),
and every file and folder the project writes is published atomically.

Every vqd model (denoiser, VQ-AR baseline, tokenizer) is saved and loaded through save_folder / load_folder,
so the folder format is one thing. Nothing here unpickles: safetensors and YAML only. `atomic_write` is the one
way the project writes a file (data stages, checkpoints, exports, caches): a unique temporary name, fsync,
rename, fsync of the folder, so a crash leaves the old file or the new one, never half of one.
A text-to-image folder may also hold `sampling.yaml`: the settings it samples best with and how they were
chosen (vqd/sampling.py `save_sampling` / `load_sampling`), the defaults of every program that samples it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml
from safetensors.torch import load_file, save_file

from vqd.errors import UserError

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
SAMPLING_NAME = "sampling.yaml"
TOKENIZER_DIR = "tokenizer"  # an export's tokenizer folder: the VQ-VAE that decodes its ids


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a unique temporary path beside `path`; if the block succeeds, the file is fsynced and renamed over
    `path` (durably), otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON with sorted keys (deterministic bytes)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def publish_folder(staged: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Rename the complete folder `staged` to `folder`: an existing `folder` is first moved aside and removed,
    so a reader finds the old folder or the new one, never a folder rewritten in place."""
    staged, folder = Path(staged), Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        aside = folder.with_name(folder.name + ".replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(staged, folder)
    fsync_dir(folder.parent)
    return folder


def save_folder(folder: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write `config.yaml` and `model.safetensors` into `folder` (created if needed), atomically per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a saved model is a plain copy.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_write(folder / WEIGHTS_NAME) as tmp:
        save_file(plain, str(tmp))
    atomic_write_text(folder / CONFIG_NAME, yaml.safe_dump(_plain_yaml(dict(config)), sort_keys=False))
    return folder


def load_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model folder: (config dict, CPU tensors). Errors name the folder and the missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {str(folder)!r} does not exist or is not a directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise UserError(f"model folder {str(folder)!r} has no {name}")
    config = yaml.safe_load((folder / CONFIG_NAME).read_text())
    if not isinstance(config, dict):
        raise UserError(f"{folder / CONFIG_NAME} must hold a mapping, got {type(config).__name__}")
    return config, load_file(str(folder / WEIGHTS_NAME))


def load_state_dict_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str = "model") -> None:
    """Load `tensors` into `module`, raising ValueError that lists missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(tensors[k].shape)}"
        for k in sorted(set(own) & set(tensors))
        if own[k].shape != tensors[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_clip_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_clip_list(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes {_clip_list(mismatched)}")
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
    module.load_state_dict(dict(tensors), strict=True)


def installed_package_folder(name: str) -> Path | None:
    """The folder of installed package `name`, found without importing it (its files are data here: a
    vocabulary, a TorchScript file, images); None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model weights and shards can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _clip_list(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" ... ({len(items) - n} more)" if len(items) > n else "")


def _plain_yaml(value: Any) -> Any:
    """Tuples and other sequences become lists so that safe_dump writes plain YAML."""
    if isinstance(value, Mapping):
        return {str(k): _plain_yaml(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_yaml(v) for v in value]
    return value
