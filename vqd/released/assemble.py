"""A released model converted: the vqd config, the model's tensors (shapes checked), the tokenizer, the provenance.

Both readers (a diffusers pipeline folder, an official .pth) end in `assemble`, which checks every converted
tensor against the shapes the vqd model of that config has (built on the meta device: nothing is allocated),
so a mismatch is reported against the file it came from, before any model is built.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqd.io import TOKENIZER_DIR, save_folder
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.network import openai_vit_b_32
from vqd.released.tensors import ReleasedFormatError, check_shapes
from vqd.text import TextEncoder, TextEncoderConfig, tokenize
from vqd.vqvae import VQVAE

PROVENANCE = "provenance.json"  # the name training/export.py writes and reads


@dataclass
class ReleasedModel:
    """A released VQ-Diffusion model in vqd's terms: build it with `model()`, or write it with `save()`."""

    config: VQDiffusionConfig
    tensors: dict[str, torch.Tensor]  # VQDiffusionModel's state dict, every shape checked
    tokenizer: VQVAE  # eval mode
    source: dict[str, Any] = field(default_factory=dict)  # what it was converted from

    def model(self) -> VQDiffusionModel:
        """The composed model (eval mode)."""
        return VQDiffusionModel.from_loaded(self.config.to_dict(), self.tensors, where=str(self.source.get("path")))

    def save(self, folder: str | Path) -> Path:
        """A vqd model folder (config.yaml, model.safetensors, tokenizer/, provenance.json), written beside and
        renamed into place."""

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        save_folder(tmp, self.config.to_dict(), self.tensors)
        self.tokenizer.save(tmp / TOKENIZER_DIR)
        (tmp / PROVENANCE).write_text(json.dumps({"released": self.source}, indent=1, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder


def text_config(width: int, layers: int, heads: int, vocab_size: int, context_length: int, mlp_ratio: int,
                activation: str) -> TextEncoderConfig:
    """The tower's config; OpenAI's ViT-B/32 text tower (every released model's) gets the paper presets' config,
    so that a fine-tune config naming a preset matches it (its weights travel with the model either way)."""
    cfg = TextEncoderConfig(width=width, layers=layers, heads=heads, vocab_size=vocab_size,
                            context_length=context_length, mlp_ratio=mlp_ratio, activation=activation)
    openai = openai_vit_b_32()
    same = all(getattr(cfg, k) == getattr(openai, k) for k in ("width", "layers", "heads", "vocab_size",
                                                                  "context_length", "mlp_ratio", "activation"))
    return openai if same else cfg


@torch.no_grad()
def empty_caption_features(cfg: TextEncoderConfig, tower: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tower's features of the empty caption, [L, D]: the null condition of a model without learned one
    (the released code and diffusers then guide against ``"")."""
    encoder = TextEncoder(cfg, load_weights=False)
    encoder.load_tower_weights(tower)
    return encoder(tokenize([""], cfg.context_length))[0]


def assemble(config: VQDiffusionConfig, tensors: dict[str, torch.Tensor], origin: dict[str, str], tokenizer: VQVAE,
             source: dict[str, Any], part: str) -> ReleasedModel:
    """Check the converted tensors against the model's shapes and the tokenizer against the model's codes."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in VQDiffusionModel(config, load_text_weights=False).state_dict().items()}
    check_shapes(tensors, expected, origin, "model")
    if tokenizer.num_codes != config.num_codes or tuple(tokenizer.grid) != tuple(config.grid):
        raise ReleasedFormatError(f"{part}: the VQ-VAE gives {tokenizer.num_codes} codes on a {tuple(tokenizer.grid)} "
                                  f"grid, the denoiser reads {config.num_codes} on {tuple(config.grid)}")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return ReleasedModel(config, tensors, tokenizer.eval(), source)
