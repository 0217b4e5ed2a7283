"""Worker of benchmarks/gpu_check.py: sampling speed on the plan's grid and codebook (the paper's 32 x 32, K = 2,887
on a GPU), one batch a row.

    python benchmarks/gpu_check_sample.py sample --plan plan.json --rows rows.jsonl

Rows: our sampler (vqd/sampling.py, exact strided posterior, truncation off as in the peer) at 25, 50 and 100 steps,
eager and, where the plan compiles, with the denoiser compiled in torch.compile's "reduce-overhead" mode (CUDA
graphs); VQ-AR of the same parameter count (vqd/ar.py) with the prefix recomputed for every token and with a KV
cache (eager: its cache grows a position a step, shapes CUDA graphs cannot replay); diffusers' VQ-Diffusion
(Transformer2DModel + VQDiffusionScheduler) at our depth and width (benchmarks/sampling.py builds it). bf16
autocast on a GPU, fp32 on the CPU; random weights and random text features (speed does not depend on them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import contextlib
import functools
import time
from types import SimpleNamespace

import torch
from gpu_check_common import Plan, Rows, sync, worker_args
from sampling import build_diffusers_peer, diffusers_sample

from vqd.ar import VQARConfig, VQARModel
from vqd.models import VQDiffusionConfig, VQDiffusionModel, count_parameters
from vqd.sampling import SamplingConfig, sample_tokens


class Samplers:
    """The models of the rows, each built when a row first needs it (a restarted worker builds only what is left)."""

    def __init__(self, plan: Plan):
        self.plan, self.device = plan, torch.device(plan.device)
        self.common = dict(num_codes=plan.num_codes, grid=(plan.grid, plan.grid))

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def build(self) -> VQDiffusionModel:
        torch.manual_seed(0)
        model = VQDiffusionModel(VQDiffusionConfig(size=self.plan.sizes[0], **self.common), load_text_weights=False)
        return model.to(self.device).eval()

    @functools.cached_property
    def diffusion(self) -> VQDiffusionModel:
        return self.build()

    @functools.cached_property
    def text(self) -> torch.Tensor:
        """Random unit-norm text features [B, L, D], what the frozen tower would hand the denoiser."""
        g = torch.Generator().manual_seed(0)
        shape = (self.plan.sample_batch, self.diffusion.config.condition_length, self.diffusion.text_dim)
        return torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1).to(self.device)

    @functools.cached_property
    def compiled(self) -> VQDiffusionModel:
        """The same model (the same seed), its denoiser compiled (CUDA graphs on a GPU), warmed up."""
        model = self.build()
        model.denoiser = torch.compile(model.denoiser, mode="reduce-overhead" if self.device.type == "cuda" else None)
        self.diffuse(model, 2)  # compilation and graph capture, outside the timed rows
        return model

    @functools.cached_property
    def ar(self) -> VQARModel:
        torch.manual_seed(0)
        return VQARModel(VQARConfig(size=self.plan.ar_size, **self.common), load_text_weights=False).to(self.device).eval()

    @functools.cached_property
    def peer(self):
        net, scheduler = build_diffusers_peer(self.diffusion, SimpleNamespace(device=self.device, grid=self.plan.grid))
        with self.autocast():
            diffusers_sample(net, scheduler, self.text, 2, self.diffusion.num_codes, self.plan.grid ** 2,
                             self.generator())  # its warm-up
        return net, scheduler

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(0)

    @torch.no_grad()
    def diffuse(self, model: VQDiffusionModel, steps: int) -> torch.Tensor:
        with self.autocast():
            return sample_tokens(model, self.text, SamplingConfig(steps=steps, truncation=1.0), generator=self.generator())

    def timed(self, run, evals: int, parameters: int) -> dict:
        """One batch through run(): seconds and images/s."""
        sync(self.device)
        start = time.perf_counter()
        with torch.no_grad(), self.autocast():
            run()
        sync(self.device)
        seconds = time.perf_counter() - start
        return {"network_evals": evals, "seconds": seconds, "images_per_s": self.plan.sample_batch / seconds,
                "parameters": parameters}

    def ours(self, steps: int, compiled: bool) -> dict:
        model = self.compiled if compiled else self.diffusion
        if not compiled:
            self.diffuse(model, 2)  # kernels chosen, allocator warm: outside the timing
        return self.timed(lambda: self.diffuse(model, steps), steps, count_parameters(self.diffusion.denoiser))

    def autoregressive(self, use_cache: bool) -> dict:
        ar, text = self.ar, self.text
        return self.timed(lambda: ar.generate(text, self.generator(), use_cache=use_cache), self.plan.grid ** 2,
                          count_parameters(ar.transformer))

    def diffusers(self, steps: int) -> dict:
        net, scheduler = self.peer
        return self.timed(lambda: diffusers_sample(net, scheduler, self.text, steps, self.diffusion.num_codes,
                                                   self.plan.grid ** 2, self.generator()), steps, count_parameters(net))


def main() -> None:
    _, plan, rows_path = worker_args(__doc__, ["sample"])
    rows = Rows(rows_path, "sample", plan.device)
    s = Samplers(plan)
    b, ar = plan.sizes[0], plan.ar_size
    first, *more = plan.sample_steps
    mode = "CUDA graphs" if plan.device == "cuda" else "inductor"
    # the goals' rows first (a section cut short by its time limit keeps them), diffusers' last
    items = [(f"{b}, {first} steps", {"kind": "vq-diffusion", "steps": first, "compiled": False},
              lambda: s.ours(first, False)),
             (f"{ar}, KV cache", {"kind": "vq-ar-cache"}, lambda: s.autoregressive(True)),
             (f"{ar}, prefix recomputed", {"kind": "vq-ar-nocache"}, lambda: s.autoregressive(False))]
    items += [(f"{b}, {n} steps, compiled ({mode})", {"kind": "vq-diffusion", "steps": n, "compiled": True},
               lambda n=n: s.ours(n, True)) for n in plan.sample_steps if True in plan.compile]
    items += [(f"{b}, {n} steps", {"kind": "vq-diffusion", "steps": n, "compiled": False},
               lambda n=n: s.ours(n, False)) for n in more]
    items += [(f"diffusers VQ-Diffusion at {b}'s size, {n} steps", {"kind": "diffusers", "steps": n},
               lambda n=n: s.diffusers(n)) for n in plan.sample_steps]
    rows.run(items, plan.row_limit_s, lambda: None)


if __name__ == "__main__":
    main()
