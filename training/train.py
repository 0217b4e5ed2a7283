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

  every section and key, with its type and default:  python training/train.py --help
  (a bare config name is looked up in configs/: --config base_cc.yaml)

Outputs in train.run_dir: checkpoints/step_*/ (resume: weights, optimizer, EMA, timestep-sampler
statistics, RNG, data position), export/ (the model folder: `python training/sample.py --model <run>/export`),
config.yaml (resolved), metrics.jsonl (every logged value), mlflow_run_id.txt. MLflow (rank 0): the flattened config, loss / vlb / aux / lr /
grad norm / samples/s / tokens/s / MFU, validation loss, sample grids for fixed prompts, the export.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

from training.core.checkpoint import export_dir
from training.core.cli import parse_config
from training.core.distributed import barrier
from training.core.ema import EMA, full_weights
from training.core.metrics import measured_matmul_flops
from training.core.run import Run
from training.diffusion import setup
from training.diffusion.ar_objective import NextToken
from training.diffusion.config import DiffusionRunConfig, flops_per_sample
from training.diffusion.data import check_same_data, open_dataset, token_loader
from training.diffusion.monitor import fixed_prompts, sample_grid, validation_loader, validation_loss
from training.diffusion.objective import Denoising, SamplerState, TrainStep
from vqd.ar import VQARModel
from vqd.diffusion import TimestepSampler
from vqd.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    cfg: DiffusionRunConfig = parse_config(DiffusionRunConfig, argv, __doc__)
    # a missing or broken data set fails here, before any rank works; the text tower's weights are named with it
    manifest = open_dataset(cfg.data, then=setup.text_weights_steps(cfg))
    run = Run(cfg, "train")
    check_same_data(manifest, run.info.rank, run.info.world_size)  # names the node whose data differs
    built = setup.build_model(cfg, manifest, run)
    model, autoregressive = built.model, isinstance(built.model, VQARModel)
    engine = run.build_engine((NextToken if autoregressive else Denoising)(model, train_text=cfg.model.train_text))
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    ema = EMA(trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
    sampler = None if autoregressive or not cfg.diffusion.importance_sampling else \
        TimestepSampler(model.config.num_timesteps, device=run.device)
    run.keep(ema, sampler and SamplerState(sampler))
    run.resume()
    run.start_tracking(params=setup.model_params(model.config), parent=built.parent_run,
                       tags={"condition": model.config.condition, **({"base_model": built.base_model} if built.base_dir
                                                                      else {})})

    pinned = run.device.type == "cuda"
    loader = token_loader(manifest, cfg.data, cfg.train.micro_batch_size, cfg.train.seed, run.info.rank,
                          run.info.world_size, skip_batches=run.batches, num_workers=cfg.train.num_workers,
                          classes=model.config.classes, context_length=model.config.text.context_length,
                          pin_memory=pinned)
    if cfg.data.balance and run.info.is_main:
        print(f"data: balanced over .json {cfg.data.balance_key!r} (data.balance {cfg.data.balance}): an epoch reads "
              f"~{loader.dataset.epoch_samples():.0f} of {manifest['splits'][cfg.data.split]['samples']} samples")
    step = TrainStep(run, model, iter(loader), ema, sampler)
    flops = flops_per_sample(model.config, cfg.model.train_text)
    peak = measured_matmul_flops(run.device, next(iter(trainable.values())).dtype)
    held_out = validation_loader(manifest, cfg, model, run.info, pinned) if cfg.data.eval_split else None
    prompts = fixed_prompts(cfg, manifest, model.config)

    def export(_: int) -> None:  # the EMA (or live) weights, gathered under ZeRO-3 (a collective)
        setup.export(run, built, manifest, ema.full_state() if ema is not None else full_weights(trainable))

    def validate(_: int) -> None:
        run.log(validation_loss(engine, model, held_out, run.info))

    def draw(step_done: int) -> None:
        run.export(export)
        grid = sample_grid(export_dir(run.run_dir), cfg, prompts, run.info)
        if grid is not None:
            run.tracker.log_image(grid, f"samples/step_{step_done:08d}.png")
        barrier()

    run.loop(step, on_log=lambda means: step.report(means, flops, peak), export=export,
             periodic=[(cfg.train.eval_every if held_out is not None else 0, validate), (cfg.train.image_every, draw)])
    step.data = held_out = None  # stops the loaders' workers now, not at interpreter exit (~1 s later a rank)
    run.finish()


if __name__ == "__main__":
    exit_on_user_error(main)
