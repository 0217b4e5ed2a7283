"""AdamW and its learning-rate schedule, shared by every training program.

The schedule is a multiplier of `optim.lr`: linear warm-up over `warmup_steps` optimizer steps, then
constant, cosine or linear decay to `min_lr_ratio * lr` at the end of the run (the paper: 4.5e-4 after
5,000 warm-up steps). It is a pure function of the step, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from training.config import OptimConfig

def lr_multiplier(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """step -> factor of optim.lr: warm-up, then the decay `optim.schedule` names."""
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape

    return factor


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: weights of Linear/Conv layers decay; biases, norms,
    embeddings and free parameters (e.g. the learned null text) do not (minGPT's rule, as the released code)."""
    decay, no_decay = [], []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            linear = isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and name == "weight"
            (decay if linear else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(module: torch.nn.Module, optim: OptimConfig, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters of `module` (fused on CUDA) and its LambdaLR schedule."""
    opt = torch.optim.AdamW(param_groups(module, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                            fused=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(optim, total_steps))
