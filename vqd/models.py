"""The composed VQ-Diffusion model (denoiser + frozen text tower + null text + diffusion), and `load_model`,
which opens any vqd model folder.

A trained model is a folder (vqd/io.py): config.yaml holds `VQDiffusionConfig.to_dict()` (with
`kind: vq-diffusion`), model.safetensors holds every weight, including the frozen text tower's.
Sizes (VQD-S, VQD-B, tiny, micro) are in vqd/network.py's MODEL_SIZES.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from vqd.ar import VQARModel
from vqd.network import MODEL_SIZES, ComposedModel, ModelSize, NetworkConfig, count_parameters  # noqa: F401
from vqd.text import TextEncoder
from vqd.transformer import Denoiser, TransformerConfig, check_text


@dataclass
class VQDiffusionConfig(NetworkConfig):
    """The composed VQ-Diffusion model: network (NetworkConfig) + mask-and-replace diffusion."""

    KIND: ClassVar[str] = "vq-diffusion"

    num_timesteps: int = 100  # T
    schedule: str = "code"  # "code" (released code's) or "paper" (the text's linear ramps); see vqd/diffusion.py
    mask_rate: float = 0.9  # M, used by the "paper" schedule

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            num_codes=self.num_codes, grid=self.grid, depth=self.depth, width=self.width, heads=self.heads,
            text_dim=self.text.width, mlp_ratio=self.mlp_ratio, num_timesteps=self.num_timesteps,
            causal=False, dropout=self.dropout, checkpoint=self.checkpoint,
        )


# ------------------------------------------------------------------------------------------ the model


class VQDiffusionModel(ComposedModel):
    """Denoiser + frozen text tower + learned null text [77, D] + MaskAndReplaceDiffusion (buffers only)."""

    CONFIG: ClassVar[type] = VQDiffusionConfig

    def __init__(self, config: VQDiffusionConfig, load_text_weights: bool = True):
        super().__init__()
        from vqd.diffusion import MaskAndReplaceDiffusion

        self.config = config
        self.text_encoder = TextEncoder(config.text, load_weights=load_text_weights)
        self.denoiser = Denoiser(config.transformer_config())
        # Learned "no caption" features for classifier-free guidance; rows start at unit norm like real features.
        self.null_text = nn.Parameter(torch.empty(config.text.context_length, config.text.width))
        if self.null_text.device.type != "meta":
            with torch.no_grad():
                self.null_text.copy_(nn.functional.normalize(torch.randn_like(self.null_text), dim=-1))
        self.diffusion = MaskAndReplaceDiffusion(config.num_codes, config.num_timesteps, config.schedule,
                                                 config.mask_rate)

    def null_text_features(self, batch: int) -> torch.Tensor:
        """The learned null text for `batch` rows: [B, 77, D] (a view; gradients reach null_text)."""
        return self.null_text.unsqueeze(0).expand(batch, -1, -1)

    def drop_text(self, text_features: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each row of [B, 77, D] by the null text with probability p (classifier-free guidance)."""
        check_text("text_features", text_features, text_features.shape[0] if text_features.dim() == 3 else -1,
                   self.text_dim)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        device = generator.device if generator is not None else text_features.device
        drop = torch.rand(text_features.shape[0], generator=generator, device=device).to(text_features.device) < p
        null = self.null_text.to(text_features.dtype).unsqueeze(0)
        return torch.where(drop[:, None, None], null, text_features)

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Denoiser: x_t Long [B, N] in [0, K], t Long [B], text [B, L, D] -> logits of x_0, float [B, K, N]."""
        return self.denoiser(x_t, t, text_features)

    forward = logits


def load_model(folder: str | os.PathLike) -> nn.Module:
    """Load any vqd model folder, dispatching on config.yaml's `kind`."""
    from vqd.io import load_folder

    config, tensors = load_folder(folder)
    kind = config.get("kind")
    where = f"model folder {str(folder)!r}"
    if kind == VQDiffusionConfig.KIND:
        return VQDiffusionModel.from_loaded(config, tensors, where=where)
    if kind == VQARModel.CONFIG.KIND:
        return VQARModel.from_loaded(config, tensors, where=where)
    raise ValueError(f"kind: {where} has kind {kind!r}; load_model knows 'vq-diffusion' and 'vq-ar' "
                     "(a tokenizer folder loads with vqd.vqvae.load_tokenizer)")
