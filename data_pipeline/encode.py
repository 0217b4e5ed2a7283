"""Stage 4, encode: downloaded images -> VQ token ids, captions -> 77 CLIP ids, on a Ray Data actor pool.

One actor holds one tokenizer; each task encodes one finished download tar into <out>/encode/<shard>.npz
(uid, vq, clip, caption, meta, split; rows sorted by uid), written atomically, so a rerun encodes only
the tars that have no part yet. A part made by a different tokenizer is discarded (encode/_tokenizer.json).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.common import atomic_write_json
from data_pipeline.download import done_shards
from data_pipeline.recipe import TRAIN_VQVAE_HINT, Recipe

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
META_KEEP = ("uid", "split", "source_url", "original_width", "original_height", "sha256",
             "width", "height", "similarity", "punsafe", "pwatermark", "nsfw", "language",
             "captions", "category", "subcategory")


def tokenizer_info(folder: Path) -> dict:
    """What the manifest records about the tokenizer: folder, sha256 of its weights, codebook and grid."""
    from vqd.io import WEIGHTS_NAME, file_sha256
    from vqd.vqvae import load_tokenizer

    if not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"tokenizer folder {str(folder)!r} does not exist or has no {WEIGHTS_NAME}: train one with "
            f"`{TRAIN_VQVAE_HINT}` (its export/ folder), then set the recipe's `tokenizer:` or pass --tokenizer PATH"
        )
    model = load_tokenizer(folder)
    return {"folder": str(folder), "sha256": file_sha256(folder / WEIGHTS_NAME), "num_codes": int(model.num_codes),
            "grid": [int(g) for g in model.grid], "image_size": int(model.image_size)}


def read_tar_samples(path: Path) -> list[dict]:
    """Samples of an img2dataset tar: {'key', 'image' bytes, 'txt', 'json'}; incomplete samples dropped."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile() or "." not in m.name:
                continue
            key, ext = m.name.split(".", 1)
            data = tf.extractfile(m).read()
            s = samples.setdefault(key, {"key": key})
            if ext in IMAGE_EXTS:
                s["image"] = data
            elif ext == "txt":
                s["txt"] = data.decode("utf-8")
            elif ext == "json":
                s["json"] = json.loads(data)
    return [s for s in samples.values() if {"image", "txt", "json"} <= s.keys()]


def to_tensor(data: bytes, size: int):
    """Image bytes -> float [3, size, size] in [-1, 1] (centre crop to a square, then resize if needed)."""
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w != h:
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def text_ids(captions: list[str]):
    """CLIP BPE ids [B, 77] (vqd.text.tokenize: open_clip's vocabulary, offline)."""
    from vqd.text import tokenize

    return tokenize(captions)


class ShardEncoder:
    """A Ray Data actor: loads the tokenizer once, encodes whole download tars."""

    def __init__(self, tokenizer: str, out_folder: str, batch_size: int, threads: int = 1):
        import torch

        from vqd.vqvae import load_tokenizer

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_tokenizer(tokenizer, device=self.device)
        self.out = Path(out_folder)
        self.batch_size = batch_size

    def encode_tar(self, path: Path) -> dict:
        """One tar -> one .npz part; returns {'shard', 'encoded', 'failed'}."""
        import torch

        samples = sorted(read_tar_samples(path), key=lambda s: s["json"]["uid"])
        rows, failed = [], 0
        for s in samples:
            try:
                rows.append((s, to_tensor(s["image"], self.model.image_size)))
            except Exception:  # noqa: BLE001 - an image that decoded at download but not here is counted
                failed += 1
        n_tokens = self.model.grid[0] * self.model.grid[1]
        vq = np.zeros((len(rows), n_tokens), np.uint16)
        clip = np.zeros((len(rows), 77), np.int32)
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            images = torch.stack([t for _, t in chunk]).to(self.device)
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
                vq[i:i + len(chunk)] = self.model.encode(images).cpu().numpy().astype(np.uint16)
            clip[i:i + len(chunk)] = text_ids([s["txt"] for s, _ in chunk]).numpy().astype(np.int32)
        meta = [json.dumps({k: s["json"][k] for k in META_KEEP if s["json"].get(k) is not None}, sort_keys=True)
                for s, _ in rows]
        part = self.out / f"{path.stem}.npz"
        tmp = part.with_name(part.stem + ".tmp.npz")
        with open(tmp, "wb") as f:
            np.savez(f, uid=np.array([s["json"]["uid"] for s, _ in rows], np.int64), vq=vq, clip=clip,
                     caption=np.array([s["txt"] for s, _ in rows], dtype=str), meta=np.array(meta, dtype=str),
                     split=np.array([s["json"].get("split", "train") for s, _ in rows], dtype=str),
                     failed=np.array(failed, np.int64))
        os.replace(tmp, part)
        return {"shard": path.name, "encoded": len(rows), "failed": failed}

    def __call__(self, batch: dict) -> dict:
        results = [self.encode_tar(Path(p)) for p in batch["shard"]]
        return {k: [r[k] for r in results] for k in ("shard", "encoded", "failed")}


def run_encode(recipe: Recipe, out: Path, tokenizer: Path) -> dict:
    """Stage 4a: encode every finished download tar that has no part yet."""
    import ray
    from tqdm import tqdm

    info = tokenizer_info(tokenizer)
    folder = out / "encode"
    stamp = folder / "_tokenizer.json"
    if folder.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text())["sha256"] != info["sha256"]):
        shutil.rmtree(folder)  # parts from another tokenizer would mix codebooks
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, info)
    tars = [out / "download" / f"{p.stem}.tar" for p in done_shards(out / "download")]
    todo = [str(t) for t in tars if not (folder / f"{t.stem}.npz").is_file()]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = max(1, min(recipe.encode.actors or (gpus or cpus), len(todo) or 1))
    bar = tqdm(total=len(tars), initial=len(tars) - len(todo), desc="encode", unit="tar")
    if todo:
        ds = ray.data.from_items([{"shard": t} for t in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if gpus else 0,
            fn_constructor_kwargs={"tokenizer": str(tokenizer), "out_folder": str(folder), "batch_size": recipe.encode.batch_size},
        )
        encoded, failed, start = 0, 0, time.time()
        for row in ds.iter_rows():
            encoded, failed = encoded + row["encoded"], failed + row["failed"]
            bar.update(1)
            bar.set_postfix(images=encoded, failed=failed, img_s=f"{encoded / (time.time() - start):.0f}")
    bar.close()
    return info
