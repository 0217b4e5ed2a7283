"""Training metrics shared by the programs: a window of per-step values averaged over ranks, throughput,
and model FLOPs as a fraction of this machine's measured matmul rate (MFU).

MFU here is (model FLOPs per second) / (the rate a large square matmul reaches on this device in the
training dtype, measured once at start-up with this rank's threads). On a GPU that reference sits a little
below the datasheet peak; on a CPU it is the only honest one (the datasheet does not know how many cores
a rank really gets).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class MetricWindow:
    """Sums scalar metrics over the steps of a logging window; `flush` averages over steps and ranks.

    Values stay tensors on their device until the flush, so a GPU step never waits on `.item()`.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.seconds = 0.0

    def add(self, samples: int, seconds: float = 0.0, **values) -> None:
        """One (micro-)step's scalars (floats or 0-d tensors), the samples this rank trained on and the seconds
        it took (checkpoints, evaluations and grids happen between steps and stay out of the throughput)."""
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.samples += samples
        self.seconds += seconds

    def flush(self, device: torch.device) -> dict[str, float]:
        """Means over the window's values and all ranks, plus samples_per_s of all ranks; resets the window."""
        keys = sorted(self.sums)
        values = [torch.as_tensor(self.sums[k], dtype=torch.float64, device=device).reshape(()) for k in keys]
        totals = torch.tensor([float(self.samples), self.seconds], dtype=torch.float64, device=device)
        stacked = torch.cat([torch.stack(values), totals]) if values else totals
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked)
            world = dist.get_world_size()
        means = {k: float(v) / (self.counts[k] * world) for k, v in zip(keys, stacked[:-2].tolist())}
        means["samples_per_s"] = float(stacked[-2]) / max(float(stacked[-1]) / world, 1e-9)
        self.__init__()
        return means


def denoiser_flops_per_sample(depth: int, width: int, mlp_ratio: int, num_tokens: int, text_len: int,
                              text_dim: int, num_codes: int, local_mixing: bool = False) -> float:
    """Forward FLOPs of one image through the denoiser (2 per multiply-add; norms and softmax left out)."""
    c, n, length = width, num_tokens, text_len
    per_token = (2 * 4 * c * c  # self-attention q, k, v, out
                 + 2 * 2 * n * c  # scores and the weighted sum over n keys
                 + 2 * 2 * c * c  # cross-attention q and out
                 + 2 * 2 * length * c  # scores and the weighted sum over the text tokens
                 + 2 * 2 * mlp_ratio * c * c  # MLP
                 + (2 * 9 * mlp_ratio * c if local_mixing else 0))  # its depthwise 3 x 3 convolution
    text_kv = 2 * 2 * length * text_dim * c  # the text's keys and values, once per image
    return depth * (n * per_token + text_kv) + n * 2 * c * num_codes  # + the head


def text_tower_flops_per_sample(layers: int, width: int, mlp_ratio: int, context: int) -> float:
    """Forward FLOPs of the CLIP text tower over one caption of `context` tokens."""
    per_token = 2 * 4 * width * width + 2 * 2 * context * width + 2 * 2 * mlp_ratio * width * width
    return layers * context * per_token


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, trials: int = 5) -> float:
    """FLOP/s of a square matmul on `device` in `dtype` (size chosen per device): the best of `trials`
    short measurements, so that a moment of contention from another process does not lower the reference."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: kernels chosen, threads awake
        a @ b
    sync()
    best = 0.0
    for _ in range(trials):
        runs, start = 0, time.perf_counter()
        while True:
            a @ b
            runs += 1
            if runs % 2 == 0:
                sync()
                if time.perf_counter() - start >= seconds / trials:
                    break
        best = max(best, 2 * size ** 3 * runs / (time.perf_counter() - start))
    return best
