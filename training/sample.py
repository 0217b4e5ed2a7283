"""Text -> image from an exported model folder (it carries its text tower and tokenizer: nothing else is read), or
from a released model folder (diffusers' VQ-Diffusion pipeline layout, e.g. a copy of microsoft/vq-diffusion-ithq).

    python training/sample.py --model runs/emoji_base/export --prompt "red heart" --prompt "house" --out grid.png
    python training/sample.py --model runs/emoji_base/export --prompt "smiling cat" --steps 50 --guidance 3 --no-purity
    python training/sample.py --model DIR --prompt "red heart" --image in.png --mask mask.png --out inpaint.png
    python training/sample.py --model DIR --prompts prompts.txt --out-dir samples/     # 0000.png, 0001.png ...
    python training/sample.py --model /data/vq-diffusion-ithq --prompt "a teddy bear playing in the pool" --guidance 5

A grid shows each picture with its prompt under it (each prompt `--per-prompt` times). `--prompts FILE` (one
prompt a line) writes one PNG per line at the model's native resolution, numbered in file order, in
batches of `--batch`. Inpainting: white pixels of `--mask` are regenerated, the rest of `--image` is kept.
Class-conditional models take class names as prompts; unconditional models take `--count N` instead.
The sampling settings start at the model folder's own (its sampling.yaml); each flag given overrides one, and
the line printed first says what was used.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from training.core.sampling_flags import add_sampling_flags, sampling_settings, settings_source
from training.evaluation.grid import captioned_grid
from training.tokenizer.data import load_image
from vqd.errors import ArgumentParser, UserError, exit_on_user_error
from vqd.pipeline import TextToImage, to_uint8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported model folder (config.yaml, model.safetensors, tokenizer/) "
                                                  "or a released model folder (diffusers' VQ-Diffusion pipeline)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts", help="a text file of prompts, one a line (with --out-dir)")
    p.add_argument("--count", type=int, default=0, help="unconditional models: how many images")
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt in a grid")
    p.add_argument("--out", default="samples.png", help="the grid PNG")
    p.add_argument("--out-dir", help="one PNG per prompt, native resolution (with --prompts)")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image", help="inpainting: the image to edit")
    p.add_argument("--mask", help="inpainting: white = regenerate, black = keep (same aspect as --image)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for flag in ("prompts", "image", "mask"):  # read before the model is: a typo costs nothing
        path = getattr(args, flag)
        if path and (not Path(path).exists() or Path(path).is_dir()):
            raise UserError(f"--{flag} {path!r}: no such file")
    if bool(args.image) != bool(args.mask):
        raise UserError("inpainting needs both --image (the picture) and --mask (white: regenerate)")
    return args


def read_prompts(args: argparse.Namespace, condition: str) -> list[str]:
    """The prompts in order: --prompts FILE lines, then --prompt flags (or --count blanks when unconditional)."""
    prompts = []
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts += args.prompt
    if condition == "none":
        prompts = prompts or [""] * args.count
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts FILE" + (" or --count N" if condition == "none" else ""))
    return prompts


def load_rgb(path: str, size: int) -> torch.Tensor:
    """An image file -> float [3, size, size] in [-1, 1] (alpha on white, centre crop, bicubic)."""
    try:
        return load_image(Path(path).read_bytes(), size)
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise UserError(f"--image {path!r} is not an image this can read ({e})") from None


def load_mask(path: str, size: int) -> torch.Tensor:
    """A mask image -> Bool [size, size], True where it is light (to regenerate)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L").resize((size, size), Image.Resampling.NEAREST)
            return torch.from_numpy(np.asarray(im) > 127)
    except OSError as e:
        raise UserError(f"--mask {path!r} is not an image this can read ({e})") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = TextToImage.from_folder(args.model, device=args.device)  # not a model folder, a part missing: one line
    (config,) = sampling_settings(pipe, args)
    print(f"sampling: {config.describe(pipe.num_timesteps)} (defaults from {settings_source(pipe, args.model)}; "
          "flags override them)")
    if pipe.autoregressive and args.steps:
        print(f"note: --steps {args.steps} does not apply to a VQ-AR model (it draws its {pipe.model.grid[0] * pipe.model.grid[1]} "
              "tokens one by one)")
    prompts = read_prompts(args, pipe.model.config.condition)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if args.out_dir:  # evaluation at scale: one native-size PNG per line, in file order
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)

        for start in tqdm(range(0, len(prompts), args.batch), desc="sampling", unit="batch"):
            chunk = prompts[start:start + args.batch]
            for i, image in enumerate(to_uint8(pipe.generate(chunk, config, batch_size=args.batch, generator=generator))):
                Image.fromarray(image.numpy()).save(out / f"{start + i:04d}.png")
        print(f"{len(prompts)} images in {out}")
        return

    prompts = [p for p in prompts for _ in range(args.per_prompt)]
    labels = prompts if pipe.model.config.condition != "none" else ["(unconditional)"] * len(prompts)
    if args.image:
        image, mask = load_rgb(args.image, pipe.image_size), load_mask(args.mask, pipe.image_size)
        images = pipe.inpaint(prompts, image, mask, config, generator=generator, progress=True)
        kept = torch.where(mask[None], torch.full_like(image, -1.0), image)  # what the model was given
        images, labels = torch.cat([image[None], kept[None], images]), ["input", "kept (black: regenerate)", *labels]
    else:
        images = pipe.generate(prompts, config, batch_size=args.batch, generator=generator, progress=True)
    grid = captioned_grid(to_uint8(images).numpy(), labels, ncols=min(8, len(labels)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"{len(prompts)} images: {args.out}")


if __name__ == "__main__":
    exit_on_user_error(main)
