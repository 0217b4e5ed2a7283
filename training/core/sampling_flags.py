"""The sampling flags of the programs that draw pictures (sample.py, evaluate.py, diagnose.py): each one, given,
overrides that field of the model folder's own settings (its sampling.yaml); left out, the folder's holds."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from vqd.io import SAMPLING_NAME
from vqd.pipeline import TextToImage
from vqd.sampling import SamplingConfig


def add_sampling_flags(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """--steps, --truncation, --guidance, --purity / --no-purity. With `sweep`, each takes several values and
    every combination is a setting to measure (`--purity on off` both ways; a bare `--purity` is on)."""
    many = "+" if sweep else None
    default = " (default: the model folder's sampling.yaml, else the paper's"
    p.add_argument("--steps", type=int, nargs=many, help=f"reverse steps{default}: all T)")
    p.add_argument("--truncation", type=float, nargs=many, help=f"keep the top-r probability mass, 1 = off{default}: 0.86)")
    p.add_argument("--guidance", type=float, nargs=many, help=f"classifier-free guidance scale, 1 = off{default}: 1)")
    if sweep:
        p.add_argument("--purity", nargs="*", choices=("on", "off"),
                       help=f"purity sampling: on, off, or both (a bare --purity is on){default}: off)")
        p.add_argument("--no-purity", dest="purity", action="store_const", const=["off"], help="purity sampling off")
    else:
        p.add_argument("--purity", action=argparse.BooleanOptionalAction, default=None,
                       help=f"purity sampling: reveal the most certain positions first{default}: off)")


def sampling_settings(pipe: TextToImage, args: argparse.Namespace) -> list[SamplingConfig]:
    """The settings the flags ask for over the folder's (pipe.sampling), each checked against the model: one,
    or every combination of a sweep's values, in flag order."""
    def values(flag):
        return [None] if flag is None else (list(flag) if isinstance(flag, list) else [flag])

    purity = args.purity
    if isinstance(purity, list):  # a sweep's on / off
        purity = [v == "on" for v in purity] or [True]
    out = []
    for steps, truncation, guidance, pure in itertools.product(values(args.steps), values(args.truncation),
                                                               values(args.guidance), values(purity)):
        config = pipe.sampling.override(steps=steps, truncation=truncation, guidance_scale=guidance, purity=pure)
        if not config.purity:
            config.max_reveal = None  # it bounds purity sampling's reveals only
        if pipe.autoregressive:
            config.steps = None  # a VQ-AR model draws its h*w tokens one by one
        pipe.validate(config)
        if config not in out:
            out.append(config)
    return out


def settings_source(pipe: TextToImage, folder: str) -> str:
    """Where the defaults came from, for the line each program prints."""
    if not (Path(folder) / SAMPLING_NAME).is_file():
        return f"the paper's: {folder} has no {SAMPLING_NAME}"
    return f"{Path(folder) / SAMPLING_NAME}: {pipe.sampling_chosen_by.get('how') or 'no record of how they were chosen'}"
