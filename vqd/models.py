"""The composed VQ-Diffusion model (denoiser + frozen text tower + null text + diffusion), and `load_model`,
which opens any vqd model folder.

A trained model is a folder (vqd/io.py): config.yaml holds `VQDiffusionConfig.to_dict()` (with
`kind: vq-diffusion`), model.safetensors holds every weight, including the frozen text tower's.
Sizes (VQD-S, VQD-B, tiny, micro) are in vqd/network.py's MODEL_SIZES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from vqd.ar import VQARModel
from vqd.diffusion import MaskAndReplaceDiffusion
from vqd.errors import UserError
from vqd.network import MODEL_SIZES, ComposedModel, ModelSize, NetworkConfig, count_parameters  # noqa: F401
from vqd.text import TextEncoder, tokenize, with_caption_mean
from vqd.transformer import Denoiser, TransformerConfig, check_text

CONDITIONS = ("text", "class", "none")


@dataclass
class VQDiffusionConfig(NetworkConfig):
    """The composed VQ-Diffusion model: network (NetworkConfig) + mask-and-replace diffusion."""

    KIND: ClassVar[str] = "vq-diffusion"

    num_timesteps: int = 100  # T
    schedule: str = "code"  # "code" (released code's) or "paper" (the text's linear ramps); see vqd/diffusion.py
    mask_rate: float = 0.9  # M, used by the "paper" schedule
    # What the image is conditioned on (the paper's unified model, Sec. 5.4): "text" (CLIP features of a
    # caption), "class" (a learned embedding of one of `classes`), or "none" (unconditional: only the learned
    # null condition). The condition reaches the denoiser as a sequence [B, L, D] through cross-attention:
    # L = 77 text tokens, or L = 1 for a class and for none; D = text.width in every case.
    condition: str = "text"
    classes: tuple[str, ...] = ()  # class names, in label order (condition "class")
    # The condition's first row also joins t in every AdaLN (vqd/transformer.py; ours, not the paper's). A
    # text condition then starts with one more row, the caption's mean token feature (L = 78).
    pooled_condition: bool = False
    # A depthwise 3 x 3 convolution over the token grid in every block's MLP (vqd/transformer.py; ours).
    local_mixing: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.classes = tuple(self.classes)
        if self.condition not in CONDITIONS:
            raise UserError(f"condition: expected one of {CONDITIONS}, got {self.condition!r}")
        if (self.condition == "class") != bool(self.classes):
            raise UserError("classes: a class-conditional model needs its class names, and only it has them "
                             f"(condition {self.condition!r}, {len(self.classes)} classes)")

    @property
    def condition_length(self) -> int:
        """L, the length of the condition sequence the denoiser attends to."""
        if self.condition != "text":
            return 1
        return self.text.context_length + (1 if self.pooled_condition else 0)

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            num_codes=self.num_codes, grid=self.grid, depth=self.depth, width=self.width, heads=self.heads,
            text_dim=self.text.width, mlp_ratio=self.mlp_ratio, num_timesteps=self.num_timesteps,
            causal=False, dropout=self.dropout, checkpoint=self.checkpoint, pooled_condition=self.pooled_condition,
            local_mixing=self.local_mixing,
        )


def text_condition(config: VQDiffusionConfig, features: torch.Tensor, clip_ids: torch.Tensor) -> torch.Tensor:
    """The tower's features [B, C, D] of clip_ids [B, C] -> the condition the denoiser reads [B, L, D] (the
    caption's mean feature prepended with pooled_condition). Sampling and training (a trained tower) share it."""
    return with_caption_mean(features, clip_ids) if config.pooled_condition else features


# ------------------------------------------------------------------------------------------ the model


