"""Any model folder in: a vqd model folder (config.yaml + model.safetensors, vqd/io.py), or a released one
(diffusers' VQ-Diffusion pipeline layout, converted by vqd/released/), built as the model its config names."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from vqd.errors import UserError
from vqd.io import load_folder
from vqd.models import MODEL_KINDS
from vqd.released import is_released, read_released


def read_model_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a vqd model folder, or of a released model folder (diffusers' VQ-Diffusion
    pipeline layout, vqd/released/), converted: what a fine-tune starts from and load_model builds."""
    if is_released(folder):
        released = read_released(folder)
        return released.config.to_dict(), released.tensors
    return load_folder(folder)


def load_model(folder: str | os.PathLike) -> nn.Module:
    """Load any vqd model folder (or a released one, see read_model_folder), dispatching on the config's `kind`."""
    config, tensors = read_model_folder(folder)
    kind = config.get("kind")
    where = f"model folder {str(folder)!r}"
    if kind not in MODEL_KINDS:
        raise UserError(f"kind: {where} has kind {kind!r}; load_model knows {sorted(MODEL_KINDS)} "
                         "(a tokenizer folder loads with vqd.vqvae.load_tokenizer)")
    return MODEL_KINDS[kind].from_loaded(config, tensors, where=where)
