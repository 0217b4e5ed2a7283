"""Train the image tokenizer (VQ-VAE, optionally VQGAN's patch-GAN loss) with DeepSpeed, from one YAML config.

Loss: ||x - x~||_1 + beta ||sg[z_q] - E(x)||^2 (EMA codebook, dead-code restart), plus, from
`loss.disc_start` on, the hinge patch-GAN term with VQGAN's adaptive weight when `loss.disc_weight` > 0.
Images come from webdataset tars (img2dataset layout) or an image folder (`data.source`).

Commands (run from the repository root):

  one CPU (2 ranks over gloo; any rank count works, world size 1 needs no launcher at all):
    deepspeed --num_gpus 2 training/train_vqvae.py --config configs/vqvae_emoji.yaml
    python training/train_vqvae.py --config configs/vqvae_emoji.yaml            # 1 rank, no launcher
    (on a CPU-only machine DeepSpeed's launcher needs no extra flag: --num_gpus N starts N CPU ranks; add
     --master_port P when another job on the machine already uses the default 29500)

  one node, many GPUs:
    deepspeed --num_gpus 8 training/train_vqvae.py --config configs/vqvae_f8_8192.yaml
    torchrun --nproc_per_node 8 training/train_vqvae.py --config configs/vqvae_f8_8192.yaml

  many nodes:
    deepspeed --hostfile cluster/hostfile training/train_vqvae.py --config configs/vqvae_f8_8192.yaml
    srun --nodes 4 --ntasks-per-node 8 --gpus-per-task 1 python training/train_vqvae.py --config ...
    (SLURM: rank, world size and the master address are read from SLURM_* variables)

  overrides, resume, pruning:
    ... --config configs/vqvae_emoji.yaml --train.steps=3000 --optim.lr=2e-4 --train.run_dir=runs/emoji2
    ... --train.resume=auto            # continue from the newest checkpoint in train.run_dir
    --prune.enabled=true               # after training: keep only the codes used on the training data

Outputs in train.run_dir: checkpoints/step_*/ (resume), export/ (the tokenizer folder: load_tokenizer(path)),
config.yaml (resolved), mlflow_run_id.txt. Metrics (loss, PSNR, codebook usage and perplexity, skipped images)
and reconstruction grids go to MLflow (tracking.uri, $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # `python training/train_vqvae.py` / deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from training.budget import StepBudget  # noqa: E402
from training.checkpoint import export_dir, load_checkpoint, resolve_resume, save_checkpoint  # noqa: E402
from training.config import (OptimConfig, TrackingConfig, TrainConfig, load_config,  # noqa: E402
                             save_config, split_cli)
from training.data_images import ImageDataConfig, image_loader  # noqa: E402
from training.distributed import barrier, cleanup, init_distributed  # noqa: E402
from training.grid import image_grid  # noqa: E402
from training.metrics import MetricWindow  # noqa: E402
from training.optim import build_optimizer, set_total_steps  # noqa: E402
from training.tracking import start_run  # noqa: E402
from vqd.autoencoder import PatchDiscriminator, hinge_d_loss  # noqa: E402
from vqd.pipeline import to_uint8  # noqa: E402
from vqd.vqvae import VQVAE, VQVAEConfig, count_code_usage, load_tokenizer  # noqa: E402


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
            raise ValueError("model.codebook 'gumbel' is for loading taming checkpoints; train with 'ema' or 'learned'")
        if self.train.ema_decay:
            raise ValueError("train.ema_decay is not used by the tokenizer trainer (the codebook has its own EMA)")
        if self.model.used_codes:
            raise ValueError("model.used_codes is set by pruning after training, not in a training config")
        if instance := self.model.one_channel_groups():
            raise ValueError(f"model.norm_groups {self.model.norm_groups} leaves one channel a group at {instance} "
                             f"channels: GroupNorm is then instance norm, which erases each channel's per-image "
                             f"mean and with it flat colours (a red heart comes back brown); use at most "
                             f"{min(instance) // 2} groups")


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
        mse = (x.float() - x_rec.detach().float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
        metrics = {"rec_l1": rec.detach(), "q_loss": q_loss.detach(), "perplexity": stats["perplexity"],
                   "usage_batch": stats["usage"], "psnr": (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()}
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
        rec = vqvae.decode(ids).float()
        mse = (rec - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnr_sum += float((10 * torch.log10(4.0 / mse)).sum())
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


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = split_cli(argv)
    cfg: VQVAERunConfig = load_config(VQVAERunConfig, config_path, overrides)
    info = init_distributed()
    run_dir = Path(cfg.train.run_dir)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DeepSpeed also broadcasts them)

    vqvae = VQVAE(cfg.model)
    if cfg.train.init_from:
        vqvae.load_state_dict(load_tokenizer(cfg.train.init_from).state_dict())
    objective = TokenizerObjective(vqvae, cfg.loss)
    opt, sched = build_optimizer(objective, cfg.optim, cfg.train.steps, info.device)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=opt, lr_scheduler=sched, config=cfg.deepspeed)
    if cfg.model.codebook == "ema":  # EMA statistics stay fp32 even when the engine runs in bf16 / fp16
        engine.module.vqvae.quantize.float()
    dtype = next(p for p in engine.module.parameters() if p.requires_grad).dtype

    step, batches_done = 0, 0
    skipped = {"bad_images": 0, "bad_tars": 0}  # this rank's, since the run began (kept in checkpoints)
    budget = StepBudget(cfg.train.max_minutes, cfg.train.steps, step, every=cfg.train.log_every)
    resume_from = resolve_resume(cfg.train.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, info.rank)
        step, batches_done = int(state["step"]), int(state.get("batches", 0))
        budget = StepBudget.resumed(cfg.train.max_minutes, cfg.train.steps, state, every=cfg.train.log_every)
        skipped = {k: int(state.get(f"skipped_{k}", 0)) for k in skipped}
    tracker = start_run(cfg, run_dir, info.is_main, "train_vqvae", tags={"world_size": str(info.world_size)})

    loader = image_loader(cfg.data, cfg.model.image_size, cfg.train.micro_batch_size, split="train",
                          rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                          skip_batches=batches_done, num_workers=cfg.train.num_workers)
    data = iter(loader)
    set_total_steps(sched, budget.planned)
    bar = tqdm(total=budget.planned, initial=step, disable=not info.is_main, desc="train_vqvae", dynamic_ncols=True)
    window = MetricWindow()
    window_counts = torch.zeros(cfg.model.num_embeddings)
    engine.train()
    while step < budget.planned:
        started = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            x, bad = next(data)
            batches_done += 1
            for k, v in bad.items():
                skipped[k] = skipped.get(k, 0) + v
            x = x.to(info.device, dtype)
            loss, metrics = engine(x, step)
            engine.backward(loss)
            engine.step()
            window.add(x.shape[0], loss=loss.detach(), **metrics)
            window_counts += objective.counts.detach().float().cpu()
        window.add(0, time.perf_counter() - started)
        step += 1
        if budget.update(step, info.device, info.world_size) != bar.total:  # the time budget moved the end
            set_total_steps(sched, budget.planned)
            bar.total = budget.planned
        bar.update(1)
        last = step == budget.planned
        if step % cfg.train.log_every == 0 or last:
            means = window.flush(info.device)
            means["images_per_s"] = means.pop("samples_per_s")
            totals = torch.tensor([float(skipped[k]) for k in sorted(skipped)], dtype=torch.float64)
            if info.world_size > 1:  # counts add up over ranks
                totals = totals.to(info.device)
                torch.distributed.all_reduce(totals)
            if budget.enabled:
                means["planned_steps"] = float(budget.planned)
            means.update({"usage": float((window_counts > 0).float().mean()), "lr": sched.get_last_lr()[0],
                          **{f"skipped/{k}": float(v) for k, v in zip(sorted(skipped), totals.tolist())}})
            tracker.log_metrics(means, step)
            bar.set_postfix(loss=f"{means['loss']:.4f}", psnr=f"{means['psnr']:.2f}",
                            usage=f"{means['usage']:.2f}", ips=f"{means['images_per_s']:.0f}")
            window_counts.zero_()
        if info.is_main and cfg.train.image_every and (step % cfg.train.image_every == 0 or last):
            tracker.log_image(recon_grid(engine.module.vqvae, x), f"reconstructions/step_{step:08d}.png")
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and not last:  # the last: after the loop
            tracker.log_metrics(evaluate(engine.module.vqvae, cfg, info.rank, info.world_size, info.device), step)
        if step % cfg.train.save_every == 0 or last:
            save_checkpoint(engine, run_dir, step, info.rank, cfg,
                            {"batches": batches_done, **{f"skipped_{k}": v for k, v in skipped.items()},
                             **budget.state()}, cfg.train.keep_checkpoints)
            if info.is_main:
                engine.module.vqvae.save(export_dir(run_dir))
                save_config(cfg, export_dir(run_dir) / "run_config.yaml")
            barrier()
    bar.close()

    vqvae = engine.module.vqvae
    final = evaluate(vqvae, cfg, info.rank, info.world_size, info.device, max_batches=10 ** 9)
    barrier()  # no collective follows: the other ranks may leave while rank 0 prunes and uploads
    if info.is_main:
        if cfg.prune.enabled:
            counts = prune_codes(vqvae, cfg, info.device)
            final["pruned_codes"] = vqvae.num_codes
            tracker.log_metrics({"train/used_codes": float((counts > 0).sum())}, step)
            vqvae.save(export_dir(run_dir))
        tracker.log_metrics(final, step)
        tracker.set_tags({"export": str(export_dir(run_dir).resolve())})
        ended = f" of {cfg.train.steps} (time budget {cfg.train.max_minutes:g} min)" if step < cfg.train.steps else ""
        print(f"done: {step} steps{ended}; final: {final}  export: {export_dir(run_dir)}", flush=True)
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main()
