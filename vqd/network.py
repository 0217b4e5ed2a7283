"""What the VQ-Diffusion model and the VQ-AR baseline share: the size registry, the network fields of
their configs, and the composed-model base (frozen text tower, saving and loading as a model folder).

Sizes. The paper (Gu et al. 2022, Sec. 4.1 "Implementation details") builds two denoisers:
VQ-Diffusion-S, "18 transformer blocks with dimension of 192" (34M parameters), and VQ-Diffusion-B,
"19 transformer blocks with dimension of 1024" (370M parameters). The released configs
(microsoft/VQ-Diffusion configs/coco.yaml, cub200.yaml) confirm B: n_layer 19, n_embd 1024, n_head 16,
mlp_hidden_times 4, condition_dim 512 (CLIP ViT-B/32 text), a 32 x 32 grid of 2887 codes. No released
config gives S's head count; we use 6 heads of 32 channels. The tiny sizes are ours, for CPUs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from vqd.config import from_dict, to_dict
from vqd.text import TextEncoder, TextEncoderConfig


@dataclass
class ModelSize:
    """Depth and width of the image transformer, and the text tower that goes with them."""

    depth: int
    width: int
    heads: int
    mlp_ratio: int = 4
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)


MODEL_SIZES: dict[str, ModelSize] = {
    "VQD-S": ModelSize(depth=18, width=192, heads=6),  # paper: 34M parameters
    "VQD-B": ModelSize(depth=19, width=1024, heads=16),  # paper: 370M parameters
    # CPU sizes (ours): an 8 x 8 grid trains in minutes; small text tower, same vocabulary and context.
    "tiny": ModelSize(depth=4, width=128, heads=4, text=TextEncoderConfig(width=128, layers=2, heads=2)),
    "micro": ModelSize(depth=2, width=32, heads=2, text=TextEncoderConfig(width=32, layers=1, heads=2)),
}


@dataclass
class NetworkConfig:
    """Fields shared by the VQ-Diffusion and VQ-AR models: image tokens, network size, text tower.

    `size` names a MODEL_SIZES entry that fills depth/width/heads/mlp_ratio/text left as None.
    """

    KIND: ClassVar[str] = ""

    num_codes: int  # K, after codebook remapping
    grid: tuple[int, int]  # (h, w)
    size: str | None = None
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: int | None = None
    dropout: float = 0.0
    checkpoint: bool = False  # activation checkpointing while training
    text: TextEncoderConfig | None = None

    def __post_init__(self):
        self.grid = tuple(self.grid)
        if self.size is not None:
            if self.size not in MODEL_SIZES:
                raise ValueError(f"size: unknown model size {self.size!r} (known: {', '.join(MODEL_SIZES)})")
            preset = MODEL_SIZES[self.size]
            for name in ("depth", "width", "heads", "mlp_ratio"):
                if getattr(self, name) is None:
                    setattr(self, name, getattr(preset, name))
            if self.text is None:
                self.text = dataclasses.replace(preset.text)
        if self.mlp_ratio is None:
            self.mlp_ratio = 4
        if self.text is None:
            self.text = TextEncoderConfig()
        for name in ("depth", "width", "heads"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required when no size is given")
        if self.num_codes < 1:
            raise ValueError(f"num_codes: expected a positive integer, got {self.num_codes}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of to_dict; `kind`, if present, must be this model's kind."""
        data = dict(data)
        kind = data.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise ValueError(f"kind: expected {cls.KIND!r} for {cls.__name__}, got {kind!r}")
        return from_dict(cls, data)


class ComposedModel(nn.Module):
    """What every composed model shares: the frozen text tower, and saving/loading as a model folder."""

    CONFIG: ClassVar[type] = NetworkConfig
    text_encoder: TextEncoder

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def text_dim(self) -> int:
        return self.config.text.width

    def encode_text(self, clip_ids: torch.Tensor) -> torch.Tensor:
        """CLIP ids Long [B, 77] -> frozen, L2-normalised per-token features [B, 77, D] (no grad)."""
        return self.text_encoder(clip_ids)

    def save(self, folder: str | os.PathLike) -> None:
        """Write config.yaml + model.safetensors (every weight, the frozen text tower's included)."""
        from vqd.io import save_folder

        save_folder(folder, self.config.to_dict(), self.state_dict())

    @classmethod
    def from_folder(cls, folder: str | os.PathLike):
        """Load a saved model (eval mode); a wrong kind, missing or mis-shaped tensors raise ValueError."""
        from vqd.io import load_folder

        config, tensors = load_folder(folder)
        return cls.from_loaded(config, tensors, where=f"model folder {str(folder)!r}")

    @classmethod
    def from_loaded(cls, config: dict, tensors: dict[str, torch.Tensor], where: str = "model"):
        """Build from a config dict and tensors already read (see load_model)."""
        from vqd.io import load_state_dict_strict

        # The folder carries the text tower's weights: never fetch cfg.text.pretrained again.
        model = cls(cls.CONFIG.from_dict(config), load_text_weights=False)
        load_state_dict_strict(model, tensors, where=where)
        return model.eval()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
