"""What the DeepSpeed engine trains for the VQ-AR baseline (`model.kind: vq-ar`), and its training step.

The paper's Table 3 baseline is trained by the same program, on the same batches, with the same optimizer,
EMA, checkpoints and export as VQ-Diffusion; only the objective differs: next-token cross-entropy over the
image tokens in raster order (teacher forcing, vqd/ar.py), in nats per token. There is no timestep, so no
timestep sampler, and no null condition, so no caption dropout (data.drop_text does not apply). As in
training/diffusion/objective.py, the frozen text tower stays outside the engine unless model.train_text trains it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqd.ar import VQARModel


class NextToken(nn.Module):
    """(tokens Long [B, N], condition) -> next-token logits float [B, K, N].

    The condition is the frozen tower's text features [B, 77, D], or CLIP ids [B, 77] when the tower is
    trained here. Attribute names are VQARModel's, so the engine's parameter names are the export's keys.
    """

    def __init__(self, model: VQARModel, train_text: bool = False):
        super().__init__()
        self.transformer = model.transformer
        self.text_encoder = model.text_encoder.requires_grad_(True) if train_text else None

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.head.weight.dtype  # bf16 when the engine casts the module
        features = self.text_encoder.features(condition) if self.text_encoder is not None else condition
        return self.transformer(tokens, features.to(dtype))


def condition_of(engine, model: VQARModel, batch: dict, device: torch.device) -> torch.Tensor:
    """What NextToken reads: CLIP ids [B, 77] for a trained tower, else frozen features [B, 77, D]."""
    ids = batch["clip"].to(device)
    if engine.module.text_encoder is not None:
        return ids
    with torch.no_grad():
        return model.encode_text(ids)


def ar_micro_step(engine, model: VQARModel, batch: dict, device: torch.device):
    """Forward one micro-batch: (loss, None, None, metrics), the shape of training/objective.micro_step's
    result (no per-sample bound, no timesteps)."""
    tokens = batch["vq"].to(device)
    logits = engine(tokens, condition_of(engine, model, batch, device))
    loss = F.cross_entropy(logits.float(), tokens)  # mean over B x N tokens: nats per token
    return loss, None, None, {"nll": loss.detach()}


@torch.no_grad()
def ar_validation_loss(engine, model: VQARModel, loader, info, batches: int = 4) -> dict[str, float]:
    """Held-out next-token cross-entropy (nats per token) over `batches` fixed batches per rank."""
    was_training = engine.module.training
    engine.module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # summed nats, tokens
    for _, batch in zip(range(batches), loader):
        tokens = batch["vq"].to(info.device)
        logits = engine(tokens, condition_of(engine, model, batch, info.device))
        total += torch.stack([F.cross_entropy(logits.float(), tokens, reduction="sum").double(),
                              torch.tensor(float(tokens.numel()), dtype=torch.float64, device=info.device)])
    engine.module.train(was_training)
    if info.world_size > 1:
        torch.distributed.all_reduce(total)
    return {"val/nll": float(total[0]) / max(float(total[1]), 1.0)}
