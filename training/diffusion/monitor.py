"""What the diffusion trainer reports besides the loss: a held-out validation loss, and grids of pictures drawn
for fixed prompts from the exported weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.core.distributed import DistInfo
from training.diffusion.ar_objective import ar_validation_loss
from training.diffusion.data import split_shards, token_loader
from training.diffusion.objective import step_generator
from training.evaluation.grid import captioned_grid
from vqd.ar import VQARModel
from vqd.pipeline import TextToImage, to_uint8
from vqd.shards import iter_samples


def fixed_prompts(cfg, manifest: dict, model_cfg) -> list[str]:
    """The prompts of the training grids: the config's, else the first held-out captions (or class names)."""
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    if model_cfg.condition == "class":
        return list(model_cfg.classes[:: max(1, len(model_cfg.classes) // cfg.sample.count)][: cfg.sample.count])
    if model_cfg.condition == "none":
        return [""] * cfg.sample.count
    split = cfg.data.eval_split or cfg.data.split
    captions = []
    for path, _ in split_shards(manifest, split):
        for sample in iter_samples(path):
            captions.append(sample["txt"])
            if len(captions) >= cfg.sample.count:
                return captions
    return captions


def sample_grid(export: Path, cfg, prompts: list[str], info: DistInfo) -> np.ndarray | None:
    """Rank 0: pictures for `prompts` from the model folder `export` with its sampling settings, captions under
    them, as uint8 [H, W, 3]."""
    if not info.is_main or not (export / "tokenizer").is_dir():
        return None
    pipe = TextToImage.from_folder(export, device=info.device)  # with the settings the export carries
    images = pipe.generate(prompts, generator=torch.Generator(info.device).manual_seed(0))
    labels = prompts if pipe.model.config.condition != "none" else ["(unconditional)"] * len(prompts)
    return np.asarray(captioned_grid(to_uint8(images).numpy(), labels, ncols=min(8, len(prompts))))


def validation_loader(manifest: dict, cfg, model, info: DistInfo, pin_memory: bool = False):
    """The held-out split's fixed batches (seed 12345), built once: its workers stay up between evaluations and
    every evaluation reads the same samples from the start."""
    workers = min(1, cfg.train.num_workers)
    return token_loader(manifest, cfg.data, cfg.train.micro_batch_size, seed=12345, rank=info.rank,
                        world_size=info.world_size, num_workers=workers, classes=getattr(model.config, "classes", ()),
                        split=cfg.data.eval_split, context_length=model.config.text.context_length,
                        persistent=workers > 0, pin_memory=pin_memory)


@torch.no_grad()  # no graph: held-out batches are never backpropagated
def validation_loss(engine, model, loader, info: DistInfo, batches: int = 4) -> dict[str, float]:
    """Held-out bound estimate (nats per token): `batches` fixed batches per rank, t stratified over [0, T).

    The same samples, timesteps and noise at every evaluation, so successive values compare the weights only.
    val/condition_gain is what the caption (or class) is worth: the x0 cross-entropy of the same x_t with the
    learned null condition minus with the sample's own, in nats per token. A model whose gain stays near 0
    is learning an unconditional model, whatever its loss does.
    A VQ-AR model reports its held-out next-token cross-entropy instead (val/nll).
    """
    if isinstance(model, VQARModel):
        return ar_validation_loss(engine, model, loader, info, batches)

    diffusion, T = model.diffusion, model.diffusion.num_timesteps
    was_training = engine.module.training
    engine.module.eval()
    total, count = torch.zeros(3, dtype=torch.float64, device=info.device), 0
    for i, batch in zip(range(batches), loader):
        g = step_generator(12345, info.rank, i, 0, info.device)
        x0 = batch["vq"].to(info.device)
        B, N = x0.shape
        t = (torch.arange(B, device=info.device) * T // B + i * 7) % T
        x_t = diffusion.q_sample(x0, t, generator=g)
        kind = model.config.condition
        if kind == "text":
            ids = batch["clip"].to(info.device)
            condition = ids if engine.module.text_encoder is not None else model.encode_text(ids)
        else:
            condition = batch["label"].to(info.device)
        drop = torch.full((B,), kind == "none", device=info.device)
        terms = diffusion.loss_terms(engine(x_t, t, condition, drop), x0, x_t, t)
        null_nll = terms["aux"] if kind == "none" else \
            -engine(x_t, t, condition, torch.ones_like(drop)).float().gather(1, x0.unsqueeze(1)).sum(dim=(1, 2))
        total += torch.stack([terms["vlb"].sum().double() * T / N, terms["aux"].sum().double() / N,
                              (null_nll - terms["aux"]).sum().double() / N])
        count += B
    engine.module.train(was_training)
    stats = torch.cat([total, torch.tensor([float(count)], dtype=torch.float64, device=info.device)])
    if info.world_size > 1:
        torch.distributed.all_reduce(stats)
    n = max(float(stats[3]), 1.0)
    out = {"val/vlb": float(stats[0]) / n, "val/aux": float(stats[1]) / n}
    if kind != "none":
        out["val/condition_gain"] = float(stats[2]) / n
    return out
