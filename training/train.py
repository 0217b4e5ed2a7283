"""Train VQ-Diffusion (or, with --model.kind=vq-ar, the VQ-AR baseline) on a built token data set with DeepSpeed
ZeRO, from one YAML config.

Commands (from the repository root):

  one CPU (2 ranks over gloo; world size 1 needs no launcher at all):
    deepspeed --num_gpus 2 training/train.py --config configs/emoji_base.yaml
    python training/train.py --config configs/emoji_base.yaml --train.steps=100

  one node, many GPUs:
    deepspeed --num_gpus 8 training/train.py --config configs/base_cc.yaml
    torchrun --nproc_per_node 8 training/train.py --config configs/base_cc.yaml

  many nodes (cluster/ has a hostfile example, per-node launch and SLURM scripts):
    deepspeed --hostfile cluster/hostfile training/train.py --config configs/base_cc.yaml
    srun --nodes 8 --ntasks-per-node 8 --gpus-per-task 1 python training/train.py --config configs/base_cc.yaml

  fine-tune (VQ-Diffusion-F), resume, overrides:
    deepspeed --num_gpus 8 training/train.py --config configs/finetune_cub200.yaml \
        --train.init_from=runs/base_cc/export          # or runs:/<mlflow run id of the base>
    ... --train.resume=auto                            # newest complete checkpoint of train.run_dir
    ... --train.steps=20000 --optim.lr=1e-4 --deepspeed.zero_optimization.stage=3

  the paper's Table 3 baseline on the same data, optimizer, EMA and export (training/diffusion/ar_objective.py):
    python training/train.py --config configs/emoji_base.yaml --model.kind=vq-ar --model.size=VQ-AR-tiny

Outputs in train.run_dir: checkpoints/step_*/ (resume: weights, optimizer, EMA, timestep-sampler
statistics, RNG, data position), export/ (the model folder: `python training/sample.py --model <run>/export`),
config.yaml (resolved), metrics.jsonl (every logged value), mlflow_run_id.txt. MLflow (rank 0): the flattened config, loss / vlb / aux / lr /
grad norm / samples/s / tokens/s / MFU, validation loss, sample grids for fixed prompts, the export.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.core.budget import StepBudget
from training.core.checkpoint import export_dir, load_checkpoint, resolve_resume, save_checkpoint
from training.core.config import load_config, split_cli
from training.core.distributed import barrier, cleanup, init_distributed
from training.core.ema import EMA, full_weights
from training.core.export import describe_base, export_model, resolve_init_from, tokenizer_folder
from training.core.metrics import MetricWindow, measured_matmul_flops
from training.core.optim import build_optimizer, set_total_steps
from training.diffusion.ar_objective import NextToken, ar_micro_step
from training.diffusion.config import DiffusionRunConfig, build_model_config, flops_per_sample
from training.diffusion.data import check_same_data, class_names, open_dataset, token_loader
from training.diffusion.monitor import fixed_prompts, sample_grid, validation_loss
from training.diffusion.objective import Denoising, micro_step, step_generator
from training.tracking.access import require_access
from training.tracking.lineage import start_tracking, tower_run_id
from training.tracking.redaction import public_uri
from training.tracking.tracker import tracking_uri
from vqd.ar import VQARModel
from vqd.diffusion import TimestepSampler
from vqd.io import load_state_dict_strict
from vqd.models import MODEL_KINDS, read_model_folder
from vqd.vqvae import load_tokenizer


def gradient_norm(engine, trainable: dict) -> float | None:
    """The global gradient norm before clipping, read before the optimizer step: ZeRO 1-3 keep their own
    (after the step); at ZeRO-0 every rank holds whole gradients, averaged over ranks once accumulated."""
    if engine.zero_optimization_stage() > 0:
        return None  # engine.get_global_grad_norm() after the step
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else None


def build_engine(cfg: DiffusionRunConfig, model, info):
    """The DeepSpeed engine over what this run trains (the denoiser, null condition and class embeddings, or
    VQ-AR's network), compiled when train.compile asks, with the run's EMA and timestep sampler (None when off):
    (engine, lr scheduler, ema, sampler). `model` is on info.device."""
    import deepspeed

    autoregressive = isinstance(model, VQARModel)
    trained = (NextToken if autoregressive else Denoising)(model, train_text=cfg.model.train_text)
    opt, sched = build_optimizer(trained, cfg.optim, cfg.train.steps, info.device)
    engine, _, _, _ = deepspeed.initialize(model=trained, optimizer=opt, lr_scheduler=sched, config=cfg.deepspeed)
    if cfg.train.compile:
        engine.compile()
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    ema = EMA(trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
    sampler = TimestepSampler(model.config.num_timesteps) if cfg.diffusion.importance_sampling and not autoregressive \
        else None
    return engine, sched, ema, sampler


def optimizer_step(engine, model, data, cfg: DiffusionRunConfig, info, step: int, sampler=None, ema=None,
                   window: MetricWindow | None = None, want_grad_norm: bool = False) -> float | None:
    """One optimizer step: train.grad_accum micro-batches from the iterator `data` (forward, backward, the engine's
    step), the EMA, and every rank's (t, L_t) folded into the timestep sampler. Each micro-batch's values go to
    `window`. Returns the gradient norm before clipping when asked and the engine keeps none itself (ZeRO-0)."""
    vlbs, ts, grad_norm = [], [], None
    for micro in range(cfg.train.grad_accum):
        batch = next(data)
        if isinstance(model, VQARModel):
            loss, vlb, t, metrics = ar_micro_step(engine, model, batch, info.device)
        else:
            g = step_generator(cfg.train.seed, info.rank, step, micro, info.device)
            loss, vlb, t, metrics = micro_step(engine, model, sampler, batch, cfg.data.drop_text,
                                               cfg.diffusion.aux_weight, cfg.diffusion.adaptive_aux, g, info.device)
        engine.backward(loss)
        if want_grad_norm and micro == cfg.train.grad_accum - 1:
            grad_norm = gradient_norm(engine, {n: p for n, p in engine.module.named_parameters() if p.requires_grad})
        engine.step()
        vlbs.append(vlb)
        ts.append(t)
        if window is not None:
            window.add(batch["vq"].shape[0], loss=loss.detach(), epoch=batch["epoch"], **metrics)
    if ema is not None:
        ema.update()
    if sampler is not None:  # every rank folds in every rank's (t, L_t): all draw from the same p(t)
        sums, counts = sampler.batch_statistics(torch.cat(ts), torch.cat(vlbs))
        if info.world_size > 1:
            sums, counts = sums.to(info.device), counts.to(info.device)
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        sampler.update(sums, counts)
    return grad_norm


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = split_cli(argv)
    cfg: DiffusionRunConfig = load_config(DiffusionRunConfig, config_path, overrides)
    manifest = open_dataset(cfg.data)  # a missing or broken data set fails here, before any rank works
    run_dir = Path(cfg.train.run_dir)
    info = init_distributed()
    require_access(cfg.tracking, info)  # wrong or missing tracking credentials end the run here, in one line
    check_same_data(manifest, info.rank, info.world_size)  # names the node whose data differs, before any work
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (DeepSpeed broadcasts them too)

    # ---- the model: from scratch, or from a base model folder (fine-tuning, VQ-Diffusion-F) ----
    base_dir, base_run, base_config, base_tensors = None, "", None, None
    if cfg.train.init_from:
        if info.is_main:  # rank 0 fetches an MLflow run's export once; the others then find it in run_dir
            resolve_init_from(cfg.train.init_from, tracking_uri(cfg.tracking), run_dir)
        barrier()
        base_dir, base_run = resolve_init_from(cfg.train.init_from, tracking_uri(cfg.tracking), run_dir)
        base_config, base_tensors = read_model_folder(base_dir)  # a released model folder is converted here
    classes = tuple(base_config.get("classes", ())) if base_config else ()
    if cfg.model.condition == "class" and not classes:
        classes = class_names(manifest, cfg.data.split, cfg.data.label_key)
    model_cfg = build_model_config(cfg, manifest, classes, base_config)
    tokenizer = tokenizer_folder(manifest)
    model = MODEL_KINDS[model_cfg.KIND](model_cfg, load_text_weights=base_tensors is None)
    if base_tensors is not None:
        load_state_dict_strict(model, base_tensors, where=f"train.init_from {str(base_dir)!r}")
    elif cfg.model.init_from_codebook:
        if tokenizer is None or isinstance(model, VQARModel):
            raise ValueError("model.init_from_codebook: a VQ-Diffusion model and the data set's tokenizer on this "
                             "machine are needed")
        model.init_code_embeddings(load_tokenizer(tokenizer).code_vectors(), seed=cfg.train.seed)
    model.to(info.device)

    engine, sched, ema, sampler = build_engine(cfg, model, info)
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}

    step, batches = 0, 0
    budget = StepBudget(cfg.train.max_minutes, cfg.train.steps, step, every=cfg.train.log_every)
    resume_from = resolve_resume(cfg.train.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, info.rank)
        step, batches = int(state["step"]), int(state["batches"])
        budget = StepBudget.resumed(cfg.train.max_minutes, cfg.train.steps, state, every=cfg.train.log_every)
        if ema is not None:
            ema.load(resume_from, info.rank)
        if sampler is not None:
            sampler.load_state_dict(torch.load(resume_from / "timestep_sampler.pt", weights_only=True))

    # a fine-tune descends from its base; a base model on an aligned text tower from the run that aligned it
    tower_run = "" if base_tensors is not None else tower_run_id(model_cfg.text.pretrained)
    tracker = start_tracking(cfg, run_dir, info, model_cfg, base_run or tower_run, program="train",
                             base_model=describe_base(base_dir) if base_dir is not None else "")
    prompts = fixed_prompts(cfg, manifest, model_cfg)
    exported_at = -1

    def log(metrics: dict[str, float], step: int) -> None:
        """To MLflow, and to run_dir/metrics.jsonl whatever the tracking store does (rank 0)."""
        tracker.log_metrics(metrics, step)
        if info.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def export(step: int) -> None:
        """The EMA (or live) weights as run_dir/export, self-sufficient (collective under ZeRO-3)."""
        nonlocal exported_at
        weights = ema.full_state() if ema is not None else full_weights(trainable)
        if info.is_main:
            provenance = {"mlflow_run_id": tracker.run_id, "tracking_uri": public_uri(tracker.uri) if tracker.run_id else None,
                          "experiment": cfg.tracking.experiment, "step": step, "run_dir": str(run_dir.resolve()),
                          "data": {"folders": manifest["sources"], "recipe": manifest["recipe"].get("name"),
                                   "tokenizer_sha256": manifest["tokenizer"]["sha256"]},
                          "base_run_id": base_run or None,
                          "base_model": describe_base(base_dir) if base_dir is not None else None, "weights": "ema" if ema is not None else "live"}
            export_model(model, weights, export_dir(run_dir), tokenizer, provenance,
                         cfg.sample.settings(None if isinstance(model, VQARModel) else model_cfg.num_timesteps),
                         {"how": f"the `sample` section of the training config {config_path}, not measured"})
        exported_at = step
        barrier()

    def save(step: int) -> None:
        """A resume checkpoint on every rank, then the export that goes with it."""
        def extra(folder: Path) -> None:
            if ema is not None:
                ema.save(folder, info.rank)
            if sampler is not None and info.is_main:
                torch.save(sampler.state_dict(), folder / "timestep_sampler.pt")

        save_checkpoint(engine, run_dir, step, info.rank, cfg, {"batches": batches, **budget.state()},
                        cfg.train.keep_checkpoints, extra)
        export(step)

    # ---- the loop ----
    loader = token_loader(manifest, cfg.data, cfg.train.micro_batch_size, cfg.train.seed, info.rank, info.world_size,
                          skip_batches=batches, num_workers=cfg.train.num_workers, classes=model_cfg.classes,
                          context_length=model_cfg.text.context_length)
    if cfg.data.balance and info.is_main:
        print(f"data: balanced over .json {cfg.data.balance_key!r} (data.balance {cfg.data.balance}): an epoch reads "
              f"~{loader.dataset.epoch_samples():.0f} of {manifest['splits'][cfg.data.split]['samples']} samples")
    data = iter(loader)
    flops = flops_per_sample(model_cfg, cfg.model.train_text)
    peak = measured_matmul_flops(info.device, next(iter(trainable.values())).dtype)
    window = MetricWindow()
    set_total_steps(sched, budget.planned)
    bar = tqdm(total=budget.planned, initial=step, disable=not info.is_main, desc="train", dynamic_ncols=True)
    engine.train()
    grad_norm = None
    while step < budget.planned:
        started = time.perf_counter()
        grad_norm = optimizer_step(engine, model, data, cfg, info, step, sampler, ema, window,
                                   want_grad_norm=(step + 1) % cfg.train.log_every == 0)
        batches += cfg.train.grad_accum
        step += 1
        window.add(0, time.perf_counter() - started)
        if budget.update(step, info.device, info.world_size) != bar.total:  # the time budget moved the end
            set_total_steps(sched, budget.planned)
            bar.total = budget.planned
        bar.update(1)
        last = step == budget.planned
        if step % cfg.train.log_every == 0 or last:
            means = window.flush(info.device)
            means["lr"] = sched.get_last_lr()[0]
            means["tokens_per_s"] = means["samples_per_s"] * model_cfg.grid[0] * model_cfg.grid[1]
            means["mfu"] = means["samples_per_s"] * flops / (peak * info.world_size)
            if budget.enabled:
                means["planned_steps"] = float(budget.planned)
            grad_norm = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
            if grad_norm is not None:
                means["grad_norm"] = float(grad_norm)
            grad_norm = None
            log(means, step)
            bar.set_postfix(loss=f"{means['loss']:.3f}", sps=f"{means['samples_per_s']:.0f}", mfu=f"{means['mfu']:.2f}")
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or last) and cfg.data.eval_split:
            log(validation_loss(engine, model, manifest, cfg, info), step)
        if step % cfg.train.save_every == 0 or last:
            save(step)
        if cfg.train.image_every and (step % cfg.train.image_every == 0 or last):
            if exported_at != step:
                export(step)
            grid = sample_grid(export_dir(run_dir), cfg, prompts, info)
            if grid is not None:
                tracker.log_image(grid, f"samples/step_{step:08d}.png")
            barrier()
    bar.close()
    del data  # stops the loader's workers now, not at interpreter exit (~1 s later a rank)

    barrier()  # no collective follows: the other ranks may leave while rank 0 uploads the export
    if info.is_main:
        tracker.log_artifacts(export_dir(run_dir), "export")
        tracker.set_tags({"export": str(export_dir(run_dir).resolve())})
        ended = f" of {cfg.train.steps} (time budget {cfg.train.max_minutes:g} min)" if step < cfg.train.steps else ""
        print(f"done: {step} steps{ended}, export: {export_dir(run_dir)}", flush=True)
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main()
