"""What the DeepSpeed engine trains for the image tokenizer, and how it is measured and pruned.

Loss: ||x - x~||_1 + beta ||sg[z_q] - E(x)||^2 (EMA codebook, dead-code restart), plus, from
`loss.disc_start` on, the hinge patch-GAN term with VQGAN's adaptive weight when `loss.disc_weight` > 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from training.evaluation.grid import image_grid
from training.tokenizer.config import LossConfig, VQVAERunConfig
from training.tokenizer.data import image_loader
from vqd.autoencoder import PatchDiscriminator, hinge_d_loss
from vqd.pipeline import to_uint8
from vqd.vqvae import VQVAE, count_code_usage, psnr


class TokenizerObjective(nn.Module):
    """VQVAE + optional patch discriminator in one module, so one DeepSpeed engine and one optimizer train both."""

    def __init__(self, vqvae: VQVAE, loss: LossConfig):
        super().__init__()
        self.vqvae, self.cfg = vqvae, loss
        self.disc = (PatchDiscriminator(num_layers=loss.disc_layers, width=loss.disc_width)
                     if loss.disc_weight > 0 else None)

    def forward(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, 3, H, W] -> (total loss, detached metrics)."""
        x_rec, q_loss, ids, stats = self.vqvae(x)
        rec = (x - x_rec).abs().mean()
        loss = rec + q_loss
        metrics = {"rec_l1": rec.detach(), "q_loss": q_loss.detach(), "perplexity": stats["perplexity"],
                   "usage_batch": stats["usage"], "psnr": psnr(x, x_rec.detach().clamp(-1, 1)).mean()}
        self.counts = stats["counts"]
        if self.disc is not None:
            if step >= self.cfg.disc_start:
                # generator term through a parameter-detached copy of D: only the decoder side learns from it
                frozen = {n: p.detach() for n, p in self.disc.named_parameters()}
                g_loss = -torch.func.functional_call(self.disc, frozen, (x_rec,)).mean()
                weight = self.adaptive_weight(rec, g_loss) * self.cfg.disc_weight
                d_loss = hinge_d_loss(self.disc(x.detach()), self.disc(x_rec.detach()))
                loss = loss + weight * g_loss + d_loss
                metrics.update(g_loss=g_loss.detach(), d_loss=d_loss.detach(), disc_weight=weight.detach())
            else:  # zero-valued term so that every parameter has a gradient on every rank
                loss = loss + 0.0 * sum(p.sum() for p in self.disc.parameters())
        return loss, metrics

    def adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """VQGAN's balance: ||d rec / d W_last|| / (||d gan / d W_last|| + 1e-4), clamped to [0, adaptive_max]."""
        last = self.vqvae.last_layer()
        g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, self.cfg.adaptive_max).detach()


@torch.no_grad()
def evaluate(vqvae: VQVAE, cfg: VQVAERunConfig, rank: int, world: int, device, max_batches: int = 50) -> dict:
    """Held-out PSNR (of clamped decode(encode(x))) and codebook usage, averaged over ranks."""
    was_training = vqvae.training
    vqvae.eval()
    loader = image_loader(cfg.data, cfg.model.image_size, cfg.train.micro_batch_size, split="heldout", rank=rank,
                          world_size=world, epochs=1, drop_last=False)
    dtype = next(vqvae.parameters()).dtype
    psnr_sum, n, counts = 0.0, 0, torch.zeros(vqvae.cfg.num_embeddings, device=device)
    for i, (x, _) in enumerate(loader):
        if i >= max_batches:
            break
        x = x.to(device)
        ids = vqvae.encode(x.to(dtype))
        psnr_sum += float(psnr(vqvae.decode(ids), x).sum())
        n += x.shape[0]
        counts += torch.bincount(ids.flatten(), minlength=counts.numel()).float()
    stats = torch.tensor([psnr_sum, float(n)], device=device, dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(stats)
        torch.distributed.all_reduce(counts)
    vqvae.train(was_training)
    if stats[1] == 0:
        return {}
    p = counts / counts.sum()
    return {"heldout/psnr": float(stats[0] / stats[1]), "heldout/usage": float((counts > 0).float().mean()),
            "heldout/perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum())), "heldout/images": int(stats[1])}


def recon_grid(vqvae: VQVAE, x: torch.Tensor) -> Any:
    """Rows of 8 originals over their reconstructions, as one uint8 image."""
    with torch.no_grad():
        was = vqvae.training
        vqvae.eval()
        dtype = next(vqvae.parameters()).dtype
        rec = vqvae.decode(vqvae.encode(x[:16].to(dtype))).float()
        vqvae.train(was)
    pairs = []
    for i in range(0, min(16, x.shape[0]), 8):
        pairs += [x[i:i + 8].float(), rec[i:i + 8]]
    return image_grid(to_uint8(torch.cat(pairs)), ncols=8)


def prune_codes(vqvae: VQVAE, cfg: VQVAERunConfig, device) -> torch.Tensor:
    """Count raw code usage over the training split (rank 0, one pass) and set the remap. Returns the counts."""
    vqvae.eval()
    loader = image_loader(cfg.data, cfg.model.image_size, cfg.train.micro_batch_size, split="train", epochs=1,
                          drop_last=False)
    dtype = next(vqvae.parameters()).dtype
    batches = (x.to(dtype) for i, (x, _) in enumerate(loader) if not cfg.prune.max_batches or i < cfg.prune.max_batches)
    counts = count_code_usage(vqvae, tqdm(batches, desc="counting code usage"), device)
    vqvae.set_code_remap(counts.nonzero().squeeze(1))
    return counts
