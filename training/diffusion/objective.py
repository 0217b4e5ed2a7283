"""What the DeepSpeed engine trains, and one training step of VQ-Diffusion (or of the VQ-AR baseline).

The engine wraps `Denoising`: the denoiser, the learned null condition and the class embeddings. The
frozen CLIP text tower stays outside it (no gradient, nothing for ZeRO to partition), and so does the
diffusion maths: its float64 schedule must not be cast to bf16 with the module, and the loss is formed in
fp32 from the network's log-probabilities.

Every random draw of a micro-step (t, x_t, which captions are dropped) comes from a generator seeded by
(seed, rank, step, micro-step), so a resumed run draws exactly what an uninterrupted one would.

A step never waits on the device between logging steps: batches arrive in pinned memory and are copied
without blocking, p(t) and its statistics stay on the device (one all-reduce a step, enqueued like any
other kernel), the EMA is a few fused kernels, and the gradient norm is read only before a logging step.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from training.core.ema import EMA
from training.core.run import Run
from training.diffusion.ar_objective import ar_micro_step
from vqd.ar import VQARModel
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


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`, copied without blocking the host (the loader pins them on a GPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def frozen_text(model, ids: torch.Tensor, precision: str) -> torch.Tensor:
    """The frozen tower's features of CLIP ids [B, C]: on a GPU in the step's precision (autocast), elsewhere in
    fp32 (a CPU without native bf16 runs it 60x slower)."""
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=low or torch.float32,
                                         enabled=low is not None and ids.device.type == "cuda"):
        return model.encode_text(ids)


def micro_step(engine, model: VQDiffusionModel, sampler: TimestepSampler | None, batch: dict, drop_text: float,
               aux_weight: float, adaptive_aux: bool, g: torch.Generator, precision: str = "fp32"):
    """Forward one micro-batch (on the device) through the engine: returns (loss, per-sample terms, t, metrics)."""
    diffusion = model.diffusion
    x0 = batch["vq"]
    B, T = x0.shape[0], diffusion.num_timesteps
    if sampler is not None:
        t, pt = sampler.sample(B, generator=g, device=x0.device)
    else:
        t, pt = torch.randint(0, T, (B,), generator=g, device=x0.device), None
    x_t = diffusion.q_sample(x0, t, generator=g)
    kind = model.config.condition
    if kind == "text" and engine.module.text_encoder is None:
        condition = frozen_text(model, batch["clip"], precision)
    elif kind == "text":
        condition = batch["clip"]
    else:
        condition = batch["label"]
    drop = torch.rand(B, generator=g, device=x0.device) < (1.0 if kind == "none" else drop_text)
    log_p_x0 = engine(x_t, t, condition, drop)
    loss, terms = diffusion.training_loss(log_p_x0, x0, x_t, t, pt=pt, aux_weight=aux_weight, adaptive_aux=adaptive_aux)
    N = x0.shape[1]
    inv_pt = torch.full_like(terms["vlb"], float(T)) if pt is None else 1.0 / pt
    metrics = {"vlb": (terms["vlb"] * inv_pt).mean() / N, "aux": terms["aux"].mean() / N}
    return loss, terms["vlb"].detach(), t, metrics


class SamplerState:
    """The timestep sampler as a part of the checkpoint (rank 0 writes it; every rank reads it)."""

    FILE = "timestep_sampler.pt"

    def __init__(self, sampler: TimestepSampler):
        self.sampler = sampler

    def save(self, folder: Path, rank: int) -> None:
        if rank == 0:
            torch.save(self.sampler.state_dict(), folder / self.FILE)

    def load(self, folder: Path, rank: int) -> None:
        self.sampler.load_state_dict(torch.load(folder / self.FILE, weights_only=True))


def gradient_norm(engine, trainable: dict) -> torch.Tensor | None:
    """The global gradient norm before clipping, read before the optimizer step: ZeRO 1-3 keep their own
    (after the step); at ZeRO-0 every rank holds whole gradients, averaged over ranks once accumulated."""
    if engine.zero_optimization_stage() > 0:
        return None  # engine.get_global_grad_norm() after the step
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else None


class TrainStep:
    """One optimizer step of the diffusion trainer: train.grad_accum micro-batches through the engine, then the
    EMA and the timestep sampler's statistics (all ranks fold in every rank's (t, L_t), so all draw alike)."""

    def __init__(self, run: Run, model: VQDiffusionModel | VQARModel, data, ema: EMA | None,
                 sampler: TimestepSampler | None):
        self.run, self.model, self.data, self.ema, self.sampler = run, model, data, ema, sampler
        self.cfg = run.cfg
        self.trainable = {n: p for n, p in run.engine.module.named_parameters() if p.requires_grad}
        self.grad_norm: torch.Tensor | None = None
        self.autoregressive = isinstance(model, VQARModel)

    def __call__(self, step: int) -> None:
        run, cfg, engine = self.run, self.cfg, self.run.engine
        vlbs, ts = [], []
        for micro in range(cfg.train.grad_accum):
            batch = to_device(next(self.data), run.device)
            run.batches += 1
            if self.autoregressive:
                loss, vlb, t, metrics = ar_micro_step(engine, self.model, batch, run.device)
            else:
                g = step_generator(cfg.train.seed, run.info.rank, step, micro, run.device)
                loss, vlb, t, metrics = micro_step(engine, self.model, self.sampler, batch, cfg.data.drop_text,
                                                   cfg.diffusion.aux_weight, cfg.diffusion.adaptive_aux, g,
                                                   cfg.train.precision)
            engine.backward(loss)
            if micro == cfg.train.grad_accum - 1 and (step + 1) % cfg.train.log_every == 0:
                self.grad_norm = gradient_norm(engine, self.trainable)
            engine.step()
            vlbs.append(vlb)
            ts.append(t)
            run.window.add(batch["vq"].shape[0], loss=loss.detach(), epoch=batch["epoch"], **metrics)
        if self.ema is not None:
            self.ema.update()
        if self.sampler is not None:
            sums, counts = self.sampler.batch_statistics(torch.cat(ts), torch.cat(vlbs))
            if run.info.world_size > 1:  # one all-reduce of [2T] on the device (counts are exact in float64)
                stats = torch.cat([sums, counts.double()])
                torch.distributed.all_reduce(stats)
                sums, counts = stats[: len(sums)], stats[len(sums):]
            self.sampler.update(sums, counts)

    def report(self, means: dict[str, float], flops_per_sample: float, peak_flops: float) -> None:
        """What a logging step adds to the window's means: tokens/s, MFU and the gradient norm."""
        run = self.run
        h, w = self.model.config.grid
        means["tokens_per_s"] = means["samples_per_s"] * h * w
        means["mfu"] = means["samples_per_s"] * flops_per_sample / (peak_flops * run.info.world_size)
        norm = self.grad_norm if self.grad_norm is not None else run.engine.get_global_grad_norm()
        if norm is not None:
            means["grad_norm"] = float(norm)
        self.grad_norm = None
