"""Exponential moving average of the trained weights, in fp32, on every ZeRO stage.

ZeRO 0-2 keep every parameter whole on every rank, so each rank holds the same full EMA (and rank 0
saves it). ZeRO-3 keeps 1/world of each parameter on each rank (`param.ds_tensor`, DeepSpeed's partition:
the flattened tensor cut into equal contiguous chunks in rank order, the last one padded); the EMA then
covers only that chunk, each rank saves its own, and `full_state` all-gathers the chunks into whole
tensors (a collective: every rank calls it). The EMA follows the weights the module computes with
(bf16 under bf16 training), held in fp32.

Decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short run's EMA is not dominated
by its random initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vqd.errors import UserError


def _zero3_shard(p: torch.nn.Parameter) -> torch.Tensor | None:
    return getattr(p, "ds_tensor", None)


class EMA:
    """fp32 shadow of `named_params` (name -> trainable parameter of the engine's module)."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise UserError(f"train.ema_decay: expected a value in (0, 1), got {decay}")
        self.params, self.decay, self.warmup, self.updates = dict(named_params), decay, warmup, 0
        self.zero3 = any(_zero3_shard(p) is not None for p in self.params.values())
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}

    def _local(self, p: torch.nn.Parameter) -> torch.Tensor:
        """What this rank holds of p: the whole tensor, or its ZeRO-3 partition."""
        shard = _zero3_shard(p)
        return shard if shard is not None else p.data

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- d * shadow + (1 - d) * weights, after an optimizer step: a few fused kernels over every
        tensor on the device (no host copy, no fp32 copy of bf16 weights)."""
        d = self.current_decay()
        shadows = list(self.shadow.values())
        weights = [self._local(p) for p in self.params.values()]
        if all(w.dtype == torch.float32 for w in weights):
            torch._foreach_lerp_(shadows, weights, 1.0 - d)
        else:  # lerp wants one dtype; multiply-add promotes bf16 weights into the fp32 shadows as it goes
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, weights, alpha=1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """name -> whole fp32 tensor on the CPU (all-gathered under ZeRO-3: call on every rank)."""
        if not self.zero3:
            return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}
        world = dist.get_world_size()
        out = {}
        for name, p in self.params.items():
            shard = self.shadow[name]
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard.contiguous())
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return out

    def save(self, folder: Path, rank: int) -> None:
        """ema.safetensors (rank 0; ZeRO 0-2) or ema_rank_{rank}.safetensors (every rank; ZeRO-3)."""
        if self.zero3 or rank == 0:
            tensors = {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}
            save_file(tensors, str(folder / self._file(rank)), metadata={"updates": str(self.updates)})

    def load(self, folder: Path, rank: int) -> None:
        """Restore what `save` wrote (the same ZeRO layout and world size)."""
        path = folder / self._file(rank)
        if not path.is_file():
            raise UserError(f"checkpoint {folder} has no {path.name}: it was written without EMA, with another "
                             "ZeRO stage or another number of ranks")
        tensors = load_file(str(path))
        if set(tensors) != set(self.shadow) or any(tensors[n].shape != t.shape for n, t in self.shadow.items()):
            raise UserError(f"{path}: EMA tensors do not match this model's trainable parameters")
        for n, t in tensors.items():
            self.shadow[n].copy_(t)

        with safe_open(str(path), "pt") as f:
            self.updates = int(f.metadata().get("updates", 0))

    def _file(self, rank: int) -> str:
        return f"ema_rank_{rank}.safetensors" if self.zero3 else "ema.safetensors"


@torch.no_grad()
def full_weights(named_params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """name -> whole fp32 CPU tensor of the live weights; gathers ZeRO-3 partitions (call on every rank)."""
    zero3 = [p for p in named_params.values() if _zero3_shard(p) is not None]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named_params.items()}
    return {n: p.detach().float().cpu().clone() for n, p in named_params.items()}
