"""Convolutional encoder / decoder of the image tokenizer, and the VQGAN patch discriminator.

The encoder and decoder follow the layout of the taming-transformers VQGAN that VQ-Diffusion used
(resolution levels of ResNet blocks, optional self-attention at chosen resolutions, a middle block with
attention), with the same module names and tensor shapes, so that a taming checkpoint's state dict loads
into them with strict=True. Channel counts are free, so the same code also builds 1M-parameter CPU models.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_count(channels: int, groups: int = 32) -> int:
    """The groups GroupNorm gets over `channels`: `groups`, shrunk to a divisor of `channels` for tiny models."""
    return math.gcd(groups, channels)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with taming's eps and group_count's groups."""
    return nn.GroupNorm(group_count(channels, groups), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block: x + conv(silu(norm(conv(silu(norm(x)))))). [B, Cin, H, W] -> [B, Cout, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 projection only when the width changes (taming calls it nin_shortcut)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # [B, 1, HW, C] so that SDPA (flash / memory-efficient kernels on GPU) does the softmax(QK^T/sqrt(C))V
        q, k, v = (t(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with right/bottom zero padding (taming's asymmetric pad). [B,C,H,W] -> [B,C,H/2,W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    """A resolution level holding `block` and `attn` lists (names as in taming's state dict)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level's res-blocks, each followed by its attention block where the level has them."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _middle(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


class Encoder(nn.Module):
    """Image -> latent grid. [B, in_channels, H, W] -> [B, z_channels, H/f, W/f] with f = 2**(len(ch_mult)-1)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, z_channels: int, in_channels: int = 3, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, widths = resolution, (1,) + tuple(ch_mult)
        c_in = ch
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * widths[i], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, dropout, groups))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_in, groups))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = _middle(c_in, dropout, groups)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent grid -> image. [B, z_channels, h, w] -> [B, out_ch, h*f, w*f] (unbounded; callers clamp)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, z_channels: int, out_ch: int = 3, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        n = len(ch_mult)
        c_in = ch * ch_mult[-1]
        res = resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _middle(c_in, dropout, groups)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            c_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, dropout, groups))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_in, groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_in)
                res *= 2
            levels.insert(0, level)  # up[i] is the level at resolution index i, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN style): one real/fake logit per overlapping patch. [B,3,H,W] -> [B,1,h',w']."""

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, num_layers + 1):
            c_next = width * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            # VQGAN uses BatchNorm; GroupNorm has no running buffers, so it needs no cross-rank sync and runs
            # unchanged when DeepSpeed casts the parameters (but not the buffers) to bf16
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), group_norm(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x~))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
