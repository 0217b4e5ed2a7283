"""Tiny test images and webdataset tars, built by code (img2dataset layout: {key}.png/.txt/.json)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(size: int = 24, seed: int = 0, mode: str = "RGB") -> bytes:
    """A blocky random image (coarse colour patches, so a tokenizer can learn it) as PNG bytes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    arr = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1), dtype=np.uint8))[:size, :size]
    im = Image.fromarray(arr[..., :4] if mode == "RGBA" else arr[..., :3], mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: str | Path, samples: dict[str, bytes], ext: str = "png",
              splits: dict[str, str] | None = None) -> Path:
    """One webdataset tar: for each key, {key}.{ext} + {key}.json (with `split` if given) + {key}.txt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, data in samples.items():
            meta = {"key": key, **({"split": splits[key]} if splits and key in splits else {})}
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", json.dumps(meta).encode()),
                                  (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return path


def write_dataset(folder: str | Path, n_tars: int = 2, per_tar: int = 32, size: int = 24) -> list[Path]:
    """n_tars good tars of `per_tar` blocky PNGs each, named train-000000.tar, ..."""
    folder = Path(folder)
    return [write_tar(folder / f"train-{t:06d}.tar",
                      {f"{t:03d}{i:05d}": png_bytes(size, seed=t * 1000 + i) for i in range(per_tar)})
            for t in range(n_tars)]


def truncated_tar(path: str | Path, good: dict[str, bytes], cut: int = 700) -> Path:
    """A tar cut short after `cut` bytes past its first member (a download that died)."""
    path = write_tar(path, good)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:512 + cut])
    return Path(path)
