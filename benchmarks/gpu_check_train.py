"""Workers of benchmarks/gpu_check.py: the matmul peak, the training step, the largest micro-batch that fits, and
collectives across 2 ranks.

    python benchmarks/gpu_check_train.py {peak,train,collectives} --plan plan.json --rows rows.jsonl

(collectives under the deepspeed launcher, 2 ranks). The training rows run what training/train.py runs: the run
config loaded with its overrides, the model built as it builds it, the run frame's engine (training/core/run.py:
DeepSpeed, fused AdamW, torch.compile) with the EMA and timestep sampler, and the trainer's own step
(training/diffusion/objective.py TrainStep), fed by the real token loader from synthetic shards.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import gc
import time
from typing import Callable

import torch
import torch.distributed as dist
from gpu_check_common import REPO, Plan, Rows, peak_rss_gb, run_overrides, sync, worker_args

from training.core.config import load_config, resolve_precision
from training.core.distributed import init_distributed
from training.core.ema import EMA
from training.core.run import Run
from training.diffusion.ar_objective import NextToken
from training.diffusion.config import DiffusionRunConfig, build_model_config, flops_per_sample
from training.diffusion.data import open_dataset, token_loader
from training.diffusion.objective import Denoising, TrainStep
from vqd.ar import VQARModel
from vqd.diffusion import TimestepSampler
from vqd.models import MODEL_KINDS

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def is_oom(err: BaseException) -> bool:
    """An allocation the device could not make (torch's own error, or cuBLAS/cuDNN failing to get workspace)."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower() \
        or "ALLOC_FAILED" in str(err)


def free_memory(device: torch.device) -> None:
    """Return what the last engine held (its cycles collected, the allocator's cache emptied, compiled graphs dropped)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- peak


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0, windows: int = 3) -> float:
    """TFLOP/s of an n x n x n product in `dtype`: the best of `windows` timed windows after a warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    best = 0.0
    for _ in range(windows):
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds / windows:
            for _ in range(4):
                a @ b
            runs += 4
            sync(device)
        best = max(best, 2 * n ** 3 * runs / (time.perf_counter() - start))
    return best / 1e12


def peak(plan: Plan, rows: Rows, device: torch.device) -> None:
    dtype = resolve_precision(plan.precision)
    rows.run([(f"{dtype} {n}", {"dtype": dtype, "n": n}, lambda n=n: {"tflops": matmul_tflops(device, DTYPES[dtype], n)})
              for n in plan.peak_sizes], plan.row_limit_s, lambda: free_memory(device))


# ---------------------------------------------------------------------------------------------- training


class Config:
    """One training configuration as train.py builds it: config, model, engine, EMA, timestep sampler, step."""

    def __init__(self, plan: Plan, info, size: str, compile: bool, checkpointing: bool):
        overrides = run_overrides(plan, size, f"--train.compile={str(compile).lower()}",
                                  f"--model.checkpoint={str(checkpointing).lower()}")
        self.cfg = cfg = load_config(DiffusionRunConfig, REPO / plan.config, overrides)
        self.manifest = open_dataset(cfg.data)
        self.model_cfg = build_model_config(cfg, self.manifest)
        self.info = info
        self.run = Run(cfg, "gpu_check")  # the trainers' frame: the process group exists, the seed is set
        self.model = MODEL_KINDS[self.model_cfg.KIND](self.model_cfg, load_text_weights=False).to(info.device)
        autoregressive = isinstance(self.model, VQARModel)
        self.engine = self.run.build_engine((NextToken if autoregressive else Denoising)(
            self.model, train_text=cfg.model.train_text))
        trainable = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        ema = EMA(trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
        sampler = None if autoregressive or not cfg.diffusion.importance_sampling else \
            TimestepSampler(self.model_cfg.num_timesteps, device=info.device)
        self.train_step = TrainStep(self.run, self.model, None, ema, sampler)
        self.engine.train()
        self.parameters = sum(p.numel() for p in trainable.values())
        self.step = 0

    def batches(self, micro_batch: int):
        """The real loader over the synthetic shards, at `micro_batch` samples a rank."""
        cfg = self.cfg
        return iter(token_loader(self.manifest, cfg.data, micro_batch, cfg.train.seed, self.info.rank,
                                 self.info.world_size, num_workers=cfg.train.num_workers, classes=self.model_cfg.classes,
                                 context_length=self.model_cfg.text.context_length,
                                 pin_memory=self.info.device.type == "cuda"))

    def steps(self, data, n: int) -> float:
        """Seconds of n optimizer steps, the device synchronised at both ends."""
        self.train_step.data = data
        sync(self.info.device)
        start = time.perf_counter()
        for _ in range(n):
            self.train_step(self.step)
            self.step += 1
        sync(self.info.device)
        self.run.window = type(self.run.window)()  # nothing reads the window here: drop its sums
        return time.perf_counter() - start


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on the CPU the process's peak RSS (it only grows)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gb()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def step_row(plan: Plan, info, size: str, compile: bool, checkpointing: bool) -> dict:
    """tokens/s, MFU and peak memory of one configuration at the config's micro-batch."""
    reset_peak(info.device)
    run = Config(plan, info, size, compile, checkpointing)
    data = run.batches(plan.micro_batch)
    first = run.steps(data, 1)  # compilation, allocator and kernel selection: timed apart
    warm = run.steps(data, max(1, plan.warmup_steps - 1))
    n = max(2, min(plan.timed_steps, int(plan.row_seconds / max(warm / max(1, plan.warmup_steps - 1), 1e-6))))
    seconds = run.steps(data, n)
    samples_per_s = plan.micro_batch * n / seconds
    flops = flops_per_sample(run.model_cfg, run.cfg.model.train_text)
    peak_flops = plan.peak_flops or matmul_tflops(info.device, DTYPES[run.cfg.train.precision], plan.peak_sizes[-1]) * 1e12
    row = {"micro_batch": plan.micro_batch,
           "precision": run.cfg.train.precision, "zero_stage": run.engine.zero_optimization_stage(),
           "parameters_trained": run.parameters, "steps_timed": n, "step_ms": 1e3 * seconds / n,
           "first_step_s": first, "samples_per_s": samples_per_s,
           "tokens_per_s": samples_per_s * plan.grid * plan.grid, "model_tflops": samples_per_s * flops / 1e12,
           "mfu": samples_per_s * flops / peak_flops, "peak_tflops": peak_flops / 1e12,
           "peak_memory_gb": peak_memory_gb(info.device)}
    del data, run
    return row


def largest_fitting(fits: Callable[[int], bool], start: int, bound: int, tries: int) -> tuple[int, int | None, list]:
    """The largest b <= bound with fits(b), for fits monotone: doubling from `start` until a failure or the bound,
    then bisection, in at most `tries` calls. Returns (largest that fitted or 0, smallest that failed or None,
    [(b, fitted), ...] in the order tried)."""
    fit, fail, tried, b = 0, None, [], min(start, bound)
    while len(tried) < tries:
        ok = fits(b)
        tried.append((b, ok))
        fit, fail = (max(fit, b), fail) if ok else (fit, b if fail is None else min(fail, b))
        if fail is None:
            if b >= bound:
                break
            b = min(bound, 2 * b)
        else:
            nxt = (fit + fail) // 2 if fit else fail // 2
            if nxt in (fit, fail) or nxt < 1:
                break
            b = nxt
    return fit, fail, tried


def search_row(plan: Plan, info, size: str, checkpointing: bool) -> dict:
    """The largest micro-batch of `size` that trains (eager); an out-of-memory try frees the engine, the next
    builds a new one."""
    state: dict = {"run": None, "memory": {}}

    def fits(b: int) -> bool:
        reset_peak(info.device)
        try:
            state["run"] = state["run"] or Config(plan, info, size, False, checkpointing)
            state["run"].steps(state["run"].batches(b), 2)
            state["memory"][b] = peak_memory_gb(info.device)
            return True
        except Exception as err:  # noqa: BLE001 - out of memory is the answer; anything else is the row's error
            if not is_oom(err):
                raise
        state["run"] = None  # outside the handler: the traceback no longer holds the failed step's tensors
        free_memory(info.device)
        return False

    fit, fail, tried = largest_fitting(fits, plan.micro_batch, plan.search_bound, plan.search_tries)
    state["run"] = None
    return {"compile": False, "fits": fit, "fails_at": fail,
            "bound": plan.search_bound, "tries": len(tried), "tried": tried,
            "peak_memory_gb": state["memory"].get(fit)}


def train(plan: Plan, rows: Rows, info) -> None:
    """Step rows and searches, cheapest first, so that a section cut short by its time limit has the most to show:
    every eager row; the compiled rows and the searches without activation checkpointing; then with it."""
    sizes, searched = plan.sizes, plan.search_sizes or plan.sizes

    def step(size: str, c: bool, k: bool):
        return (f"{size}, compile {'on' if c else 'off'}, checkpointing {'on' if k else 'off'}",
                {"size": size, "compile": c, "checkpointing": k}, lambda: step_row(plan, info, size, c, k))

    def search(size: str, k: bool):
        return (f"largest micro-batch: {size}, checkpointing {'on' if k else 'off'}", {"size": size, "checkpointing": k},
                lambda: search_row(plan, info, size, k))

    items = [step(size, False, k) for k in plan.checkpointing for size in sizes if False in plan.compile]
    for k in plan.checkpointing:
        items += [step(size, True, k) for size in sizes if True in plan.compile] + [search(size, k) for size in searched]
    rows.run(items, plan.row_limit_s, lambda: free_memory(info.device))


# ---------------------------------------------------------------------------------------------- collectives


def collectives(plan: Plan, rows: Rows | None, info) -> None:
    """all-reduce and all-gather (and reduce-scatter on NCCL) of plan.collective_mb per rank: result checked, timed."""
    world, n = info.world_size, int(plan.collective_mb * 2**20 / 4)
    ops = ["all_reduce", "all_gather"] + (["reduce_scatter"] if info.backend == "nccl" else [])
    x = torch.full((n,), float(info.rank + 1), device=info.device)
    expected_sum = world * (world + 1) / 2

    def run(op: str) -> tuple[bool, float]:
        """(the result is right, bytes each rank moves by the usual bus-bandwidth count)."""
        if op == "all_reduce":
            y = x.clone()
            dist.all_reduce(y)
            return bool((y == expected_sum).all()), 2 * (world - 1) / world * n * 4
        if op == "all_gather":
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            return all(bool((p == i + 1).all()) for i, p in enumerate(parts)), (world - 1) * n * 4
        out = torch.empty(n // world, device=info.device)
        dist.reduce_scatter_tensor(out, x)
        return bool((out == expected_sum).all()), (world - 1) / world * n * 4

    def measure(op: str, repeats: int = 5) -> dict:
        for _ in range(2):
            run(op)
        sync(info.device)
        dist.barrier()
        start = time.perf_counter()
        results = [run(op) for _ in range(repeats)]
        sync(info.device)
        seconds = (time.perf_counter() - start) / repeats
        return {"ms": 1e3 * seconds, "bus_gb_per_s": results[0][1] / seconds / 1e9,
                "correct": all(ok for ok, _ in results)}

    fields = {"backend": info.backend, "ranks": world, "mb": plan.collective_mb}
    if rows is None:  # the other ranks run the same collectives and write nothing
        for op in ops:
            measure(op)
    else:
        rows.run([(op, fields, lambda op=op: measure(op)) for op in ops], plan.row_limit_s, lambda: None)


def main() -> None:
    section, plan, rows_path = worker_args(__doc__, ["peak", "train", "collectives"])
    if section == "peak":
        return peak(plan, Rows(rows_path, "peak", plan.device), torch.device(plan.device))
    info = init_distributed()  # as train.py: nccl on CUDA, gloo on the CPU
    rows = Rows(rows_path, section, plan.device) if info.is_main else None
    if section == "collectives":
        return collectives(plan, rows, info)
    train(plan, rows, info)


if __name__ == "__main__":
    main()
