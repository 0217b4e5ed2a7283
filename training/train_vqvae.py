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

import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.core.budget import StepBudget
from training.core.checkpoint import export_dir, load_checkpoint, resolve_resume, save_checkpoint
from training.core.config import load_config, save_config, split_cli
from training.core.distributed import barrier, cleanup, init_distributed
from training.core.metrics import MetricWindow
from training.core.optim import build_optimizer, set_total_steps
from training.tokenizer.config import VQVAERunConfig
from training.tokenizer.data import image_loader
from training.tokenizer.objective import TokenizerObjective, evaluate, prune_codes, recon_grid
from training.tracking.access import require_access
from training.tracking.tracker import start_run
from vqd.vqvae import VQVAE, load_tokenizer


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = split_cli(argv)
    cfg: VQVAERunConfig = load_config(VQVAERunConfig, config_path, overrides)
    info = init_distributed()
    require_access(cfg.tracking, info)  # wrong or missing tracking credentials end the run here, in one line
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
