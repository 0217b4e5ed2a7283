"""Train the image tokenizer (VQ-VAE, optionally VQGAN's patch-GAN loss) with DeepSpeed, from one YAML config.

The objective (training/tokenizer/objective.py): L1 reconstruction + commitment, EMA codebook, optionally
VQGAN's patch-GAN term. Images come from webdataset tars (img2dataset layout) or an image folder (`data.source`).

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

import torch

from training.core.checkpoint import export_dir
from training.core.cli import parse_config
from training.core.config import save_config
from training.core.run import Run
from training.tokenizer.config import VQVAERunConfig
from training.tokenizer.data import image_loader, list_sources
from training.tokenizer.objective import TokenizerObjective, evaluate, prune_codes, recon_grid
from vqd.errors import exit_on_user_error
from vqd.vqvae import VQVAE, load_tokenizer

SKIPPED = ("bad_images", "bad_tars")  # images and tars the loader could not read: counted, kept in checkpoints


def main(argv: list[str] | None = None) -> None:
    cfg: VQVAERunConfig = parse_config(VQVAERunConfig, argv, __doc__)
    list_sources(cfg.data.source)  # images that are not there fail here, before any rank works (and say who makes them)
    run = Run(cfg, "train_vqvae")
    vqvae = VQVAE(cfg.model)
    if cfg.train.init_from:
        vqvae.load_state_dict(load_tokenizer(cfg.train.init_from).state_dict())
    objective = TokenizerObjective(vqvae, cfg.loss)
    engine = run.build_engine(objective)
    if cfg.model.codebook == "ema":  # EMA statistics stay fp32 even when the engine runs in bf16 / fp16
        engine.module.vqvae.quantize.float()
    dtype = next(p for p in engine.module.parameters() if p.requires_grad).dtype
    state = run.resume()
    run.rank_state = {f"skipped_{k}": int(state.get(f"skipped_{k}", 0)) for k in SKIPPED}  # this rank's, all run
    run.start_tracking()

    data = iter(image_loader(cfg.data, cfg.model.image_size, cfg.train.micro_batch_size, split="train",
                             rank=run.info.rank, world_size=run.info.world_size, seed=cfg.train.seed,
                             skip_batches=run.batches, num_workers=cfg.train.num_workers))
    used = torch.zeros(cfg.model.num_embeddings, device=run.device)  # codes used in this logging window
    last_batch: list[torch.Tensor] = []

    def train_step(step: int) -> None:
        for _ in range(cfg.train.grad_accum):
            x, bad = next(data)
            run.batches += 1
            for k, v in bad.items():
                run.rank_state[f"skipped_{k}"] += v
            x = x.to(run.device, dtype, non_blocking=True)
            loss, metrics = engine(x, step)
            engine.backward(loss)
            engine.step()
            run.window.add(x.shape[0], loss=loss.detach(), **metrics)
            used.add_(objective.counts.detach().float())
        last_batch[:] = [x]

    def on_log(means: dict[str, float]) -> None:
        totals = torch.tensor([float(run.rank_state[f"skipped_{k}"]) for k in SKIPPED], dtype=torch.float64,
                              device=run.device)
        if run.info.world_size > 1:  # counts add up over ranks
            torch.distributed.all_reduce(totals)
        means.update({"usage": float((used > 0).float().mean()),
                      **{f"skipped/{k}": float(v) for k, v in zip(SKIPPED, totals.tolist())}})
        used.zero_()

    def draw(step: int) -> None:
        if run.info.is_main:
            run.tracker.log_image(recon_grid(engine.module.vqvae, last_batch[0]), f"reconstructions/step_{step:08d}.png")

    def held_out(step: int) -> None:
        if not run.last:  # the last: after the loop, over the whole held-out split
            run.log(evaluate(engine.module.vqvae, cfg, run.info.rank, run.info.world_size, run.device))

    def export(_: int) -> None:
        if run.info.is_main:
            engine.module.vqvae.save(export_dir(run.run_dir))
            save_config(cfg, export_dir(run.run_dir) / "run_config.yaml")

    run.loop(train_step, on_log=on_log, export=export, throughput="images_per_s",
             periodic=[(cfg.train.image_every, draw), (cfg.train.eval_every, held_out)])
    data = None  # stops the loader's workers

    final = evaluate(vqvae, cfg, run.info.rank, run.info.world_size, run.device, max_batches=10 ** 9)

    def prune_and_report() -> str:  # one pass over the training images on rank 0: the others need not wait
        if cfg.prune.enabled:
            counts = prune_codes(vqvae, cfg, run.device)
            final["pruned_codes"] = vqvae.num_codes
            run.tracker.log_metrics({"train/used_codes": float((counts > 0).sum())}, run.step)
            vqvae.save(export_dir(run.run_dir))
        run.tracker.log_metrics(final, run.step)
        return f"final: {final}"

    run.finish(upload_export=False, then_on_main=prune_and_report)

if __name__ == "__main__":
    exit_on_user_error(main)
