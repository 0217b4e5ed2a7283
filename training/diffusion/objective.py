"""What the DeepSpeed engine trains, and one training micro-step of VQ-Diffusion.

The engine wraps `Denoising`: the denoiser, the learned null condition and the class embeddings. The
frozen CLIP text tower stays outside it (no gradient, nothing for ZeRO to partition), and so does the
diffusion maths: its float64 schedule must not be cast to bf16 with the module, and the loss is formed in
fp32 from the network's log-probabilities.

Every random draw of a micro-step (t, x_t, which captions are dropped) comes from a generator seeded by
(seed, rank, step, micro-step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vqd.diffusion import TimestepSampler
from vqd.models import VQDiffusionModel, text_condition


class Denoising(nn.Module):
    """(x_t [B, N], t [B], condition, drop Bool [B]) -> log p(x0 | x_t) float [B, K, N].

    The condition is the frozen tower's text features [B, 77, D] (condition "text"), or CLIP ids [B, 77]
    when the tower is trained here, class labels Long [B] ("class"), or ignored ("none": every sample
    sees the null condition).
    """

    def __init__(self, model: VQDiffusionModel, train_text: bool = False):
        super().__init__()
        self.kind = model.config.condition
        self.denoiser = model.denoiser
        self.null_text = model.null_text
        self.class_embedding = model.class_embedding
        # a trained tower is part of the engine (its gradients, optimizer state and EMA); a frozen one is not
        self.text_encoder = model.text_encoder.requires_grad_(True) if train_text else None
        self.model_config = model.config

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        dtype = self.null_text.dtype
        null = self.null_text.unsqueeze(0)
        if self.text_encoder is not None:
            # condition: CLIP ids [B, C]
            features = text_condition(self.model_config, self.text_encoder.features(condition), condition).to(dtype)
        elif self.kind == "text":
            features = condition.to(dtype)
        elif self.kind == "class":
            features = self.class_embedding(condition).unsqueeze(1)
        else:
            features = null.expand(x_t.shape[0], -1, -1)
        features = torch.where(drop[:, None, None], null, features)
        return self.denoiser(x_t, t, features).log_softmax(dim=1)


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-step: the same draws whenever this (rank, step) runs."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 64 + micro)
    return g


def micro_step(engine, model: VQDiffusionModel, sampler: TimestepSampler | None, batch: dict, drop_text: float,
               aux_weight: float, adaptive_aux: bool, g: torch.Generator, device: torch.device):
    """Forward one micro-batch through the engine: returns (loss, per-sample terms, t)."""
    diffusion = model.diffusion
    x0 = batch["vq"].to(device)
    B, T = x0.shape[0], diffusion.num_timesteps
    if sampler is not None:
        t, pt = sampler.sample(B, generator=g, device=device)
    else:
        t, pt = torch.randint(0, T, (B,), generator=g, device=device), None
    x_t = diffusion.q_sample(x0, t, generator=g)
    kind = model.config.condition
    if kind == "text" and engine.module.text_encoder is None:
        with torch.no_grad():
            condition = model.encode_text(batch["clip"].to(device))
    elif kind == "text":
        condition = batch["clip"].to(device)
    else:
        condition = batch["label"].to(device)
    drop = torch.rand(B, generator=g, device=device) < (1.0 if kind == "none" else drop_text)
    log_p_x0 = engine(x_t, t, condition, drop)
    loss, terms = diffusion.training_loss(log_p_x0, x0, x_t, t, pt=pt, aux_weight=aux_weight, adaptive_aux=adaptive_aux)
    N = x0.shape[1]
    inv_pt = torch.full_like(terms["vlb"], float(T)) if pt is None else 1.0 / pt
    metrics = {"vlb": (terms["vlb"] * inv_pt).mean() / N, "aux": terms["aux"].mean() / N}
    return loss, terms["vlb"].detach(), t, metrics
