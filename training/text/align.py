"""What the text-tower aligner trains: CLIP's symmetric InfoNCE between a caption's pooled tower feature and a
small encoder of its image's VQ token grid, and the held-out text -> image retrieval that measures it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.core.config import OptimConfig, TrackingConfig, TrainConfig
from training.diffusion.data import TokenDataConfig, split_shards
from vqd.config import from_dict
from vqd.errors import UserError
from vqd.network import MODEL_SIZES, text_fields
from vqd.shards import iter_samples
from vqd.text import TextEncoder, TextEncoderConfig, fit_context, tokenize, with_caption_mean


@dataclass
class TowerSection:
    """Which tower: a MODEL_SIZES name; the `text` section's fields replace its tower's (as in train.py)."""

    size: str = "tiny"


@dataclass
class ImageSideConfig:
    """The image encoder the tower is aligned against (thrown away after): pre-LN transformer over the VQ ids."""

    width: int = 128
    layers: int = 1
    heads: int = 4
    dim: int = 128  # the shared space both sides are projected to


@dataclass
class AlignRunConfig:
    model: TowerSection = field(default_factory=TowerSection)
    text: dict[str, Any] = field(default_factory=dict)
    image: ImageSideConfig = field(default_factory=ImageSideConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=50,
                                                                   schedule="cosine", min_lr_ratio=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, micro_batch_size=128, num_workers=1,
                                                                   run_dir="runs/text", precision="fp32"))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vqd-text"))
    deepspeed: dict[str, Any] = field(default_factory=dict)  # the DeepSpeed config (batch, clipping: from train)

    def validate(self) -> None:
        if self.model.size not in MODEL_SIZES:
            raise UserError(f"model.size: unknown size {self.model.size!r} (known: {', '.join(MODEL_SIZES)})")
        if self.text.get("pretrained"):
            raise UserError("text.pretrained: this program trains a tower from its seeded init; a pretrained CLIP "
                             "tower already knows its words (point the diffusion config at it instead)")
        if self.train.precision != "fp32":  # `auto` has been resolved by now: bf16 on a CPU or GPU that has it
            raise UserError(f"train.precision: the tower trains in fp32 (its features are fp32), got "
                            f"{self.train.precision!r}; set train.precision: fp32")
        if self.train.micro_batch_size < 2 or self.train.grad_accum != 1:
            raise UserError("train.micro_batch_size: a contrastive batch needs >= 2 samples (and train.grad_accum 1: "
                             "the negatives are the batch's)")
        if self.train.steps < 1 or self.train.log_every < 1:
            raise UserError("train.steps and train.log_every must be >= 1")
        if self.image.width % self.image.heads:
            raise UserError(f"image.width: {self.image.width} is not divisible by image.heads={self.image.heads}")
        tower_config(self)  # every text field is checked now

    def __post_init__(self):
        self.text = dict(self.text or {})
        if self.train.precision == "auto":  # the tower's features are fp32 by contract: `auto` means fp32 here
            self.train.precision = "fp32"


def tower_config(cfg: AlignRunConfig) -> TextEncoderConfig:
    """The size's tower with the `text` section's fields replacing its own (the diffusion config's rule)."""
    return from_dict(TextEncoderConfig, text_fields(cfg.model.size, cfg.text), "text")


class TokenGridEncoder(nn.Module):
    """A VQ token grid -> its unit vector in the shared space: Long [B, N] -> [B, dim]."""

    def __init__(self, num_codes: int, tokens: int, side: ImageSideConfig):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, side.width)
        self.position = nn.Parameter(torch.randn(tokens, side.width) * 0.02)
        layer = nn.TransformerEncoderLayer(side.width, side.heads, 4 * side.width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, side.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(side.width)
        self.project = nn.Linear(side.width, side.dim)

    def forward(self, vq: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embedding(vq) + self.position)
        return F.normalize(self.project(self.norm(h.mean(dim=1))), dim=-1)


class Aligner(nn.Module):
    """The tower, the image encoder, the caption's projection and CLIP's learned temperature."""

    def __init__(self, tower: TextEncoder, num_codes: int, tokens: int, side: ImageSideConfig):
        super().__init__()
        self.tower = tower.requires_grad_(True)
        self.image = TokenGridEncoder(num_codes, tokens, side)
        self.project = nn.Linear(tower.dim, side.dim)
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # [1]: DeepSpeed broadcasts no 0-d tensor

    def caption_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP ids [B, C] -> unit vectors [B, dim] of each caption's pooled feature (what the AdaLN reads)."""
        pooled = with_caption_mean(self.tower.features(ids), ids)[:, 0]
        return F.normalize(self.project(pooled), dim=-1)

    def forward(self, vq: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE over the batch, and how often a caption's best image is its own: scalars."""
        logits = self.log_scale.exp().clamp(max=100.0) * self.caption_vectors(ids) @ self.image(vq).T
        target = torch.arange(len(vq), device=vq.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, (logits.argmax(dim=1) == target).float().mean()


def held_out(manifest: dict, split: str, context_length: int) -> dict[str, Any]:
    """Every sample of `split`: VQ ids [M, N], CLIP ids of its .txt (the shard's own) and of its first caption
    form [M, C], and the two captions (a form-less sample's typed caption is its .txt)."""
    vq, clip, template, typed = [], [], [], []
    for path, _ in split_shards(manifest, split):
        for sample in iter_samples(path):
            vq.append(sample["vq"].astype(np.int64))
            clip.append(sample["clip"].astype(np.int64))
            template.append(sample["txt"])
            forms = sample["json"].get("captions") or [sample["txt"]]
            typed.append(str(forms[0]))
    return {"vq": torch.from_numpy(np.stack(vq)), "template": template, "typed": typed,
            "template_ids": fit_context(torch.from_numpy(np.stack(clip)), context_length),
            "typed_ids": fit_context(tokenize(typed), context_length)}


def caption_hits(scores: torch.Tensor, captions: list[str], k: int = 5) -> dict[str, float]:
    """Text -> image retrieval from scores [M, M] (caption i against image j): top-1 and top-k, the share of
    captions whose best (one of k best) images has that same caption (an identical caption's image is as right
    as its own), and the top-1 a random ranking scores."""
    captions = np.asarray(captions, dtype=object)
    ranked = scores.topk(min(k, len(captions)), dim=1).indices.cpu().numpy()
    hit = captions[ranked] == captions[:, None]  # [M, k]
    return {"top1": float(hit[:, 0].mean()), f"top{k}": float(hit.any(axis=1).mean()),
            "chance_top1": float(np.mean([(captions == c).mean() for c in captions]))}


@torch.no_grad()
def retrieval(aligner: Aligner, held: dict[str, Any]) -> dict[str, float]:
    """Held-out text -> image retrieval for both caption kinds (template .txt, typed form): val/<kind>_top1, ..."""
    device = aligner.log_scale.device
    images = aligner.image(held["vq"].to(device))
    out = {}
    for kind in ("template", "typed"):
        scores = aligner.caption_vectors(held[f"{kind}_ids"].to(device)) @ images.T
        out.update({f"val/{kind}_{name}": v for name, v in caption_hits(scores, held[kind]).items()})
    return out
