"""What the VQ-Diffusion model and the VQ-AR baseline share: the size registry, the network fields of
their configs, and the composed-model base (frozen text tower, saving and loading as a model folder).

Sizes. The paper (Gu et al. 2022, Sec. 4.1) builds VQ-Diffusion-S, "18 transformer blocks with dimension
of 192" (34M parameters), and VQ-Diffusion-B, "19 transformer blocks with dimension of 1024" (370M).
The released configs (microsoft/VQ-Diffusion configs/coco.yaml, cub200.yaml) confirm B: n_layer 19,
n_embd 1024, n_head 16, mlp_hidden_times 4, condition_dim 512 (CLIP ViT-B/32 text), a 32 x 32 grid of
K = 2887 image codes (2886 used VQGAN codes plus id 0, where its remapping sends the 5306 unused ones;
[MASK] is a 2888th class). Counted here at that K and grid, without the frozen text tower (63.2M):
- VQD-B builds 388.8M parameters, 5% over the paper's 370M (the paper does not say what it counted).
- VQD-S: no S config was released, and 18 blocks of width 192 hold only 17.4M, half the paper's 34M.
  We keep the parameter count, which is what the paper's comparisons rest on, and widen to 288
  (9 heads of 32 channels): 35.0M, 3% over, as B is over. `width: 192` gives the text's literal S.
- VQ-AR-S / VQ-AR-B, the Table 3 baseline at equal size: the same depth, width and heads, causal and
  without the timestep's AdaLN layers; their parameters go back into a wider MLP (ratio 6.25 and 6):
  34.7M (-0.8%) and 384.9M (-1.0%). The paper does not say how its VQ-AR matched the sizes.
- ITHQ: the released model most users start from (microsoft/VQ-Diffusion configs/ithq.yaml, diffusers'
  microsoft/vq-diffusion-ithq): n_layer 36, n_embd 1408, n_head 16, mlp_hidden_times 4, on its own VQ-VAE's
  K = 4096 codes and a 32 x 32 grid: 1,359.3M parameters. The size a fine-tune of it names (vqd/released/).
The paper presets condition on OpenAI's CLIP ViT-B/32 text tower, as the released code does (QuickGELU,
open_clip tag "openai"); its weights must be on disk (vqd/clip_weights.py). The CPU sizes are ours: a
small seeded tower with CLIP's vocabulary and context.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from vqd.config import from_dict, to_dict
from vqd.errors import UserError
from vqd.io import load_folder, load_state_dict_strict, save_folder
from vqd.text import TextEncoder, TextEncoderConfig


def openai_vit_b_32() -> TextEncoderConfig:
    """OpenAI's CLIP ViT-B/32 text tower (the released code's `clip_name: ViT-B/32`), pretrained weights."""
    return TextEncoderConfig(activation="quick_gelu", pretrained="openai")


@dataclass
class ModelSize:
    """Depth and width of the image transformer, and the text tower that goes with them."""

    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4  # MLP hidden width = round(mlp_ratio * width)
    text: TextEncoderConfig = field(default_factory=openai_vit_b_32)


# Parameter counts without the text tower, at K = 2887 and a 32 x 32 grid (tiny: K = 1024, 16 x 16, the
# sampling benchmark's); tests/test_models.py checks them.
MODEL_SIZES: dict[str, ModelSize] = {
    "VQD-S": ModelSize(depth=18, width=288, heads=9),  # 35.0M (paper: 34M at "dimension 192", see above)
    "VQD-B": ModelSize(depth=19, width=1024, heads=16),  # 388.8M (paper: 370M)
    "VQ-AR-S": ModelSize(depth=18, width=288, heads=9, mlp_ratio=6.25),  # 34.7M, VQD-S's size
    "VQ-AR-B": ModelSize(depth=19, width=1024, heads=16, mlp_ratio=6),  # 384.9M, VQD-B's size
    "ITHQ": ModelSize(depth=36, width=1408, heads=16),  # 1,359.3M at K = 4096: the released ITHQ model
    # CPU sizes (ours): an 8 x 8 grid trains in minutes; small text tower, same vocabulary and context.
    "tiny": ModelSize(depth=4, width=128, heads=4, text=TextEncoderConfig(width=128, layers=2, heads=2)),  # 1.69M
    "VQ-AR-tiny": ModelSize(depth=4, width=128, heads=4, mlp_ratio=6.75,
                            text=TextEncoderConfig(width=128, layers=2, heads=2)),  # 1.69M, tiny's size
    "micro": ModelSize(depth=2, width=32, heads=2, text=TextEncoderConfig(width=32, layers=1, heads=2)),
}
# The VQ-AR size of each VQ-Diffusion size's parameter count (the paper's Table 3 compares equal sizes).
AR_SIZE_OF = {"VQD-S": "VQ-AR-S", "VQD-B": "VQ-AR-B", "tiny": "VQ-AR-tiny"}


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
    mlp_ratio: float | None = None
    dropout: float = 0.0
    checkpoint: bool = False  # activation checkpointing while training
    text: TextEncoderConfig | None = None

    def __post_init__(self):
        self.grid = tuple(self.grid)
        if self.size is not None:
            if self.size not in MODEL_SIZES:
                raise UserError(f"size: unknown model size {self.size!r} (known: {', '.join(MODEL_SIZES)})")
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
                raise UserError(f"{name}: required when no size is given")
        if self.num_codes < 1:
            raise UserError(f"num_codes: expected a positive integer, got {self.num_codes}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of to_dict; `kind`, if present, must be this model's kind. With a `size`, a partial `text`
        mapping overrides the size's text tower field by field (`{"size": "VQD-B", "text": {"pretrained":
        "/data/clip-vit-base-patch32"}}` keeps OpenAI's ViT-B/32 and names where its weights are)."""
        data = dict(data)
        kind = data.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise UserError(f"kind: expected {cls.KIND!r} for {cls.__name__}, got {kind!r}")
        if isinstance(data.get("text"), dict):
            data["text"] = text_fields(data.get("size"), data["text"])
        return from_dict(cls, data)


def text_fields(size: str | None, text: dict[str, Any]) -> dict[str, Any]:
    """A config's `text` section over the text tower of model size `size`: its fields replace the size's, field by
    field (no size: the section alone). Every program that reads a `text` section merges it here."""
    return (to_dict(MODEL_SIZES[size].text) if size in MODEL_SIZES else {}) | dict(text)


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
        save_folder(folder, self.config.to_dict(), self.state_dict())

    @classmethod
    def from_folder(cls, folder: str | os.PathLike):
        """Load a saved model (eval mode); a wrong kind, missing or mis-shaped tensors raise ValueError."""
        config, tensors = load_folder(folder)
        return cls.from_loaded(config, tensors, where=f"model folder {str(folder)!r}")

    @classmethod
    def from_loaded(cls, config: dict, tensors: dict[str, torch.Tensor], where: str = "model"):
        """Build from a config dict and tensors already read (see load_model)."""
        # The folder carries the text tower's weights: never fetch cfg.text.pretrained again.
        model = cls(cls.CONFIG.from_dict(config), load_text_weights=False)
        load_state_dict_strict(model, tensors, where=where)
        return model.eval()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
