"""Sampling speed: VQ-Diffusion at several step counts against VQ-AR of the same network, and a peer.

    python benchmarks/sampling.py                                    # CPU default: tiny size, 16x16 grid
    python benchmarks/sampling.py --size VQD-B --grid 32 --device cuda --dtype bf16   # the paper's setting

Rows: images/s at one batch size for VQ-Diffusion at 100/50/25/10 steps (our sampler, exact strided
posterior), VQ-AR of the same parameter count (vqd/network.py AR_SIZE_OF: the paper's Table 3 compares
equal sizes) without a cache (whole prefix recomputed per token) and with a KV cache, and diffusers'
VQ-Diffusion (Transformer2DModel for discrete inputs + VQDiffusionScheduler, randomly initialised at the
same depth/width) over the same number of network evaluations. A second table splits one reverse step
into the network and the posterior maths. Weights are random, the text tower's too: speed does not
depend on them, so the paper sizes run without CLIP weights on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from vqd.ar import VQARConfig, VQARModel
from vqd.diffusion import sample_categorical
from vqd.models import VQDiffusionConfig, VQDiffusionModel, count_parameters
from vqd.network import AR_SIZE_OF
from vqd.sampling import SamplingConfig, guided_log_p_x0, sample_tokens, truncate


def timed(fn, device: str) -> float:
    """Wall seconds of fn(), synchronising the device on both ends."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build_models(args):
    """Our VQ-Diffusion model and the VQ-AR of its parameter count, random weights, eval mode."""
    common = dict(num_codes=args.num_codes, grid=(args.grid, args.grid))
    diffusion = VQDiffusionModel(VQDiffusionConfig(size=args.size, **common), load_text_weights=False)
    ar = VQARModel(VQARConfig(size=args.ar_size or AR_SIZE_OF.get(args.size, args.size), **common),
                   load_text_weights=False)
    return diffusion.to(args.device).eval(), ar.to(args.device).eval()


def build_diffusers_peer(model: VQDiffusionModel, args):
    """diffusers' discrete Transformer2DModel at our depth/width/heads, and its scheduler."""
    from diffusers import Transformer2DModel, VQDiffusionScheduler

    cfg = model.config
    net = Transformer2DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads, num_layers=cfg.depth,
        cross_attention_dim=cfg.text.width, num_vector_embeds=cfg.num_codes + 1, sample_size=args.grid,
        num_embeds_ada_norm=cfg.num_timesteps, norm_type="ada_norm", activation_fn="geglu-approximate",
        attention_bias=True,
    ).to(args.device).eval()
    return net, VQDiffusionScheduler(num_vec_classes=cfg.num_codes + 1, num_train_timesteps=cfg.num_timesteps)


def diffusers_sample(net, scheduler, text, steps: int, mask_id: int, n: int, generator) -> torch.Tensor:
    """diffusers' own loop: network log-probs, then scheduler.step, `steps` times."""
    sample = torch.full((text.shape[0], n), mask_id, dtype=torch.long, device=text.device)
    scheduler.set_timesteps(steps, device=text.device)
    for t in scheduler.timesteps:
        log_p_x0 = net(sample, encoder_hidden_states=text, timestep=t).sample
        sample = scheduler.step(log_p_x0, t, sample, generator=generator).prev_sample
    return sample


