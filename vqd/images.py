"""Images as every part of the project reads them (the encode stage, the tokenizer trainer, evaluation, the
prompt page), so that a tokenizer sees at encoding time exactly what it saw in training: which stored files
are images, how a stored image becomes a model input, and which keys are held out.

An image: decoded with a pixel cap read from its header (before any pixel is decoded), alpha (RGBA, LA,
palette transparency) composited on white, shorter side resized to `size` (bicubic), then a centre crop
(or a random one, for training), as float [3, size, size] in [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail (and be counted), not decode half-grey
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")  # a webdataset record's image keys, a file's suffixes
MAX_PIXELS = 4096 * 4096  # default cap: a 12 MP photo passes; 89.5 MP (PIL's own) is far beyond a 256 px pipeline


class TooManyPixels(ValueError):
    """An image whose header declares more pixels than allowed (a decompression bomb, or just too big)."""


def is_image_file(path) -> bool:
    """True for a file name with one of IMAGE_EXTS as its suffix (any case)."""
    return str(path).rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in str(path)


def record_image(record: dict) -> bytes | None:
    """The encoded image of a webdataset record (img2dataset's {key}.jpg / .png / ...), or None when it has none."""
    return next((record[ext] for ext in IMAGE_EXTS if ext in record), None)


def is_heldout(key: str, fraction: float) -> bool:
    """True for about `fraction` of keys: int(sha256(key)[:8 bytes]) mod 10000 < fraction * 10000 (stable everywhere)."""
    cut = round(fraction * 10000)
    return cut > 0 and int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10000 < cut


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PIL image of encoded bytes, refused from its header when larger than `max_pixels` (nothing decoded yet)."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # PIL's own guard (twice its limit) fires inside open()
        raise TooManyPixels(str(err)) from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise TooManyPixels(f"{w}x{h} pixels > {max_pixels}")
    return im


def to_rgb_on_white(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (emoji PNGs are mostly transparent)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(data: bytes, size: int, rng: random.Random | None = None, flip: bool = False,
               max_pixels: int = MAX_PIXELS):
    """Encoded bytes -> float [3, size, size] in [-1, 1]. Raises (OSError, ValueError...) on unreadable data."""
    import torch

    with open_image(data, max_pixels) as im:
        im.load()
        im = to_rgb_on_white(im)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if scale >= 1 else 3.0)
    if rng is not None:
        left, top = rng.randint(0, nw - size), rng.randint(0, nh - size)
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    if flip and rng is not None and rng.random() < 0.5:
        x = x.flip(2)
    return x
