"""Training speed and memory: the real training step (DeepSpeed engine, frozen text tower, diffusion loss) on
synthetic tokens, across precision, ZeRO stage and world size.

    python benchmarks/train_step.py                          # CPU: configs/emoji_base.yaml's model, world 1 and 2
    python benchmarks/train_step.py --device cuda --config configs/base_cc.yaml --batch 16 --worlds 1

Per row: tokens/s and samples/s over all ranks; model FLOP/s as a fraction of this machine's measured matmul
rate in the same dtype with the same threads (MFU: 3x the denoiser's forward FLOPs plus the frozen tower's
forward, see training/core/metrics.py); the optimizer state each rank holds (Adam's two moments plus fp32 master
weights where the engine keeps them: ZeRO-1/2/3 partition it, so a rank holds ~1/world); peak RSS per rank
(CPU) or peak allocated GPU memory. bf16 rows run only where the hardware has bf16 natively. Token ids are
random: speed does not depend on them. Each configuration is a separate `deepspeed` launch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import argparse
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from gpu_check_common import host_cpu

from training.core.config import load_config, native_bf16
from training.core.distributed import init_distributed
from training.core.metrics import measured_matmul_flops
from training.core.optim import build_optimizer
from training.diffusion.config import DiffusionRunConfig, build_model_config, flops_per_sample
from training.diffusion.objective import Denoising, micro_step, step_generator, to_device
from vqd.diffusion import TimestepSampler
from vqd.models import VQDiffusionModel

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: build the run's model and engine, time `--steps` optimizer steps."""
    import torch

    overrides = [f"--train.precision={args.precision}", f"--train.micro_batch_size={args.batch}",
                 f"--deepspeed.zero_optimization.stage={args.zero}", "--train.compile=false", *args.override]
    cfg = load_config(DiffusionRunConfig, args.config, overrides)
    manifest = {"tokenizer": {"num_codes": args.num_codes, "grid": [args.grid, args.grid]}}
    model_cfg = build_model_config(cfg, manifest)
    if model_cfg.text.pretrained:  # speed does not depend on the weights: a seeded tower of the same shape
        model_cfg.text.pretrained = None
    info = init_distributed()
    torch.manual_seed(0)
    model = VQDiffusionModel(model_cfg).to(info.device)
    import deepspeed

    denoising = Denoising(model)
    opt, sched = build_optimizer(denoising, cfg.optim, 10**6, info.device)
    engine, _, _, _ = deepspeed.initialize(model=denoising, optimizer=opt, lr_scheduler=sched, config=cfg.deepspeed)
    sampler = TimestepSampler(model_cfg.num_timesteps)
    n = args.grid * args.grid
    g = torch.Generator().manual_seed(info.rank)
    context = model_cfg.text.context_length  # the config's text context (emoji_base.yaml: 32 of CLIP's 77)
    batch = {"vq": torch.randint(0, args.num_codes, (args.batch, n), generator=g),
             "clip": torch.randint(1, 49406, (args.batch, context), generator=g), "label": torch.zeros(args.batch).long()}

    def step(i: int) -> None:
        gen = step_generator(0, info.rank, i, 0, info.device)
        loss, *_ = micro_step(engine, model, sampler, to_device(batch, info.device), 0.1, 5e-4, True, gen)
        engine.backward(loss)
        engine.step()

    def sync() -> None:
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()

    for i in range(args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    seconds = time.perf_counter() - start
    dtype = next(p for p in engine.module.parameters() if p.requires_grad).dtype
    peak = measured_matmul_flops(info.device, dtype)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the AdamW inside ZeRO's wrapper
    state_bytes = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    master_bytes = sum(p.numel() * p.element_size() for group in inner.param_groups for p in group["params"])
    if info.device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(info.device)
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = torch.tensor([seconds, peak, state_bytes + master_bytes, memory], dtype=torch.float64, device=info.device)
    rows = [torch.zeros_like(row) for _ in range(info.world_size)]
    torch.distributed.all_gather(rows, row)
    if info.is_main:
        rows = torch.stack(rows).cpu()
        samples_per_s = args.batch * args.steps * info.world_size / float(rows[:, 0].max())
        flops = flops_per_sample(model_cfg)
        result = {"precision": args.precision, "zero": args.zero, "world": info.world_size, "batch_per_rank": args.batch,
                  "samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * n,
                  "model_tflops": samples_per_s * flops / 1e12,
                  "matmul_tflops_per_rank": float(rows[:, 1].mean()) / 1e12,
                  "mfu": samples_per_s * flops / float(rows[:, 1].sum()),
                  "optimizer_state_mb_per_rank": [float(b) / 2**20 for b in rows[:, 2]],
                  "peak_memory_mb_per_rank": [float(b) / 2**20 for b in rows[:, 3]],
                  "parameters_trained": sum(p.numel() for p in denoising.parameters() if p.requires_grad)}
        Path(args.result).write_text(json.dumps(result))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(args: argparse.Namespace) -> None:
    import torch


    precisions = [p for p in args.precisions if p == "fp32" or native_bf16()]
    rows, failed, threads = [], [], args.threads or max(1, (os.cpu_count() or 2))
    for precision in precisions:
        for world in args.worlds:
            for zero in args.zero:
                with tempfile.TemporaryDirectory() as tmp:
                    result = Path(tmp) / "row.json"
                    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world)), "PYTHONPATH": str(REPO)}
                    if args.device == "cpu":
                        env["CUDA_VISIBLE_DEVICES"] = ""
                    port = free_port()
                    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(port), str(Path(__file__)),
                           "--worker", "--config", args.config, "--precision", precision, "--zero", str(zero),
                           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--grid", str(args.grid), "--num-codes", str(args.num_codes), "--result", str(result),
                           *[f"--override={o}" for o in args.override]]
                    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                    if out.returncode != 0 or not result.is_file():
                        print(f"{precision} zero{zero} world{world}: failed\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
                        failed.append({"precision": precision, "zero": zero, "world": world,
                                       "error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]})
                        continue
                    rows.append(json.loads(result.read_text()))
                    r = rows[-1]
                    print(f"{precision:5s} ZeRO-{zero} world {world}: {r['tokens_per_s']:9.0f} tokens/s  "
                          f"MFU {r['mfu']:.2f}  optimizer state/rank "
                          f"{', '.join(f'{m:.1f}' for m in r['optimizer_state_mb_per_rank'])} MB", flush=True)
    device = f"{torch.cuda.get_device_name(0)}, host CPU {host_cpu()}" if args.device == "cuda" else host_cpu()
    print(f"\n{args.config}, batch {args.batch} per rank, {args.grid}x{args.grid} tokens, K = {args.num_codes}, "
          f"on {device}\n")
    print("| precision | ZeRO | ranks | tokens/s | samples/s | MFU | optimizer state / rank (MB) | peak memory / rank (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['zero']} | {r['world']} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:,.1f} | "
              f"{r['mfu']:.0%} | {' / '.join(f'{m:.1f}' for m in r['optimizer_state_mb_per_rank'])} | "
              f"{' / '.join(f'{m:,.0f}' for m in r['peak_memory_mb_per_rank'])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "config": args.config, "rows": rows, "failed": failed}, indent=1))
    print(f"\nwrote {out}")
    if failed:  # a benchmark whose rows fail must not pass for one that measured
        names = ", ".join(f"{f['precision']} ZeRO-{f['zero']} world {f['world']}" for f in failed)
        raise SystemExit(f"error: {len(failed)} of {len(failed) + len(rows)} configurations failed ({names}): "
                         "their output is above")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/emoji_base.yaml")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=64, help="per rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--num-codes", type=int, default=512)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="bf16 runs only where it is native")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--threads", type=int, default=0, help="CPU threads in all (0: every core), split over ranks")
    p.add_argument("--override", action="append", default=[], help="a config override, e.g. --override=--model.size=tiny")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/training.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.zero = args.zero if isinstance(args.zero, list) else [args.zero]
    if args.worker:
        args.zero = args.zero[0]
        worker(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