class VQDiffusionModel(ComposedModel):
    """Denoiser + condition (frozen text tower, or class embeddings) + learned null condition [L, D]
    + MaskAndReplaceDiffusion (buffers only)."""

    CONFIG: ClassVar[type] = VQDiffusionConfig

    def __init__(self, config: VQDiffusionConfig, load_text_weights: bool = True):
        super().__init__()

        self.config = config
        dim = config.text.width
        self.text_encoder = TextEncoder(config.text, load_weights=load_text_weights) if config.condition == "text" \
            else None
        self.class_embedding = nn.Embedding(len(config.classes), dim) if config.condition == "class" else None
        self.denoiser = Denoiser(config.transformer_config())
        # Learned "no condition" features for classifier-free guidance (and the only condition of an
        # unconditional model); rows start at unit norm like CLIP's per-token features.
        self.null_text = nn.Parameter(torch.empty(config.condition_length, dim))
        if self.null_text.device.type != "meta":
            with torch.no_grad():
                self.null_text.copy_(nn.functional.normalize(torch.randn_like(self.null_text), dim=-1))
                if self.class_embedding is not None:
                    self.class_embedding.weight.copy_(nn.functional.normalize(torch.randn(len(config.classes), dim),
                                                                              dim=-1))
        self.diffusion = MaskAndReplaceDiffusion(config.num_codes, config.num_timesteps, config.schedule,
                                                 config.mask_rate)

    @torch.no_grad()
    def init_code_embeddings(self, vectors: torch.Tensor, seed: int = 0) -> None:
        """Start the denoiser's code embedding and its output head from the tokenizer's code vectors [K, d]:
        codes that decode alike start alike, so a young model's mistakes are near misses (a colour close to
        the right one) rather than arbitrary codes. A fixed random projection to the width, rescaled to the
        default init's std; the [MASK] row keeps its own init."""
        K = self.config.num_codes
        if tuple(vectors.shape[:1]) != (K,) or vectors.dim() != 2:
            raise UserError(f"vectors: expected [{K}, d] (one per code), got {tuple(vectors.shape)}")
        g = torch.Generator().manual_seed(seed)
        centred = vectors.float().cpu() - vectors.float().cpu().mean(dim=0)
        projected = centred @ torch.randn(vectors.shape[1], self.denoiser.cfg.width, generator=g)
        projected *= 0.02 / projected.std().clamp_min(1e-12)
        weight = self.denoiser.token_embedding.weight
        weight[:K] = projected.to(weight)
        self.denoiser.head.weight.copy_(projected.to(self.denoiser.head.weight))

    def encode_text(self, clip_ids: torch.Tensor) -> torch.Tensor:
        """CLIP ids Long [B, C] (C = text.context_length) -> frozen, L2-normalised per-token features [B, L, D]
        (no grad); L = C, or C + 1 with pooled_condition (the caption's mean feature first)."""
        if self.text_encoder is None:
            raise UserError(f"this model is conditioned on {self.config.condition!r}, not on text")
        return text_condition(self.config, self.text_encoder(clip_ids), clip_ids)

    def encode_classes(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels Long [B] in [0, num_classes) -> condition features [B, 1, D]."""
        if self.class_embedding is None:
            raise UserError(f"this model is conditioned on {self.config.condition!r}, not on a class")
        if labels.dtype != torch.long or labels.dim() != 1:
            raise UserError(f"labels: expected a LongTensor [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.config.classes)):
            raise UserError(f"labels must lie in [0, {len(self.config.classes) - 1}], got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return self.class_embedding(labels).unsqueeze(1)

    def class_labels(self, names: list[str]) -> torch.Tensor:
        """Class names -> labels Long [B]; an unknown name is a ValueError listing a few known ones."""
        index = {name: i for i, name in enumerate(self.config.classes)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise UserError(f"unknown class name(s) {unknown[:5]}; this model knows {len(index)} classes, e.g. "
                             f"{list(index)[:5]}")
        return torch.tensor([index[n] for n in names], dtype=torch.long, device=self.null_text.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> condition features [B, L, D]: captions (text), class names (class), ignored (none)."""
        device = self.null_text.device
        if self.config.condition == "text":
            return self.encode_text(tokenize(list(prompts), self.config.text.context_length).to(device))
        if self.config.condition == "class":
            return self.encode_classes(self.class_labels(list(prompts)))
        return self.null_text_features(len(prompts)).detach()

    def null_text_features(self, batch: int) -> torch.Tensor:
        """The learned null condition for `batch` rows: [B, L, D] (a view; gradients reach null_text)."""
        return self.null_text.unsqueeze(0).expand(batch, -1, -1)

    def drop_text(self, text_features: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each row of [B, L, D] by the null condition with probability p (classifier-free guidance)."""
        check_text("text_features", text_features, text_features.shape[0] if text_features.dim() == 3 else -1,
                   self.text_dim)
        if not 0.0 <= p <= 1.0:
            raise UserError(f"p: expected a probability in [0, 1], got {p}")
        device = generator.device if generator is not None else text_features.device
        drop = torch.rand(text_features.shape[0], generator=generator, device=device).to(text_features.device) < p
        null = self.null_text.to(text_features.dtype).unsqueeze(0)
        return torch.where(drop[:, None, None], null, text_features)

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Denoiser: x_t Long [B, N] in [0, K], t Long [B], text [B, L, D] -> logits of x_0, float [B, K, N]."""
        return self.denoiser(x_t, t, text_features)

    forward = logits


# The composed model of each `kind` a model folder's config.yaml can name.
MODEL_KINDS: dict[str, type[ComposedModel]] = {VQDiffusionConfig.KIND: VQDiffusionModel, VQARModel.CONFIG.KIND: VQARModel}
