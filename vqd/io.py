"""A trained model is a folder: `config.yaml` (what to build) + `model.safetensors` (the weights).

Every vqd model (denoiser, VQ-AR baseline, tokenizer) is saved and loaded through these two
functions, so the folder format is one thing. Nothing here unpickles: safetensors and YAML only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


def save_folder(folder: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write `config.yaml` and `model.safetensors` into `folder` (created if needed), atomically per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a saved model is a plain copy.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(plain, str(tmp))
    os.replace(tmp, folder / WEIGHTS_NAME)
    tmp = folder / (CONFIG_NAME + ".tmp")
    tmp.write_text(yaml.safe_dump(_plain_yaml(dict(config)), sort_keys=False))
    os.replace(tmp, folder / CONFIG_NAME)
    return folder


def load_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model folder: (config dict, CPU tensors). Errors name the folder and the missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist or is not a directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ValueError(f"model folder {str(folder)!r} has no {name}")
    config = yaml.safe_load((folder / CONFIG_NAME).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_NAME} must hold a mapping, got {type(config).__name__}")
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
        raise ValueError(f"{where}: " + "; ".join(problems))
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
