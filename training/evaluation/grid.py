"""Image grids a person can look at: pictures upscaled to a readable size, each with its caption under it."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vqd.errors import UserError


def captioned_grid(images: np.ndarray, captions: list[str], ncols: int = 8, cell: int = 128,
                   lines: int = 3) -> Image.Image:
    """uint8 [B, H, W, 3] + B captions -> one RGB image: a grid of `cell`-pixel pictures, captions wrapped below."""
    if len(images) != len(captions):
        raise UserError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, cell // 6)  # the default bitmap font is ~6 px a character
    ncols = max(1, min(ncols, len(images)))
    rows = -(-len(images) // ncols)
    pad, text_h = 4, lines * line_h + 4
    canvas = Image.new("RGB", (ncols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        r, c = divmod(i, ncols)
        x, y = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        # nearest-neighbour keeps the token grid's pixels sharp at small native sizes (32 px emoji)
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
        canvas.paste(picture, (x, y))
        wrapped = textwrap.wrap(caption, chars)[:lines]
        if len(textwrap.wrap(caption, chars)) > lines:
            wrapped[-1] = wrapped[-1][: chars - 3] + "..."
        for j, line in enumerate(wrapped):
            draw.text((x, y + cell + 2 + j * line_h), line, fill="black", font=font)
    return canvas


def image_grid(images, ncols: int = 8) -> np.ndarray:
    """uint8 [N, H, W, 3] (numpy or torch) -> one uint8 [rows*H, ncols*W, 3] grid, padded with white, no captions."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.full((rows * h, ncols * w, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return grid
