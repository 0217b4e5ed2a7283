"""The encode stage on a GPU: images/s, peak host and GPU memory by download shard size, and how far its ids
are from a CPU encoding, for each encode.gpu_precision.

    python benchmarks/encode_gpu.py                      # 1,000- and 10,000-sample shards of 256 px JPEGs
    python benchmarks/encode_gpu.py --sizes 1000 --agree 32
    python benchmarks/encode_gpu.py --device cpu --sizes 2 --agree 2     # the same code on the CPU (the suite's)

The paper-size tokenizer architecture (configs/vqvae_f8_8192.yaml: f8, 32 x 32 ids, 8,192 codes) with random
weights; the encode stage's actor class (ShardEncoder) runs in a fresh process per shard and precision, so
Ray need not be installed. Prints a table and writes JSON to --out (default benchmarks/results/encode_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from gpu_check_common import child_env, host_cpu

from data_pipeline.encode import ShardEncoder
from vqd.images import load_image
from vqd.shards import iter_samples, read_tar
from vqd.vqvae import VQVAE, VQVAEConfig, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_tokenizer(folder: Path) -> None:
    import torch

    torch.manual_seed(0)
    VQVAE(VQVAEConfig.from_dict(yaml.safe_load((REPO / "configs" / "vqvae_f8_8192.yaml").read_text())["model"])).save(folder)


def encode_child(tokenizer: str, tar: str, out: str, precision: str, batch_size: int, device: str) -> None:
    """In a fresh process: one shard through ShardEncoder on `device`; prints one JSON line."""
    import importlib.util
    import types

    import torch

    if importlib.util.find_spec("ray") is None:  # a GPU box without Ray: the actor class needs only this of it
        sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: False)

    from pipeline import peak_rss_mb

    enc = ShardEncoder(tokenizer, out, batch_size, gpu_precision=precision)
    if enc.device != device:
        raise SystemExit(f"error: the encoder runs on {enc.device}, not {device}: with no CUDA device, use --device cpu")
    start = time.time()
    info = enc.encode_tar(Path(tar))
    gpu = device == "cuda"
    if gpu:
        torch.cuda.synchronize()
    n = sum(info["samples"].values())
    print(json.dumps({"samples": n, "images_per_s": n / (time.time() - start), "peak_host_rss_mb": peak_rss_mb(),
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
                      "failed": info["failed"]}))


def agreement(tokenizer: Path, tar: Path, part: Path, n: int) -> float:
    """Fraction of the ids in `part` (the stage's GPU encoding) equal to a CPU fp32 encoding of the same n images."""
    import numpy as np
    import torch

    images = {}
    for r in read_tar(tar):
        images[json.loads(r["json"])["uid"]] = load_image(r["jpg"], 256)
        if len(images) == n:
            break
    stage = {int(s["key"], 16): s["vq"] for s in iter_samples(part) if int(s["key"], 16) in images}
    uids = sorted(stage)
    with torch.no_grad():
        ref = load_tokenizer(tokenizer).encode(torch.stack([images[u] for u in uids])).numpy()
    return float((np.stack([stage[u].astype(np.int64) for u in uids]) == ref).mean())


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return encode_child(*sys.argv[2:6], int(sys.argv[6]), sys.argv[7])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="download shard sizes")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same code, for the suite")
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="encode.gpu_precision values (default: fp32 and bf16 on cuda, fp32 on cpu)")
    p.add_argument("--agree", type=int, default=64, help="images compared with a CPU fp32 encoding")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "encode_gpu.json"))
    args = p.parse_args()
    if args.device == "cpu" and "bf16" in (args.precisions or []):
        p.error("--precisions bf16 applies to a GPU (the encode stage runs fp32 on a CPU)")
    args.precisions = args.precisions or (["fp32", "bf16"] if args.device == "cuda" else ["fp32"])
    import torch
    from pipeline import download_tar

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tokenizer(tmp / "tokenizer")
        tars = [download_tar(tmp / "download", shard, n) for shard, n in enumerate(args.sizes)]
        for precision in args.precisions:
            for tar, n in zip(tars, args.sizes):
                out = tmp / f"encode-{precision}-{n}"
                cmd = [sys.executable, __file__, "--child", str(tmp / "tokenizer"), str(tar), str(out), precision,
                       str(args.batch_size), args.device]
                child = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.device))
                if child.returncode:
                    raise RuntimeError(child.stderr[-3000:])
                r = {"precision": precision, **json.loads(child.stdout.strip().splitlines()[-1])}
                if tar == tars[0]:
                    r["ids_equal_to_cpu_fp32"] = agreement(tmp / "tokenizer", tar, out / f"{tar.stem}.train.tar", args.agree)
                runs.append(r)
                print(r, flush=True)
    cpu = host_cpu()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\nencode stage on {device} (host CPU {cpu}), 256 px, paper-size tokenizer (random weights), "
          f"batch {args.batch_size}")
    print(f"{'precision':>9}  {'samples':>7}  {'images/s':>8}  {'host peak RSS':>13}  {'GPU peak':>8}  {'ids = CPU fp32':>14}")
    for r in runs:
        agree = f"{100 * r['ids_equal_to_cpu_fp32']:.3f}%" if "ids_equal_to_cpu_fp32" in r else ""
        print(f"{r['precision']:>9}  {r['samples']:>7,}  {r['images_per_s']:>8.1f}  {r['peak_host_rss_mb']:>10.0f} MB  "
              f"{'-' if r['peak_gpu_mb'] is None else format(r['peak_gpu_mb'] / 1024, '.1f'):>5} GB  {agree:>14}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "cpu": cpu, "batch_size": args.batch_size, "runs": runs},
                                         indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
