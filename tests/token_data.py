"""A tiny token data set written straight to the shard contract (DESIGN.md): manifest.json + {split}-NNNNNN.tar
of {key}.vq.npy / .clip.npy / .txt / .json, plus the tokenizer folder the manifest names.

The task is learnable and checkable: each caption names one pattern on a 4 x 4 grid of K = 8 codes (stripes
and checkerboard share their two codes, so only the text tells them apart), with a little token noise. Each
sample's .json carries other caption forms (as a person would type them), class labels (subcategory: the
pattern; category: lines or tiles) and its concept (the caption). With `images=True` the data set also has
the download/ tar evaluation reads (training/evaluate.py): each sample's grid drawn as a 16 px PNG, one
colour per code.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from vqd.io import file_sha256
from vqd.text import tokenize
from vqd.vqvae import VQVAE, VQVAEConfig

K, GRID = 8, (4, 4)
N = GRID[0] * GRID[1]
_row, _col = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
PATTERNS = {
    "red stripes": (_row % 2).reshape(N),
    "blue checkerboard": ((_row + _col) % 2).reshape(N),
    "green border": np.where((_row == 0) | (_row == GRID[0] - 1) | (_col == 0) | (_col == GRID[1] - 1), 2, 3).reshape(N),
    "yellow diagonal": np.where(_row == _col, 4, 5).reshape(N),
}
FORMS = {caption: [caption.split()[1], f"{caption} pattern"] for caption in PATTERNS}  # "stripes", "red stripes pattern"
CATEGORY = {"stripes": "lines", "diagonal": "lines", "checkerboard": "tiles", "border": "tiles"}
PALETTE = np.array([[220, 40, 40], [250, 250, 250], [40, 160, 60], [20, 20, 20], [240, 200, 30], [60, 80, 220],
                    [150, 60, 180], [120, 120, 120]], dtype=np.uint8)  # code -> RGB


def draw(vq: np.ndarray, size: int = 16) -> bytes:
    """A token grid [N] as a PNG of `size` px: each code a block of its PALETTE colour."""
    from PIL import Image

    cell = size // GRID[0]
    pixels = PALETTE[vq.reshape(GRID)].repeat(cell, axis=0).repeat(cell, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tokenizer(folder: Path, seed: int = 0) -> Path:
    """A random VQ-VAE whose ids are this data set's: 16 px images, f4 -> 4 x 4 grid, K = 8."""
    torch.manual_seed(seed)
    VQVAE(VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), z_channels=8, embed_dim=4, num_embeddings=K,
                      norm_groups=8)).save(folder)
    return folder


def write_token_dataset(folder: Path, train: int = 200, test: int = 40, per_shard: int = 25, noise: float = 0.05,
                        seed: int = 0, first_uid: int = 0, images: bool = False,
                        frequency: tuple[float, ...] = (1, 1, 1, 1)) -> Path:
    """Write the data set (and its tokenizer in folder/tokenizer; with `images`, download/00000.tar too); each
    sample's pattern is drawn with probability proportional to its `frequency` (PATTERNS order)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = write_tokenizer(folder / "tokenizer")
    rng = np.random.default_rng(seed)
    captions = list(PATTERNS)
    clip = {c: tokenize([c])[0].numpy().astype(np.int32) for c in captions}
    splits = {}
    uid = first_uid
    download = None
    if images:
        (folder / "download").mkdir(exist_ok=True)
        download = tarfile.open(folder / "download" / "00000.tar", "w", format=tarfile.USTAR_FORMAT)
    for split, count in (("train", train), ("test", test)):
        shards = []
        for start in range(0, count, per_shard):
            name = f"{split}-{len(shards):06d}.tar"
            with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                n = min(per_shard, count - start)
                for _ in range(n):
                    # equal frequencies keep the uniform draw, so the other tests' data sets stay as they were
                    caption = captions[int(rng.integers(len(captions)) if len(set(frequency)) == 1 else
                                           rng.choice(len(captions), p=np.array(frequency) / sum(frequency)))]
                    vq = np.where(rng.random(N) < noise, rng.integers(0, K, N), PATTERNS[caption]).astype(np.uint16)
                    key = f"{uid:016x}"
                    uid += 1
                    sub = caption.split()[1]
                    meta = {"uid": uid, "split": split, "captions": FORMS[caption], "subcategory": sub,
                            "category": CATEGORY[sub], "concept": caption}
                    if download is not None:
                        for ext, data in (("png", draw(vq)), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                            _add(download, f"{key}.{ext}", data)
                    _add(tar, f"{key}.vq.npy", _npy(vq))
                    _add(tar, f"{key}.clip.npy", _npy(clip[caption]))
                    _add(tar, f"{key}.txt", caption.encode())
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
            shards.append({"name": name, "samples": n, "sha256": file_sha256(folder / name),
                           "bytes": (folder / name).stat().st_size})
        splits[split] = {"samples": count, "shards": shards}
    if download is not None:
        download.close()
    manifest = {
        "format": "vqd-shards/1",
        "recipe": {"name": "toy-patterns", "sha256": "0" * 64, "config": {}},
        "tokenizer": {"folder": str(tok_dir), "sha256": file_sha256(tok_dir / "model.safetensors"), "num_codes": K,
                      "grid": list(GRID), "image_size": 16},
        "text_tokenizer": {"name": "open_clip SimpleTokenizer (CLIP BPE)", "context_length": 77, "vocab_size": 49408},
        "splits": splits,
        "statistics": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder
