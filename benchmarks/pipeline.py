"""Data pipeline speed on the emoji recipe: download images/s against the local HTTP server (img2dataset,
the real path), and encode images/s per core (PNG decode + VQ tokenizer + CLIP BPE, one thread).

    python benchmarks/pipeline.py                      # all ~3,950 emoji, random tokenizer of configs/vqvae_emoji.yaml
    python benchmarks/pipeline.py --limit 1000 --tokenizer runs/vqvae_emoji/export --num-cpus 2

Prints a table and writes JSON to --out (default benchmarks/results/pipeline.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def random_emoji_tokenizer(folder: Path) -> Path:
    """A randomly initialised tokenizer with the architecture of configs/vqvae_emoji.yaml (speed only)."""
    import torch
    import yaml

    from vqd.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    model_cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "vqvae_emoji.yaml").read_text())["model"]
    VQVAE(VQVAEConfig.from_dict(model_cfg)).save(folder)
    return folder


def encode_per_core(out: Path, tokenizer: Path, batch_size: int) -> dict:
    """Encode every download tar once in this process with one torch thread: images/s on one core."""
    import torch

    from data_pipeline.common import done_shards
    from data_pipeline.encode import ShardEncoder

    torch.set_num_threads(1)
    scratch = out / "bench_encode"
    scratch.mkdir(exist_ok=True)
    enc = ShardEncoder(str(tokenizer), str(scratch), batch_size, threads=1)
    tars = [out / "download" / f"{p.stem}.tar" for p in done_shards(out / "download")]
    enc.encode_tar(tars[0])  # warm-up (first-call allocations, BPE cache)
    start, n = time.perf_counter(), 0
    for t in tars:
        n += sum(enc.encode_tar(t)["samples"].values())
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s_per_core": n / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=0, help="emoji rows to use (0: all)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: random weights, emoji architecture)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    p.add_argument("--distributor", default="auto", choices=["auto", "ray", "multiprocessing"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/pipeline.json")
    args = p.parse_args()

    import ray

    from data_pipeline.build import build

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = Path(args.tokenizer) if args.tokenizer else random_emoji_tokenizer(tmp / "tokenizer")
        overrides = {"source.limit": args.limit, "download.distributor": args.distributor}
        out = tmp / "emoji"
        report = build("emoji", out=str(out), tokenizer=str(tokenizer), num_cpus=args.num_cpus,
                       stages=["metadata", "filter", "download"], overrides=overrides)
        dl = report["stages"]["download"]
        shard_stats = [json.loads(f.read_text()) for f in (out / "download").glob("*_stats.json")]
        busy = max(x["end_time"] for x in shard_stats) - min(x["start_time"] for x in shard_stats)
        steady = sum(x["successes"] for x in shard_stats) / busy  # first shard start -> last shard end
        cpus = int(ray.cluster_resources().get("CPU", 1))
        report = build("emoji", out=str(out), tokenizer=str(tokenizer), stages=["encode", "validate"], overrides=overrides)
        enc = report["stages"]["encode"]
        per_core = encode_per_core(out, tokenizer, args.batch_size)
    results = {
        "recipe": "emoji",
        "images": dl["stats"]["downloaded"],
        "download_failed": dl["stats"]["failed"],
        "download_seconds": dl["seconds"],
        "download_images_per_s": dl["stats"]["downloaded"] / dl["seconds"],
        "download_images_per_s_steady": steady,
        "encode_stage_seconds": enc["seconds"],
        "encode_stage_images_per_s": enc["stats"]["encoded"] / enc["seconds"],
        "encode_images_per_s_per_core": per_core["images_per_s_per_core"],
        "ray_cpus": cpus,
        "distributor": args.distributor,
        "tokenizer": str(args.tokenizer or "random weights, configs/vqvae_emoji.yaml architecture"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    rows = [
        ("download (img2dataset, 127.0.0.1 server, stage wall time)", f"{results['download_images_per_s']:.0f} images/s"),
        ("download (img2dataset shards running, no start-up)", f"{results['download_images_per_s_steady']:.0f} images/s"),
        ("encode stage (Ray actor pool, incl. actor start-up)", f"{results['encode_stage_images_per_s']:.0f} images/s"),
        ("encode per core (decode + VQ encode + CLIP BPE, 1 thread)", f"{results['encode_images_per_s_per_core']:.0f} images/s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nemoji recipe, {results['images']} images, Ray with {cpus} CPU(s), {os.cpu_count()} cores on the machine")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>16}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
