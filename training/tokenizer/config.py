"""The tokenizer trainer's run config: one YAML with sections model, data, optim, train, loss, prune, tracking,
deepspeed (configs/vqvae_emoji.yaml, configs/vqvae_f8_8192.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.core.config import OptimConfig, TrackingConfig, TrainConfig
from training.tokenizer.data import ImageDataConfig
from vqd.errors import UserError
from vqd.vqvae import VQVAEConfig


@dataclass
class LossConfig:
    """VQGAN adversarial term (off when disc_weight is 0)."""

    disc_weight: float = 0.0
    disc_start: int = 0  # optimizer step at which the GAN term switches on
    disc_layers: int = 3
    disc_width: int = 64
    adaptive_max: float = 1e4  # clamp of the adaptive weight ||grad rec|| / ||grad gan||


@dataclass
class PruneConfig:
    """After training: count code usage over the training images and keep only the used codes."""

    enabled: bool = False
    max_batches: int = 0  # 0 = one full pass


@dataclass
class VQVAERunConfig:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.9)))
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vqd-tokenizer"))
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.model.codebook == "gumbel":
            raise UserError("model.codebook 'gumbel' is for loading taming checkpoints; train with 'ema' or 'learned'")
        if self.train.ema_decay:
            raise UserError("train.ema_decay is not used by the tokenizer trainer (the codebook has its own EMA)")
        if self.model.used_codes:
            raise UserError("model.used_codes is set by pruning after training, not in a training config")
        if instance := self.model.one_channel_groups():
            raise UserError(f"model.norm_groups {self.model.norm_groups} leaves one channel a group at {instance} "
                             f"channels: GroupNorm is then instance norm, which erases each channel's per-image "
                             f"mean and with it flat colours (a red heart comes back brown); use at most "
                             f"{min(instance) // 2} groups")