def step_breakdown(model: VQDiffusionModel, text, args) -> dict[str, float]:
    """Seconds of one reverse step at mid-chain: network, truncation, posterior + draw."""
    B, N = text.shape[0], args.grid * args.grid
    g = torch.Generator(device=args.device).manual_seed(0)
    x_t = torch.randint(0, model.num_codes + 1, (B, N), generator=g, device=args.device)
    t = torch.full((B,), model.diffusion.num_timesteps // 2, device=args.device)
    log_p = guided_log_p_x0(model, x_t, t, text, None, 1.0)
    # A trained model is confident; random weights are not. Time truncation on a peaked stand-in too.
    peaked = (log_p * 40).log_softmax(dim=1)
    reps = args.breakdown_repeats

    def per_call(fn) -> float:
        fn()  # warm-up

        def repeat() -> None:
            for _ in range(reps):
                fn()

        return timed(repeat, args.device) / reps

    return {
        "network_s": per_call(lambda: guided_log_p_x0(model, x_t, t, text, None, 1.0)),
        "truncation_random_weights_s": per_call(lambda: truncate(log_p, 0.86)),
        "truncation_peaked_s": per_call(lambda: truncate(peaked, 0.86)),
        "posterior_and_draw_s": per_call(lambda: sample_categorical(model.diffusion.log_posterior(log_p, x_t, t, t - 1), g)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--ar-size", default=None, help="VQ-AR size (default: the one of --size's parameter count)")
    parser.add_argument("--grid", type=int, default=16, help="token grid side (32 in the paper)")
    parser.add_argument("--num-codes", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 50, 25, 10])
    parser.add_argument("--truncation", type=float, default=1.0,
                        help="r for our sampler (1.0 = off, as in the diffusers peer; its cost is in the step table)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip", nargs="*", default=[], choices=["ar-nocache", "ar-cache", "diffusers"])
    parser.add_argument("--rounds", type=int, default=1, help="time every row this many times, round-robin; keep medians")
    parser.add_argument("--breakdown-repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, ar = build_models(args)
    N = args.grid * args.grid
    text = torch.nn.functional.normalize(torch.randn(args.batch, 77, model.text_dim, device=args.device), dim=-1)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    plan: list[tuple[str, int, object]] = []  # (row name, network evaluations, the timed call)

    g = lambda: torch.Generator(device=args.device).manual_seed(0)  # noqa: E731
    with autocast:  # warm-up: allocator, kernels, lazy init
        sample_tokens(model, text, SamplingConfig(steps=2), generator=g())
    n_diffusion, n_ar = count_parameters(model.denoiser), count_parameters(ar.transformer)
    print(f"batch {args.batch}, grid {args.grid}x{args.grid}, K={args.num_codes}, {args.device} {args.dtype}, "
          f"truncation r={args.truncation}, {args.rounds} round(s)\nparameters: VQ-Diffusion {args.size} "
          f"{n_diffusion / 1e6:.2f}M, VQ-AR {ar.config.size} {n_ar / 1e6:.2f}M ({n_ar / n_diffusion - 1:+.1%})")
    for steps in args.steps:
        cfg = SamplingConfig(steps=steps, truncation=args.truncation)
        plan.append((f"VQ-Diffusion ({steps} steps)", steps, lambda cfg=cfg: sample_tokens(model, text, cfg, generator=g())))
    if "ar-nocache" not in args.skip:
        plan.append(("VQ-AR, no cache (prefix recomputed)", N, lambda: ar.generate(text, g(), use_cache=False)))
    if "ar-cache" not in args.skip:
        plan.append(("VQ-AR, KV cache", N, lambda: ar.generate(text, g(), use_cache=True)))
    peer_params = None
    if "diffusers" not in args.skip:
        net, scheduler = build_diffusers_peer(model, args)
        peer_params = count_parameters(net)
        print(f"parameters: diffusers peer {peer_params / 1e6:.2f}M")
        with autocast:  # its warm-up
            diffusers_sample(net, scheduler, text, 2, model.num_codes, N, g())
        for steps in args.steps:
            plan.append((f"diffusers VQ-Diffusion ({steps})", steps,
                         lambda steps=steps: diffusers_sample(net, scheduler, text, steps, model.num_codes, N, g())))
    # Rows are timed round-robin, `rounds` times, and each keeps its median: on a shared machine the load
    # drifts, and interleaving spreads the drift over every row instead of favouring the ones timed early.
    times: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    for r in range(args.rounds):
        for name, evals, fn in plan:
            with autocast:
                times[name].append(timed(fn, args.device))
            print(f"  round {r + 1}: {name:<36} {evals:>6} evals  {times[name][-1]:8.2f} s", flush=True)
    rows = []
    for name, evals, _ in plan:
        seconds = statistics.median(times[name])
        rows.append({"sampler": name, "network_evals": evals, "seconds": seconds, "images_per_s": args.batch / seconds,
                     "all_seconds": times[name]})
    with autocast:
        breakdown = step_breakdown(model, text, args)

    base = {r["network_evals"]: r["images_per_s"] for r in rows if r["sampler"].startswith("VQ-Diffusion")}
    print("\n| sampler | network evals | s / batch | images/s | vs VQ-Diffusion 25 steps |\n|---|---|---|---|---|")
    for r in rows:
        ratio = r["images_per_s"] / base[25] if 25 in base else float("nan")
        print(f"| {r['sampler']} | {r['network_evals']} | {r['seconds']:.2f} | {r['images_per_s']:.2f} | {ratio:.2f}x |")
    net_s = breakdown["network_s"]
    print("\n| one reverse step (mid-chain) | ms | vs network |\n|---|---|---|")
    for name, seconds in breakdown.items():
        print(f"| {name.removesuffix('_s').replace('_', ' ')} | {seconds * 1e3:.1f} | {seconds / net_s:.2f}x |")

    result = {
        "args": vars(args), "rows": rows, "step_breakdown": breakdown,
        "parameters": {"vq_diffusion_denoiser": n_diffusion, "vq_ar_transformer": n_ar,
                       "vq_ar_size": ar.config.size, "diffusers_transformer": peer_params},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "load_average_1_5_15_min_at_end": os.getloadavg(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
